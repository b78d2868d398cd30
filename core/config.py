"""Reading and validating `config.toml`.

Every key the host understands is declared here, with its type and default, in one place;
plugin-owned keys (the rest of `[teacher]`, `[precond]`, `[sample]`) are read by the plugin
through the same typed `Section` accessor, and whatever nobody read is reported as unknown.
Relative paths resolve against the folder that holds the config file.
"""

from __future__ import annotations

import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.errors import UserError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

_REQUIRED = object()

#: Upper bounds of sizes a config can ask for: far beyond any real run, but a typo such as
#: num = 1e9 fails at once instead of allocating until the machine runs out of memory.
SEED_MAX = 2 ** 63 - 1
MAX_SAMPLES = 10_000_000       # samples drawn or evaluated
MAX_BATCH = 1_000_000          # one batch
MAX_GRID = 100_000             # time steps of a grid / solver steps

#: Stage names in their canonical order. `core.stages` implements each one.
STAGES = ("teacher", "coefficients", "distill", "export", "sample", "evaluate")

#: Top-level tables a config may contain.
KNOWN_SECTIONS = ("run", "diffusion", "data", "network", "teacher", "teacher_train", "precond",
                  "coefficients", "student", "distill", "export", "sample", "evaluate")


class Section:
    """Typed access to one `[table]` of the config, with one-line errors naming the key."""

    def __init__(self, name: str, data: dict, source: str, base_dir: Path):
        if not isinstance(data, dict):
            raise UserError(f"{source}: [{name}] must be a table")
        self.name, self.data, self.source, self.base_dir = name, data, source, base_dir
        self._read: set[str] = set()

    # -- helpers ---------------------------------------------------------------------------
    def where(self, key: str) -> str:
        return f"{self.source}: [{self.name}] {key}"

    def fail(self, key: str, why: str):
        raise UserError(f"{self.where(key)}: {why}")

    def has(self, key: str) -> bool:
        return key in self.data

    def _get(self, key: str, default):
        self._read.add(key)
        if key in self.data:
            return self.data[key]
        if default is _REQUIRED:
            self.fail(key, "is required")
        return default

    def finish(self) -> None:
        """Reject keys nobody asked for (typos must not be silently ignored)."""
        unknown = sorted(set(self.data) - self._read)
        if unknown:
            raise UserError(f"{self.source}: [{self.name}] unknown key {unknown[0]!r}")

    # -- typed getters ---------------------------------------------------------------------
    def str(self, key: str, default=_REQUIRED, choices=None) -> str:
        v = self._get(key, default)
        if v is None:
            return v
        if not isinstance(v, str):
            self.fail(key, f"expected a string, got {v!r}")
        if choices is not None and v not in choices:
            self.fail(key, f"must be one of {', '.join(choices)}; got {v!r}")
        return v

    def int(self, key: str, default=_REQUIRED, min=None, max=None) -> int:
        v = self._get(key, default)
        if isinstance(v, bool) or not isinstance(v, int):
            self.fail(key, f"expected an integer, got {v!r}")
        if min is not None and v < min:
            self.fail(key, f"must be >= {min}, got {v}")
        if max is not None and v > max:
            self.fail(key, f"must be <= {max:,}, got {v:,}")
        return v

    def seed(self, key: str, default) -> int:
        """A random seed: 0 <= seed < 2^63 (torch's generators take 64-bit seeds)."""
        return self.int(key, default, min=0, max=SEED_MAX)

    def float(self, key: str, default=_REQUIRED, min=None, max=None, positive=False) -> float:
        v = self._get(key, default)
        return self._check_float(key, v, min, max, positive)

    def _check_float(self, key, v, min=None, max=None, positive=False) -> float:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            self.fail(key, f"expected a number, got {v!r}")
        v = float(v)
        if not math.isfinite(v):
            self.fail(key, f"must be finite, got {v}")
        if positive and v <= 0:
            self.fail(key, f"must be > 0, got {v}")
        if min is not None and v < min:
            self.fail(key, f"must be >= {min}, got {v}")
        if max is not None and v > max:
            self.fail(key, f"must be <= {max}, got {v}")
        return v

    def bool(self, key: str, default=_REQUIRED) -> bool:
        v = self._get(key, default)
        if not isinstance(v, bool):
            self.fail(key, f"expected true or false, got {v!r}")
        return v

    def floats(self, key: str, default=_REQUIRED, positive=False, nonempty=True) -> list[float]:
        v = self._get(key, default)
        if v is None:
            return None
        if not isinstance(v, list) or (nonempty and not v):
            self.fail(key, f"expected a non-empty list of numbers, got {v!r}")
        return [self._check_float(key, x, positive=positive) for x in v]

    def ints(self, key: str, default=_REQUIRED, min=None) -> list[int]:
        v = self._get(key, default)
        if v is None:
            return None
        if not isinstance(v, list) or not v or not all(
                isinstance(x, int) and not isinstance(x, bool) for x in v):
            self.fail(key, f"expected a non-empty list of integers, got {v!r}")
        if min is not None and any(x < min for x in v):
            self.fail(key, f"every entry must be >= {min}, got {v!r}")
        return v

    def schedules(self, key: str, t_min: float, t_max: float,
                  default=_REQUIRED) -> dict[int, list[float]]:
        """Explicit time schedules per step count: a table ``{ K = [t_0, ..., t_K] }`` whose
        keys are positive integers (TOML keys are strings) and whose values are K+1 finite,
        strictly decreasing times from `t_max` to `t_min` (endpoints to rounding; they are
        set to exactly t_max and t_min). Returns {K: times}, sorted by K."""
        v = self._get(key, default)
        if not isinstance(v, dict):
            self.fail(key, f"expected a table of step count = [times], e.g. "
                           f"{{ 2 = [{t_max:g}, 0.6, {t_min:g}] }}, got {v!r}")
        out: dict[int, list[float]] = {}
        for k, ts in v.items():
            if not (isinstance(k, str) and re.fullmatch(r"[1-9][0-9]*", k)) \
                    or int(k) > MAX_GRID:
                self.fail(key, f"key {k!r} must be a step count (an integer from 1 to "
                               f"{MAX_GRID:,})")
            K, what = int(k), f"{key}.{k}"
            if not isinstance(ts, list) or len(ts) != K + 1:
                self.fail(key, f"{k} = {ts!r}: expected a list of {K + 1} times "
                               f"(t_max, ..., t_min) for {K} step{'s' if K > 1 else ''}")
            ts = [self._check_float(what, t, positive=True) for t in ts]
            if not math.isclose(ts[0], t_max, rel_tol=1e-6):
                self.fail(key, f"{k} = {ts}: must start at [diffusion] t_max = {t_max:g}")
            if not math.isclose(ts[-1], t_min, rel_tol=1e-6):
                self.fail(key, f"{k} = {ts}: must end at [diffusion] t_min = {t_min:g}")
            ts[0], ts[-1] = t_max, t_min
            if any(a <= b for a, b in zip(ts, ts[1:])):
                self.fail(key, f"{k} = {ts}: times must be strictly decreasing")
            out[K] = ts
        return dict(sorted(out.items()))

    def strs(self, key: str, default=_REQUIRED) -> list[str]:
        v = self._get(key, default)
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            self.fail(key, f"expected a list of strings, got {v!r}")
        return v

    def matrix(self, key: str, default=_REQUIRED) -> list[list[float]]:
        """A list of equally long, non-empty lists of numbers (e.g. mixture means)."""
        v = self._get(key, default)
        if not isinstance(v, list) or not v or not all(isinstance(r, list) and r for r in v):
            self.fail(key, f"expected a list of lists of numbers, got {v!r}")
        rows = [[self._check_float(key, x) for x in r] for r in v]
        if len({len(r) for r in rows}) != 1:
            self.fail(key, "all rows must have the same length")
        return rows

    def path(self, key: str, default=_REQUIRED, base: Path | None = None) -> Path | None:
        """A path; relative ones resolve against `base` (default: the config's folder)."""
        v = self._get(key, default)
        if v is None:
            return None
        if not isinstance(v, str) or not v:
            self.fail(key, f"expected a path string, got {v!r}")
        p = Path(v).expanduser()
        return p if p.is_absolute() else ((base or self.base_dir) / p).resolve()


