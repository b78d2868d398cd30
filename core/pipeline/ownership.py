"""Own only what you wrote: the paths a run writes, checked before it writes any of them.

* **No collisions.** Every path a run writes (its configured outputs — the coefficient store,
  the jumper, a trained teacher — the files and folders its stages write in out_dir, and its
  own bookkeeping) is compared with every path it reads (the config file, every file the
  config names: data, teacher, binaries, weights) and with every other path it writes, in all
  the runs of one command (a ``[run] preconds`` comparison included). Paths are compared by
  their real path (symlinks and ``..`` resolved) and, where both exist, by (st_dev, st_ino).
  One path in two roles is one ``error:`` line before anything is written. The same role in
  two runs is sharing, not a collision (the parent writes the coefficient store its
  preconditionings read; they share one metrics cache), except two runs writing one file.
* **Outputs replace only files.** A configured output that exists and is not a regular file
  (a folder, a device such as /dev/null, a FIFO, a socket) is refused: the rename would
  replace it.
* **Paths outside out_dir** are written only where the user names them (an absolute
  ``[coefficients] path`` or ``[export] path``, ``[evaluate] cache_dir``): every default lies
  inside out_dir.
* **out_dir is ctmkit's.** It may not be ``/`` or the home directory. An existing out_dir must
  be ctmkit's: it holds the marker file ``.ctmkit`` that ctmkit writes into every out_dir it
  runs in, or the ``stages.json`` / ``run.json`` of an earlier version — or it holds nothing
  but ctmkit's temporaries, ctmkit's out_dirs and the run's own inputs (an empty folder, a
  folder of runs, or the config's own folder with ``out_dir = "."``). A folder holding
  anything else is refused: its files are not ctmkit's to replace or sweep. ``--dry-run``
  makes the same checks.
* **Locks** (core.pipeline.lock): a comparison's label folders are locked with its out_dir; a run into
  the *parent* of a running run's out_dir (without preconds) is allowed: it writes nothing
  in that folder.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from core.base.errors import UserError
from core.base.io import MARKER, is_temporary
from core.host.stage_table import STAGES

#: files that say an out_dir was written by ctmkit (the marker, or an earlier version's records)
OWNED_BY = (MARKER, "stages.json", "run.json")
#: a run's own bookkeeping in out_dir, written by every run whatever its stages
BOOKKEEPING = (".lock", "run.json", "stages.json", MARKER)
#: what each stage writes in out_dir besides its configured paths (folders end in "/"): declared
#: with the stage (core.host.stage_table)
STAGE_FILES = {s.name: s.files for s in STAGES}
#: written by a [run] preconds comparison in the parent out_dir
COMPARISON_FILES = ("comparison.json", "comparison.png")
#: written in out_dir by the commands beside the stages (``ctmkit gap``, ``ctmkit
#: search-schedule``): a run's configured outputs may not name them
COMMAND_FILES = {"gap": ("gap.json", "gap.png"),
                 "search-schedule": ("search_schedule.json", "search_schedule.png")}
#: the folders of an out_dir that only ctmkit writes (swept of any ctmkit temporary)
OWNED_FOLDERS = ("", "checkpoints", "teacher_checkpoints")
#: config keys that name what a run writes, not what it reads (see `configured_outputs`)
_OUTPUT_KEYS = {("run", "out_dir"), ("coefficients", "path"), ("export", "path"),
                ("evaluate", "cache_dir")}


@dataclass(frozen=True)
class Use:
    """One path one run uses: `role` names it in errors ("[export] path (the jumper)")."""
    path: Path
    role: str
    writes: bool
    folder: bool = False
    run: int = 0


def _identity(path: Path) -> tuple[str, tuple | None]:
    """(real path, (st_dev, st_ino) or None where nothing is there)."""
    real = os.path.realpath(path)
    try:
        st = os.stat(real)
    except OSError:
        return real, None
    return real, (st.st_dev, st.st_ino)


def _same(a: tuple, b: tuple) -> bool:
    return a[0] == b[0] or (a[1] is not None and a[1] == b[1])


def configured_outputs(run, stages) -> list[Use]:
    """The paths the config names for writing, each written when its stage runs."""
    cfg = run.cfg
    coef, exp = cfg.coefficients.path, cfg.export.path
    uses = [Use(coef, "[coefficients] path (the coefficient store)", "coefficients" in stages),
            Use(coef.with_suffix(".png"), "the coefficient plot (beside [coefficients] path)",
                "coefficients" in stages),
            Use(exp, "[export] path (the jumper)", "export" in stages)]
    if cfg.export.aoti:
        uses.append(Use(exp.with_suffix(".pt2"), "the AOTInductor package (beside [export] "
                                                 "path)", "export" in stages))
        from core.base.integrity import sidecar_path
        uses.append(Use(sidecar_path(exp.with_suffix(".pt2")), "the AOTInductor package's "
                        "digest file (beside [export] path)", "export" in stages))
    if cfg.teacher_kind == "network":
        uses.append(Use(run.teacher_file(), "[teacher] path (the trained teacher)",
                        "teacher" in stages))
    if cfg.evaluate.cache_dir is not None:
        uses.append(Use(cfg.evaluate.cache_dir, "[evaluate] cache_dir", bool(
            {"evaluate", "distill"} & set(stages)), folder=True))
    return uses


def out_dir_uses(out_dir: Path, stages) -> list[Use]:
    """The run's bookkeeping and its stages' own files in out_dir."""
    uses = [Use(out_dir / name, f"out_dir's {name}", True) for name in BOOKKEEPING]
    for stage, names in STAGE_FILES.items():
        for name in names:
            uses.append(Use(out_dir / name.rstrip("/"), f"the {stage} stage's {name}",
                            stage in stages, folder=name.endswith("/")))
    return uses


def _strings(value, where: str):
    """(where, string) for every string in a nested TOML value."""
    if isinstance(value, str):
        yield where, value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _strings(v, f"{where}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _strings(v, f"{where}[{i}]")


def config_inputs(cfg) -> list[Use]:
    """The config file and every existing file or folder its values name (relative ones
    resolved against the config's folder, as `Section.path` does), but the output keys."""
    uses = [Use(cfg.path.resolve(), "the config file", False)]
    for section, table in cfg.raw.items():
        if section == "run" or not isinstance(table, dict):
            continue
        for key, value in table.items():
            if (section, key) in _OUTPUT_KEYS or (section == "teacher" and key == "path" and
                                                  cfg.teacher_kind == "network"):
                continue
            for where, text in _strings(value, key):
                if not text or "\n" in text or "\0" in text:
                    continue
                p = Path(text).expanduser()
                p = p if p.is_absolute() else cfg.base_dir / p
                try:
                    exists = p.exists()
                except (OSError, ValueError):
                    continue
                if exists:
                    uses.append(Use(p, f"[{section}] {where}", False))
    return uses


def run_uses(runs) -> list[Use]:
    """Every path of every run of one command: `runs` is [(Run, stages)], the parent first."""
    uses = []
    for i, (run, stages) in enumerate(runs):
        mine = config_inputs(run.cfg) + configured_outputs(run, stages) + \
            out_dir_uses(run.out_dir, stages)
        if i == 0 and len(runs) > 1:
            mine += [Use(run.out_dir / n, f"the comparison's {n}", True)
                     for n in COMPARISON_FILES]
        if i == 0:
            mine += [Use(run.out_dir / n, f"ctmkit {command}'s {n}", False)
                     for command, names in COMMAND_FILES.items() for n in names]
        uses += [Use(u.path, u.role, u.writes, u.folder, i) for u in mine]
    return uses


def check_collisions(uses: list[Use]) -> None:
    """One `error:` line for the first written path that is also another role's path (or the
    same file written by two runs), or an output that exists and is the wrong kind of thing."""
    for u in uses:
        if u.writes:
            _check_kind(u)
    ids = [_identity(u.path) for u in uses]
    for i, a in enumerate(uses):
        for j in range(i + 1, len(uses)):
            b = uses[j]
            if not (a.writes or b.writes) or not _same(ids[i], ids[j]):
                continue
            if a.role == b.role and (a.folder or not (a.writes and b.writes)
                                     or a.run == b.run):
                continue              # shared between the runs of one comparison
            w, o = (a, b) if a.writes else (b, a)
            what = o.role if o.role != w.role else f"{o.role} of another of its runs"
            raise UserError(f"{w.path}: {w.role} would be written over {what} "
                            f"({o.path}); give it a path of its own")


def _check_kind(u: Use) -> None:
    """A written path that exists must be what the run writes there: a folder for folders, a
    regular file (or a symlink, which the rename replaces) for files."""
    try:
        st = os.lstat(u.path)
    except OSError:
        return
    import stat
    if u.folder:
        if not os.path.isdir(u.path):
            raise UserError(f"{u.path}: {u.role} must be a folder, but a file is there")
    elif stat.S_ISDIR(st.st_mode):
        raise UserError(f"{u.path}: {u.role} is a file, but a folder is there")
    elif not (stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)):
        raise UserError(f"{u.path}: {u.role} exists and is not a regular file (a device, "
                        f"FIFO or socket); ctmkit replaces only regular files")


