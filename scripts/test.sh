#!/usr/bin/env bash
# Installs moe-blocks with its dev tools, then runs the linter, the test suite (the Triton
# backend through the Triton interpreter when there is no GPU) and the benchmark suites once
# with tiny shapes and timing disabled.
#
#   bash scripts/test.sh            with the versions locked in scripts/constraints.txt (CI)
#   bash scripts/test.sh --latest   with today's releases (in a fresh virtualenv; not in CI);
#                                   when everything passes, it rewrites scripts/constraints.txt
#                                   with the versions it ran: commit that to move the lock
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh "$@"
python - <<'PY'
import importlib.metadata as m
names = ["torch", "triton", "transformers", "kernels", "numpy", "pytest", "hypothesis",
         "pytest-benchmark", "ruff", "safetensors", "setuptools"]
def version(name):
    try:
        return m.version(name)
    except m.PackageNotFoundError:
        return "-"
print("versions:", ", ".join(f"{name} {version(name)}" for name in names), flush=True)
PY
python -m ruff check .
python -m ruff format --check .
python -m pytest -ra tests
MOE_BLOCKS_BENCH_SIZE=tiny python -m pytest -q benches --benchmark-disable
if [[ "${1:-}" == --latest ]]; then
    python - <<'PY'
import datetime, platform, subprocess, sys
frozen = subprocess.run(
    [sys.executable, "-m", "pip", "freeze", "--exclude-editable"],
    check=True, capture_output=True, text=True,
).stdout.split()
python = f"{sys.version_info.major}.{sys.version_info.minor}"
lines = [
    "# The versions `bash scripts/test.sh` installs: the whole environment of the last passing",
    f"# `bash scripts/test.sh --latest` ({datetime.date.today()}, CPython {platform.python_version()},"
    f" {platform.machine()}), which wrote this file.",
    "# torch is left out (users bring their own build; scripts/install.sh says which it installs).",
    "# Pinned for the Python it ran on: on another, pip resolves the ranges of pyproject.toml.",
]
lines += [f'{pin}; python_version == "{python}"' for pin in frozen
          if pin.split("==")[0].lower() != "torch"]
open("scripts/constraints.txt", "w").write("\n".join(lines) + "\n")
print(f"scripts/constraints.txt: {len(lines) - 4} versions locked for Python {python}")
PY
fi
