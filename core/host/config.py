"""Reading and validating `config.toml`.

Every key the host understands is declared once, as a field of a config dataclass (`key()`)
or a `Key`, with its type, default, range or choices and help; the parser, the dataclasses'
defaults and the docs' reference (`core/config_reference.py`) follow from the declarations.
Plugin-owned keys (the rest of `[data]`, `[network]`, `[teacher]`, `[precond]`, `[sample]`,
`[evaluate.metric]`) are read by the plugin through the same typed `Section` accessor, and
whatever nobody read is reported as unknown. Relative paths resolve against the folder that
holds the config file.
"""

from __future__ import annotations

import copy
import math
import re
import sys
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable

from core.host import stage_table
from core.base.bounds import MAX_DEPTH, check_nesting, check_text_nesting
from core.base.errors import UserError

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
MAX_ITERATIONS = 100_000_000   # optimiser steps (and the intervals counted in them)
MAX_LIST = 1_000               # entries of a list of step counts, EMA rates, names, schedules
MAX_SAMPLE_VALUES = 1 << 28    # values of one sample (a shape's product): 1 GiB in float32
MAX_RANK = 8                   # entries of a sample shape

#: Stage names in their canonical order, as `core.host.stage_table` declares them.
STAGES = stage_table.NAMES

#: Top-level tables a config may contain.
KNOWN_SECTIONS = ("run", "diffusion", "data", "network", "teacher", "teacher_train", "precond",
                  "coefficients", "student", "distill", "discriminator", "export", "sample",
                  "evaluate", "gap", "search")


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

    def floats(self, key: str, default=_REQUIRED, positive=False, nonempty=True, min=None,
               max=None, length=MAX_LIST) -> list[float]:
        v = self._get(key, default)
        if v is None:
            return None
        if not isinstance(v, list) or (nonempty and not v):
            self.fail(key, f"expected a non-empty list of numbers, got {v!r}")
        self._check_length(key, v, length)
        return [self._check_float(key, x, min, max, positive) for x in v]

    def ints(self, key: str, default=_REQUIRED, min=None, max=None,
             length=MAX_LIST) -> list[int]:
        v = self._get(key, default)
        if v is None:
            return None
        if not isinstance(v, list) or not v or not all(
                isinstance(x, int) and not isinstance(x, bool) for x in v):
            self.fail(key, f"expected a non-empty list of integers, got {v!r}")
        self._check_length(key, v, length)
        if min is not None and any(x < min for x in v):
            self.fail(key, f"every entry must be >= {min}, got {v!r}")
        if max is not None and any(x > max for x in v):
            self.fail(key, f"every entry must be <= {max:,}, got {next(x for x in v if x > max):,}")
        return v

    def shape(self, key: str, default=_REQUIRED) -> list[int] | None:
        """A sample shape: at most `MAX_RANK` positive integers whose product is at most
        `MAX_SAMPLE_VALUES` (what one sample may hold)."""
        v = self.ints(key, default, min=1, length=MAX_RANK)
        if v is not None and math.prod(v) > MAX_SAMPLE_VALUES:
            self.fail(key, f"{v} holds {math.prod(v):,} values per sample; the bound is "
                           f"{MAX_SAMPLE_VALUES:,}")
        return v

    def _check_length(self, key: str, v: list, bound: int = MAX_LIST) -> None:
        if len(v) > bound:
            self.fail(key, f"holds {len(v):,} entries; the bound is {bound:,}")

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
        self._check_length(key, list(v))
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
        self._check_length(key, v)
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
# Declaring a key: once, with its type, default, range or choices and help. Parsing, the
# dataclasses' defaults, unknown-key errors and the docs' reference
# (core/config_reference.py) all follow from the declarations.
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Derived:
    """A default computed from keys read before it, e.g. a stage's seed from [run] seed."""
    text: str                           # how the reference names it, e.g. "[run] seed"
    of: Callable[[dict], Any]           # its value, from the parse context ({"run": RunCfg})


