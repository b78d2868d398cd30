"""Trajectory alignment of teacher-initialised jumpers (the paper's Figure 7 setting).

1-D mixture 1/3 N(-2, 1) + 2/3 N(1, 0.25) (0.25 read as the variance: std 0.5); every jumper is
the consistency function built from the exact teacher denoiser with one of the built-in
preconditionings. For K = 1, 2, 3, 5 deterministic CTM jumps from the same noise, the error is
the RMS gap to the exact teacher ODE solution (at t_min, and over all landing times).

    python tools/trajectory_alignment.py [--out runs/trajectory_alignment] [--quick]
"""

from __future__ import annotations

import argparse
import math

import _common  # noqa: F401  (puts the repo on sys.path)
import numpy as np
import torch

from core.diffusion.coefficients.estimate import estimate_table
from core.evaluation.evaluate import distribution_distance, trajectory_errors
from core.base.io import save_json
from core.export.jumper import Jumper, TeacherAsNetwork
from core.diffusion.schedules import log_grid, rho_grid
from plugins.samplers import CTMSampler
from plugins.teachers.gmm import GMMTeacher

T_MIN, T_MAX, RHO, SIGMA_DATA = 0.002, 80.0, 7.0, 0.5


def build(n_timesteps: int, n_samples: int, seed: int):
    teacher = GMMTeacher([1 / 3, 2 / 3], [[-2.0], [1.0]], [1.0, 0.5])
    den = teacher.denoiser()
    table = estimate_table(lambda x, t, y: den(x, t, y), teacher.sample_data, teacher.dim,
                           log_grid(n_timesteps, T_MIN, T_MAX), n_samples, 1024, seed, {})
    jumpers = {name: Jumper(TeacherAsNetwork(teacher.denoiser(torch.float64), SIGMA_DATA), p,
                            SIGMA_DATA) for name, p in _common.builtin_preconds(table).items()}
    return teacher, table, jumpers


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(_common.ROOT / "runs" / "trajectory_alignment"))
    ap.add_argument("--steps", default="1,2,3,5")
    ap.add_argument("--num", type=int, default=2000, help="noise draws")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="smaller estimate (40 x 1024)")
    args = ap.parse_args(argv)
    steps = [int(k) for k in args.steps.split(",")]
    n_t, n_s = (40, 1024) if args.quick else (120, 4096)
    teacher, table, jumpers = build(n_t, n_s, args.seed)

    results, cache = {}, {}
    for name, jumper in jumpers.items():
        results[name] = trajectory_errors(jumper, teacher, steps, args.num, args.seed + 1, T_MIN,
                                          T_MAX, RHO, torch.float64, reference_cache=cache)
    # distribution distance of the 3-step samples to exact data, per preconditioning
    gen = torch.Generator().manual_seed(args.seed + 2)
    data, _ = teacher.sample_data(args.num, gen)
    x_T = torch.randn((args.num, 1), generator=gen, dtype=torch.float64) * T_MAX
    w1 = {name: distribution_distance(CTMSampler().sample(j, x_T, rho_grid(3, T_MIN, T_MAX, RHO),
                                                          gen).numpy(), data.numpy())[1]
          for name, j in jumpers.items()}

    print(f"# {_common.command_line()}")
    print(f"# teacher 1/3 N(-2,1) + 2/3 N(1,0.25); coefficients {n_t} x {n_s}; {args.num} draws")
    print("final-point RMSE vs the exact teacher ODE (path RMSE in brackets), deterministic "
          "CTM sampling; W1 of 3-step samples to data")
    header = f"{'preconditioning':<19}" + "".join(f"{f'K={k}':>19}" for k in steps) + f"{'W1 (K=3)':>10}"
    print(header)
    for name, r in results.items():
        cells = "".join(f"{r[k]['final_rmse']:>9.4f} ({r[k]['path_rmse']:.4f})" for k in steps)
        print(f"{name:<19}{cells}{w1[name]:>10.4f}")

    out = _common.Path(args.out)
    save_json(out / "trajectory_alignment.json",
              {"steps": steps, "errors": {n: {str(k): v for k, v in r.items()}
                                          for n, r in results.items()}, "w1_3step": w1})
    plot(teacher, jumpers, results, steps, out / "trajectory_alignment.png", args.seed)
    print(f"wrote {out / 'trajectory_alignment.png'} and {out / 'trajectory_alignment.json'}")
    return results


def plot(teacher, jumpers, results, steps, path, seed):
    from core.evaluation.plots import _plt, _save

    plt = _plt()
    show = ["ctm", "analytic-forward", "analytic-backward"]
    fig, axes = plt.subplots(1, len(show) + 1, figsize=(4.2 * (len(show) + 1), 3.8))
    gen = torch.Generator().manual_seed(seed + 3)
    x_T = torch.randn((14, 1), generator=gen, dtype=torch.float64) * T_MAX
    dense = list(np.exp(np.linspace(math.log(T_MAX), math.log(T_MIN), 160))[1:])
    ref = torch.cat(teacher.reference_solve(x_T, T_MAX, dense), 1)       # [n, len(dense)]
    ts3 = rho_grid(3, T_MIN, T_MAX, RHO)
    for ax, name in zip(axes, show):
        ax.plot(np.log(dense), ref.T.numpy(), color="0.6", lw=0.8)
        traj: list = [x_T]
        CTMSampler().sample(jumpers[name], x_T, ts3, gen, trajectory=traj)
        pts = torch.cat(traj, 1).numpy()
        for row in pts:
            ax.plot(np.log(ts3), row, "o-", color="C3", ms=3, lw=0.8)
        ax.set_ylim(-5, 4)
        ax.set_title(f"{name}: teacher (grey) vs 3 jumps", fontsize=9)
        ax.set_xlabel("log t")
    ax = axes[-1]
    for name, r in results.items():
        style = "s--" if name == "bcm" else "o-"   # bcm coincides with ctm at teacher init
        ax.plot(steps, [r[k]["final_rmse"] for k in steps], style, label=name, mfc="none")
    ax.set_yscale("log")
    ax.set_xlabel("jumps K")
    ax.set_ylabel("final RMSE vs teacher ODE")
    ax.legend(fontsize=8)
    _save(fig, path)


if __name__ == "__main__":
    main()
