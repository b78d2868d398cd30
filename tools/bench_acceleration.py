"""Training acceleration of Analytic-Precond over CTM's preconditioning (the paper's Fig. 3 claim).

A network teacher is trained (EDM DSM) on a multi-modal 2-D mixture; then, from that teacher,
the same seed and the same budget, CTM training (Eqn. 7 + DSM) runs once with the `ctm` and once
with the `analytic` preconditioning, logging the EMA student's 2-step error against the teacher
ODE. Acceleration = budget / (iterations Analytic-Precond needs to reach the error CTM has at the
end of the budget), linearly interpolated between evaluations; when it does not get there, the
reverse ratio (CTM's iterations to reach Analytic's final error / budget), so < 1 means slower.
Several seeds; the last line is `acceleration: X.XX` (the mean).

    python tools/bench_acceleration.py [--quick] [--seeds 3] [--out runs/bench_acceleration]
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import math
import sys
import time

import _common
import numpy as np

from core.run import main as core_main

MIXTURE = {"weights": [1 / 6] * 6,
           "means": [[2 * math.cos(2 * math.pi * k / 6), 2 * math.sin(2 * math.pi * k / 6)]
                     for k in range(6)],
           "stds": [0.2] * 6}


def config(out: str, stages: list, seed: int, precond: str, s: dict) -> str:
    mix = "{ " + ", ".join(f"{k} = {v}" for k, v in MIXTURE.items()) + " }"
    variant = f'\nvariant = "{s["variant"]}"' if precond == "analytic" else ""
    return f"""
[run]
out_dir = "{out}"
stages = {stages!r}
seed = {seed}
[data]
gmm = {mix}
[network]
name = "mlp"
width = {s['width']}
depth = {s['depth']}
emb_dim = 32
[teacher]
kind = "network"
path = "{s['teacher']}"
[teacher_train]
iterations = {s['teacher_its']}
batch_size = 256
lr = 2e-3
warmup = 100
checkpoint_every = {s['teacher_its']}
[precond]
name = "{precond}"{variant}
[coefficients]
path = "{s['coefficients']}"
n_timesteps = 80
n_samples = 1024
batch = 512
[distill]
iterations = {s['its']}
batch_size = {s['batch']}
lr = {s['lr']}
ema = [{s['ema']}]
checkpoint_every = {s['its']}
eval_every = {s['eval_every']}
eval_num = 512
eval_steps = [2]
N = 18
max_ode_steps = 17
seed = {seed}
[evaluate]
seed = 12345
""".replace("'", '"')


def run(cfg_path, quiet=True) -> None:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf) if quiet else contextlib.nullcontext():
        rc = core_main([str(cfg_path), "--no-progress"])
    if rc != 0:
        raise SystemExit(f"bench_acceleration: {cfg_path} failed (exit {rc})")


def curve(metrics_csv) -> tuple[np.ndarray, np.ndarray]:
    with open(metrics_csv) as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("traj_err_2")]
    return (np.array([int(r["iteration"]) for r in rows]),
            np.array([float(r["traj_err_2"]) for r in rows]))


def first_reach(its: np.ndarray, err: np.ndarray, level: float) -> float | None:
    """First iteration (linear interpolation between evaluations) where err <= level."""
    for i in range(len(its)):
        if err[i] <= level:
            if i == 0:
                return float(its[0])
            a, b = err[i - 1], err[i]
            return float(its[i - 1] + (its[i] - its[i - 1]) * (a - level) / (a - b))
    return None


def acceleration(ctm, ana, budget) -> float:
    level_ctm = ctm[1][-1]
    hit = first_reach(*ana, level_ctm)
    if hit is not None:
        return budget / max(hit, 1.0)
    hit = first_reach(*ctm, ana[1][-1])
    return (hit if hit is not None else budget) / budget


def main(argv=None) -> float:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small budget: < 10 min on 2 CPU cores")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--variant", default="backward", choices=("backward", "forward"),
                    help="Analytic-Precond variant (the paper trains with backward)")
    ap.add_argument("--out", default=str(_common.ROOT / "runs" / "bench_acceleration"))
    args = ap.parse_args(argv)
    s = (dict(width=96, depth=3, teacher_its=1500, its=300, batch=64, lr=4e-4, eval_every=25,
              ema=0.99)
         if args.quick else
         dict(width=128, depth=4, teacher_its=4000, its=2000, batch=128, lr=4e-4, eval_every=100,
              ema=0.999))
    s["variant"] = args.variant
    out = _common.Path(args.out).resolve()
    if out.exists():                      # a benchmark starts from nothing
        import shutil
        shutil.rmtree(out)
    out.mkdir(parents=True)
    s["teacher"], s["coefficients"] = str(out / "teacher.pt"), str(out / "coefficients.h5")
    t0 = time.perf_counter()
    base = out / "teacher.toml"
    base.write_text(config(str(out / "teacher_run"), ["teacher", "coefficients"], 0, "analytic", s))
    run(base)
    print(f"# {_common.command_line()}")
    print(f"# teacher: MLP width {s['width']} depth {s['depth']}, {s['teacher_its']} DSM "
          f"iterations on a 6-mode 2-D ring mixture ({time.perf_counter() - t0:.0f}s)")
    print(f"# distillation: CTM loss (Eqn. 7, l2) + DSM, N=18, Heun, batch {s['batch']}, "
          f"{s['its']} iterations, lr {s['lr']}, EMA {s['ema']}, analytic variant "
          f"{s['variant']}; 2-step RMSE of the EMA student vs the teacher "
          f"ODE on 512 fixed noises every {s['eval_every']} iterations")
    results, accs = {}, []
    for seed in range(args.seeds):
        for p in ("ctm", "analytic"):
            cfg = out / f"{p}_{seed}.toml"
            cfg.write_text(config(str(out / f"{p}_{seed}"), ["distill"], seed, p, s))
            run(cfg)
            results[(p, seed)] = curve(out / f"{p}_{seed}" / "metrics.csv")
        ctm, ana = results[("ctm", seed)], results[("analytic", seed)]
        accs.append(acceleration(ctm, ana, s["its"]))
        print(f"seed {seed}: 2-step error  ctm {ctm[1][0]:.4f} -> {ctm[1][-1]:.4f}   analytic "
              f"{ana[1][0]:.4f} -> {ana[1][-1]:.4f}   acceleration {accs[-1]:.2f}", flush=True)
    plot(results, args.seeds, out / "acceleration.png")
    print(f"# {time.perf_counter() - t0:.0f}s in all; curves: {out / 'acceleration.png'}")
    mean = float(np.mean(accs))
    print(f"# per seed: {', '.join(f'{a:.2f}' for a in accs)}; std {np.std(accs):.2f}")
    print(f"acceleration: {mean:.2f}")
    return mean


def plot(results, seeds, path):
    from core.plots import _plt, _save

    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for seed in range(seeds):
        for p, c in (("ctm", "C0"), ("analytic", "C3")):
            its, err = results[(p, seed)]
            ax.plot(its, err, color=c, alpha=0.8, lw=1.2, label=p if seed == 0 else None)
    ax.set_xlabel("iteration")
    ax.set_ylabel("2-step RMSE vs teacher ODE")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title("CTM training: CTM vs Analytic-Precond preconditioning")
    _save(fig, path)


if __name__ == "__main__":
    main()
    sys.exit(0)