@dataclass(frozen=True)
class Key:
    """One config key. `kind` names the `Section` getter that reads and checks it (str int seed
    float bool path floats ints strs schedules, or table / tables: a raw TOML table / list of
    tables). `default` is the value in effect when the key is absent, written as in TOML
    (paths as strings), or `_REQUIRED`, or a `Derived`; `example` is what the reference shows
    for a key without a default value (None, REQUIRED)."""
    kind: str
    default: Any
    help: str
    name: str = ""               # the TOML name (default: the dataclass field's)
    min: Any = None
    max: Any = None
    positive: bool = False       # floats: > 0
    choices: tuple | None = None
    words: tuple = ()            # floats: these strings too, as they are ("adaptive")
    length: int = MAX_LIST       # lists: at most this many entries
    base: str | None = None      # paths: "out_dir" resolves relative ones against out_dir
    example: Any = None
    #: whether the key changes a result (the weights a training run reaches at an iteration, the
    #: numbers of a coefficient store): only these enter the fingerprints that decide whether a
    #: checkpoint is resumed or a store reused (`result_values`). False: how long a run goes on,
    #: how often it logs, evaluates or checkpoints, where it writes, and speed settings that
    #: change numbers at most at float-rounding level.
    result: bool = True

    def read(self, s: Section, ctx: dict):
        """The key's value in section `s`, checked (`ctx`: what parse_config read before)."""
        n, k = self.name, self.kind
        d = self.default.of(ctx) if isinstance(self.default, Derived) else self.default
        if k == "str":
            return s.str(n, d, choices=self.choices)
        if k == "int":
            return s.int(n, d, min=self.min, max=self.max)
        if k in ("float", "floats"):
            v = s._get(n, d)
            if isinstance(v, str) and v in self.words:
                return v
            if k == "floats":
                return s.floats(n, d, min=self.min, max=self.max, positive=self.positive,
                                length=self.length)
            return s.float(n, d, min=self.min, max=self.max, positive=self.positive)
        if k == "ints":
            return s.ints(n, d, min=self.min, max=self.max, length=self.length)
        if k == "strs":
            v = s.strs(n, d)
            for x in v if self.choices else ():
                if x not in self.choices:
                    s.fail(n, f"unknown {n.rstrip('s')} {x!r} (known: {', '.join(self.choices)})")
            return v
        if k == "path":
            return s.path(n, d, base=ctx[self.base] if self.base else None)
        if k == "schedules":
            return s.schedules(n, ctx["diffusion"].t_min, ctx["diffusion"].t_max, d)
        if k in ("seed", "bool"):
            return getattr(s, k)(n, d)
        v = s._get(n, d)                         # table, tables: checked by their reader
        if k == "table" and not isinstance(v, dict):
            s.fail(n, f"must be a table ([{s.name}.{n}]) of {self.help}")
        return v


def _field(k: Key):
    """The dataclass field of key `k`: its default where the default is a plain value."""
    meta = {"key": k}
    if k.default is _REQUIRED or isinstance(k.default, Derived) or (
            k.kind == "path" and k.default is not None):
        return field(metadata=meta)              # set by parse_config
    if isinstance(k.default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(k.default), metadata=meta)
    return field(default=k.default, metadata=meta)


def key(kind: str, default, help: str, **opts):
    """A dataclass field declared as a config key (see `Key`)."""
    return _field(Key(kind, default, help, **opts))


def redefault(cls, name: str, default):
    """Field `name` of `cls` with another default ([teacher_train] and [distill] share keys
    but not all their defaults)."""
    return _field(replace(next(f.metadata["key"] for f in fields(cls) if f.name == name),
                          default=default))


def keys(cls) -> list[Key]:
    """The keys a config dataclass declares, in order, named."""
    return [replace(f.metadata["key"], name=f.metadata["key"].name or f.name)
            for f in fields(cls) if "key" in f.metadata]


def result_values(obj) -> dict:
    """{field name: value} of the keys of config dataclass `obj` that change a result
    (`Key.result`): what a fingerprint of it digests."""
    return {f.name: getattr(obj, f.name) for f in fields(obj)
            if "key" in f.metadata and f.metadata["key"].result}


def _read(cls, s: Section, ctx: dict):
    """`cls` from section `s`: every declared key read and checked."""
    return cls(**{f.name: k.read(s, ctx) for f, k in zip(
        [f for f in fields(cls) if "key" in f.metadata], keys(cls))})


# ---------------------------------------------------------------------------------------------
# Host-owned sections. Defaults follow EDM / the paper's Appendix B.
# ---------------------------------------------------------------------------------------------

_SEED = Derived("[run] seed", lambda c: c["run"].seed)
_SCHEDULE = {2: [80.0, 0.6, 0.002]}


@dataclass(kw_only=True)
class RunCfg:
    out_dir: Path = key("path", "runs/default", "every file the stages write")
    stages: list[str] = key("strs", ["coefficients", "export", "sample", "evaluate"],
                            "any subset, run in this order", choices=STAGES)
    seed: int = key("seed", 0, "default of the other seeds")
    device: str = key("str", "cpu", '"cpu" | "cuda" | "cuda:N"')
    preconds: list = key("tables", [], 'e.g. [{name = "ctm"}, {name = "analytic", variant = '
                         '"backward"}] instead of [precond]: teacher + coefficients once, '
                         'then distill..evaluate per entry in out_dir/<label>/ '
                         '(label = name[-variant])')


@dataclass(kw_only=True)
class DiffusionCfg:
    sigma_data: float = key("float", 0.5, "EDM's sigma_data (CM/BCM/EDM scalings)",
                            positive=True)
    t_min: float = key("float", 0.002, "epsilon, the trajectory's end; below t_max",
                       positive=True)
    t_max: float = key("float", 80.0, "T, the noise level sampling starts from", positive=True)
    rho: float = key("float", 7.0, "EDM's time-step schedule exponent", positive=True)


