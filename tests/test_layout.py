"""The rooms of models/ import one way (README "Layout"): kernels <- moe_blocks <- the JetMoE
model <- the applications (train, bench) <- the CLI, and inside train/ and bench/ each module
only the ones before it; checked on the source, every import (lazy ones too)."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ORDER = {  # each room may import only the rooms before it in its list
    "train": ["settings", "tokens", "data", "lora", "run_folder", "continual", "sample", "report",
              "loop", "distributed", "run"],
    "bench": ["cases", "baselines", "measure", "ep", "report"],
}  # fmt: skip
LAYERS = [  # (folder, what it may not import)
    ("kernels", ("moe_blocks", "models", ".models")),
    ("moe_blocks", ("moe_blocks.models", ".models")),
    ("models/jetmoe", ("moe_blocks.models.train", "moe_blocks.models.bench", "..train", "..bench",
                       "..cli", "moe_blocks.models.cli")),
]  # fmt: skip


def _imports(path: Path) -> list[str]:
    """Every module ``path`` imports, relative ones with their leading dots."""
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module is None:  # from . import room
            names += ["." * node.level + alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names.append("." * node.level + node.module)
        elif isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
    return names


@pytest.mark.parametrize("package", ORDER)
def test_each_room_imports_only_the_rooms_before_it(package):
    rooms = ORDER[package]
    folder = ROOT / "models" / package
    assert sorted(p.stem for p in folder.glob("*.py") if p.stem != "__init__") == sorted(rooms)
    for index, room in enumerate(rooms):
        for name in _imports(folder / f"{room}.py"):
            if name.startswith(".") and not name.startswith(".."):
                target = name.lstrip(".").split(".")[0]
                assert target in rooms[:index], f"{package}/{room}.py imports .{target}"


@pytest.mark.parametrize(("folder", "forbidden"), LAYERS)
def test_no_layer_imports_one_above_it(folder, forbidden):
    for path in (ROOT / folder).rglob("*.py"):
        if path.name == "__main__.py":  # python -m moe_blocks: the command line's entry point
            continue
        for name in _imports(path):
            if folder == "kernels" and name.startswith("moe_blocks.kernels"):
                continue
            assert not name.startswith(forbidden), f"{path.relative_to(ROOT)} imports {name}"
