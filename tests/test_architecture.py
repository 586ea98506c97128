"""The package tree is the architecture: imports point one way, from the core outward.

Layers (an arrow means "may import"): core <- models, lora, data <- pruning, fleet <- training
<- strategies, clients <- round, engine, deploy <- reporting, cli. A module may import its own
layer or lower ones, never a higher one, and never through a function-level import of an
internal module (which would hide a cycle).
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {
    "fedtune.core": 0,
    "fedtune.tracking": 1,
    "fedtune.models": 1, "fedtune.lora": 1, "fedtune.data": 1,
    "fedtune.pruning": 2, "fedtune.fleet": 2,
    "fedtune.training": 3,
    "strategies": 4, "clients": 4,
    "fedtune.round": 5, "fedtune.engine": 5, "fedtune.deploy": 5,
    "fedtune.reporting": 6, "fedtune.cli": 6, "fedtune.__main__": 6, "fedtune": 6,
}
PACKAGES = ("fedtune", "strategies", "clients")
# Function-level imports that load lazily on purpose (none of them dodges a cycle: each points down).
LAZY = {
    "fedtune.cli": "each command imports only what it runs (`fedtune certs` starts no torch)",
    "fedtune.engine.simulation": "Ray and Flower are imported after the run's environment is set",
    "clients.app": "a per-message ClientApp process stays light when a node's worker trains",
    "clients.worker": "the ClientApp side of the worker must not import torch",
}


def layer_of(module: str) -> int | None:
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in LAYERS:
            return LAYERS[".".join(parts[:n])]
    return None


def modules() -> list[tuple[str, Path]]:
    out = []
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            rel = path.relative_to(ROOT).with_suffix("")
            name = ".".join(p for p in rel.parts if p != "__init__")
            out.append((name, path))
    return out


def imports(path: Path) -> list[tuple[str, int, bool]]:
    """(imported module, line, inside a function) for every internal import."""
    tree = ast.parse(path.read_text())
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                names = [child.module]
            elif isinstance(child, ast.Import):
                names = [a.name for a in child.names]
            else:
                names = []
            for name in names:
                if name.split(".")[0] in PACKAGES:
                    found.append((name, child.lineno, in_function))
            visit(child, nested)

    visit(tree, False)
    return found


def test_every_module_has_a_layer():
    missing = [name for name, _ in modules() if layer_of(name) is None]
    assert not missing, f"modules outside every layer (add them to LAYERS): {missing}"


@pytest.mark.parametrize("name,path", modules(), ids=[n for n, _ in modules()])
def test_imports_point_one_way(name, path):
    mine = layer_of(name)
    wrong = [f"{path.relative_to(ROOT)}:{line} imports {target} (layer {layer_of(target)} > {mine})"
             for target, line, _ in imports(path) if (layer_of(target) or 0) > mine]
    hidden = [f"{path.relative_to(ROOT)}:{line} imports {target} inside a function"
              for target, line, in_function in imports(path) if in_function and name not in LAZY]
    assert not wrong and not hidden, "\n".join(wrong + hidden)


def test_the_check_catches_an_arrow_the_wrong_way(tmp_path):
    """The test itself can fail: a core module importing the round loop is flagged."""
    bad = tmp_path / "bad.py"
    bad.write_text("from fedtune.round.loop import run_server\n\ndef f():\n    import strategies.base\n")
    found = imports(bad)
    assert ("fedtune.round.loop", 1, False) in found and ("strategies.base", 4, True) in found
    assert layer_of("fedtune.round.loop") > layer_of("fedtune.core.config")