@dataclass(kw_only=True)
class CoefficientsCfg:
    path: Path = key("path", "coefficients.h5", "the HDF5 store (relative to out_dir)",
                     base="out_dir", result=False)
    grid: str = key("str", "log", "log-uniform t (log) or EDM's rho-schedule (edm)",
                    choices=("log", "edm"))
    n_timesteps: int = key("int", 120, "grid points (paper: 120 for CIFAR-10 and FFHQ, 160 "
                           "with the edm grid for ImageNet)", min=3, max=MAX_GRID)
    n_samples: int = key("int", 4096, "x_t samples per time step for E_q(x_t) (paper: 4096 / "
                         "1024)", min=2, max=MAX_SAMPLES)
    batch: int = key("int", 512, "samples per teacher call", min=1, max=MAX_BATCH)
    seed: int = key("seed", _SEED, "same data, noise and probes at every time step")
    data: Path | None = key("path", None, "x_0 array (.npy/.npz/.h5) for teachers that cannot "
                            "sample data", example="x0.npy")
    dtype: str = key("str", "float64", "the teacher in the JVPs (float32: 4-7x faster for "
                     "convnets on CPU; draws and inner products stay float64)",
                     choices=("float64", "float32"))
    dl: str = key("str", "jvp", "dl/dlambda in s_t: jvp exact (nested forward-mode JVP; "
                  "~2.5-3x the cost, s_t at a time independent of the grid), fd 4th-order "
                  "finite differences over the grid (cheaper, but s_t depends on the grid)",
                  choices=("jvp", "fd"))
    # speed (tools/bench_coefficients.py; docs/speed.md): the same numbers to float rounding,
    # not part of the store's settings (a store is reused across them)
    times_per_call: int = key("int", 1, "time steps per teacher call: the batch at k time "
                              "steps in one call (k x batch rows)", min=1, max=MAX_GRID,
                                  result=False)
    compile: bool = key("bool", False, "torch.compile the first-order JVPs (the nested one of "
                        "dl = jvp stays eager: dynamo cannot trace it)", result=False)
    smooth: float = key("float", 0.0, "0: l_t, s_t exactly as Eqns. (15), (17). > 0: a "
                        "DEVIATION from the paper, for study only: both Gaussian-smoothed over "
                        "lambda with this std (numerics.smooth; end values, constants and L = S "
                        "= 1, eta = 0 at t_max kept); logged, in the store's settings and in "
                        "metrics.json (\"deviation\")", min=0.0, max=10.0)


@dataclass(kw_only=True)
class StudentCfg:
    init: str = key("str", "teacher", '"teacher" (the paper\'s initialisation) or a warm start '
                    "(core/train/warm_start.py): a student.pt, a distill checkpoint or a run's out_dir "
                    "(its newest checkpoint), relative to this file; {label}: the [run] preconds "
                    "entry's label, e.g. \"../stage1/{label}\"")
    init_ema: bool = key("bool", False, "a checkpoint source's EMAs and stop-gradient target "
                         "too (else they start as its online weights)")
    init_optimizer: bool = key("bool", False, "a checkpoint source's optimiser state too")

#: The keys the host reads in the plugin-owned sections: the plugin each one names (the
#: plugin reads the rest of its section).
PLUGIN_KEYS = {
    "network": [Key("str", "mlp", "mlp | unet | any network plugin", name="name")],
    "teacher": [Key("str", _REQUIRED, "gmm | torchscript | network | edm | openai | any "
                    "teacher plugin", name="kind", example="gmm")],
    "precond": [Key("str", "analytic", "cm | ctm | bcm | analytic | any preconditioning plugin",
                    name="name")],
    # the GAN term's discriminator (docs/gan.md), read when [distill] gan_weight != 0
    "discriminator": [
        Key("str", "conv", "conv (small, from scratch: vectors, small images) | projected "
            "(Sauer et al. 2021 on frozen timm feature networks; the gan extra) | any "
            "discriminator plugin", name="name"),
        Key("float", 2e-4, "the discriminator's learning rate (constant)", name="lr",
            positive=True),
        Key("str", "adam", "the discriminator's optimiser", name="optimizer",
            choices=("adam", "radam")),
    ],
}


@dataclass(kw_only=True)
class ExportCfg:
    path: Path = key("path", "jumper.pt", "the TorchScript jumper (relative to out_dir)",
                     base="out_dir")
    dtype: str = key("str", "float32", "parameter / activation dtype of the exported jumper",
                     choices=("float32", "float64"))
    source: str = key("str", "auto", "auto: the distilled student.pt if present, else "
                      "the teacher", choices=("auto", "teacher", "student"))
    aoti: bool = key("bool", False, "also write <path stem>.pt2 (torch.export + AOTInductor)")


