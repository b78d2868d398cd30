"""The run's own files: preparing out_dir (lock, stale temporaries), ``run.json`` (a record of
what ran — as EDM's training_options.json), and the ``--dry-run`` plan."""

from __future__ import annotations

import dataclasses
import json
import platform
import subprocess
import sys
from dataclasses import fields, is_dataclass
from pathlib import Path

from core import REPO, __version__
from core.base.errors import UserError
from core.base.io import file_digest, remove_stale_temporaries, save_json, write_bytes
from core.pipeline.lock import RunLock


def _check_folder(out_dir: Path) -> None:
    for parent in [out_dir, *out_dir.parents]:
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"{out_dir}: cannot be the output folder ({parent} is a file)")
            break


def prepare_out_dirs(out_dirs: list[Path], written: list[Path] = ()) -> list[RunLock]:
    """Lock the out_dirs of one command (the first one's parents checked: see core.pipeline.lock), mark
    each as ctmkit's (core.base.io.MARKER) and sweep the temporaries of killed runs from the
    folders ctmkit writes (`written`: those outside the out_dirs). Returns the locks, to be
    released in reverse order."""
    from core.pipeline.ownership import MARKER, owned_folders

    for d in out_dirs:
        _check_folder(d)
    for i, d in enumerate(out_dirs):           # all refusals before any folder is made
        RunLock(d).check(check_parents=i == 0)
    locks: list[RunLock] = []
    try:
        for i, d in enumerate(out_dirs):
            locks.append(RunLock(d).acquire(check_parents=i == 0))
        for d in out_dirs:
            if not (d / MARKER).exists():
                write_bytes(d / MARKER, b"ctmkit out_dir: its files are ctmkit's to replace "
                                        b"and sweep\n")
    except BaseException:
        for lock in reversed(locks):
            lock.release()
        raise
    owned = [f for d in out_dirs for f in owned_folders(d)]
    removed = remove_stale_temporaries(written, owned=owned)
    if removed:
        print(f"[ctmkit] removed {len(removed)} temporary file(s) left by an interrupted run",
              flush=True)
    return locks


def _plain(v):
    if is_dataclass(v):
        return {f.name: _plain(getattr(v, f.name)) for f in fields(v)}
    if isinstance(v, Path):
        return str(v)
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


def resolved_config(cfg) -> dict:
    """The config as the run sees it: host sections with every default filled in and paths
    resolved; plugin-owned sections as written."""
    out = {name: _plain(getattr(cfg, name)) for name in
           ("run", "diffusion", "coefficients", "export", "sample", "evaluate",
            "teacher_train", "distill")}
    out["student"] = _plain(cfg.student)
    for name in ("data", "network", "teacher", "precond"):
        out[name] = _plain(getattr(cfg, name).data)
    return out


def _git_commit() -> str | None:
    repo = REPO
    try:
        r = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True,
                           text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() or None if r.returncode == 0 else None


def _devices(device: str) -> list[str]:
    import torch
    if device.startswith("cuda") and torch.cuda.is_available():
        return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return [platform.processor() or platform.machine() or "cpu"]


def teacher_file_digest(run) -> str | None:
    """SHA-256 of the teacher's file, where the teacher has one (and it exists yet)."""
    t = run.cfg.teacher
    if "path" not in t.data and run.cfg.teacher_kind != "network":
        return None
    p = run.teacher_file() if run.cfg.teacher_kind == "network" else \
        t.path("path", None)
    return file_digest(p) if p is not None and p.is_file() else None


def write_run_record(cfg, run, argv: list[str]) -> None:
    """out_dir/run.json. No timestamps: the same command on the same machine writes the same
    file, so a rerun that skips every stage changes nothing."""
    import torch

    from core.base import distributed as dist

    save_json(cfg.run.out_dir / "run.json", {
        "command": [Path(sys.executable).name, "-m", "core.run", *argv],
        "config_file": str(cfg.path.resolve()),
        "config": resolved_config(cfg),
        "versions": {"ctmkit": __version__, "torch": torch.__version__,
                     "cuda": torch.version.cuda, "python": platform.python_version()},
        "git_commit": _git_commit(),
        "devices": _devices(cfg.run.device),
        "world_size": dist.world(),
        "teacher_sha256": teacher_file_digest(run),
        **_warm_start_record(cfg),
    })


def _warm_start_record(cfg) -> dict:
    """``[student] init = <path>``: which file the student starts from, and its iteration."""
    if cfg.student_init_path is None or "{label}" in cfg.student.init:
        return {}
    from core.train.warm_start import record
    return {"student_init": record(cfg.student_init_path)}


def dry_run(cfg, runs, force: bool, progress: bool = True) -> None:
    """Print the resolved config and, per stage, whether it would run or be skipped."""
    from core.pipeline.ledger import Ledger, stage_key
    from core.pipeline.stages import Run

    from core.pipeline.ownership import check_ownership

    prepared = []
    for c, st in runs:
        r = Run(c, progress=progress)
        # no out_dir for the plugins: a dataset is decoded into memory, not into a store in
        # out_dir/datastore (a dry run writes nothing)
        r.ctx = dataclasses.replace(r.ctx, out_dir=None)
        r.validate(st)                      # the same checks a real run makes first
        prepared.append((r, st))
    check_ownership(prepared)
    print(json.dumps(resolved_config(cfg), indent=2, sort_keys=True))
    print("plan:")
    for r, st in prepared:
        ledger = Ledger(r.out_dir)
        for name in st:
            label = f" ({r.out_dir})"
            try:
                fresh = not force and ledger.up_to_date(name, stage_key(r, name))
            except UserError as e:              # e.g. the teacher file does not exist yet
                fresh, why = False, f" (inputs not there yet: {str(e)[:100]})"
            else:
                why = ""
            print(f"  {name:<13}{'skip: up to date' if fresh else 'run' + why}{label}")
    sys.stdout.flush()
