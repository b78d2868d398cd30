"""The layering of the code base: core/ never imports plugins/ (the built-ins are fetched by
name from the registry), and every equation of the paper tagged ``Eqn. (N)`` is implemented
at exactly one line of core/ and plugins/ (other mentions say "see Eqn. N")."""

import ast
import re
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TAG = re.compile(r"Eqn\. \((\d+)\)")


def _modules(folder: str):
    return sorted((ROOT / folder).rglob("*.py"))


def _imported(tree: ast.AST):
    """Every module an import statement names, at any depth (functions, branches)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module
            for alias in node.names:
                yield node.lineno, f"{node.module}.{alias.name}"
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(
                node.func, "id", "")) == "import_module" and node.args and \
                isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
            yield node.lineno, node.args[0].value


def test_core_never_imports_plugins():
    offenders = []
    for path in _modules("core"):
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for line, name in _imported(tree):
            if name == "plugins" or name.startswith("plugins."):
                offenders.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
    assert not offenders, "core/ must not import plugins/:\n" + "\n".join(offenders)


def test_the_import_check_sees_function_level_imports():
    tree = ast.parse("def f():\n    from plugins.samplers import CTMSampler\n"
                     "def g():\n    import plugins.losses\n")
    assert {n for _, n in _imported(tree)} >= {"plugins.samplers", "plugins.losses"}


def test_each_equation_tag_marks_one_implementation_line():
    sites = defaultdict(list)
    for path in _modules("core") + _modules("plugins"):
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            for n in TAG.findall(line):
                sites[n].append((f"{path.relative_to(ROOT)}:{i}", line))
    assert {"2", "3", "8", "9"} <= set(sites), sorted(sites)
    for n, found in sorted(sites.items()):
        assert len(found) == 1, f"Eqn. ({n}) is tagged at {len(found)} lines: " + \
            ", ".join(w for w, _ in found)
        where, line = found[0]
        code = line.split("#", 1)[0].strip()
        assert code and not code.startswith(('"', "'")), \
            f"Eqn. ({n}) at {where} tags no code: {line.strip()}"
