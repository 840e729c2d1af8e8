"""Plant known bugs, one at a time, in a temporary copy of the working tree and check that the
tests named for each one fail.

    python scripts/mutation/planted.py             # every patch in scripts/mutation/planted/
    python scripts/mutation/planted.py tile_offset moa_aux_loss   # some of them, by name
    python scripts/mutation/planted.py --list

Each ``planted/<name>.patch`` is a ``git diff`` preceded by a header::

    Bug: what the patch breaks, in words
    Killed by: tests/test_file.py::test_name      (one line per test; pytest node ids)

For every patch the script copies the working tree (tracked and untracked, not ignored files)
to a temporary folder, applies the patch with ``git apply``, completes the packages there as an
install would lay them out (``kernels/`` also as ``moe_blocks/kernels/``), and runs the named
tests in that folder, which comes first on ``PYTHONPATH``: neither the checkout nor its editable
install is imported instead of the patched copy, in the tests or in processes they start. A
bug is *killed* when a named test fails (pytest stops at the first, ``-x``; Hypothesis would
spend minutes shrinking each failure) or the test process dies of a signal (a segmentation
fault in the Triton interpreter). First the named tests run once on the
unpatched copy and must all pass (``--no-baseline`` skips that). The exit status is 0 when every
bug was killed.

Needs Python >= 3.11 (tomllib). Neither this script nor mutmut runs in CI (time): see
docs/testing.md for the last results.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[2]
PATCHES = Path(__file__).resolve().parent / "planted"
TIMEOUT_S = 900


@dataclass(frozen=True)
class PlantedBug:
    name: str
    description: str
    tests: tuple[str, ...]
    diff: str

    @classmethod
    def read(cls, path: Path) -> PlantedBug:
        text = path.read_text()
        header, marker, rest = text.partition("diff --git ")
        if not marker:
            raise ValueError(f"{path}: no 'diff --git' section")
        description = re.findall(r"^Bug:\s*(.+)$", header, re.MULTILINE)
        tests = re.findall(r"^Killed by:\s*(\S+)\s*$", header, re.MULTILINE)
        if len(description) != 1 or not tests:
            raise ValueError(f"{path}: the header needs one 'Bug:' line and 'Killed by:' lines")
        return cls(path.stem, description[0], tuple(tests), marker + rest)


def working_tree_copy(destination: Path) -> Path:
    """Copy the files git would see (tracked or untracked, not ignored) into ``destination``."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, check=True, capture_output=True,
    ).stdout.decode().split("\0")  # fmt: skip
    for relative in filter(None, listed):
        source = ROOT / relative
        if source.is_file():
            target = destination / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    return destination


def install_in_place(tree: Path) -> None:
    """Complete the packages of ``tree`` as ``pip install`` would lay them out
    (``[tool.setuptools] package-dir`` of pyproject.toml: ``kernels/`` is copied to
    ``moe_blocks/kernels/``), so that ``import moe_blocks`` from ``tree`` loads the copy, in
    the tests and in any process they start, and never the checkout's editable install."""
    config = tomllib.loads((tree / "pyproject.toml").read_text())["tool"]["setuptools"]
    for package, source in config["package-dir"].items():
        target = tree / package.replace(".", "/")
        if (tree / source).resolve() != target.resolve():
            shutil.copytree(tree / source, target, dirs_exist_ok=True)


def run_tests(tree: Path, tests: tuple[str, ...]) -> tuple[int, list[str], str]:
    """Run ``tests`` in ``tree`` against its own packages: (exit status, failed ids, output).
    The status is pytest's, or minus the signal that ended it, or 124 on a timeout."""
    install_in_place(tree)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONPATH": str(tree)}
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-rf", "-p", "no:cacheprovider", *tests]
    try:
        result = subprocess.run(
            command, cwd=tree, env=env, capture_output=True, text=True, timeout=TIMEOUT_S
        )
    except subprocess.TimeoutExpired:
        return 124, [], f"timed out after {TIMEOUT_S} s"
    output = result.stdout + result.stderr
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", output, re.MULTILINE)
    return result.returncode, failed, output


def try_bug(bug: PlantedBug | None, tests: tuple[str, ...]) -> tuple[int, list[str], str]:
    """Run ``tests`` on a fresh copy of the working tree with ``bug`` applied (None: unpatched);
    as :func:`run_tests`, with status 128 when the patch does not apply."""
    with tempfile.TemporaryDirectory(prefix="planted_") as scratch:
        tree = working_tree_copy(Path(scratch) / "tree")
        if bug is not None:
            applied = subprocess.run(
                ["git", "apply", "-"], cwd=tree, input=bug.diff, capture_output=True, text=True
            )
            if applied.returncode != 0:
                return 128, [], f"the patch does not apply: {applied.stderr.strip()}"
        return run_tests(tree, tests)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="patch names (default: all)")
    parser.add_argument("--list", action="store_true", help="list the bugs and their tests")
    parser.add_argument("--no-baseline", action="store_true", help="skip the unpatched run")
    args = parser.parse_args(argv)
    bugs = [PlantedBug.read(path) for path in sorted(PATCHES.glob("*.patch"))]
    unknown = set(args.names) - {bug.name for bug in bugs}
    if unknown:
        parser.error(f"unknown patch names: {', '.join(sorted(unknown))}")
    if args.names:
        bugs = [bug for bug in bugs if bug.name in args.names]
    if args.list:
        for bug in bugs:
            print(f"{bug.name}: {bug.description}\n    " + "\n    ".join(bug.tests))
        return 0

    if not args.no_baseline:
        every_test = tuple(dict.fromkeys(test for bug in bugs for test in bug.tests))
        status, failed, output = try_bug(None, every_test)
        if status != 0:
            print(output[-6000:])
            print(f"baseline: the named tests do not all pass unpatched (exit {status}): {failed}")
            return 2
        print(f"baseline: {len(every_test)} named tests pass on the unpatched tree")

    survivors = []
    for bug in bugs:
        started = time.perf_counter()
        status, failed, output = try_bug(bug, bug.tests)
        seconds = time.perf_counter() - started
        if status == 1 and failed:
            print(f"killed   {bug.name} ({seconds:.0f} s) by {failed[0]}")
            continue
        if status < 0:
            print(f"killed   {bug.name} ({seconds:.0f} s): the tests died of signal {-status}")
            continue
        survivors.append(bug.name)
        reason = "every named test passed" if status == 0 else f"exit status {status}"
        print(f"SURVIVED {bug.name} ({seconds:.0f} s): {reason}\n{output[-3000:]}")
    print(f"{len(bugs) - len(survivors)} of {len(bugs)} planted bugs killed")
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
