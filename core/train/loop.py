"""What every training loop here shares: the loop skeleton (`TrainingLoop`: lr schedule,
backward, clipping, step, EMA, logging, checkpoints, fingerprint, resume), checkpoints (atomic,
last k kept, exact resume), EMA, the metrics CSV and its PNG, and keyed random draws."""

from __future__ import annotations

import copy
import csv
import hashlib
import io
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from core.base import distributed as dist
from core.base.bounds import check_state_dict
from core.base.errors import UserError, first_line
from core.base.io import atomic_path, save_torch

CKPT_FORMAT, CKPT_VERSION = "ctmkit.checkpoint", 1
_CKPT_RE = re.compile(r"^ckpt-(\d{8})\.pt$")


def iteration_generator(seed: int, iteration: int, stream: int = 0) -> torch.Generator:
    """The CPU generator for one iteration: every rank draws the whole global batch from it."""
    return torch.Generator().manual_seed((seed * 1_000_003 + iteration * 7919 + stream)
                                         % (2 ** 63 - 1))


class EMA:
    """theta_ema <- mu theta_ema + (1 - mu) theta (also the stop-gradient target, see Eqn. 28)."""

    def __init__(self, model: nn.Module, rate: float):
        self.rate = rate
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self._lists: tuple | None = None        # (source, its tensors, ours), made once

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One fused lerp over all parameters (bitwise the per-tensor lerp_'s result)."""
        if self._lists is None or self._lists[0] is not model:
            self._lists = (model, [p.detach() for p in model.parameters()],
                           list(self.model.parameters()), list(model.buffers()),
                           list(self.model.buffers()))
        _, theirs, mine, their_buffers, my_buffers = self._lists
        if mine:
            torch._foreach_lerp_(mine, theirs, 1.0 - self.rate)
        if my_buffers:
            torch._foreach_copy_(my_buffers, their_buffers)


def checkpoints(folder: Path) -> list[tuple[int, Path]]:
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _CKPT_RE.match(p.name))]
    return sorted(found)


def save_checkpoint(folder: Path, iteration: int, fingerprint: str, modules: dict,
                    optimizer, keep: int, extra: dict | None = None,
                    optimizers: dict | None = None) -> Path:
    """Rank 0 writes ckpt-<iteration>.pt atomically, then deletes all but the newest `keep`.
    `optimizers`: more optimisers by name (the GAN's discriminator), beside `optimizer`."""
    path = folder / f"ckpt-{iteration:08d}.pt"
    if dist.is_main():
        state = {"format": CKPT_FORMAT, "version": CKPT_VERSION, "fingerprint": fingerprint,
                 "iteration": iteration,
                 "modules": {k: m.state_dict() for k, m in modules.items()},
                 "optimizer": optimizer.state_dict(), "extra": extra or {}}
        if optimizers:
            state["optimizers"] = {k: o.state_dict() for k, o in optimizers.items()}
        save_torch(path, state)
        for _, old in checkpoints(folder)[:-keep]:
            old.unlink(missing_ok=True)
    dist.barrier()
    return path


def load_checkpoint(path: Path, fingerprint: str) -> dict:
    from core.base.io import load_torch

    state = load_torch(path, "checkpoint (delete it to resume from an earlier one)", CKPT_FORMAT,
                       keys={"iteration": int, "modules": dict, "optimizer": dict})
    if state.get("version") != CKPT_VERSION:
        raise UserError(f"{path}: checkpoint version {state.get('version')} is not supported")
    if state.get("fingerprint") != fingerprint:
        raise UserError(f"{path}: checkpoint of a different configuration (model, data, loss or "
                        f"batch settings changed); use another out_dir or delete the checkpoints")
    return state


