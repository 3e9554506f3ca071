"""The import graph of the library points down and has no cycles; the maths never imports Ray.

Layers, lowest first (docs/design.md#import-direction): a module may import its own layer or a lower one.
The check parses every module's imports (module level and inside functions) with ``ast``.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

LIB = Path(__file__).resolve().parents[1] / "ptmst_ray"

LAYERS = [
    {"vocab", "storage", "device", "tensorio", "lease"},
    {"config"},
    {"layout"},
    {"models"},
    {"data", "trajectories"},
    {"distill", "evaluate"},
    {"stages"},
    {"orchestration", "cluster"},
]
PURE = ("models", "trajectories", "distill", "evaluate", "stages")
"""Packages that never import Ray (the Ray layer schedules them): data may, for its optional decoding pool."""


def _module_name(path: Path) -> str:
    parts = path.relative_to(LIB.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return found


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in LIB.rglob("*.py")}
    return {m: {i for i in _imports(p) if i in modules and i not in (m, "ptmst_ray")} for m, p in modules.items()}


def _layer(module: str) -> int:
    top = module.split(".")[1] if "." in module else ""
    for i, names in enumerate(LAYERS):
        if top in names:
            return i
    raise AssertionError(f"{module}: not in any layer of tests/test_architecture.py; add it")


def test_every_import_points_down():
    bad = [f"{m} (layer {_layer(m)}) imports {i} (layer {_layer(i)})"
           for m, deps in _graph().items() if m != "ptmst_ray" for i in deps if _layer(i) > _layer(m)]
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_no_import_cycles():
    graph = _graph()
    # package __init__ modules are namespaces (docstrings only): an edge to one is not a dependency
    graph = {m: {i for i in deps if not (LIB / Path(*i.split(".")[1:]) / "__init__.py").is_file()}
             for m, deps in graph.items()}
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in graph.get(m, ()):
            if state.get(d) == 1:
                pytest.fail("import cycle: " + " -> ".join(path[path.index(d):] + [d]) if d in path else d)
            if d not in state:
                visit(d, path + [d])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [m])


@pytest.mark.parametrize("package", PURE)
def test_maths_and_stages_never_import_ray(package):
    users = [str(p.relative_to(LIB)) for p in (LIB / package).rglob("*.py")
             if any(i == "ray" or i.startswith("ray.") for i in _imports(p))]
    assert not users, f"{package} must stay free of Ray: {users}"


def test_no_private_name_crosses_modules():
    """``from ptmst_ray.x import _name`` from another module is a private name used outside its home."""
    bad = []
    for p in list(LIB.rglob("*.py")) + list((LIB.parent / "cli").rglob("*.py")):
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(("ptmst_ray", "ptmst_ray_cli")):
                bad += [f"{p.name}: {node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
    assert not bad, bad


def test_a_phase_launcher_imports_no_torch():
    """A phase's launcher task imports orchestration.phases (it builds the Train run, blocks on fit() and reads the
    checkpoints' scalars after it) and never torch: a second of CPU in every launcher process."""
    code = ("import sys, ptmst_ray.orchestration.phases, ptmst_ray.tensorio; "
            "print(sorted(m for m in ('torch', 'safetensors.torch', 'open_clip') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=LIB.parent)
    assert out.stdout.strip() == "[]", out.stdout
