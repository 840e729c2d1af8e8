"""Run mutmut on kernels/ and moe_blocks/ with the fast tests that cover them.

    python scripts/mutation/mutmut_run.py                 # fresh run in runs/mutmut/
    python scripts/mutation/mutmut_run.py --resume        # continue or re-report that run
    python scripts/mutation/mutmut_run.py --retest-survivors  # after adding tests

mutmut names each mutant after the module path of its file, and the tests import the kernels as
``moe_blocks.kernels`` (``kernels/`` is installed there, pyproject.toml ``package-dir``). So the
run happens in a staging folder that holds the installed layout: the working tree copied there,
``kernels/`` copied to ``moe_blocks/kernels/``. mutmut then reads ``[tool.mutmut]`` of the staged
pyproject.toml, whose paths are those of that layout. The last lines printed are the counts per
outcome; ``runs/mutmut/survivors.md`` lists every surviving mutant with its diff, to be judged.

Needs mutmut 3.x (``pip install -e ".[mutation]"``) and Python >= 3.11. Not run in CI (time): see
docs/testing.md for the last run, what it covered and how long it took.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from planted import ROOT, install_in_place, working_tree_copy

STAGE = ROOT / "runs" / "mutmut"


def mutmut(*arguments: str, stage: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mutmut", *arguments], cwd=stage, env=env, text=True,
        capture_output=True,
    )  # fmt: skip


def survivors_report(stage: Path, env: dict) -> tuple[list[str], str]:
    """The surviving mutants' names and a markdown page with each one's diff."""
    listed = mutmut("results", stage=stage, env=env).stdout
    names = [line.split(":")[0].strip() for line in listed.splitlines() if ": survived" in line]
    sections = [f"# {len(names)} surviving mutants\n"]
    for name in names:
        diff = mutmut("show", name, stage=stage, env=env).stdout.strip()
        sections.append(f"## {name}\n\n```diff\n{diff}\n```\n")
    return names, "\n".join(sections)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--resume", action="store_true", help="keep the staged run's results")
    parser.add_argument(
        "--retest-survivors", action="store_true",
        help="copy the working tree's tests and pyproject.toml into the staged run, then run "
        "only the mutants that survived it",
    )  # fmt: skip
    parser.add_argument("--max-children", type=int, default=os.cpu_count() or 2)
    args = parser.parse_args(argv)
    env = dict(os.environ)
    env.setdefault("HYPOTHESIS_PROFILE", "default")
    names: list[str] = []
    if args.retest_survivors:
        names, _ = survivors_report(STAGE, env)
        for folder in (STAGE, STAGE / "mutants"):
            shutil.copytree(ROOT / "tests", folder / "tests", dirs_exist_ok=True)
            shutil.copy2(ROOT / "pyproject.toml", folder / "pyproject.toml")
    elif not args.resume and STAGE.exists():
        shutil.rmtree(STAGE)
    if not STAGE.exists():
        working_tree_copy(STAGE)
        install_in_place(STAGE)
    started = time.perf_counter()
    run = subprocess.run(
        [sys.executable, "-m", "mutmut", "run", "--max-children", str(args.max_children), *names],
        cwd=STAGE, env=env,
    )  # fmt: skip
    minutes = (time.perf_counter() - started) / 60
    if run.returncode != 0:
        print(f"mutmut run failed with exit status {run.returncode}")
        return run.returncode
    mutmut("export-cicd-stats", stage=STAGE, env=env)
    stats = json.loads((STAGE / "mutants" / "mutmut-cicd-stats.json").read_text())
    names, page = survivors_report(STAGE, env)
    (STAGE / "survivors.md").write_text(page)
    print(f"mutmut: {minutes:.1f} min with {args.max_children} workers; {json.dumps(stats)}")
    print(f"{len(names)} survivors, with their diffs: {STAGE / 'survivors.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