def restore(state: dict, modules: dict, optimizer, path: Path | str = "checkpoint",
            optimizers: dict | None = None) -> int:
    for k, m in modules.items():
        if k not in state["modules"]:
            raise UserError(f"{path}: checkpoint lacks {k!r}")
        check_state_dict(state["modules"][k], f"{path}: {k}", m.state_dict())
    more = state.get("optimizers") if optimizers else {}
    for k in optimizers or {}:
        if not isinstance(more, dict) or not isinstance(more.get(k), dict):
            raise UserError(f"{path}: checkpoint lacks the {k} optimiser")
    try:
        for k, m in modules.items():
            m.load_state_dict(state["modules"][k])
        optimizer.load_state_dict(state["optimizer"])
        for k, o in (optimizers or {}).items():
            o.load_state_dict(more[k])
    except (RuntimeError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise UserError(f"{path}: checkpoint does not fit the model ({first_line(e)})") from None
    return int(state["iteration"])


def resume(folder: Path, fingerprint: str, modules: dict, optimizer,
           optimizers: dict | None = None) -> tuple[int, Path | None]:
    """Restore the newest checkpoint in `folder`, if any: (its iteration, its path)."""
    found = checkpoints(folder)
    if not found:
        return 0, None
    path = found[-1][1]
    return restore(load_checkpoint(path, fingerprint), modules, optimizer, path,
                   optimizers), path


def _is_number(text: str) -> bool:
    try:
        float(text)
    except (TypeError, ValueError):
        return False
    return True


class MetricsLog:
    """metrics.csv (one row per logged iteration; on resume rows past the checkpoint go), and
    TensorBoard events in <csv stem>_tb/ when the `tensorboard` package is installed."""

    def __init__(self, path: Path, fields: list[str], resume_from: int):
        self.path, self.fields = path, ["iteration"] + fields
        self.rows: list[dict] = []
        self.tb = None
        if dist.is_main():
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(path.with_name(path.stem + "_tb")),
                                        purge_step=resume_from + 1 if resume_from else None)
            except ImportError:       # tensorboard is optional
                self.tb = None
        if resume_from > 0 and path.is_file():
            try:
                with open(path, newline="", encoding="utf-8") as fh:
                    reader = csv.DictReader(fh)
                    rows = [r for r in reader if (r.get("iteration") or "").isdigit()
                            and int(r["iteration"]) <= resume_from]
                    names = [f for f in (reader.fieldnames or []) if isinstance(f, str)]
            except (UnicodeDecodeError, csv.Error, OSError) as e:
                raise UserError(f"{path}: not a ctmkit metrics file ({e.__class__.__name__}); "
                                f"move it away to resume") from None
            for r in rows:
                for k, v in r.items():
                    if k not in ("iteration", None) and v not in (None, "") and \
                            not _is_number(v):
                        raise UserError(f"{path}: not a ctmkit metrics file ({k} = {v!r}); "
                                        f"move it away to resume")
            self.rows = [{k: v for k, v in r.items() if k is not None} for r in rows]
            self.fields += [f for f in names if f not in self.fields]
        for r in self.rows:
            for f in self.fields:
                r.setdefault(f, "")

    def add(self, iteration: int, values: dict) -> None:
        for k in values:
            if k not in self.fields:
                self.fields.append(k)
        row = {"iteration": iteration, **{k: f"{v:.6g}" if isinstance(v, float) else v
                                          for k, v in values.items()}}
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(k, float(v), iteration)
        if self.rows and int(self.rows[-1]["iteration"]) == iteration:
            self.rows[-1].update(row)
        else:
            self.rows.append(row)

    def flush(self) -> None:
        if not dist.is_main():
            return
        if self.tb is not None:
            self.tb.flush()
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=self.fields, restval="")
        w.writeheader()
        w.writerows(self.rows)
        with atomic_path(self.path) as tmp:
            tmp.write_text(buf.getvalue())

    def column(self, name: str) -> tuple[list[int], list[float]]:
        xs, ys = [], []
        for r in self.rows:
            if r.get(name) not in (None, ""):
                xs.append(int(r["iteration"]))
                ys.append(float(r[name]))
        return xs, ys


def plot_curves(log: MetricsLog, path: Path, title: str) -> None:
    if not dist.is_main():
        return
    from core.evaluation.plots import _plt, _save

    plt = _plt()
    gan_cols = [f for f in log.fields if f in ("loss_gan", "d_loss", "d_real", "d_fake",
                                                 "gan_weight") and log.column(f)[0]]
    loss_cols = [f for f in log.fields if f.startswith("loss") and f != "loss_gan"]
    err_cols = [f for f in log.fields if f.startswith(("traj_err", "fid", "kid"))]
    panels = 1 + bool(err_cols) + bool(gan_cols)
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels if panels > 1 else 6, 3.8),
                             squeeze=False)
    if gan_cols:                 # the GAN term (core/train/gan.py): logits and losses, linear scale
        ax = axes[0, panels - 1]
        for c in gan_cols:
            xs, ys = log.column(c)
            ax.plot(xs, ys, label=c, lw=1)
        ax.axhline(0.0, color="0.6", lw=0.5)
        ax.set_xlabel("iteration")
        ax.set_title("GAN: discriminator loss, mean logits (real, fake), generator term",
                     fontsize=9)
        ax.legend(fontsize=8)
    positive = True
    for c in loss_cols:
        xs, ys = log.column(c)
        axes[0, 0].plot(xs, ys, label=c, lw=1)
        positive = positive and all(y > 0 for y in ys)
    # the GAN's adversarial term can make the total negative: then a symmetric log scale
    axes[0, 0].set_yscale("log" if positive else "symlog", **({} if positive else
                                                              {"linthresh": 1e-3}))
    axes[0, 0].set_xlabel("iteration")
    axes[0, 0].legend(fontsize=8)
    for c in err_cols:
        xs, ys = log.column(c)
        axes[0, 1].plot(xs, ys, "o-", label=c, ms=3)
    if err_cols:
        axes[0, 1].set_yscale("log")
        axes[0, 1].set_xlabel("iteration")
        axes[0, 1].set_title("EMA student: trajectory RMSE vs the teacher ODE / sample "
                             "metrics (_K = jumps)", fontsize=9)
        axes[0, 1].legend(fontsize=8)
    fig.suptitle(title)
    _save(fig, path)