@dataclass(kw_only=True)
class SampleCfg:
    sampler: str = key("str", "ctm", "ctm | cm | any sampler plugin")
    steps: int = key("int", 2, "jumps on EDM's rho grid from t_max to t_min", min=1,
                     max=MAX_GRID)
    num: int = key("int", 1000, "total samples", min=1, max=MAX_SAMPLES)
    batch: int = key("int", 500, "samples per batch", min=1, max=MAX_BATCH)
    seed: int = key("seed", _SEED, "the noise")
    timesteps: list[float] | None = key("floats", None, "explicit decreasing times t_0 > ... > "
                                        "t_K (overrides steps)", positive=True,
                                        length=MAX_GRID + 1,
                                        example=[80.0, 0.8, 0.002])
    runner: str = key("str", "python", "ctm_sample: the C++ binary on the exported file",
                      choices=("python", "ctm_sample"))
    binary: Path | None = key("path", None, "ctm_sample (default: this checkout's "
                              "build/ctm_sample)", example="build/ctm_sample")
    formats: list[str] = key("strs", [], "extra to samples.npy: npz (samples.npz, ADM's "
                             "evaluator.py), png (samples/, EDM's fid.py)", choices=("npz", "png"),
                             example=["npz", "png"])


@dataclass(kw_only=True)
class EvaluateCfg:
    steps: list[int] = key("ints", [1, 2, 3, 5], "step counts for the trajectory error and "
                           "the metrics", min=1, max=MAX_GRID)
    num: int = key("int", 1000, "noise draws for the trajectory error", min=2,
                   max=MAX_SAMPLES)
    seed: int = key("seed", Derived("[run] seed + 1", lambda c: min(c["run"].seed + 1,
                                                                     SEED_MAX)), "the draws")
    projections: int = key("int", 256, "sliced-W1 directions (d > 1)", min=1, max=MAX_GRID)
    data: Path | None = key("path", None, "reference x_0 array for teachers that cannot "
                            "sample data", example="x0.npy")
    trajectory: bool = key("bool", True, "trajectory error vs the teacher ODE (costly for "
                           "big teachers)")
    metrics: list = key("strs", [], "metric plugins: fid, kid (images), for each of steps "
                        "and samples.npy")
    metric_options: dict = key("table", {}, "the metric plugins' options", name="metric")
    sample_num: int = key("int", 10000, "samples per step count for the metrics", min=2,
                          max=MAX_SAMPLES)
    sample_batch: int = key("int", 500, "samples per batch for the metrics", min=1,
                            max=MAX_BATCH)
    cache_dir: Path | None = key("path", "refstats", "reference statistics (relative to "
                                 "out_dir)", base="out_dir")
    schedules: dict = key("schedules", {}, "explicit times for K steps (K+1 "
                          "strictly decreasing, t_max to t_min) instead of the rho grid, for "
                          "the trajectory error and the metrics; a K not in steps is "
                          "added. metrics.json: trajectory_error.K.schedule, "
                          "quality.schedules.K", example=_SCHEDULE)


def _from_evaluate(name: str) -> Derived:
    return Derived(f"[evaluate] {name}", lambda c: getattr(c["evaluate"], name))


@dataclass(kw_only=True)
class GapCfg:
    """``ctmkit gap`` (core/gap.py): the consistency gap of the teacher-initialised jumper."""
    steps: list[int] = key("ints", _from_evaluate("steps"), "step counts whose rho-grid jumps "
                           "are measured", min=1, max=MAX_GRID)
    schedules: dict = key("schedules", Derived("[evaluate] schedules", lambda c: {
        str(k): v for k, v in c["evaluate"].schedules.items()}), "explicit schedules, as "
                          "[evaluate] schedules", example=_SCHEDULE)
    num: int = key("int", _from_evaluate("num"), "teacher ODE solutions from fixed noise",
                   min=2, max=MAX_SAMPLES)
    seed: int = key("seed", _from_evaluate("seed"), "the noise")
    dtype: str = key("str", "auto", "auto: float64 for analytic teachers (those that sample "
                     "their data), float32 for networks", choices=("auto", "float32", "float64"))


@dataclass(kw_only=True)
class TrainCfg:
    """Keys shared by [teacher_train] and [distill]."""
    iterations: int = key("int", _REQUIRED, "optimiser steps", min=1, max=MAX_ITERATIONS,
                          result=False)
    batch_size: int = key("int", _REQUIRED, "global batch: split over torchrun processes",
                          min=1, max=MAX_BATCH)
    lr: float = key("float", _REQUIRED, "learning rate", positive=True)
    optimizer: str = key("str", "adam", "", choices=("adam", "radam"))
    warmup: int = key("int", 0, "linear learning-rate warm-up iterations", min=0,
                      max=MAX_ITERATIONS)
    lr_schedule: str = key("str", "constant", "after warmup: constant | linear / cosine "
                           "(to lr_min at the last iteration) | inverse_sqrt (EDM2: lr / "
                           "sqrt(max(it / lr_ref_iterations, 1)))",
                           choices=("constant", "linear", "cosine", "inverse_sqrt"))
    lr_min: float = key("float", 0.0, "the last iteration's lr of linear / cosine", min=0.0)
    lr_ref_iterations: int = key("int", 0, "inverse_sqrt: iterations at the full lr (EDM2's "
                                 "ref_batches)", min=0, max=MAX_ITERATIONS)
    grad_clip: float = key("float", 0.0, "max global gradient norm (0: off)", min=0.0)
    ema: list = key("floats", [0.999], "EMA rates; the first one is saved / exported",
                    min=0.0, max=1.0, length=16)
    checkpoint_every: int = key("int", 500, "iterations between checkpoints", min=1,
                                max=MAX_ITERATIONS, result=False)
    keep_checkpoints: int = key("int", 2, "checkpoints kept", min=1, max=MAX_LIST, result=False)
    log_every: int = key("int", 10, "iterations between log lines", min=1,
                         max=MAX_ITERATIONS, result=False)
    seed: int = key("seed", _SEED, "initialisation, data order and noise")
    precision: str = key("str", "fp32", "bf16 / fp16 on GPU only (CPU trains in fp32)",
                         choices=("fp32", "bf16", "fp16"))


