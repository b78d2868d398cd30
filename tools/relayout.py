"""Rooms that say what they hold (issue 21 item 6): move core/'s flat modules into sub-packages
by concern, and rewrite every reference to them.

    python tools/relayout.py            # move and rewrite (idempotent: a rerun changes nothing)
    python tools/relayout.py --dry-run  # say what it would move and which files it would rewrite

It ``git mv``-s each module of `MOVES` that is still at its old place (a module of `MOVES`
that a branch has not added yet is skipped), creates the new packages' ``__init__.py``
(`PACKAGES`), removes `REMOVED`, writes tests/test_import_graph.py, rewrites every tracked text
file (`TEXT_SUFFIXES`, `TEXT_NAMES`) as below, and last regenerates the generated documentation
(`GENERATORS`: the config reference, the stage table). The rewrites:

* ``from core import x, y as z`` statements, each name to its new package
  (``from core.host import plugins``, ``from core.train import loop as training``), split into
  one statement per package where the names now live apart;
* dotted module names wherever they stand — imports, ``core.distill.to_device`` in
  monkeypatch strings, ``"core.stages:teacher"`` in the stage table, ``-m`` module paths,
  entry points in pyproject.toml, prose — matched as whole dotted names (``core.data`` is not
  ``core.datasets``; ``core.data.source``, its new name, is not ``core.data`` again);
* file paths: ``core/distill.py`` -> ``core/train/distill.py``, ``core/coefficients/`` ->
  ``core/diffusion/coefficients/``, also as TorchScript names a class's code in an exported
  archive (``code/__torch__/core/jumper.py``).

Modules it does not know (new ones other branches add to core/) stay where they are; their
imports are rewritten like every other file's. tests/test_import_graph.py then says whether
one of them must move too (a room may not import a top-level module but core.api): add it to
`MOVES` and run the script again. The script leaves itself, CHANGELOG.md (a record of what was)
and git's history alone (and tests/test_relayout.py, whose examples name the old modules).

Module map (for docs/design.md)
-------------------------------

core/ (the host; plugin authors import only ``core.api``)

* ``core/api.py`` — the plugin contracts and the helpers re-exported for plugin authors.
* ``core/run.py``, ``core/gap.py`` (and the other commands other branches add: ``cli``,
  ``search_schedule``, ...) — the commands (``python -m core.run``, ``ctmkit gap``): they sit on
  top; no room imports them.
* ``core/base/`` — what every room uses: ``errors`` (UserError, one-line messages), ``io``
  (atomic writers, digests, temporaries, the ``.ctmkit`` marker), ``bounds`` (size limits of
  untrusted input), ``integrity`` (archive digests and sidecars), ``dtypes`` (the dtype-name
  table), ``distributed`` (torchrun ranks), ``compiled`` (torch.compile as ctmkit uses it).
* ``core/host/`` — what a run is configured with: ``config`` (config.toml, every key declared
  once), ``stage_table`` (every stage declared once), ``plugins`` (the plugin registry and
  context), ``hookspecs`` (the hooks a plugin implements).
* ``core/data/`` — x_0: ``source`` (the [data] section as a DataSource: files, mixtures,
  dataset plugins), ``datasets`` (the Dataset a dataset plugin returns), ``datastore`` (the
  uint8 image store decoded once and shared by every process).
* ``core/diffusion/`` — the mathematics: ``edm`` (EDM's scalings and denoiser), ``ode`` (Euler /
  Heun), ``schedules`` (time grids), ``dsm`` (the DSM loss), ``contracts`` (the bases of the
  solver, loss and sampler plugins), ``coefficients/`` (Analytic-Precond's l_t, s_t: estimation,
  numerics, the table and its HDF5 store).
* ``core/export/`` — the deployable jumper: ``jumper`` (TorchScript export and load),
  ``aoti`` (the AOTInductor package), ``sampling`` (K-step sampling of an exported jumper),
  ``sample_files`` (samples.npz and PNG folders).
* ``core/train/`` — training: ``loop`` (the training loop, EMA, lr schedules, checkpoints,
  fingerprints), ``distill`` (distillation), ``teacher`` (the teacher stage's DSM training),
  ``students`` (a student from a teacher), ``s_pathway`` (the zero-initialised s pathway of
  every student network), ``warm_start``, ``distances`` (l2, l1, pseudo-Huber, LPIPS),
  ``gan`` (the GAN term: hinge losses, turns, the discriminator's checks).
* ``core/evaluation/`` — what a run measures and shows: ``evaluate`` (trajectory errors,
  distribution distances), ``quality`` (sample quality through the metric plugins), ``plots``
  (figures), ``images`` (PNG grids, uint8 quantisation).
* ``core/pipeline/`` — running the stages: ``stages`` (each stage's function and the Run they
  share), ``ledger`` (stages.json: up to date or not), ``ownership`` (which paths a run may
  write), ``record`` (run.json, --dry-run), ``lock`` (one run per out_dir), ``compare``
  (a [run] preconds comparison).

plugins/ (the built-ins, registered like third-party plugins)

* ``plugins/metrics/`` — FID / KID: the plugin (``__init__``), ``fid`` (clean-fid's features,
  reference statistics, Fréchet distance, KID), ``feature_net`` (the offline feature network).
* ``plugins/openai/`` — openai/consistency_models' UNet (``unet``), the openai teachers'
  network.
* ``plugins/edm/`` — NVlabs EDM's networks and snapshot reader; the rest as before.

The imports run one way: base <- host <- data <- diffusion <- export <- evaluation <- train <-
pipeline <- commands; core.api re-exports from the rooms and no room imports it
(tests/test_import_graph.py).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: old module -> new module (a package moves with everything in it)
MOVES = {
    # base
    "core.errors": "core.base.errors",
    "core.io": "core.base.io",
    "core.bounds": "core.base.bounds",
    "core.integrity": "core.base.integrity",
    "core.dtypes": "core.base.dtypes",
    "core.distributed": "core.base.distributed",
    "core.compiled": "core.base.compiled",
    # host
    "core.config": "core.host.config",
    "core.stage_table": "core.host.stage_table",
    "core.plugins": "core.host.plugins",
    "core.hookspecs": "core.host.hookspecs",
    # data
    "core.data": "core.data.source",
    "core.datasets": "core.data.datasets",
    "core.datastore": "core.data.datastore",
    # diffusion
    "core.edm": "core.diffusion.edm",
    "core.ode": "core.diffusion.ode",
    "core.schedules": "core.diffusion.schedules",
    "core.dsm": "core.diffusion.dsm",
    "core.contracts": "core.diffusion.contracts",
    "core.coefficients": "core.diffusion.coefficients",
    # export
    "core.jumper": "core.export.jumper",
    "core.aoti": "core.export.aoti",
    "core.sampling": "core.export.sampling",
    "core.sample_files": "core.export.sample_files",
    # evaluation
    "core.evaluate": "core.evaluation.evaluate",
    "core.quality": "core.evaluation.quality",
    "core.plots": "core.evaluation.plots",
    "core.images": "core.evaluation.images",
    # train
    "core.training": "core.train.loop",
    "core.distill": "core.train.distill",
    "core.teacher_training": "core.train.teacher",
    "core.students": "core.train.students",
    "core.warm_start": "core.train.warm_start",
    "core.distances": "core.train.distances",
    "core.s_pathway": "core.train.s_pathway",
    "core.gan": "core.train.gan",                                  # the GAN term
    # pipeline
    "core.stages": "core.pipeline.stages",
    "core.ledger": "core.pipeline.ledger",
    "core.ownership": "core.pipeline.ownership",
    "core.record": "core.pipeline.record",
    "core.lock": "core.pipeline.lock",
    "core.compare": "core.pipeline.compare",
    # the metric plugin's internals go with it; the openai UNet gets its own folder
    "core.metrics": "plugins.metrics.fid",
    "core.feature_net": "plugins.metrics.feature_net",
    "plugins.edm.openai_unet": "plugins.openai.unet",
}
#: files that move without a change of module name (a module becomes its package)
FILE_MOVES = {"plugins/metrics.py": "plugins/metrics/__init__.py"}
#: modules that go; what imported them imports the replacement
REMOVED = {"plugins.teachers.base": "core.api"}

#: the new packages and what each holds (their __init__.py docstrings)
PACKAGES = {
    "core/base": "What every room of core uses: errors, atomic I/O and digests, bounds of "
                 "untrusted input, archive integrity, dtype names, torchrun ranks, torch.compile.",
    "core/host": "What a run is configured with: the config (every key declared once), the "
                 "stage table (every stage declared once), the plugin registry and its hooks.",
    "core/data": "x_0: the [data] section as a DataSource, the Dataset of a dataset plugin, the "
                 "shared uint8 image store.",
    "core/diffusion": "The mathematics: EDM's scalings and denoiser, the ODE solvers, time "
                      "grids, DSM, the solver / loss / sampler bases, Analytic-Precond's "
                      "coefficients.",
    "core/export": "The deployable jumper: TorchScript and AOTInductor export and load, K-step "
                   "sampling, sample files.",
    "core/evaluation": "What a run measures and shows: trajectory errors and distances, sample "
                       "quality through the metric plugins, figures and image grids.",
    "core/train": "Training: the loop (EMA, lr schedules, checkpoints, fingerprints), "
                  "distillation, the teacher stage, students and their s pathway, warm starts, "
                  "distances.",
    "core/pipeline": "Running the stages: each stage's function, stages.json, the ownership "
                     "checks, run.json and --dry-run, the out_dir lock, [run] preconds "
                     "comparisons.",
    "plugins/openai": "openai/consistency_models' UNet (unet.py), re-implemented with its "
                      "parameter names: the network of the openai teachers.",
}

#: the text files whose references are rewritten (by suffix; plus the names in TEXT_NAMES)
TEXT_SUFFIXES = {".py", ".toml", ".md", ".cfg", ".txt", ".yml", ".yaml", ".cmake", ".cpp",
                 ".hpp", ".ini", ".sh", ".json"}
TEXT_NAMES = {".ci/run"}
#: tracked files never rewritten
KEEP = {"tools/relayout.py", "tests/test_relayout.py", "CHANGELOG.md"}


def _path(module: str) -> str:
    return module.replace(".", "/")


def _file_of(module: str) -> Path | None:
    """The file or package folder of old module `module` in the working tree, or None (a
    folder of the old name that is its own new package, core/data/, is not it)."""
    p = ROOT / _path(module)
    if p.is_dir() and not MOVES.get(module, "").startswith(module + "."):
        return p
    f = p.with_suffix(".py")
    return f if f.is_file() else None


def _is_package(old: str) -> bool:
    """Whether old module `old` is a package (before or after its move)."""
    new = MOVES[old]
    return not new.startswith(old + ".") and ((ROOT / _path(old)).is_dir()
                                               or (ROOT / _path(new)).is_dir())


def _git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(ROOT), *args], check=True, capture_output=True,
                          text=True).stdout


# --- the rewrite rules --------------------------------------------------------------------------

def _renames() -> dict[str, str]:
    return {**MOVES, **REMOVED}


def _children(new_prefix: str) -> set[str]:
    """The first name after `new_prefix` of every new module under it (core.data -> source,
    datasets, datastore): what follows an old name that is also a new package's name."""
    out = set()
    for new in _renames().values():
        if new.startswith(new_prefix + "."):
            out.add(new[len(new_prefix) + 1:].split(".")[0])
    return out


