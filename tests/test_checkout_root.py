"""A process started in the repository root has the root on ``sys.path`` ahead of site-packages.
Our top-level ``kernels/`` and ``models/`` folders (installed as ``moe_blocks.kernels`` and
``moe_blocks.models``) must not shadow installed packages of those names there: transformers
>= 5.25 imports the PyPI package ``kernels`` (kernels/_checkout.py)."""

import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_in_root(code: str, pythonpath: Path | None = None) -> subprocess.CompletedProcess:
    """``python -c code`` started in the repository root, as ``python -m pytest`` is."""
    env = None if pythonpath is None else os.environ | {"PYTHONPATH": str(pythonpath)}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


@pytest.mark.parametrize("where", ["elsewhere", "in a virtualenv inside the checkout"])
@pytest.mark.parametrize("name", ["kernels", "models"])
def test_an_installed_package_of_a_top_level_folders_name_is_the_one_imported(name, where):
    """An installed package named like our folder, with a submodule and a relative import, is
    what ``import NAME`` gives in the root: its own attributes, its own submodules; also when
    it is installed under the checkout (``python -m venv .venv`` in a fresh clone)."""
    parent = ROOT if where.startswith("in a") else None
    with tempfile.TemporaryDirectory(prefix=".venv-test-", dir=parent) as site:
        _check_installed_package_is_imported(name, Path(site))


def _check_installed_package_is_imported(name: str, tmp_path: Path) -> None:
    package = tmp_path / name
    package.mkdir()
    token = f"installed-{name}-{tmp_path.name}"
    (package / "__init__.py").write_text(f"from .sub import VALUE\nMARKER = {token!r}\n")
    (package / "sub.py").write_text("VALUE = 42\n")
    result = run_in_root(
        f"""
        import {name}, {name}.sub
        print({name}.MARKER, {name}.VALUE, {name}.sub.__file__)
        """,
        pythonpath=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    marker, value, sub_file = result.stdout.split()
    assert (marker, value) == (token, "42")
    assert Path(sub_file).resolve() == (package / "sub.py").resolve()


@pytest.mark.parametrize("name", ["kernels", "models"])
def test_without_an_installed_package_the_import_fails_as_without_the_checkout(name):
    result = run_in_root(
        f"""
        import sys
        sys.path[:] = [p for p in sys.path if "-packages" not in p]
        try:
            import {name}
        except ModuleNotFoundError as error:
            assert error.name == {name!r}, error.name
            assert {name!r} not in sys.modules
            print("not found")
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "not found"


def test_transformers_imports_from_the_root_and_the_kernel_package_is_still_ours():
    """transformers (which imports ``kernels`` when that package is installed, and requires it
    from 5.25 on) imports in the root beside moe_blocks, whose kernel package is unchanged and
    loaded once: no module of our kernels/ folder under any other name (its torch.library ops
    registered twice corrupt the dispatcher)."""
    result = run_in_root(
        f"""
        import sys
        from pathlib import Path
        import transformers
        from transformers import JetMoeForCausalLM, MixtralForCausalLM
        import moe_blocks.kernels
        from moe_blocks.kernels import expert_linear, plan_dispatch
        folder = Path({str(ROOT / "kernels")!r})
        def from_folder(module):
            file = getattr(module, "__file__", None)
            return file is not None and folder in Path(file).resolve().parents
        ours = sorted(name for name, module in list(sys.modules.items()) if from_folder(module))
        assert ours and all(name.startswith("moe_blocks.kernels") for name in ours), ours
        try:
            import kernels
        except ModuleNotFoundError:
            print("no installed kernels")
        else:
            assert folder not in Path(kernels.__file__).resolve().parents, kernels.__file__
            print("installed kernels")
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() in {"installed kernels", "no installed kernels"}
