"""The floor plan of the flat layout: imports only go down, and nothing imports in a circle.

Every import of every top-level module is read with `ast` (imports inside functions too, since a
lazy import hides a circle rather than removing it) and checked against the plan:

    ground floor   boxes, data, model, rewards, runtime, scenes   (know nothing of the floors above)
    first floor    eval                                           (imports the ground floor only)
    second floor   sft, grpo                                      (the ground floor and eval)
    top            report, bench*                                 (anything)
"""
from __future__ import annotations

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GROUND = {"boxes", "data", "model", "rewards", "runtime", "scenes"}
# What each module may import from the project (a module not named here is on the top floor).
ALLOWED = {**{name: GROUND for name in GROUND}, "eval": GROUND,
           "sft": GROUND | {"eval"}, "grpo": GROUND | {"eval"}}


def project_modules(root: str = ROOT) -> list[str]:
    return sorted(f[:-3] for f in os.listdir(root) if f.endswith(".py"))


def imported_modules(path: str, project: set[str]) -> set[str]:
    """The project modules a file imports anywhere in it (top level, functions, branches)."""
    tree = ast.parse(open(path).read(), filename=path)
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & project


def import_graph(root: str = ROOT) -> dict[str, set[str]]:
    project = set(project_modules(root))
    return {m: imported_modules(os.path.join(root, m + ".py"), project) - {m} for m in project}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as a list of modules (first == last), or None (depth-first search)."""
    state: dict[str, str] = {}  # "open" while on the current path, "done" after

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt, node]
            if nxt not in state:
                cycle = visit(nxt, path + [nxt])
                if cycle:
                    return cycle
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state:
            cycle = visit(start, [start])
            if cycle:
                return cycle
    return None


def test_no_import_circles():
    assert find_cycle(import_graph()) is None, f"import circle: {' -> '.join(find_cycle(import_graph()))}"


@pytest.mark.parametrize("module", project_modules())
def test_imports_follow_the_floor_plan(module):
    imports = import_graph()[module]
    if module in ALLOWED:
        assert imports <= ALLOWED[module], f"{module}.py imports {sorted(imports - ALLOWED[module])} from above"


def test_the_checker_sees_circles_and_lazy_imports(tmp_path):
    """The checks above could pass by seeing nothing: a planted lazy circle must be found."""
    (tmp_path / "data.py").write_text("import os\n\ndef f():\n    from model import X\n")
    (tmp_path / "model.py").write_text("import data\n")
    (tmp_path / "runtime.py").write_text("def g():\n    import eval as evaluation\n")
    graph = import_graph(str(tmp_path))
    assert graph["data"] == {"model"} and graph["runtime"] == set()  # eval.py is not in tmp_path
    assert find_cycle(graph) in (["data", "model", "data"], ["model", "data", "model"])
    (tmp_path / "eval.py").write_text("")
    assert not import_graph(str(tmp_path))["runtime"] <= ALLOWED["runtime"]
