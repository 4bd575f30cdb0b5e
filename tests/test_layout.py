"""The package layout: imports run one way along the data flow, with no cycles, and nothing
imports the package ``__init__``. (The former module line cap is gone: ruff's complexity check,
configured in pyproject.toml and run by .ci/run, keeps functions readable instead.)"""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "sklearn_crb"

#: Floors of the data flow; a module may import only from its own floor or below.
FLOORS = [
    ("sklearn_crb._version", "sklearn_crb._atomic"),
    ("sklearn_crb.physics.parameters",),
    ("sklearn_crb._validation", "sklearn_crb.physics.priors", "sklearn_crb.physics.sequence"),
    ("sklearn_crb.physics.r2sl", "sklearn_crb.physics._numba", "sklearn_crb.physics.signal", "sklearn_crb.physics"),
    ("sklearn_crb.crb",),
    ("sklearn_crb.basis",),
    # the model arguments (sequence, basis, estimate, fixed) the simulator and the estimators resolve alike
    ("sklearn_crb._model", "sklearn_crb.noise", "sklearn_crb.simulator", "sklearn_crb.parallel_simulation"),
    # the CRB metrics are pure functions of (y_true, y_pred, crb); the estimators' score() uses them
    ("sklearn_crb.metrics", "sklearn_crb._report"),
    ("sklearn_crb.estimators", "sklearn_crb.network"),
    ("sklearn_crb.phantom", "sklearn_crb.io", "sklearn_crb.maps", "sklearn_crb.pretrained"),
    ("sklearn_crb.viz", "sklearn_crb.report"),
    ("sklearn_crb.recipes",),
    ("sklearn_crb.demo",),
    ("sklearn_crb.cli",),
]


def _module_name(path):
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _floor(name):
    best = None
    for i, prefixes in enumerate(FLOORS):
        for p in prefixes:
            if name == p or name.startswith(p + "."):
                if best is None or len(p) > best[1]:
                    best = (i, len(p))
    return None if best is None else best[0]


MODULES = sorted(p for p in PKG.rglob("*.py"))


def _imports(path):
    """(module-level imports, all imports) of package modules, as dotted names."""
    tree = ast.parse(path.read_text())
    top, every = set(), set()
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.ImportFrom):
            if node.level:
                names = [f"<relative import in {path.name}>"]
            elif node.module and node.module.startswith("sklearn_crb"):
                names = [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.startswith("sklearn_crb")]
        every.update(names)
        if node in tree.body:
            top.update(names)
    return top, every, tree


@pytest.mark.parametrize("path", MODULES, ids=lambda p: _module_name(p))
def test_no_module_imports_the_package_init(path):
    if path == PKG / "__init__.py":
        return
    _, every, tree = _imports(path)
    assert "sklearn_crb" not in every, f"{path} imports the package __init__"
    assert not any(n.startswith("<relative") for n in every), f"{path} uses a relative import"
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "__import__"]
    assert not calls, f"{path} calls __import__"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: _module_name(p))
def test_imports_run_down_the_flow(path):
    name = _module_name(path)
    if name == "sklearn_crb":
        return
    me = _floor(name)
    assert me is not None, f"{name} has no floor in tests/test_layout.py::FLOORS"
    _, every, _ = _imports(path)
    for dep in every:
        f = _floor(dep)
        assert f is not None, f"{name} imports {dep}, which has no floor"
        assert f <= me, f"{name} (floor {me}) imports {dep} (floor {f}) from further down the flow"


def test_module_level_imports_are_acyclic():
    graph = {}
    for path in MODULES:
        top, _, _ = _imports(path)
        graph[_module_name(path)] = {d for d in top if d != "sklearn_crb"}
    state = {}

    def visit(n, stack):
        if state.get(n) == 1:
            raise AssertionError("import cycle: " + " -> ".join(stack + [n]))
        if state.get(n) == 2:
            return
        state[n] = 1
        for d in graph.get(n, ()):
            visit(d, stack + [n])
        state[n] = 2

    for n in graph:
        visit(n, [])