@dataclass(kw_only=True)
class TeacherTrainCfg(TrainCfg):
    iterations: int = redefault(TrainCfg, "iterations", 2000)
    batch_size: int = redefault(TrainCfg, "batch_size", 256)
    lr: float = redefault(TrainCfg, "lr", 1e-3)
    p_mean: float = key("float", -1.2, "EDM's log-normal training noise levels: mean of ln t")
    p_std: float = key("float", 1.2, "and its standard deviation", positive=True)


@dataclass(kw_only=True)
class DistillCfg(TrainCfg):
    iterations: int = redefault(TrainCfg, "iterations", 1000)
    batch_size: int = redefault(TrainCfg, "batch_size", 128)
    lr: float = redefault(TrainCfg, "lr", 4e-4)
    loss: str = key("str", "ctm", "ctm (Eqn. 7) | cm (Eqn. 5) | dsm | any loss plugin")
    distance: str = key("str", "l2", "the loss's distance (lpips: images, upsampled to 224)",
                        choices=("l2", "l1", "pseudo_huber", "lpips"))
    lpips_net: str = key("str", "vgg", "the lpips backbone (vgg: as CM / CTM)",
                         choices=("vgg", "alex"))
    lpips_weights: Path | None = key("path", None, "torchvision's ImageNet backbone file "
                                     "(default: the torch hub cache)",
                                     example="vgg16-397923af.pth")
    lpips_random: bool = key("bool", False, "a random backbone: for tests only, the values "
                             "mean nothing")
    solver: str = key("str", "heun", "euler | heun: the teacher ODE solver inside the loss")
    N: int = key("int", 18, "EDM grid for t, s, u (Appendix B.2, Table 3)", min=2,
                 max=MAX_GRID)
    max_ode_steps: int = key("int", 17, "at most this many solver steps from t to u (Table 3)",
                             min=1, max=MAX_GRID)
    target_ema: float = key("float", 0.999, "mu of the stop-gradient target (see Eqn. 28)",
                            min=0.0, max=1.0)
    dsm_weight: Any = key("float", 1.0, "weight of the DSM loss, or \"adaptive\" (CTM's "
                          "gradient-norm balance)", min=0.0, words=("adaptive",))
    eval_every: int = key("int", 100, "the EMA student's evaluation every so many iterations",
                          min=1, max=MAX_ITERATIONS, result=False)
    eval_num: int = key("int", 256, "noise draws / samples per evaluation", min=2,
                        max=MAX_SAMPLES, result=False)
    eval_steps: list = key("ints", [1, 2, 4], "step counts of the evaluation", min=1,
                           max=MAX_GRID, result=False)
    # changes no weight, but has always entered the distill fingerprint: declared result =
    # true so the fingerprints of existing runs (and their checkpoints) stay what they were
    eval: list = key("strs", ["trajectory"], "trajectory error and/or metrics of [evaluate] "
                     "metrics (\"fid\")")
    eval_schedules: dict = key("schedules", {}, "as [evaluate] schedules: K jumps "
                               "on these times instead of the rho grid (K is added to "
                               "eval_steps); metrics.csv keeps the column names (traj_err_2, "
                               "fid_2, ...)", example=_SCHEDULE, result=False)
    micro_batch: int = key("int", 0, "samples per forward/backward pass: gradient "
                           "accumulation inside the batch (same result to rounding; 0: the "
                           "whole per-process batch)", min=0, max=MAX_BATCH, result=False)
    # speed (tools/bench_train.py; docs/speed.md): off by default, each changes results at
    # most at float-rounding level
    solve_buckets: int = key("int", 0, "the teacher solve in the loss: 0 gathers the "
                             "travelling samples each step; k >= 1 sorts them by step count "
                             "and runs step j on a prefix rounded up to B/k rows (static "
                             "shapes, no device sync)", min=0, max=MAX_BATCH, result=False)
    compile: bool = key("bool", False, "torch.compile the teacher, the student and the target",
                        result=False)
    compile_mode: str = key("str", "default", "torch.compile's mode with compile = true: "
                            "reduce-overhead adds CUDA graphs (CUDA only; on the CPU the same "
                            "as default)", choices=("default", "reduce-overhead",
                                                    "max-autotune",
                                                    "max-autotune-no-cudagraphs"), result=False)
    fused_optimizer: bool = key("bool", False, "the optimiser step as fused kernels (Adam: "
                                "torch's fused=True, RAdam: foreach=True), on CPU and CUDA",
                                    result=False)
    channels_last: bool = key("bool", False, "image networks and inputs in channels_last "
                              "memory format", result=False)
    tf32: bool = key("bool", False, "TF32 matmuls / convolutions on CUDA", result=False)
    # CTM's GAN term (docs/gan.md): a [discriminator] trained against the student's jumps
    gan_weight: Any = key("float", 0.0, "weight of the generator's adversarial (hinge) term; 0: "
                          "no GAN; \"adaptive\": CTM's gradient-norm balance against the main "
                          "loss, as for dsm_weight", min=0.0, words=("adaptive",))
    gan_start: int = key("int", 0, "the iteration the GAN term (and the discriminator's "
                         "training) switches on", min=0, max=MAX_ITERATIONS)
    generator_every: int = key("int", 1, "CTM's g_learning_period: from gan_start on, an "
                               "iteration (it - gan_start) % k == 0 steps the student, the "
                               "others the discriminator only; 1: both every iteration",
                               min=1, max=MAX_ITERATIONS)
    gan_fake: str = key("str", "jump_to_t_min", "the discriminator's fake: the student's jump "
                        "from the loss's x_t, t straight to t_min, or its jump to s carried on "
                        "to t_min by the stop-gradient target (CTM's gan_fake_inner_type / "
                        "gan_fake_outer_type)", choices=("jump_to_t_min", "jump_then_target"))


