#!/usr/bin/env bash
# Installs moe-blocks (editable) and its dev tools into the current Python environment.
#
#   bash scripts/install.sh            the dev tools and libraries at the versions of
#                                      scripts/constraints.txt: what the suite last passed with
#   bash scripts/install.sh --latest   today's releases of all of them instead (not in CI)
#
# torch is not in the lock (users bring their own build): on a machine without torch, the CPU
# wheel is installed first, pinned, so pip takes it instead of resolving the open range in
# pyproject.toml to a multi-GB CUDA build; an existing torch is kept, and so is the triton it
# pins (CUDA builds do), which the lock's triton would contradict.
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
    "") latest=0 ;;
    --latest) latest=1 ;;
    *) echo "scripts/install.sh: unknown argument '$1' (expected nothing or --latest)" >&2; exit 2 ;;
esac
python -m pip install --quiet --upgrade pip >/dev/null 2>&1 || true
if ! python -c "import torch" >/dev/null 2>&1; then
    python -m pip install --quiet "torch==2.13.0"
fi
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
if ((latest)); then
    # every package at its latest release but torch, which stays the build that is installed
    python -c "import importlib.metadata as m; print('torch==' + m.version('torch'))" >"$constraints"
    python -m pip install --quiet --upgrade --upgrade-strategy eager -c "$constraints" -e ".[dev]"
    exit 0
fi
if python -c "import importlib.metadata as m, sys; sys.exit(not any(
        r.split(';')[0].strip().startswith(('triton', 'pytorch-triton'))
        for r in m.requires('torch') or []))"; then
    grep -v '^triton==' scripts/constraints.txt >"$constraints"
else
    cp scripts/constraints.txt "$constraints"
fi
python -m pip install --quiet -c "$constraints" -e ".[dev]"