def make_optimizer(name: str, params, lr: float, fused: bool = False):
    """Adam or RAdam; `fused`: the step as fused kernels (Adam: fused=True, RAdam, which has
    no fused kernel: foreach=True). Same update to float rounding."""
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, **({"fused": True} if fused else {}))
    if name == "radam":
        return torch.optim.RAdam(params, lr=lr, **({"foreach": True} if fused else {}))
    raise ValueError(name)


@dataclass(frozen=True)
class LRSchedule:
    """The learning rate of iteration `it` (0-based), a pure function of `it`, so a resumed run
    follows the uninterrupted one exactly: a linear warm-up over `warmup` iterations, times

    * ``constant``: 1;
    * ``linear`` / ``cosine``: from `lr` (at the end of the warm-up) to `lr_min` at the last
      iteration (``iterations - 1``), linearly / along half a cosine;
    * ``inverse_sqrt``: EDM2's (Karras et al. 2024, Eqn. 15: lr / sqrt(max(t / t_ref, 1))), in
      iterations: full lr up to `ref` iterations, then decaying as 1 / sqrt(it).
    """
    lr: float
    warmup: int = 0
    kind: str = "constant"
    lr_min: float = 0.0
    ref: int = 0
    iterations: int = 1

    @classmethod
    def of(cls, cfg) -> "LRSchedule":
        """The schedule a [teacher_train] / [distill] config (TrainCfg) declares."""
        return cls(lr=cfg.lr, warmup=cfg.warmup, kind=cfg.lr_schedule, lr_min=cfg.lr_min,
                   ref=cfg.lr_ref_iterations, iterations=cfg.iterations)

    def __call__(self, it: int) -> float:
        warm = min(1.0, (it + 1) / self.warmup) if self.warmup > 0 else 1.0
        if self.kind == "constant":
            return self.lr * warm
        if self.kind == "inverse_sqrt":
            return self.lr * warm / math.sqrt(max(it / self.ref, 1.0))
        span = self.iterations - 1 - self.warmup          # decay after the warm-up's last step
        p = min(max((it - self.warmup) / span, 0.0), 1.0) if span > 0 else 1.0
        decay = 1.0 - p if self.kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * p))
        return warm * (self.lr_min + (self.lr - self.lr_min) * decay)


def with_lr_schedule(keys: dict, cfg) -> dict:
    """A fingerprint's view `keys` of a TrainCfg, with the schedule keys as they bear on the
    weights: none for ``constant`` (fingerprints of runs from before schedules still match),
    and ``iterations`` too for ``linear`` / ``cosine``, whose every lr depends on it (a longer
    run is then another run, not a resumable extension)."""
    keys = {k: v for k, v in keys.items() if k not in ("lr_schedule", "lr_min",
                                                       "lr_ref_iterations")}
    if cfg.lr_schedule != "constant":
        keys.update(lr_schedule=cfg.lr_schedule, lr_ref_iterations=cfg.lr_ref_iterations)
    if cfg.lr_schedule in ("linear", "cosine"):
        keys.update(lr_min=cfg.lr_min, iterations=cfg.iterations)
    return keys


def config_digest(desc: dict) -> str:
    """The fingerprint of a training run: SHA-256 of everything that determines its weights
    (a JSON-able description); a checkpoint of another fingerprint is not resumed."""
    return hashlib.sha256(json.dumps(desc, sort_keys=True, default=str).encode()).hexdigest()


def backward(loss, scaler=None) -> None:
    """loss.backward(), through the fp16 GradScaler when there is one."""
    (scaler.scale(loss) if scaler is not None else loss).backward()