# ---------------------------------------------------------------------------------------------
# Host-owned sections. Defaults follow EDM / the paper's Appendix B.
# ---------------------------------------------------------------------------------------------

@dataclass
class RunCfg:
    out_dir: Path
    stages: list[str]
    seed: int = 0                # global seed; stages derive theirs from it unless given
    device: str = "cpu"          # "cpu" | "cuda" | "cuda:N"
    preconds: list = field(default_factory=list)   # compare several [precond] tables


@dataclass
class DiffusionCfg:
    sigma_data: float = 0.5      # EDM's sigma_data
    t_min: float = 0.002         # epsilon, the trajectory's end
    t_max: float = 80.0          # T, the noise level sampling starts from
    rho: float = 7.0             # EDM's time-step schedule exponent


@dataclass
class CoefficientsCfg:
    path: Path                   # HDF5 store (default out_dir/coefficients.h5)
    grid: str = "log"            # "log": log-uniform t | "edm": EDM rho-schedule
    n_timesteps: int = 120       # grid points (paper: 120 for CIFAR-10/FFHQ, 160 ImageNet)
    n_samples: int = 4096        # x_t samples per time step for E_q(x_t)
    batch: int = 512             # samples per teacher call
    seed: int = 0                # seeds data, noise and probes (common across time steps)
    data: Path | None = None     # x_0 array (.npy/.npz) when the teacher cannot sample data
    dtype: str = "float64"       # the teacher's dtype in the JVPs (float32: ~7x faster convs
                                 # on CPU); draws and inner products are float64 either way
    dl: str = "jvp"              # dl/dlambda: "jvp" exact (nested forward-mode JVP, ~2.5x the
                                 # cost) | "fd" finite differences over the time grid


