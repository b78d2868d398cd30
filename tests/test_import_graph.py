"""The rooms of core/ (tools/relayout.py's module map) import one another
one way only: the graph of core's sub-packages and core.api, drawn from every import (functions
included), has no cycle, and no room imports a module at the top of core/ but core.api (the
commands, core/run.py, core/gap.py, core/cli.py, ..., sit on top beside core.api)."""

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CORE = ROOT / "core"


def _imports(path: Path):
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module
            for alias in node.names:
                yield node.lineno, f"{node.module}.{alias.name}"


ROOMS = sorted(p.name for p in CORE.iterdir() if (p / "__init__.py").is_file())
TOP = sorted(p.stem for p in CORE.glob("*.py") if p.stem != "__init__")


def _node(module: str):
    """The room (core.<package>), core.api or another top-level module a module is in."""
    parts = module.split(".")
    if parts[0] != "core" or len(parts) < 2:
        return None
    return "core." + parts[1] if parts[1] in ROOMS or parts[1] in TOP else None


def _graph():
    edges = defaultdict(dict)
    for path in sorted(CORE.rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        src = _node(".".join(rel.parts))
        if src is None or src.split(".")[1] not in ROOMS and src != "core.api":
            continue
        for line, name in _imports(path):
            dst = _node(name)
            if dst is not None and dst != src:
                edges[src].setdefault(dst, f"{path.relative_to(ROOT)}:{line} imports {name}")
    return edges


def test_core_has_rooms():
    assert {"base", "host", "data", "diffusion", "export", "evaluation", "train",
            "pipeline"} <= set(ROOMS), ROOMS


def test_no_room_imports_the_modules_at_the_top_but_core_api():
    bad = [why for src, dsts in _graph().items() for dst, why in dsts.items()
           if src != "core.api" and dst.split(".")[1] in TOP and dst != "core.api"]
    assert not bad, ("a room imports a top-level module of core/ (move it into a room: "
                     "tools/relayout.py MOVES):\n" + "\n".join(bad))


def test_the_rooms_import_one_another_without_a_cycle():
    edges = _graph()
    nodes = {"core." + r for r in ROOMS} | {"core.api"}
    state: dict = {}

    def visit(n, stack):
        state[n] = 1
        for m in edges.get(n, {}):
            if m not in nodes:
                continue
            if state.get(m) == 1:
                cycle = stack[stack.index(m):] + [m]
                raise AssertionError("import cycle " + " -> ".join(cycle) + ":\n" + "\n".join(
                    edges[a][b] for a, b in zip(cycle, cycle[1:])))
            if m not in state:
                visit(m, stack + [m])
        state[n] = 2

    for n in sorted(nodes):
        if n not in state:
            visit(n, [n])


def test_core_api_is_imported_by_no_room():
    bad = [why for src, dsts in _graph().items() if src != "core.api"
           for dst, why in dsts.items() if dst == "core.api"]
    assert not bad, "\n".join(bad)
