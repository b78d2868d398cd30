"""``ctmkit gap config.toml``: the consistency gap of each preconditioning on this teacher,
measured before any training (paper Section 3.2).

For a jump t -> s along the teacher's PF-ODE (x_t, x_s: its reference solution from fixed
noise), the jumper f(t, s) x_t + g(t, s) D (Eqn. 8) lands exactly on x_s when

    D_theta*(x_t, t, s) = (x_s - f(t, s) x_t) / g(t, s)              (Eqn. 8 inverted)

the denoiser a perfect student needs. The consistency gap is ||D_theta* - D_phi(x_t, t)||
(Section 3.2, bounded in Prop. 3.1 / Eqn. 16; Analytic-Precond's s_t minimises it, Eqn. 17).
For CM / BCM, which mix the network output F rather than D (Table 1), Eqn. 8 inverted gives
F*, and the gap is that of D* = c_skip(t) x_t + c_out(t) F* (Eqn. 3). Reported per
preconditioning, as RMS per dimension over the noise draws:

* ``gap_rms``: the consistency gap; ``jump_rms``: the teacher-initialised jumper's error
  f x_t + g D_phi - x_s (= g (D_phi - D*) for CTM-like preconditionings);
* per jump of each schedule of ``[gap] steps`` / ``schedules`` (defaults: ``[evaluate]``'s);
* over the training grid: every pair t_n > t_m of the ``[distill] N``-point EDM grid, averaged
  (as mean squares) with the probabilities the CTM loss draws the pairs (`ctm_pair_weights`).

Writes ``out_dir/gap.json`` (``{label: {"train_grid": {...}, "schedules": {"K": [...]}}}``),
``out_dir/gap.png`` and a table on stdout. An ``analytic`` preconditioning whose coefficient
store is missing gets it first, from the ``coefficients`` stage (as ``ctmkit config.toml
--stages coefficients`` would run it). Bad input is one ``error:`` line and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

from core.base.dtypes import DTYPES
from core.base.errors import UserError, one_line



# --- the measurement -------------------------------------------------------------------------

def ctm_pair_weights(N: int) -> dict[tuple[int, int], float]:
    """{(n, m): probability} of the grid pair (t_n, t_m) that the CTM loss trains on
    (plugins/losses.py CTMLoss.draw): n uniform on 0..N-1, then m uniform on n+1..N."""
    return {(n, m): 1.0 / (N * (N - n)) for n in range(N) for m in range(n + 1, N + 1)}


def coefficients_at(precond, t: float, s: float, label: str, where: str):
    """(f, g) of `precond` at one pair, float64 scalars; a g that is 0 or non-finite (the gap
    divides by it) or a non-finite f is a UserError."""
    f, g = precond(torch.tensor([t], dtype=torch.float64), torch.tensor([s], dtype=torch.float64))
    f, g = float(f.reshape(-1)[0]), float(g.reshape(-1)[0])
    if not (math.isfinite(f) and math.isfinite(g)) or g == 0.0:
        raise UserError(f"preconditioning {label!r}: f(t, s) = {f:g}, g(t, s) = {g:g} at "
                        f"t = {t:g}, s = {s:g} ({where}); the consistency gap needs a finite "
                        f"f and a finite, non-zero g")
    return f, g


def jump_gap(precond, sigma_data: float, x_t, x_s, D_phi, t: float, f: float,
             g: float) -> tuple[float, float]:
    """(gap_rms, jump_rms) of one jump t -> s: the RMS per dimension of D_theta* - D_phi and of
    the teacher-initialised jump f x_t + g D_phi - x_s (float64 tensors [num, ...])."""
    from core.diffusion.edm import denoiser_from_output, output_from_denoiser

    inner_star = (x_s - f * x_t) / g                                     # see Eqn. 8, inverted
    tt = torch.full((x_t.shape[0],), t, dtype=torch.float64)
    if precond.jumps_denoiser:
        D_star, inner_phi = inner_star, D_phi
    else:                       # CM / BCM: F* (Table 1), its D through Eqn. 3
        D_star = denoiser_from_output(inner_star, x_t, tt, sigma_data)
        inner_phi = output_from_denoiser(D_phi, x_t, tt, sigma_data)
    jump = f * x_t + g * inner_phi - x_s                                 # see Eqn. 8
    return _rms(D_star - D_phi), _rms(jump)


def _rms(v) -> float:
    return math.sqrt(float((v.double() ** 2).mean()))


def fixed_noise(teacher, num: int, seed: int, t_max: float):
    """x_T (float64) and class labels (random when the teacher is conditional, else None): the
    same draws as the evaluation's trajectory error (core.evaluation.evaluate.trajectory_errors)."""
    gen = torch.Generator().manual_seed(seed)
    x_T = torch.randn((num, *teacher.shape), generator=gen, dtype=torch.float64) * t_max
    labels = torch.randint(0, teacher.num_classes, (num,), generator=gen) \
        if teacher.num_classes > 0 else None
    return x_T, labels