@dataclass
class ExportCfg:
    path: Path                   # TorchScript jumper (default out_dir/jumper.pt)
    dtype: str = "float32"       # parameter / activation dtype of the exported jumper
    source: str = "auto"         # auto: the distilled student.pt if present, else the teacher
    aoti: bool = False           # also write <path stem>.pt2 (torch.export + AOTInductor)


@dataclass
class SampleCfg:
    sampler: str = "ctm"
    steps: int = 2               # jumps from t_max to t_min
    num: int = 1000              # total samples
    batch: int = 500
    seed: int = 0
    timesteps: list[float] | None = None   # explicit t_0 > ... > t_K (overrides the rho grid)
    runner: str = "python"       # python | ctm_sample (the C++ binary on the exported file)
    binary: Path | None = None   # ctm_sample (default build/ctm_sample of this checkout)


@dataclass
class EvaluateCfg:
    steps: list[int] = field(default_factory=lambda: [1, 2, 3, 5])
    num: int = 1000              # noise draws for the trajectory error
    seed: int = 1
    projections: int = 256       # sliced-Wasserstein directions (d > 1)
    data: Path | None = None     # reference x_0 array when the teacher cannot sample data
    trajectory: bool = True      # trajectory error vs the teacher ODE (costly for big teachers)
    metrics: list = field(default_factory=list)    # metric plugins, e.g. ["fid", "kid"]
    metric_options: dict = field(default_factory=dict)   # [evaluate.metric]: their options
    sample_num: int = 10000      # samples per step count for the metrics
    sample_batch: int = 500
    cache_dir: Path | None = None   # reference statistics (default out_dir/refstats)
    schedules: dict = field(default_factory=dict)   # {K: [t_max, ..., t_min]}: explicit times
                                 # for K steps instead of the rho grid (K is evaluated too)