def declared() -> dict[str, list[Key]]:
    """Every key the host declares, by section ([evaluate] metric is the table
    [evaluate.metric]); [data] and the rest of [network], [teacher], [precond], [sample] and
    [evaluate.metric] belong to plugins (and `core.data.source`)."""
    return {"run": keys(RunCfg), "diffusion": keys(DiffusionCfg), "data": [],
            "network": PLUGIN_KEYS["network"], "teacher": PLUGIN_KEYS["teacher"],
            "teacher_train": keys(TeacherTrainCfg), "precond": PLUGIN_KEYS["precond"],
            "coefficients": keys(CoefficientsCfg), "student": keys(StudentCfg),
            "distill": keys(DistillCfg), "discriminator": PLUGIN_KEYS["discriminator"],
            "export": keys(ExportCfg), "sample": keys(SampleCfg),
            "evaluate": keys(EvaluateCfg), "gap": keys(GapCfg), "search": keys(SearchCfg)}


#: [search] objective values besides the names of [evaluate] metrics
SEARCH_OBJECTIVES = ("auto", "trajectory")


@dataclass(kw_only=True)
class SearchCfg:
    """``ctmkit search-schedule`` (core/search_schedule.py): the middle time(s) of K-step
    schedules, searched by golden-section search on log t."""
    steps: list[int] = key("ints", [2, 3], "step counts K whose K-1 middle times are searched "
                           "(K = 2: one golden-section search; K >= 3: coordinate descent, one "
                           "time at a time)", min=2, max=100)
    objective: str = key("str", "auto", "trajectory: the final RMSE vs the teacher ODE from "
                         "fixed noise (metrics.json's final_rmse); or a metric of [evaluate] "
                         "metrics (e.g. \"fid\") on num samples from seed; auto: the first of "
                         "[evaluate] metrics, else trajectory")
    jumper: str = key("str", "auto", "teacher: the teacher-initialised jumper; student: the "
                      "run's distilled student.pt; exported: the [export] path file; auto: "
                      "student.pt if present, else the teacher (per preconditioning)",
                      choices=("auto", "teacher", "student", "exported"))
    label: str = key("str", "", "the [run] preconds label to search (default: every "
                     "preconditioning of the run)")
    num: int = key("int", _from_evaluate("num"), "noise draws (trajectory) or samples (a "
                   "metric) per evaluated schedule", min=2, max=MAX_SAMPLES)
    seed: int = key("seed", _from_evaluate("seed"), "the same noise for every schedule: the "
                    "objective is deterministic")
    range: list[float] = key("floats", Derived("[diffusion] [t_min, t_max]", lambda c: [
        c["diffusion"].t_min, c["diffusion"].t_max]), "[lo, hi]: where the middle times may "
                             "lie, within [t_min, t_max]", positive=True, length=2)
    iterations: int = key("int", 16, "golden-section steps per search (each shrinks the "
                          "log-t bracket by 0.618)", min=1, max=200)
    tolerance: float = key("float", 1e-3, "stop a search once its log-t bracket is this "
                           "narrow", positive=True)
    rounds: int = key("int", 2, "coordinate-descent sweeps over the middle times (K >= 3)",
                      min=1, max=100)
    dtype: str = key("str", "auto", "the teacher / student jumper's dtype; auto: float64 for "
                     "analytic teachers, float32 for networks (an exported jumper keeps its own)",
                     choices=("auto", "float32", "float64"))


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
    student: StudentCfg
    teacher_train: TeacherTrainCfg
    distill: DistillCfg
    data: Section                # [data]: x_0 from a file or an analytic mixture
    network: Section             # plugin-owned: `name` picks the network plugin
    teacher: Section             # plugin-owned: `kind` picks the teacher plugin
    precond: Section             # plugin-owned: `name` picks the preconditioning plugin
    discriminator: Section       # plugin-owned: `name` picks the discriminator plugin
    sampler_options: Section     # the rest of [sample], read by the sampler plugin
    raw: dict = field(repr=False, default_factory=dict)
    sections: dict = field(repr=False, default_factory=dict)
    gap: GapCfg | None = None    # [gap]: read by ``ctmkit gap`` only
    search: SearchCfg | None = None    # [search]: read by ``ctmkit search-schedule`` only

    @property
    def teacher_kind(self) -> str:
        return self.teacher.data.get("kind")

    @property
    def student_init(self) -> str:
        return self.student.init

    @property
    def student_init_path(self) -> Path | None:
        """A warm start's source path (relative ones from the config file's folder)."""
        init = self.student.init
        return None if init == "teacher" else (self.base_dir / Path(init).expanduser()).resolve()

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
    raw = parse_toml(text, src)
    for item in overrides:
        apply_override(raw, item)
    return parse_config(raw, path)