def _dotted_pattern() -> re.Pattern:
    """One pattern for every old dotted name, longest first, each a whole dotted name."""
    alts = []
    for old in sorted(_renames(), key=len, reverse=True):
        alt = re.escape(old)
        kids = _children(old)           # old is a new package too (core.data): not its children
        if kids:
            names = "|".join(sorted(map(re.escape, kids)))
            alt += rf"(?!\.(?:{names})\b)(?!\s+import\s+\(?\s*(?:{names})\b)"
        alts.append(alt)
    return re.compile(r"(?<![\w.])(?:" + "|".join(alts) + r")(?![\w])")


def _path_pattern() -> tuple[re.Pattern, dict[str, str]]:
    """Old file paths (core/x.py; a package's core/pkg, also as core/pkg/x.py) -> new ones."""
    table = {}
    for old, new in MOVES.items():
        table[_path(old) + ".py"] = _path(new) + ".py"
        if _is_package(old):
            table[_path(old)] = _path(new)
    table.update(FILE_MOVES)
    for old, new in REMOVED.items():
        table[_path(old) + ".py"] = _path(new) + ".py"
    alts = [re.escape(k) + r"(?![\w])" for k in sorted(table, key=len, reverse=True)]
    # a path stands alone, or inside a TorchScript archive (code/__torch__/core/jumper.py)
    return re.compile(r"(?:(?<=__torch__/)|(?<![\w/.]))(?:" + "|".join(alts) + ")"), table