def teacher_states(teacher, x_T, labels, times: list[float], cache: dict, key,
                   device: str = "cpu", progress: bool = False) -> dict:
    """{t: x_t} (float64, on the CPU) along the teacher's reference PF-ODE solution from x_T at
    times[0] (= t_max), solved on `device` one segment at a time (as `reference_solve` does in
    one call), once per `key` in `cache`; a NaN / Inf state is a UserError."""
    from tqdm.auto import tqdm

    if key not in cache:
        x = x_T.to(device)
        lab = labels.to(device) if labels is not None else None
        states = {times[0]: x_T.double()}
        for t0, t1 in tqdm(list(zip(times, times[1:])), desc="teacher ODE", unit="segment",
                           disable=not progress):
            x = teacher.reference_solve(x, t0, [t1], lab)[0]
            states[t1] = x.double().cpu()
            if not bool(torch.isfinite(states[t1]).all()):
                raise UserError(f"teacher {teacher.name!r} returned NaN/Inf on its PF-ODE from "
                                f"fixed noise (at t = {t1:g}); gap.json was not written")
        cache[key] = states
    return cache[key]


@torch.no_grad()
def teacher_denoised(teacher, states: dict, labels, dtype, device: str,
                     batch: int = 500) -> dict:
    """{t: D_phi(x_t, t)} (float64 on the CPU) for every state; NaN / Inf is a UserError."""
    D = teacher.denoiser(dtype, device)
    out = {}
    for t, x in states.items():
        parts = []
        for i in range(0, x.shape[0], batch):
            xb = x[i:i + batch].to(device=device, dtype=dtype)
            tb = torch.full((xb.shape[0],), t, dtype=dtype, device=device)
            lb = labels[i:i + batch].to(device) if labels is not None else None
            parts.append(D(xb, tb, lb).double().cpu())
        out[t] = torch.cat(parts)
        if not bool(torch.isfinite(out[t]).all()):
            raise UserError(f"teacher {teacher.name!r} returned NaN/Inf at t = {t:g}; gap.json "
                            f"was not written")
    return out


def measure(precond, label: str, sigma_data: float, states: dict, denoised: dict,
            grid: list[float], schedules: dict[int, list[float]]) -> dict:
    """One preconditioning's gap.json entry: the training grid's weighted gap (and its pairs)
    and the gap per jump of each schedule ({K: times})."""
    def one(t, s, where):
        f, g = coefficients_at(precond, t, s, label, where)
        gap, jump = jump_gap(precond, sigma_data, states[t], states[s], denoised[t], t, f, g)
        return {"t": t, "s": s, "f": f, "g": g, "gap_rms": gap, "jump_rms": jump}

    N = len(grid) - 1
    pairs = [dict(one(grid[n], grid[m], f"training grid pair ({n}, {m})"), weight=w)
             for (n, m), w in ctm_pair_weights(N).items()]
    mean_sq = lambda k: math.sqrt(sum(p["weight"] * p[k] ** 2 for p in pairs))  # noqa: E731
    return {"precond": precond.name, "variant": precond.variant or None,
            "jumps_denoiser": bool(precond.jumps_denoiser),
            "train_grid": {"N": N, "gap_rms": mean_sq("gap_rms"),
                           "jump_rms": mean_sq("jump_rms"), "pairs": pairs},
            "schedules": {str(K): [one(a, b, f"{K}-step schedule {ts}")
                                   for a, b in zip(ts, ts[1:])]
                          for K, ts in schedules.items()}}


# --- the command -----------------------------------------------------------------------------

def _schedules(cfg) -> dict[int, list[float]]:
    """{K: times} of [gap] steps (rho grid) and schedules (explicit, they win)."""
    from core.evaluation.evaluate import with_schedules
    from core.diffusion.schedules import rho_grid

    g, d = cfg.gap, cfg.diffusion
    return {K: list(g.schedules[K]) if K in g.schedules else rho_grid(K, d.t_min, d.t_max, d.rho)
            for K in with_schedules(g.steps, g.schedules)}


def _entries(cfg) -> list[tuple[str, object]]:
    """(label, [precond] section) per preconditioning of the run: [run] preconds, else
    [precond] (label: name-variant)."""
    from core.host.config import for_precond

    if cfg.run.preconds:
        return [(e["label"], for_precond(cfg, e, own_dir=False).precond)
                for e in cfg.run.preconds]
    return [("", cfg.precond)]


def _needs_coefficients(cfg, entries) -> bool:
    from core.host import plugins

    return any(getattr(plugins.get("precond", sec.data.get("name"), sec.where("name")).factory,
                       "requires_coefficients", False) for _, sec in entries) \
        and not cfg.coefficients.path.exists()


def _run_coefficients_stage(config: str, overrides: list[str], progress: bool,
                            command: str = "gap") -> None:
    """The 'coefficients' stage through the ordinary command (its lock, ledger, run.json)."""
    from core.run import main as run_main
    from core.pipeline.stages import log

    log(f"{command}: no coefficient store yet; running the 'coefficients' stage first")
    argv = [config, "--stages", "coefficients", *[f"--set={o}" for o in overrides]]
    if run_main(argv + ([] if progress else ["--no-progress"])) != 0:
        raise SystemExit(2)         # run_main printed its one error line