def parse_toml(text: str, where: str):
    """`text` parsed as TOML, its nesting bounded by `core.base.bounds.MAX_DEPTH` (checked on the
    text before parsing, as tomllib recurses, and on the result, for dotted keys); one-line
    errors."""
    check_text_nesting(text, where)
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{where}: not valid TOML: {e}") from None
    except RecursionError:          # nesting the scan above did not see: still refused
        raise UserError(f"{where}: values nest too deep; the bound is {MAX_DEPTH}") from None
    check_nesting(raw, where)
    return raw


#: a --set value that fails as TOML is a bare-word string unless it holds one of these: then it
#: was meant as TOML (an unclosed quote or bracket) and is an error, not a literal
_TOML_MARKS = "\"'[]{}"


def apply_override(raw: dict, item: str) -> None:
    """``section.key=value`` (``section.sub.key=value`` for sub-tables): the value is read as
    TOML (``1e-4``, ``true``, ``[1, 2]``, ``"text"``); a bare word that is not TOML is a string.
    A value with a line break, or one that fails as TOML and holds a quote or a bracket (an
    unclosed ``"text``), is an error."""
    where = f"--set {item}"
    name, eq, text = item.partition("=")
    parts = name.strip().split(".")
    if not eq or len(parts) < 2 or not all(parts):
        raise UserError(f"{where}: expected section.key=value")
    if parts[0] not in KNOWN_SECTIONS:
        raise UserError(f"{where}: unknown section [{parts[0]}] "
                        f"(known: {', '.join(KNOWN_SECTIONS)})")
    text = text.strip()
    if "\n" in text or "\r" in text:
        raise UserError(f"{where}: the value holds a line break; give it on one line")
    check_text_nesting(text, where)
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except (tomllib.TOMLDecodeError, RecursionError):
        if any(c in text for c in _TOML_MARKS):
            raise UserError(f"{where}: not a valid TOML value (an unclosed quote or bracket?); "
                            f"write strings as '\"text\"'") from None
        value = text
    check_nesting(value, where)
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
    ctx: dict = {}

    s = sec["run"]
    run = ctx["run"] = _read(RunCfg, s, ctx)
    ctx["out_dir"] = run.out_dir
    if len(set(run.stages)) != len(run.stages):
        s.fail("stages", "lists a stage twice")
    run.stages = sorted(run.stages, key=STAGES.index)
    preconds = run.preconds
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
    run.preconds = [dict(p, label=lab) for p, lab in zip(preconds, labels)]

    s = sec["diffusion"]
    diff = ctx["diffusion"] = _read(DiffusionCfg, s, ctx)
    if diff.t_min >= diff.t_max:
        s.fail("t_min", f"must be below t_max ({diff.t_max}), got {diff.t_min}")

    coef = _read(CoefficientsCfg, sec["coefficients"], ctx)
    student = _read(StudentCfg, sec["student"], ctx)
    if "{label}" in student.init and not run.preconds:
        sec["student"].fail("init", "holds {label}, which only [run] preconds entries define")
    export = _read(ExportCfg, sec["export"], ctx)
    if export.path.suffix == ".pt2":
        sec["export"].fail("path", "is the TorchScript file; name it *.pt (aoti = true writes the "
                                   ".pt2 package beside it)")

    s = sec["sample"]
    sample = _read(SampleCfg, s, ctx)
    if sample.timesteps is not None:
        ts = sample.timesteps
        if len(ts) < 2 or any(a <= b for a, b in zip(ts, ts[1:])):
            s.fail("timesteps", "must hold at least two strictly decreasing times")
        sample.steps = len(ts) - 1

    ev = ctx["evaluate"] = _read(EvaluateCfg, sec["evaluate"], ctx)
    gap = _read(GapCfg, sec["gap"], ctx)
    search = _read(SearchCfg, sec["search"], ctx)
    _check_search(search, sec["search"], diff, ev)
    tt = _read(TeacherTrainCfg, sec["teacher_train"], ctx)
    ds = _read(DistillCfg, sec["distill"], ctx)
    for name, t in (("teacher_train", tt), ("distill", ds)):
        _check_lr_schedule(t, sec[name])
    if ds.gan_weight != 0.0 and ds.gan_start >= ds.iterations:
        sec["distill"].fail("gan_start", f"must be below iterations ({ds.iterations:,}), got "
                                         f"{ds.gan_start:,}: the GAN term would never run")

    teacher, precond = sec["teacher"], sec["precond"]
    if "kind" not in teacher.data:
        teacher.fail("kind", "is required (e.g. \"gmm\" or \"torchscript\")")
    for name, ks in PLUGIN_KEYS.items():        # the plugin's name; it reads the rest
        for k in ks:
            sec[name].data.setdefault(k.name, k.read(sec[name], ctx))
    for name in ("run", "diffusion", "coefficients", "student", "export", "evaluate",
                 "teacher_train", "gap", "search"):
        sec[name].finish()
    # [distill]: the loss plugin may read more keys (e.g. max_ode_steps); checked at its stage
    # [sample]: host keys are read above; the remaining keys belong to the sampler plugin.
    return Config(path=path, base_dir=base, run=run, diffusion=diff, coefficients=coef,
                  export=export, sample=sample, evaluate=ev, student=student,
                  teacher_train=tt, distill=ds, data=sec["data"], network=sec["network"],
                  teacher=teacher, precond=precond, sampler_options=sec["sample"], raw=raw,
                  sections=sec, gap=gap, search=search,
                  discriminator=sec["discriminator"])


