"""What a checkout's top-level ``kernels/`` and ``models/`` folders do when imported by those names.

Installed, the two folders are ``moe_blocks.kernels`` and ``moe_blocks.models``. A Python process
started in the repository root (``python -m pytest``, ``python -c``) has the root on ``sys.path``
ahead of site-packages, so ``import kernels`` would find our folder before the PyPI package of
that name, which transformers >= 5.25 requires and imports (``from kernels import
CUDAProperties``). Imported by its top-level name, each folder therefore hands over to the
installed package of that name, found on ``sys.path`` without the checkout root, or raises the
``ModuleNotFoundError`` the process would get without the checkout. See docs/testing.md.

Standard library only: this runs while another package (transformers) is being imported.
"""

import importlib.machinery
import importlib.util
import os
import sys


def _spec_elsewhere(name: str, folder: str):
    """The import spec of top-level ``name`` from every finder, with the checkout root (the
    parent of our ``folder``) left off ``sys.path`` and any spec inside ``folder`` skipped. (A
    virtualenv inside the checkout, ``.venv/``, is not ours: only the folder is.)"""
    checkout_root = os.path.dirname(folder)

    def ours(location: str | None) -> bool:
        return location is not None and os.path.realpath(location).startswith(folder + os.sep)

    path = [entry for entry in sys.path if os.path.realpath(entry or os.getcwd()) != checkout_root]
    for finder in sys.meta_path:
        find_spec = getattr(finder, "find_spec", None)
        if find_spec is None:
            continue
        search = path if finder is importlib.machinery.PathFinder else None
        try:
            spec = find_spec(name, search)
        except (ImportError, ValueError):
            continue
        if spec is not None and not ours(spec.origin):
            return spec
    return None


def hand_over(name: str, init_file: str) -> None:
    """Make ``sys.modules[name]`` the installed package ``name`` instead of the checkout's folder
    whose ``__init__.py`` is ``init_file`` (and which is being imported now): Python's import
    statement returns whatever ``sys.modules[name]`` holds once that ``__init__`` has run."""
    spec = _spec_elsewhere(name, os.path.dirname(os.path.realpath(init_file)))
    if spec is None or spec.loader is None:
        raise ModuleNotFoundError(f"No module named {name!r}", name=name)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