def compute(cfg, run, entries, progress: bool = True) -> dict:
    """gap.json's content for `entries` (see `measure`)."""
    from tqdm.auto import tqdm

    from core.host import plugins
    from core.diffusion.schedules import rho_grid
    from core.pipeline.stages import _REFERENCE_ODE

    g, d = cfg.gap, cfg.diffusion
    teacher = run.teacher
    dtype = DTYPES[g.dtype] if g.dtype != "auto" else \
        torch.float64 if teacher.can_sample_data else torch.float32
    grid = rho_grid(cfg.distill.N, d.t_min, d.t_max, d.rho)
    schedules = _schedules(cfg)
    times = sorted({*grid, *(t for ts in schedules.values() for t in ts)}, reverse=True)
    x_T, labels = fixed_noise(teacher, g.num, g.seed, d.t_max)
    cache = _REFERENCE_ODE.setdefault(teacher.fingerprint(), {})
    states = teacher_states(teacher, x_T, labels, times, cache,
                            ("gap", g.num, g.seed, tuple(times)), run.device, progress)
    denoised = teacher_denoised(teacher, states, labels, dtype, run.device)
    out = {}
    for label, section in tqdm(entries, desc="gap", unit="precond", disable=not progress):
        precond = plugins.create("precond", section, run.ctx, "name")
        label = label or precond.name + (f"-{precond.variant}" if precond.variant else "")
        out[label] = measure(precond, label, d.sigma_data, states, denoised, grid, schedules)
        out[label].update(num=g.num, seed=g.seed, dtype=str(dtype).replace("torch.", ""))
    return out


def table(results: dict) -> str:
    """The stdout table: one row per preconditioning and step count (train grid first)."""
    rows = [f"{'precond':<20} {'jumps':<10} {'gap_rms':>10} {'jump_rms':>10}  per jump (gap)"]
    for label, r in results.items():
        tg = r["train_grid"]
        rows.append(f"{label:<20} {'grid N=' + str(tg['N']):<10} {tg['gap_rms']:>10.4g} "
                    f"{tg['jump_rms']:>10.4g}  (weighted as the CTM loss draws them)")
        for K, jumps in r["schedules"].items():
            gap = math.sqrt(sum(j["gap_rms"] ** 2 for j in jumps) / len(jumps))
            jump = math.sqrt(sum(j["jump_rms"] ** 2 for j in jumps) / len(jumps))
            rows.append(f"{label:<20} {K + ' steps':<10} {gap:>10.4g} {jump:>10.4g}  "
                        + " ".join(f"{j['gap_rms']:.3g}" for j in jumps))
    return "\n".join(rows)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2
        print(f"error: {one_line(message)}", file=sys.stderr)
        sys.exit(2)


def _parse(argv):
    p = _Parser(prog="ctmkit gap", description="The consistency gap ||D_theta* - D_phi|| of "
                "each preconditioning of the run on its teacher, before any training: per jump "
                "of [gap] steps / schedules and over the training grid. Writes out_dir/gap.json "
                "and gap.png.")
    p.add_argument("config", help="config.toml")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value, as for ctmkit config.toml; repeatable")
    p.add_argument("--out", help="the run's folder instead of [run] out_dir: gap.json and "
                   "gap.png go there, and a network teacher and the coefficient store are read "
                   "from (or a missing store made) there")
    p.add_argument("--device", help="cpu | cuda[:N] for the teacher's denoiser "
                   "(default: [run] device)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    args = p.parse_args(argv)
    if args.out is not None:
        args.set.append(f"run.out_dir={json.dumps(str(Path(args.out).resolve()))}")
    if args.device is not None:
        args.set.append(f"run.device={json.dumps(args.device)}")
    return args


def run_gap(args) -> None:
    from core.host.config import load_config
    from core.base.io import save_json
    from core.pipeline.lock import RunLock
    from core.evaluation.plots import plot_gap
    from core.pipeline.stages import Run, log

    cfg = load_config(args.config, overrides=args.set)
    entries = _entries(cfg)
    run = Run(cfg, progress=not args.no_progress)
    if _needs_coefficients(cfg, entries):
        _run_coefficients_stage(args.config, args.set, not args.no_progress)
    lock = RunLock(cfg.run.out_dir).acquire()
    try:
        results = compute(cfg, run, entries, progress=not args.no_progress)
        print(table(results), flush=True)
        save_json(cfg.run.out_dir / "gap.json", results)
        plot_gap(results, cfg.run.out_dir / "gap.png")
    finally:
        lock.release()
    log(f"gap: -> {cfg.run.out_dir / 'gap.json'}, {cfg.run.out_dir / 'gap.png'}")


def main(argv=None) -> int:
    """``ctmkit gap``: 0, or 2 with one ``error:`` line on stderr for bad input."""
    args = _parse(list(sys.argv[1:] if argv is None else argv))
    from core.cli import exit_status
    return exit_status(run_gap, args)


if __name__ == "__main__":
    sys.exit(main())