class TrainingLoop:
    """The skeleton of the teacher stage's and distillation's training loops::

        loop = TrainingLoop("distill", ...)          # resumes from the newest checkpoint
        for it in loop.iterations():                 # a progress bar from loop.start
            ... draw the batch of iteration `it`, compute the loss, backward(loss, scaler) ...
            loop.check_finite(stats, it)             # noted on the device; settled (one-line
                                                     # error) at the next log row / checkpoint
            lr = loop.step(it)                       # lr schedule, unscale, clip, step, EMAs
            if loop.due(it + 1, log_every): loop.log_row(it + 1, {...})
            loop.end_iteration(it + 1)               # progress, checkpoint when due

    Checkpoints hold `modules` and the optimiser under `fingerprint` in `ckdir`; metrics go to
    the CSV `metrics` (its columns `fields`, rows past the resumed checkpoint dropped)."""

    def __init__(self, name: str, *, ckdir: Path, fingerprint: str, modules: dict, optimizer,
                 params: list, ema_source: nn.Module, emas: list, lr, warmup: int,
                 grad_clip: float, iterations: int, checkpoint_every: int,
                 keep_checkpoints: int, metrics: Path, fields: list, progress: bool,
                 scaler=None, checkpoint_extra: dict | None = None,
                 optimizers: dict | None = None):
        self.name, self.ckdir, self.fingerprint = name, ckdir, fingerprint
        self.optimizers = optimizers or {}               # more, by name (checkpointed too)
        self.checkpoint_extra = checkpoint_extra or {}   # who wrote it (warm starts read it)
        self.modules, self.optimizer, self.params = modules, optimizer, params
        self.ema_source, self.emas, self.scaler = ema_source, emas, scaler
        # `lr`: a float (constant after `warmup`) or the run's LRSchedule
        self.schedule = lr if isinstance(lr, LRSchedule) else LRSchedule(lr, warmup)
        self.grad_clip = grad_clip
        self.total, self.checkpoint_every = iterations, checkpoint_every
        self.keep, self.progress = keep_checkpoints, progress
        if dist.is_main():    # fails (one line) before any log or checkpoint is written
            ckdir.mkdir(parents=True, exist_ok=True)
        impl = [{k: g[k] for k in ("fused", "foreach") if k in g}
                for g in optimizer.param_groups]
        self.start, resumed = resume(ckdir, fingerprint, modules, optimizer, self.optimizers)
        for g, flags in zip(optimizer.param_groups, impl):   # the config's, not the checkpoint's
            g.update(flags)
        if resumed is not None and dist.is_main():
            print(f"[ctmkit] {name}: resuming from {resumed.name} (iteration {self.start})")
        self.log = MetricsLog(metrics, fields, self.start)
        self.bar = None
        self._first_bad: torch.Tensor | None = None   # first non-finite iteration, on device

    def iterations(self):
        """The iterations still to run, with a progress bar; the metrics CSV is written at the
        end."""
        self.bar = tqdm(total=self.total, initial=self.start, desc=self.name, unit="it",
                        disable=not (self.progress and dist.is_main()), leave=False)
        yield from range(self.start, self.total)
        self.verify()
        self.bar.close()
        self.log.flush()

    def due(self, done: int, every: int) -> bool:
        return done % every == 0 or done == self.total

    def check_finite(self, stats: torch.Tensor, it: int) -> None:
        """Note whether iteration `it`'s losses `stats` are finite, on their device: no sync.
        `verify` settles it; `log_row`, a checkpoint and the end of the loop call it first, so
        a non-finite loss stops the run (naming its iteration) before anything of that
        iteration or later reaches the disk."""
        if self._first_bad is None:
            self._first_bad = torch.full((), -1, dtype=torch.long, device=stats.device)
        self._first_bad.masked_fill_(~torch.isfinite(stats).all() & (self._first_bad < 0), it)

    def verify(self) -> None:
        """One device sync: raise if a loss noted by `check_finite` was not finite."""
        if self._first_bad is None or int(self._first_bad) < 0:
            return
        last = checkpoints(self.ckdir)
        raise UserError(f"{self.name}: non-finite loss at iteration {int(self._first_bad)}; "
                        f"stopped. The last good checkpoint is "
                        f"{last[-1][1] if last else 'none (none was written)'}")

    def step(self, it: int) -> float:
        """The optimiser step of iteration `it` (gradients in place): the warm-up lr, the
        scaler's unscale, gradient clipping, the step, then every EMA. Returns the lr."""
        lr = self.schedule(it)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        scaler = self.scaler
        if scaler is not None:
            scaler.unscale_(self.optimizer)
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        if scaler is not None:
            scaler.step(self.optimizer)
            scaler.update()
        else:
            self.optimizer.step()
        for e in self.emas:
            e.update(self.ema_source)
        return lr

    def log_row(self, done: int, values: dict, loss: float, **postfix) -> None:
        self.verify()
        self.log.add(done, values)
        self.bar.set_postfix(loss=f"{loss:.4g}", **postfix)

    def end_iteration(self, done: int) -> None:
        self.bar.update(1)
        if self.due(done, self.checkpoint_every):
            self.verify()
            self.log.flush()
            save_checkpoint(self.ckdir, done, self.fingerprint, self.modules, self.optimizer,
                            self.keep, self.checkpoint_extra, self.optimizers)