def _check_search(search: SearchCfg, s: Section, diff: DiffusionCfg, ev: EvaluateCfg) -> None:
    """[search] range: two times, an interior, within [t_min, t_max]; objective: known."""
    if len(search.range) != 2:
        s.fail("range", f"expected [lo, hi], got {search.range}")
    lo, hi = search.range
    if not lo < hi:
        s.fail("range", f"{search.range} has no interior (lo must be below hi): there is no "
                        f"middle time to search")
    if lo < diff.t_min * (1 - 1e-9) or hi > diff.t_max * (1 + 1e-9):
        s.fail("range", f"{search.range} must lie within [diffusion] [t_min, t_max] = "
                        f"[{diff.t_min:g}, {diff.t_max:g}]")
    if search.objective not in SEARCH_OBJECTIVES and search.objective not in ev.metrics:
        s.fail("objective", f"must be auto, trajectory or one of [evaluate] metrics "
                            f"({', '.join(ev.metrics) or 'none'}); got {search.objective!r}")


def _check_lr_schedule(t: TrainCfg, s: Section) -> None:
    if t.lr_min > t.lr:
        s.fail("lr_min", f"must not exceed lr ({t.lr:g}), got {t.lr_min:g}")
    if t.lr_schedule == "inverse_sqrt" and t.lr_ref_iterations < 1:
        s.fail("lr_ref_iterations", "must be at least 1 with lr_schedule = \"inverse_sqrt\"")


def for_precond(cfg: Config, entry: dict, own_dir: bool = True) -> Config:
    """The config of one entry of ``[run] preconds``: its own out_dir (``<out_dir>/<label>``,
    unless `own_dir` is false) and [precond] table, sharing the teacher, the coefficient store
    and the metrics' reference statistics of the parent run."""
    raw = copy.deepcopy(cfg.raw)
    run = raw.setdefault("run", {})
    run.pop("preconds", None)
    run["out_dir"] = str(cfg.run.out_dir / entry["label"] if own_dir else cfg.run.out_dir)
    raw["precond"] = {k: v for k, v in entry.items() if k != "label"}
    init = raw.get("student", {}).get("init")
    if isinstance(init, str):                  # a warm start per preconditioning
        raw["student"]["init"] = init.replace("{label}", entry["label"])
    raw.setdefault("coefficients", {})["path"] = str(cfg.coefficients.path)
    raw.setdefault("evaluate", {})["cache_dir"] = str(cfg.evaluate.cache_dir)
    teacher = raw.setdefault("teacher", {})
    if teacher.get("kind") == "network":
        teacher["path"] = str(Section("teacher", dict(teacher), str(cfg.path), cfg.base_dir)
                              .path("path", "teacher.pt", base=cfg.run.out_dir))
    return parse_config(raw, cfg.path)