@dataclass
class TrainCfg:
    """Keys shared by [teacher_train] and [distill]."""
    iterations: int
    batch_size: int
    lr: float
    optimizer: str = "adam"      # adam | radam
    warmup: int = 0              # linear learning-rate warm-up iterations
    grad_clip: float = 0.0       # max global gradient norm (0: off)
    ema: list = field(default_factory=lambda: [0.999])   # EMA rates; the first is exported
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 10
    seed: int = 0
    precision: str = "fp32"      # fp32 | bf16 | fp16 (GPU only; CPU trains in fp32)


@dataclass
class TeacherTrainCfg(TrainCfg):
    p_mean: float = -1.2         # EDM's log-normal training noise levels
    p_std: float = 1.2


@dataclass
class DistillCfg(TrainCfg):
    loss: str = "ctm"            # ctm (Eqn. 7) | cm (Eqn. 5) | dsm | any loss plugin
    distance: str = "l2"         # l2 | l1 | pseudo_huber | lpips
    lpips_net: str = "vgg"       # lpips backbone: vgg (as CM / CTM) | alex
    lpips_weights: Path | None = None   # torchvision ImageNet backbone file (default: hub cache)
    lpips_random: bool = False   # random backbone: for tests only, the values mean nothing
    solver: str = "heun"         # teacher ODE solver in the loss
    N: int = 18                  # EDM grid for t, s, u (Appendix B.2)
    max_ode_steps: int = 17      # teacher solver steps from t to u at most
    target_ema: float = 0.999    # mu of the stop-gradient target (see Eqn. 28)
    dsm_weight: Any = 1.0        # weight of the DSM loss, or "adaptive" (CTM's balance)
    eval_every: int = 100        # EMA-student trajectory error every so many iterations
    eval_num: int = 256
    eval_steps: list = field(default_factory=lambda: [1, 2, 4])
    eval: list = field(default_factory=lambda: ["trajectory"])   # and/or [evaluate] metrics
    eval_schedules: dict = field(default_factory=dict)   # as [evaluate] schedules, for eval
    micro_batch: int = 0         # samples per forward/backward pass (gradient accumulation
                                 # within the batch; 0: the whole per-process batch)
    # speed (tools/bench_train.py; README "Speed"): off by default, each changes results at
    # most at float-rounding level
    solve_buckets: int = 0       # teacher solve in the loss: 0 gathers the travelling samples
                                 # each step; k >= 1 sorts them by step count and runs step j on
                                 # a prefix rounded up to B/k rows (static shapes, no device sync)
    compile: bool = False        # torch.compile the teacher, the student and the target
    channels_last: bool = False  # image networks and inputs in channels_last memory format
    tf32: bool = False           # TF32 matmuls / convolutions on CUDA


def _train_common(s: "Section", seed: int, iterations: int, batch: int, lr: float) -> dict:
    return dict(iterations=s.int("iterations", iterations, min=1),
                batch_size=s.int("batch_size", batch, min=1, max=MAX_BATCH), lr=s.float("lr", lr, positive=True),
                optimizer=s.str("optimizer", "adam", choices=("adam", "radam")),
                warmup=s.int("warmup", 0, min=0), grad_clip=s.float("grad_clip", 0.0, min=0.0),
                ema=[s._check_float("ema", r, min=0.0, max=1.0) for r in
                     (s.floats("ema", [0.999]))],
                checkpoint_every=s.int("checkpoint_every", 500, min=1),
                keep_checkpoints=s.int("keep_checkpoints", 2, min=1),
                log_every=s.int("log_every", 10, min=1), seed=s.seed("seed", seed),
                precision=s.str("precision", "fp32", choices=("fp32", "bf16", "fp16")))


@dataclass
class Config:
    path: Path
    base_dir: Path
    run: RunCfg
    diffusion: DiffusionCfg
    coefficients: CoefficientsCfg
    export: ExportCfg
    sample: SampleCfg
    evaluate: EvaluateCfg
    student_init: str
    teacher_train: TeacherTrainCfg
    distill: DistillCfg
    data: Section                # [data]: x_0 from a file or an analytic mixture
    network: Section             # plugin-owned: `name` picks the network plugin
    teacher: Section             # plugin-owned: `kind` picks the teacher plugin
    precond: Section             # plugin-owned: `name` picks the preconditioning plugin
    sampler_options: Section     # the rest of [sample], read by the sampler plugin
    raw: dict = field(repr=False, default_factory=dict)
    sections: dict = field(repr=False, default_factory=dict)

    @property
    def teacher_kind(self) -> str:
        return self.teacher.data.get("kind")

    @property
    def precond_name(self) -> str:
        return self.precond.data.get("name")


