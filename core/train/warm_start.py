"""Warm starts: ``[student] init = <path>`` starts distillation from an earlier run's student
instead of the teacher -- CTM's staged recipe (sony/ctm resumes its CTM + DSM checkpoint with the
GAN term on, at a lower learning rate).

The source is one of

* a ``student.pt`` (it holds the first EMA of its run): online weights, every EMA and the
  stop-gradient target start as those weights;
* a distill checkpoint (``checkpoints/ckpt-*.pt``): the online weights; with ``init_ema`` also
  its EMAs and stop-gradient target (else they start as the online weights); with
  ``init_optimizer`` also the optimiser's state;
* a run's out_dir: its newest distill checkpoint, as above.

The new run counts its own iterations from 0, with its own schedule and settings; the source's
file SHA-256 and iteration go into the new run's fingerprint (so resuming the new run is exact,
and a changed source is refused as "a different configuration") and into ``run.json``.
A source of another teacher or preconditioning family, or whose weights do not fit the
configured student, is one error line naming both.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from core.base.errors import UserError, first_line
from core.base.io import check_torch, file_digest, torch_load


@dataclass
class WarmStart:
    path: Path             # the file read
    kind: str              # "student" | "checkpoint"
    sha256: str            # of the file's bytes
    iteration: int | None  # the source run's iteration (checkpoints; student.pt since v0.1)
    state: dict
    init_ema: bool
    init_optimizer: bool

    def describe(self) -> dict:
        """What of the source determines the new run (its fingerprint; run.json)."""
        return {"path": str(self.path), "kind": self.kind, "sha256": self.sha256,
                "iteration": self.iteration, "init_ema": self.init_ema,
                "init_optimizer": self.init_optimizer}


def source_file(path: Path) -> Path:
    """The file a warm-start path names: the file itself, or an out_dir's newest checkpoint."""
    from core.train.loop import checkpoints

    if path.is_dir():
        found = checkpoints(path / "checkpoints")
        if not found:
            raise UserError(f"[student] init: {str(path)!r} is a folder without distill "
                            f"checkpoints (checkpoints/ckpt-*.pt); name a student.pt, a "
                            f"checkpoint or a run's out_dir")
        return found[-1][1]
    if not path.exists():
        raise UserError(f"[student] init: {str(path)!r} does not exist")
    return path


def record(path: Path) -> dict:
    """For run.json: the source file, its SHA-256 and its run's iteration."""
    f = source_file(Path(path))
    obj = torch_load(f, "warm-start file", mmap=True)      # the header, not the tensors
    it = obj.get("iteration") if isinstance(obj, dict) else None
    return {"path": str(f), "sha256": file_digest(f),
            "iteration": it if isinstance(it, int) else None}


def load(path: Path, init_ema: bool, init_optimizer: bool, teacher_fingerprint: str,
         precond) -> WarmStart:
    """Read and check the source (its content digest, format, teacher, preconditioning)."""
    from core.train.students import FORMAT as STUDENT_FORMAT
    from core.train.loop import CKPT_FORMAT

    f = source_file(Path(path))
    obj = torch_load(f, "warm-start file")                 # read once, then checked
    fmt = obj.get("format") if isinstance(obj, dict) else None
    if fmt == STUDENT_FORMAT:
        state = check_torch(obj, f, "student file", STUDENT_FORMAT, keys={"state_dict": dict})
        kind, iteration = "student", state.get("iteration")
        if init_ema or init_optimizer:
            raise UserError(f"[student] init: {str(f)!r} is a student.pt, which holds one set of "
                            f"weights: init_ema / init_optimizer need a checkpoint or an out_dir")
    elif fmt == CKPT_FORMAT:
        state = check_torch(obj, f, "checkpoint", CKPT_FORMAT,
                            keys={"iteration": int, "modules": dict, "optimizer": dict})
        if not isinstance(state["modules"].get("student"), dict):
            raise UserError(f"[student] init: {str(f)!r} is not a distill checkpoint (it holds "
                            f"no student; a teacher-training checkpoint?)")
        kind, iteration = "checkpoint", int(state["iteration"])
    else:
        raise UserError(f"[student] init: {str(f)!r} is neither a ctmkit student.pt nor a "
                        f"distill checkpoint")
    origin = state.get("extra", {}) if kind == "checkpoint" else state
    theirs = origin.get("teacher_fingerprint")
    if theirs is not None and theirs != teacher_fingerprint:
        raise UserError(f"[student] init: {str(f)!r} was distilled from teacher {theirs[:12]}, "
                        f"this run's teacher is {teacher_fingerprint[:12]}")
    family = origin.get("precond")
    if isinstance(family, dict) and family.get("jumps_denoiser") is not None and \
            bool(family["jumps_denoiser"]) != bool(precond.jumps_denoiser):
        mixes = {True: "D_theta (ctm, analytic)", False: "F_theta (cm, bcm)"}
        raise UserError(f"[student] init: {str(f)!r} was trained with {family.get('name')!r}, "
                        f"which mixes {mixes[bool(family['jumps_denoiser'])]}; this run's "
                        f"{precond.name!r} mixes {mixes[bool(precond.jumps_denoiser)]}")
    return WarmStart(f, kind, file_digest(f), iteration, state, init_ema, init_optimizer)


def _load_into(module: nn.Module, weights: dict, ws: WarmStart, what: str) -> None:
    try:
        module.load_state_dict(weights)
    except (RuntimeError, TypeError, KeyError, AttributeError) as e:
        raise UserError(f"[student] init: the {what} of {str(ws.path)!r} does not fit this "
                        f"run's student ({first_line(e)})") from None


def load_online(ws: WarmStart, student: nn.Module) -> None:
    """The student's (online) weights from the source, before its EMAs are made from it."""
    weights = ws.state["state_dict"] if ws.kind == "student" else ws.state["modules"]["student"]
    _load_into(student, weights, ws, "weights")


def load_averages(ws: WarmStart, target: nn.Module, emas: list[nn.Module]) -> None:
    """``init_ema``: the stop-gradient target and the EMAs (by position) from the checkpoint."""
    if not ws.init_ema:
        return
    mods = ws.state["modules"]
    names = ["target"] + [f"ema_{i}" for i in range(len(emas))]
    missing = [n for n in names if not isinstance(mods.get(n), dict)]
    if missing:
        raise UserError(f"[student] init: {str(ws.path)!r} holds no {missing[0]!r} (it has "
                        f"{', '.join(sorted(mods))}); set init_ema = false or list fewer "
                        f"[distill] ema rates")
    for name, m in zip(names, [target, *emas]):
        _load_into(m, mods[name], ws, name)


def load_optimizer(ws: WarmStart, optimizer) -> None:
    """``init_optimizer``: Adam's / RAdam's moments and step counts from the checkpoint."""
    if not ws.init_optimizer:
        return
    flags = [{k: g[k] for k in ("fused", "foreach") if k in g} for g in optimizer.param_groups]
    try:
        optimizer.load_state_dict(ws.state["optimizer"])
        for g, f in zip(optimizer.param_groups, flags):   # this config's, not the source's
            g.update(f)
    except (RuntimeError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"[student] init: the optimiser state of {str(ws.path)!r} does not fit "
                        f"this run's optimiser ({first_line(e)}); set init_optimizer = "
                        f"false") from None