_FROM_IMPORT = re.compile(
    r"^(?P<indent>[ \t]*)from[ \t]+(?P<pkg>[A-Za-z_][\w.]*)[ \t]+import[ \t]+"
    r"(?P<names>\([^)]*\)|[^\n#]*?)(?P<tail>[ \t]*(?:#[^\n]*)?)$", re.M)


def _rewrite_from_imports(text: str) -> str:
    """``from P import a, b as c`` where P.a names a moved module: each name imported from its
    new package (with ``as`` where its new name differs), one statement per package."""
    renames = _renames()

    def one(m: re.Match) -> str:
        pkg, raw = m["pkg"], m["names"]
        items = [x.strip() for x in raw.strip().strip("()").replace("\n", " ").split(",")]
        items = [x for x in items if x]
        if not any(f"{pkg}.{x.split()[0]}" in renames for x in items):
            return m[0]
        groups: dict[str, list[str]] = {}
        for item in items:
            parts = item.split()
            name, alias = parts[0], parts[2] if len(parts) == 3 and parts[1] == "as" else None
            new = renames.get(f"{pkg}.{name}")
            if new is None:
                groups.setdefault(pkg, []).append(item)
                continue
            parent, _, base = new.rpartition(".")
            local = alias or name
            groups.setdefault(parent, []).append(base if base == local else f"{base} as {local}")
        lines = [f"{m['indent']}from {p} import {', '.join(ns)}" for p, ns in groups.items()]
        lines[0] += m["tail"]
        return "\n".join(lines)

    return _FROM_IMPORT.sub(one, text)