MAX_CONFIG_BYTES = 1 << 20


def load_config(path: str | Path, overrides: list[str] = ()) -> Config:
    """Read `path`, apply ``--set section.key=value`` overrides, parse and validate."""
    path = Path(path)
    src = str(path)
    if not path.exists():
        raise UserError(f"{src}: config file not found")
    if not path.is_file():
        raise UserError(f"{src}: config is not a regular file")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise UserError(f"{src}: config is larger than 1 MiB; not a ctmkit config")
    try:
        text = path.read_text(encoding="utf-8")
    except (PermissionError, UnicodeDecodeError, OSError) as e:
        raise UserError(f"{src}: cannot read config ({e.__class__.__name__})") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{src}: not valid TOML: {e}") from None
    for item in overrides:
        apply_override(raw, item)
    return parse_config(raw, path)


def apply_override(raw: dict, item: str) -> None:
    """``section.key=value`` (``section.sub.key=value`` for sub-tables): the value is read as
    TOML (``1e-4``, ``true``, ``[1, 2]``, ``"text"``); a bare word that is not TOML is a string."""
    where = f"--set {item}"
    name, eq, text = item.partition("=")
    parts = name.strip().split(".")
    if not eq or len(parts) < 2 or not all(parts):
        raise UserError(f"{where}: expected section.key=value")
    if parts[0] not in KNOWN_SECTIONS:
        raise UserError(f"{where}: unknown section [{parts[0]}] "
                        f"(known: {', '.join(KNOWN_SECTIONS)})")
    try:
        value = tomllib.loads(f"v = {text.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = text.strip()
    table = raw
    for p in parts[:-1]:
        table = table.setdefault(p, {})
        if not isinstance(table, dict):
            raise UserError(f"{where}: {p} is not a table")
    table[parts[-1]] = value


def parse_config(raw: dict, path: Path) -> Config:
    src, base = str(path), path.resolve().parent
    for name in raw:
        if name not in KNOWN_SECTIONS:
            raise UserError(f"{src}: unknown section [{name}] "
                            f"(known: {', '.join(KNOWN_SECTIONS)})")
    sec = {name: Section(name, raw.get(name, {}), src, base) for name in KNOWN_SECTIONS}

    s = sec["run"]
    out_dir = s.path("out_dir", "runs/default")
    stages = s.strs("stages", ["coefficients", "export", "sample", "evaluate"])
    for st in stages:
        if st not in STAGES:
            s.fail("stages", f"unknown stage {st!r} (known: {', '.join(STAGES)})")
    if len(set(stages)) != len(stages):
        s.fail("stages", "lists a stage twice")
    preconds = s._get("preconds", [])
    if not isinstance(preconds, list) or not all(isinstance(p, dict) and isinstance(
            p.get("name"), str) for p in preconds):
        s.fail("preconds", "expected a list of tables with a name, e.g. [{name = \"ctm\"}, "
                           "{name = \"analytic\", variant = \"backward\"}]")
    for p in preconds:
        for k in ("label", "variant"):
            if k in p and not isinstance(p[k], str):
                s.fail("preconds", f"{k} must be a string, got {p[k]!r}")
    if preconds and "precond" in raw:
        s.fail("preconds", "give either [precond] or [run] preconds, not both")
    labels = [p.get("label", p["name"] + ("-" + p["variant"] if "variant" in p else ""))
              for p in preconds]
    if len(set(labels)) != len(labels):
        s.fail("preconds", "two entries share a label; add label = \"...\" to one")
    for lab in labels:          # each label names a sub-folder of out_dir: no paths
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}", lab) or ".." in lab:
            s.fail("preconds", f"label {lab!r} must be a plain folder name (letters, digits, "
                               f"_ . + -; no '/' or '..')")
    run = RunCfg(out_dir=out_dir, stages=sorted(stages, key=STAGES.index),
                 seed=s.seed("seed", 0), device=s.str("device", "cpu"),
                 preconds=[dict(p, label=lab) for p, lab in zip(preconds, labels)])

    s = sec["diffusion"]
    diff = DiffusionCfg(sigma_data=s.float("sigma_data", 0.5, positive=True),
                        t_min=s.float("t_min", 0.002, positive=True),
                        t_max=s.float("t_max", 80.0, positive=True),
                        rho=s.float("rho", 7.0, positive=True))
    if diff.t_min >= diff.t_max:
        s.fail("t_min", f"must be below t_max ({diff.t_max}), got {diff.t_min}")

    s = sec["coefficients"]
    coef = CoefficientsCfg(path=s.path("path", "coefficients.h5", base=out_dir),
                           grid=s.str("grid", "log", choices=("log", "edm")),
                           n_timesteps=s.int("n_timesteps", 120, min=3, max=MAX_GRID),
                           n_samples=s.int("n_samples", 4096, min=2, max=MAX_SAMPLES),
                           batch=s.int("batch", 512, min=1, max=MAX_BATCH),
                           seed=s.seed("seed", run.seed),
                           data=s.path("data", None),
                           dtype=s.str("dtype", "float64", choices=("float64", "float32")),
                           dl=s.str("dl", "jvp", choices=("jvp", "fd")))

    s = sec["student"]
    student_init = s.str("init", "teacher", choices=("teacher",))

    s = sec["export"]
    export = ExportCfg(path=s.path("path", "jumper.pt", base=out_dir),
                       dtype=s.str("dtype", "float32", choices=("float32", "float64")),
                       source=s.str("source", "auto", choices=("auto", "teacher", "student")),
                       aoti=s.bool("aoti", False))

    if export.path.suffix == ".pt2":
        sec["export"].fail("path", "is the TorchScript file; name it *.pt (aoti = true writes the "
                                   ".pt2 package beside it)")

    s = sec["sample"]
    sample = SampleCfg(sampler=s.str("sampler", "ctm"), steps=s.int("steps", 2, min=1, max=MAX_GRID),
                       num=s.int("num", 1000, min=1, max=MAX_SAMPLES),
                       batch=s.int("batch", 500, min=1, max=MAX_BATCH),
                       seed=s.seed("seed", run.seed),
                       timesteps=s.floats("timesteps", None, positive=True),
                       runner=s.str("runner", "python", choices=("python", "ctm_sample")),
                       binary=s.path("binary", None))
    if sample.timesteps is not None:
        ts = sample.timesteps
        if len(ts) < 2 or any(a <= b for a, b in zip(ts, ts[1:])):
            s.fail("timesteps", "must hold at least two strictly decreasing times")
        sample.steps = len(ts) - 1

    s = sec["evaluate"]
    ev = EvaluateCfg(steps=s.ints("steps", [1, 2, 3, 5], min=1), num=s.int("num", 1000, min=2, max=MAX_SAMPLES),
                     seed=s.seed("seed", min(run.seed + 1, SEED_MAX)), projections=s.int("projections", 256, min=1, max=MAX_GRID),
                     data=s.path("data", None), trajectory=s.bool("trajectory", True),
                     metrics=s.strs("metrics", []),
                     metric_options=s._get("metric", {}),
                     sample_num=s.int("sample_num", 10000, min=2, max=MAX_SAMPLES),
                     sample_batch=s.int("sample_batch", 500, min=1, max=MAX_BATCH),
                     cache_dir=s.path("cache_dir", "refstats", base=out_dir),
                     schedules=s.schedules("schedules", diff.t_min, diff.t_max, {}))
    if not isinstance(ev.metric_options, dict):
        s.fail("metric", "must be a table ([evaluate.metric]) of the metric plugins' options")

    s = sec["teacher_train"]
    tt = TeacherTrainCfg(**_train_common(s, run.seed, 2000, 256, 1e-3),
                         p_mean=s.float("p_mean", -1.2), p_std=s.float("p_std", 1.2, positive=True))
    s = sec["distill"]
    dw = s._get("dsm_weight", 1.0)
    if dw != "adaptive":
        dw = s.float("dsm_weight", 1.0, min=0.0)
    ds = DistillCfg(**_train_common(s, run.seed, 1000, 128, 4e-4),
                    loss=s.str("loss", "ctm"),
                    distance=s.str("distance", "l2", choices=("l2", "l1", "pseudo_huber",
                                                               "lpips")),
                    lpips_net=s.str("lpips_net", "vgg", choices=("vgg", "alex")),
                    lpips_weights=s.path("lpips_weights", None),
                    lpips_random=s.bool("lpips_random", False),
                    solver=s.str("solver", "heun"), N=s.int("N", 18, min=2, max=MAX_GRID),
                    max_ode_steps=s.int("max_ode_steps", 17, min=1, max=MAX_GRID),
                    target_ema=s.float("target_ema", 0.999, min=0.0, max=1.0), dsm_weight=dw,
                    eval_every=s.int("eval_every", 100, min=1), eval_num=s.int("eval_num", 256, min=2, max=MAX_SAMPLES),
                    eval_steps=s.ints("eval_steps", [1, 2, 4], min=1),
                    eval=s.strs("eval", ["trajectory"]),
                    eval_schedules=s.schedules("eval_schedules", diff.t_min, diff.t_max, {}),
                    micro_batch=s.int("micro_batch", 0, min=0, max=MAX_BATCH),
                    solve_buckets=s.int("solve_buckets", 0, min=0, max=MAX_BATCH),
                    compile=s.bool("compile", False),
                    channels_last=s.bool("channels_last", False), tf32=s.bool("tf32", False))

    teacher, precond = sec["teacher"], sec["precond"]
    if "kind" not in teacher.data:
        teacher.fail("kind", "is required (e.g. \"gmm\" or \"torchscript\")")
    teacher.str("kind")
    precond.str("name", "analytic")
    precond.data.setdefault("name", "analytic")

    sec["network"].str("name", "mlp")
    sec["network"].data.setdefault("name", "mlp")
    for name in ("run", "diffusion", "coefficients", "student", "export", "evaluate",
                 "teacher_train"):
        sec[name].finish()
    # [distill]: the loss plugin may read more keys (e.g. max_ode_steps); checked at its stage
    # [sample]: host keys are read above; the remaining keys belong to the sampler plugin.
    return Config(path=path, base_dir=base, run=run, diffusion=diff, coefficients=coef,
                  export=export, sample=sample, evaluate=ev, student_init=student_init,
                  teacher_train=tt, distill=ds, data=sec["data"], network=sec["network"],
                  teacher=teacher, precond=precond, sampler_options=sec["sample"], raw=raw,
                  sections=sec)


def for_precond(cfg: Config, entry: dict, own_dir: bool = True) -> Config:
    """The config of one entry of ``[run] preconds``: its own out_dir (``<out_dir>/<label>``,
    unless `own_dir` is false) and [precond] table, sharing the teacher, the coefficient store
    and the metrics' reference statistics of the parent run."""
    import copy

    raw = copy.deepcopy(cfg.raw)
    run = raw.setdefault("run", {})
    run.pop("preconds", None)
    run["out_dir"] = str(cfg.run.out_dir / entry["label"] if own_dir else cfg.run.out_dir)
    raw["precond"] = {k: v for k, v in entry.items() if k != "label"}
    raw.setdefault("coefficients", {})["path"] = str(cfg.coefficients.path)
    raw.setdefault("evaluate", {})["cache_dir"] = str(cfg.evaluate.cache_dir)
    teacher = raw.setdefault("teacher", {})
    if teacher.get("kind") == "network":
        teacher["path"] = str(Section("teacher", dict(teacher), str(cfg.path), cfg.base_dir)
                              .path("path", "teacher.pt", base=cfg.run.out_dir))
    return parse_config(raw, cfg.path)
