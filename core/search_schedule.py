"""``ctmkit search-schedule config.toml``: the middle time(s) of a K-step schedule, searched.

CTM samples in K jumps t_max = t_0 > t_1 > ... > t_K = t_min (Appendix B.3); the rho grid
fixes t_1 .. t_{K-1}, but the best middle times depend on the jumper (sony/ctm tunes its
2-step middle time with a ternary search over FID, ``code/scripts/ternary_search.py``; ECT its
``mid_t``). This command searches them for each preconditioning of the run:

* **the jumper** (``[search] jumper``): ``teacher`` -- the teacher-initialised jumper
  f(t, s) x + g(t, s) D_phi (Eqn. 8), built as the export stage builds it; ``student`` -- the
  run's distilled ``student.pt`` (per ``[run] preconds`` label, ``out_dir/<label>/``);
  ``exported`` -- the ``[export] path`` file itself; ``auto`` -- student.pt where it exists,
  else the teacher;
* **the objective** (``[search] objective``): ``trajectory`` -- the RMS per dimension at
  t_min of the jumper's K-step deterministic CTM sampling minus the teacher's reference PF-ODE
  solution from the same noise (``metrics.json``'s ``final_rmse``, core/evaluation/evaluate.py), solved
  once (it does not depend on the schedule); or a metric of ``[evaluate] metrics`` (FID, ...)
  of ``num`` samples against the evaluation's reference. Seeds and counts are fixed, so the
  objective is a deterministic function of the times (and memoised);
* **the search**: golden-section search (the ternary search that reuses one point per step)
  on u = log t over the open interval of ``[search] range``; for K = 2 on the one middle time,
  for K >= 3 by coordinate descent: one middle time at a time, between its neighbours, for
  ``rounds`` sweeps, a step kept only where it lowers the objective (so it never rises). The
  result is the best schedule evaluated inside the range; the rho grid's objective is
  reported beside it (a narrowed range may exclude it, and it may then be lower), and
  a best middle time at an end of the range is flagged (``at_edge``): the objective falls
  toward it, so its minimum may lie outside the range, or the middle jump adds nothing.

Prints the best schedules in the ``[evaluate] schedules`` syntax, writes
``out_dir/search_schedule.json`` and ``out_dir/search_schedule.png`` (the objective at every
evaluated point against the middle time). Bad input (a range with no interior or outside
[t_min, t_max], a teacher or jumper that returns NaN) is one ``error:`` line and exit 2.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Callable

import torch

from core.base.errors import UserError, one_line

#: 1 / golden ratio: each golden-section step keeps this fraction of the bracket
INV_PHI = (math.sqrt(5.0) - 1.0) / 2.0


# --- the search ------------------------------------------------------------------------------

def golden_section(f: Callable[[float], float], a: float, b: float, iterations: int,
                   tolerance: float) -> tuple[float, float]:
    """(u, f(u)): the best point evaluated by golden-section search for a minimum of `f` on the
    open interval (a, b) -- interior points only; at most `iterations` steps after the first
    two evaluations, stopping once the bracket is narrower than `tolerance`. Exact for a
    unimodal f up to the final bracket (0.618^iterations of b - a); deterministic (ties go
    left)."""
    if not a < b:
        raise UserError(f"the search interval [{math.exp(a):g}, {math.exp(b):g}] has no interior")
    c, d = b - INV_PHI * (b - a), a + INV_PHI * (b - a)
    fc, fd = f(c), f(d)
    best = min((fc, c), (fd, d))
    for _ in range(iterations):
        if b - a < tolerance:
            break
        if fc <= fd:                      # the minimum lies in [a, d]
            b, d, fd = d, c, fc
            c = b - INV_PHI * (b - a)
            fc = f(c)
            best = min(best, (fc, c))
        else:                             # ... in [c, b]
            a, c, fc = c, d, fd
            d = a + INV_PHI * (b - a)
            fd = f(d)
            best = min(best, (fd, d))
    return best[1], best[0]


def start_times(K: int, t_min: float, t_max: float, rho: float, lo: float, hi: float
                ) -> list[float]:
    """The schedule coordinate descent starts from: the rho grid when its middle times lie
    inside (lo, hi), else K - 1 middle times log-uniform inside (lo, hi)."""
    from core.diffusion.schedules import rho_grid

    ts = rho_grid(K, t_min, t_max, rho)
    if all(lo < t < hi for t in ts[1:-1]):
        return ts
    a, b = math.log(hi), math.log(lo)
    return [t_max] + [math.exp(a + (b - a) * i / K) for i in range(1, K)] + [t_min]


def search(objective: Callable[[list[float]], float], K: int, t_min: float, t_max: float,
           rho: float, lo: float, hi: float, iterations: int, tolerance: float,
           rounds: int) -> dict:
    """The best K-step schedule for `objective` (times -> value, t_max ... t_min), its middle
    times searched in (lo, hi) as the module says. Returns {"schedule", "value", "start",
    "steps": [{"round", "index", "interval", "before", "after", "t"}]}: one entry per
    coordinate search, "before" / "after" the objective of the current schedule."""
    ts = start_times(K, t_min, t_max, rho, lo, hi)
    value = objective(ts)
    out = {"start": {"schedule": list(ts), "value": value}, "steps": []}
    for r in range(1 if K == 2 else rounds):
        for i in range(1, K):
            a = math.log(max(lo, ts[i + 1]))
            b = math.log(min(hi, ts[i - 1]))
            if not a < b:           # neighbours closer than float resolution: nothing to move
                continue

            if hasattr(objective, "moving"):
                objective.moving = i          # recorded with each schedule it evaluates

            def f(u, i=i):
                return objective(ts[:i] + [math.exp(u)] + ts[i + 1:])

            u, v = golden_section(f, a, b, iterations, tolerance)
            before = value
            if v < value:
                ts, value = ts[:i] + [math.exp(u)] + ts[i + 1:], v
            out["steps"].append({"round": r, "index": i, "interval": [math.exp(a), math.exp(b)],
                                 "before": before, "after": value, "t": ts[i]})
    out.update(schedule=list(ts), value=value)
    return out


class Objective:
    """A memoised objective over schedules; `evaluated` keeps every (schedule, value) in order.
    Each entry also holds ``moved``: the index of the middle time being searched when it was
    evaluated (`moving`, set by `search`; 0 for the start). A NaN / Inf value is a
    UserError."""

    def __init__(self, name: str, fn: Callable[[list[float]], float], bar=None):
        self.name, self.fn, self.bar = name, fn, bar
        self.moving = 0
        self.cache: dict = {}
        self.evaluated: list[dict] = []

    def __call__(self, ts: list[float]) -> float:
        key = tuple(float(t) for t in ts)
        if key not in self.cache:
            v = float(self.fn(list(key)))
            if not math.isfinite(v):
                raise UserError(f"the {self.name} of schedule {format_times(key)} is NaN/Inf "
                                f"(the jumper diverges?); search_schedule.json was not written")
            self.cache[key] = v
            self.evaluated.append({"schedule": list(key), "value": v, "moved": self.moving})
            if self.bar is not None:
                self.bar.update(1)
                self.bar.set_postfix_str(f"best {min(self.cache.values()):.4g}")
        return self.cache[key]


#: a middle time this close to an end of the range (in log t) counts as at the edge
EDGE = 0.01


def at_edge(ts: list[float], lo: float, hi: float) -> bool:
    """Whether a middle time of `ts` lies within `EDGE` (log t) of an end of (lo, hi): then the
    objective falls toward that end and its minimum may lie beyond the range (or the jump adds
    nothing, e.g. a middle time at t_min)."""
    return any(min(abs(math.log(t / lo)), abs(math.log(hi / t))) < EDGE for t in ts[1:-1])


def format_times(ts) -> str:
    """[80.0, 0.81234, 0.002]: endpoints exact, middle times to 6 significant digits."""
    ts = list(ts)
    inner = [float(f"{t:.6g}") for t in ts[1:-1]]
    return "[" + ", ".join(repr(float(t)) for t in [ts[0], *inner, ts[-1]]) + "]"


def schedules_line(best: dict[int, list[float]]) -> str:
    """``schedules = { 2 = [...], 3 = [...] }``: paste into [evaluate] (or [gap])."""
    return "schedules = { " + ", ".join(f"{K} = {format_times(ts)}"
                                        for K, ts in sorted(best.items())) + " }"


# --- objectives ------------------------------------------------------------------------------

def trajectory_objective(jumper, teacher, num: int, seed: int, t_min: float, t_max: float,
                         dtype, device: str = "cpu", reference_cache: dict | None = None):
    """times -> the final trajectory error of `jumper` on that schedule: the RMS per dimension
    at t_min of its deterministic CTM sampling minus the teacher's reference PF-ODE solution,
    from the same noise and labels as core.evaluation.evaluate.trajectory_errors (same seed: the same
    number as its ``final_rmse``). The reference is solved once, on the CPU (as there)."""
    from core.export.sampling import CTMSampler

    gen = torch.Generator().manual_seed(seed)
    x_T = torch.randn((num, *teacher.shape), generator=gen, dtype=torch.float64) * t_max
    labels = torch.randint(0, teacher.num_classes, (num,), generator=gen) \
        if teacher.num_classes > 0 else None
    cache = reference_cache if reference_cache is not None else {}
    key = ("search", num, seed, t_max, t_min)
    if key not in cache:
        ref = teacher.reference_solve(x_T, t_max, [t_min], labels)[-1].double()
        if not bool(torch.isfinite(ref).all()):
            raise UserError(f"teacher {teacher.name!r} returned NaN/Inf on its PF-ODE from "
                            f"fixed noise; search_schedule.json was not written")
        cache[key] = ref
    ref = cache[key]
    x0 = x_T.to(device=device, dtype=dtype)
    lab = labels.to(device) if labels is not None else None

    @torch.no_grad()
    def value(ts: list[float]) -> float:
        x = CTMSampler(0.0).sample(jumper, x0, ts, gen, lab).double().cpu()
        sq = ((x - ref) ** 2).reshape(num, -1).sum(1) / teacher.dim
        return math.sqrt(float(sq.mean()))
    return value


def metric_objective(jumper, meta: dict, sampler, metric, reference, num: int, batch: int,
                     seed: int, device: str, cache_dir):
    """times -> the metric's value (its first key, e.g. ``fid``) on `num` samples drawn from
    `seed` with `sampler` on that schedule (as the evaluate stage scores an explicit
    schedule)."""
    import numpy as np

    from core.evaluation.quality import compute_metrics
    from core.export.sampling import draw

    def value(ts: list[float]) -> float:
        x, _ = draw(jumper, meta, sampler, ts, num, batch, seed, device, progress=False)
        if not np.all(np.isfinite(x)):
            return math.nan
        values = compute_metrics([metric], torch.from_numpy(x), reference, cache_dir,
                                 info=False)
        return float(next(iter(values.values())))
    return value


# --- the jumpers -----------------------------------------------------------------------------

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def label_runs(cfg, run, label: str = "") -> list[tuple[str, object]]:
    """(label, Run) per preconditioning of the run ([run] preconds, else [precond]), each
    Run with that entry's [precond] and out_dir, sharing `run`'s teacher; only `label` if
    given."""
    from core.host.config import for_precond
    from core.pipeline.stages import Run

    if not cfg.run.preconds:
        p = cfg.precond.data
        own = p.get("name") + (f"-{p['variant']}" if p.get("variant") else "")
        if label and label != own:
            raise UserError(f"{cfg.path}: [search] label = {label!r}, but this run has one "
                            f"preconditioning, {own!r} (labels come from [run] preconds)")
        return [(own, run)]
    labels = [e["label"] for e in cfg.run.preconds]
    if label and label not in labels:
        raise UserError(f"{cfg.path}: [search] label = {label!r} is not one of [run] "
                        f"preconds' labels ({', '.join(labels)})")
    out = []
    for e in cfg.run.preconds:
        if label and e["label"] != label:
            continue
        r = Run(for_precond(cfg, e), progress=run.progress, data=run.data_source())
        r.__dict__["teacher"] = run.teacher          # one teacher (cached_property) for all
        out.append((e["label"], r))
    return out


def build_jumper(run, source: str, dtype_name: str):
    """(jumper, meta, what) for one preconditioning's Run: `source` as ``[search] jumper``
    says; `what`: "teacher-initialised", "distilled" or "exported <path>"."""
    from core.host import plugins
    from core.export.jumper import Jumper, TeacherAsNetwork, load, make_meta

    cfg, d, teacher = run.cfg, run.cfg.diffusion, run.teacher
    student_file = run.out_dir / "student.pt"
    if source == "auto":
        source = "student" if student_file.exists() else "teacher"
    if source == "exported":
        path = cfg.export.path
        if not path.exists():
            raise UserError(f"{path}: not found; run the 'export' stage or set [search] jumper "
                            f"= \"teacher\" or \"student\"")
        jumper, meta = load(path, run.device)
        if meta.get("teacher_fingerprint") not in (None, teacher.fingerprint()):
            raise UserError(f"{path}: exported for another teacher; rerun 'export'")
        if not (math.isclose(meta["t_min"], d.t_min, rel_tol=1e-6)
                and math.isclose(meta["t_max"], d.t_max, rel_tol=1e-6)):
            raise UserError(f"{path}: the jumper covers [{meta['t_min']:g}, {meta['t_max']:g}] "
                            f"but [diffusion] says [{d.t_min:g}, {d.t_max:g}]; rerun 'export'")
        return jumper, meta, f"exported {path}"
    dtype_name = dtype_name if dtype_name != "auto" else \
        "float64" if teacher.can_sample_data else "float32"
    dtype = DTYPES[dtype_name]
    precond = plugins.create("precond", cfg.precond, run.ctx, "name")
    if source == "student":
        from core.train.students import load_student
        if not student_file.exists():
            raise UserError(f"{student_file}: not found; run the 'distill' stage or set "
                            f"[search] jumper = \"teacher\"")
        network, what = load_student(run, student_file).to(dtype), "distilled"
    else:
        network = TeacherAsNetwork(teacher.denoiser(dtype, run.device), d.sigma_data)
        what = "teacher-initialised"
    jumper = Jumper(network, precond, d.sigma_data).to(run.device).eval()
    meta = make_meta(precond, sigma_data=d.sigma_data, t_min=d.t_min, t_max=d.t_max, rho=d.rho,
                     shape=teacher.shape, num_classes=teacher.num_classes, dtype=dtype_name)
    return jumper, meta, what


# --- the command -----------------------------------------------------------------------------

def objective_name(cfg) -> str:
    s = cfg.search
    if s.objective == "auto":
        return cfg.evaluate.metrics[0] if cfg.evaluate.metrics else "trajectory"
    return s.objective


def compute(cfg, run, progress: bool = True) -> dict:
    """search_schedule.json's content: {label: {..., "schedules": {"K": {...}}}}."""
    from tqdm.auto import tqdm

    from core.diffusion.schedules import rho_grid
    from core.pipeline.stages import DTYPES as STAGE_DTYPES, _REFERENCE_ODE

    s, d = cfg.search, cfg.diffusion
    lo, hi = s.range
    name = objective_name(cfg)
    entries = label_runs(cfg, run, s.label)
    metric = reference = None
    if name != "trajectory":
        from core.evaluation.quality import metric_objects
        metric = metric_objects(cfg, run.ctx, [name])[0]
        reference = run.data_for(cfg.evaluate.data, "evaluate")
        if reference is None:
            raise UserError(f"{cfg.path}: [search] objective = {name!r} needs a dataset ([data] "
                            f"or [evaluate] data)")
        reference = reference.as_dataset()
    out = {}
    with tqdm(desc="search-schedule", unit="eval", disable=not progress) as bar:
        for label, r in entries:
            jumper, meta, what = build_jumper(r, s.jumper, s.dtype)
            dtype = STAGE_DTYPES.get(meta["dtype"], torch.float32)
            if metric is None:
                fn = trajectory_objective(jumper, run.teacher, s.num, s.seed, d.t_min, d.t_max,
                                          dtype, run.device, _REFERENCE_ODE.setdefault(
                                              run.teacher.fingerprint(), {}))
                shown = "trajectory error (final RMSE)"
            else:
                fn = metric_objective(jumper, meta, r.sampler(), metric, reference, s.num,
                                      cfg.evaluate.sample_batch, s.seed, run.device,
                                      cfg.evaluate.cache_dir)
                shown = name
            entry = {"precond": meta["precond"], "variant": meta.get("variant"),
                     "jumper": what, "objective": name, "objective_shown": shown,
                     "num": s.num, "seed": s.seed, "dtype": meta["dtype"], "range": [lo, hi],
                     "iterations": s.iterations, "tolerance": s.tolerance, "rounds": s.rounds,
                     "schedules": {}}
            for K in s.steps:
                obj = Objective(shown, fn, bar)
                rho = rho_grid(K, d.t_min, d.t_max, d.rho)
                rho_value = obj(rho)
                res = search(obj, K, d.t_min, d.t_max, d.rho, lo, hi, s.iterations,
                             s.tolerance, s.rounds)
                # res is the best schedule evaluated inside the range (the rho grid, evaluated
                # for comparison, may lie outside a narrowed one and then is not a candidate)
                edge = at_edge(res["schedule"], lo, hi)
                entry["schedules"][str(K)] = {
                    "best": {"schedule": res["schedule"], "value": res["value"],
                             "at_edge": edge},
                    "rho_grid": {"schedule": rho, "value": rho_value},
                    "start": res["start"], "steps": res["steps"], "evaluated": obj.evaluated}
            out[label] = entry
    return out