def rewrite(text: str) -> str:
    """`text` with every reference to a moved module rewritten (see the module doc)."""
    text = _rewrite_from_imports(text)
    renames = _renames()
    text = _dotted_pattern().sub(lambda m: renames[m[0]], text)
    pattern, table = _path_pattern()
    return pattern.sub(lambda m: table[m[0]], text)


# --- the moves ----------------------------------------------------------------------------------

def _moves() -> list[tuple[Path, Path]]:
    """(old, new) for every move still to make."""
    out = []
    for old, new in MOVES.items():
        src = _file_of(old)
        if src is None:
            continue
        dst = ROOT / (_path(new) if src.is_dir() else _path(new) + ".py")
        if dst.is_dir() and _only_caches(dst):      # left by a checkout of a moved tree
            shutil.rmtree(dst)
        if dst.exists():
            raise SystemExit(f"error: {src.relative_to(ROOT)} and {dst.relative_to(ROOT)} both "
                             f"exist; move one by hand")
        out.append((src, dst))
    for old, new in FILE_MOVES.items():
        if (ROOT / old).is_file():
            out.append((ROOT / old, ROOT / new))
    return out


def _only_caches(folder: Path) -> bool:
    """`folder` holds nothing but __pycache__ folders (and empty folders)."""
    return all(p.is_dir() or "__pycache__" in p.parts for p in folder.rglob("*"))


def _text_files() -> list[Path]:
    files = []
    for name in _git("ls-files", "-z").split("\0"):
        if not name or name in KEEP:
            continue
        p = ROOT / name
        if p.is_file() and (p.suffix in TEXT_SUFFIXES or name in TEXT_NAMES):
            files.append(p)
    return files


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="say what would change; change nothing")
    args = ap.parse_args(argv)
    moves = _moves()
    removed = [p for p in (ROOT / (_path(m) + ".py") for m in REMOVED) if p.is_file()]
    for src, dst in moves:
        print(f"move   {src.relative_to(ROOT)} -> {dst.relative_to(ROOT)}")
        if not args.dry_run:
            dst.parent.mkdir(parents=True, exist_ok=True)
            _git("mv", str(src), str(dst))
    for p in removed:
        print(f"remove {p.relative_to(ROOT)}")
        if not args.dry_run:
            _git("rm", "-q", str(p))
    for folder, about in PACKAGES.items():
        init = ROOT / folder / "__init__.py"
        if (ROOT / folder).is_dir() and not init.exists():
            print(f"create {init.relative_to(ROOT)}")
            if not args.dry_run:
                init.write_text(f'"""{about}"""\n', encoding="utf-8")
                _git("add", str(init))
    graph_test = ROOT / "tests" / "test_import_graph.py"
    if not graph_test.exists() and (moves or (ROOT / "core" / "pipeline").is_dir()):
        print(f"create {graph_test.relative_to(ROOT)}")
        if not args.dry_run:
            graph_test.write_text(IMPORT_GRAPH_TEST, encoding="utf-8")
            _git("add", str(graph_test))
    changed = 0
    for p in _text_files() if not args.dry_run else []:
        try:
            text = p.read_text(encoding="utf-8")
        except (UnicodeDecodeError, FileNotFoundError):
            continue
        new = rewrite(text)
        if new != text:
            p.write_text(new, encoding="utf-8")
            changed += 1
    print(f"rewrote {changed} file(s)" if not args.dry_run else
          f"{len(moves)} move(s) to make; rerun without --dry-run to rewrite the references")
    if not args.dry_run:
        regenerate()
    return 0


#: generated documentation (a key's help may name a moved file): rewritten from the new code
GENERATORS = ("tools/config_reference.py", "tools/stage_table.py")


def regenerate() -> None:
    import os
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for tool in GENERATORS:
        if (ROOT / tool).is_file():
            r = subprocess.run([sys.executable, tool, "--write"], cwd=ROOT, env=env,
                               capture_output=True, text=True)
            print(f"{tool} --write: " + ("ok" if r.returncode == 0 else
                                         f"FAILED ({(r.stderr.strip() or '?').splitlines()[-1]})"))


IMPORT_GRAPH_TEST = '''"""The rooms of core/ (tools/relayout.py's module map) import one another
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
                     "tools/relayout.py MOVES):\\n" + "\\n".join(bad))


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
                raise AssertionError("import cycle " + " -> ".join(cycle) + ":\\n" + "\\n".join(
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
    assert not bad, "\\n".join(bad)
'''


if __name__ == "__main__":
    sys.exit(main())