def _is_ctmkits(folder: Path) -> bool:
    return any((folder / name).exists() for name in OWNED_BY)


def check_out_dir(out_dir: Path, inputs: list[Use], out_dirs=()) -> None:
    """`out_dir` may be written by ctmkit: not / or the home directory, and new, empty,
    ctmkit's (`OWNED_BY`) or holding only ctmkit's temporaries and out_dirs (`out_dirs`: the
    command's own) and the run's own inputs."""
    real = Path(os.path.realpath(out_dir))
    for forbidden, what in ((Path(real.anchor), "the root folder"),
                            (Path(os.path.realpath(Path.home())), "the home directory")):
        if real == forbidden:
            raise UserError(f"{out_dir}: refusing {what} as out_dir (ctmkit replaces and "
                            f"sweeps files in it); name a folder of its own")
    if not real.is_dir() or _is_ctmkits(real):
        return
    mine = {_identity(u.path) for u in inputs} | {_identity(d) for d in out_dirs}
    foreign = []
    for entry in sorted(os.scandir(real), key=lambda e: e.name):
        if entry.name in BOOKKEEPING or is_temporary(entry.name) or (
                entry.is_dir(follow_symlinks=False) and _is_ctmkits(Path(entry.path))):
            continue
        if not any(_same(_identity(Path(entry.path)), m) for m in mine):
            foreign.append(entry.name)
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3
                                          else "")
        raise UserError(f"{out_dir}: holds files ctmkit did not write ({shown}); choose a new "
                        f"or empty out_dir (ctmkit marks its out_dirs with {MARKER})")


def check_ownership(runs) -> None:
    """What a command must pass before it writes anything (run and --dry-run alike): each
    out_dir is ctmkit's and no path it writes collides with another (see the module)."""
    uses = run_uses(runs)
    for i, (run, _) in enumerate(runs):
        check_out_dir(run.out_dir, [u for u in uses if u.run == i and not u.writes],
                      [r.out_dir for r, _ in runs])
    check_collisions(uses)


def owned_folders(out_dir: Path) -> list[Path]:
    """The folders of `out_dir` that only ctmkit writes."""
    return [out_dir / name if name else out_dir for name in OWNED_FOLDERS]


def written_folders(runs) -> list[Path]:
    """The folders outside `owned_folders` that the runs write files into (a configured
    output's folder, a cache): swept only of temporaries whose writer is dead."""
    return sorted({(u.path if u.folder else u.path.parent) for u in run_uses(runs)
                   if u.writes})