def table(results: dict) -> str:
    rows = []
    for label, r in results.items():
        rows.append(f"{label}: {r['jumper']} jumper, {r['objective_shown']} (num {r['num']}, "
                    f"seed {r['seed']})")
        for K, e in r["schedules"].items():
            b, g = e["best"], e["rho_grid"]
            rows.append(f"  {K} steps: best {b['value']:.5g} at {format_times(b['schedule'])}  "
                        f"(rho grid {g['value']:.5g} at {format_times(g['schedule'])}; "
                        f"{len(e['evaluated'])} schedules evaluated)"
                        + ("; AT THE EDGE of [search] range: the objective falls toward it"
                           if b.get("at_edge") else ""))
        best = {int(K): e["best"]["schedule"] for K, e in r["schedules"].items()}
        rows.append(f"  [evaluate] {schedules_line(best)}")
    return "\n".join(rows)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2
        print(f"error: {one_line(message)}", file=sys.stderr)
        sys.exit(2)


def _parse(argv):
    p = _Parser(prog="ctmkit search-schedule", description="The middle time(s) of K-step "
                "schedules minimising the trajectory error (or a metric of [evaluate] metrics) "
                "of the run's jumper, by golden-section search on log t ([search] section). "
                "Prints the best schedules in the [evaluate] schedules syntax; writes "
                "out_dir/search_schedule.json and search_schedule.png.")
    p.add_argument("config", help="config.toml")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value, as for ctmkit config.toml; repeatable")
    p.add_argument("--out", help="the run's folder instead of [run] out_dir: the results go "
                   "there, and the student, jumper and coefficient store are read (or a "
                   "missing store made) there")
    p.add_argument("--device", help="cpu | cuda[:N] (default: [run] device)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    args = p.parse_args(argv)
    if args.out is not None:
        args.set.append(f"run.out_dir={json.dumps(str(Path(args.out).resolve()))}")
    if args.device is not None:
        args.set.append(f"run.device={json.dumps(args.device)}")
    return args


def run_search(args) -> None:
    from core.host.config import load_config
    from core.gap import _entries, _needs_coefficients, _run_coefficients_stage
    from core.base.io import save_json
    from core.pipeline.lock import RunLock
    from core.pipeline.ownership import COMMAND_FILES, Use, check_out_dir, config_inputs
    from core.evaluation.plots import plot_search_schedule
    from core.pipeline.stages import Run, log

    cfg = load_config(args.config, overrides=args.set)
    out = cfg.run.out_dir
    # out_dir must be ctmkit's (or new, or hold only the run's inputs and these commands' files)
    check_out_dir(out, config_inputs(cfg) + [Use(out / n, "", False) for names in
                                             COMMAND_FILES.values() for n in names])
    run = Run(cfg, progress=not args.no_progress)
    if cfg.search.jumper != "exported" and _needs_coefficients(cfg, _entries(cfg)):
        _run_coefficients_stage(args.config, args.set, not args.no_progress, "search-schedule")
    lock = RunLock(cfg.run.out_dir).acquire()
    try:
        results = compute(cfg, run, progress=not args.no_progress)
        print(table(results), flush=True)
        save_json(out / "search_schedule.json", results)
        plot_search_schedule(results, out / "search_schedule.png")
    finally:
        lock.release()
    log(f"search-schedule: -> {out / 'search_schedule.json'}, {out / 'search_schedule.png'}")


def main(argv=None) -> int:
    """``ctmkit search-schedule``: 0, or 2 with one ``error:`` line on stderr for bad input."""
    args = _parse(list(sys.argv[1:] if argv is None else argv))
    from core.cli import exit_status
    return exit_status(run_search, args)


if __name__ == "__main__":
    sys.exit(main())
