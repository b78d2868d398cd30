"""The image study of issue #11: teacher-initialised FID per preconditioning x steps x schedule,
a training comparison, and a diagnosis of the 4-step result.

    OMP_NUM_THREADS=1 nice -n 5 python tools/study_images.py examples/fashion_mnist_study.toml

1. ``python -m core.run CONFIG --stages teacher,coefficients,distill`` (stages already up to
   date are skipped): one teacher, one coefficient table, one distillation per [run] preconds
   entry, with FID every [distill] eval_every iterations (iteration 0 = teacher-initialised).
2. Teacher-initialised FID (the teacher as the student, before any distillation) at 1..4 steps
   on the rho-grid and at 2 steps through a short middle time t_max -> --mid -> t_min, for
   every preconditioning, and for Analytic-Precond also with l_t, s_t smoothed
   (``--smooth``; ``[coefficients] smooth``, a DEVIATION from Eqns. (15), (17)).
3. Per-jump errors of the 4-step rho-grid schedule: for each jump t_i -> t_{i+1}, the
   teacher-initialised jumper from the teacher ODE's own x_{t_i} against the teacher ODE's
   x_{t_{i+1}} (RMS per dimension, float64 reference), and the 4-step FID when only jump i uses
   the analytic (backward) preconditioning and the others CTM's.
4. out_dir/study.{json,md,png} and out_dir/coefficients_study.png (l, s, L, S raw and smoothed).

FID here is whatever [distill] eval names (fid_featnet-<hash> with feature_net = "auto"), from
[distill] eval_num samples and the [evaluate] seed, so step 2 at the rho-grid repeats the
distillation's iteration-0 numbers (a check: they agree to sampling round-off).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# A short 2-step middle time compared with the rho grid's 2.52. Not the paper's schedule nor
# CTM's default: both sample on the rho grid (sources in tools/bench_acceleration.py).
MID_TIME = 0.821


def label(entry: dict) -> str:
    return entry.get("label") or entry["name"] + (f"-{entry['variant']}" if entry.get("variant") else "")


class MixedJumper(torch.nn.Module):
    """Jump i with jumpers[choice[i]], on a fixed schedule (for the per-jump attribution)."""

    def __init__(self, jumpers: list, ts: list[float]):
        super().__init__()
        self.jumpers, self.ts = jumpers, ts

    def forward(self, x, t, s, class_labels=None):
        i = int(np.argmin([abs(math.log(float(t.reshape(-1)[0])) - math.log(a))
                           for a in self.ts[:-1]]))
        return self.jumpers[i](x, t, s, class_labels)


def read_curves(path: Path) -> dict:
    """{column: [(iteration, value)]} from a distill metrics.csv (FID columns only)."""
    out: dict = {}
    if not path.is_file():
        return out
    with open(path) as f:
        for row in csv.DictReader(f):
            for k, v in row.items():
                if k.startswith("fid") and v not in ("", None):
                    out.setdefault(k, []).append((int(row["iteration"]), float(v)))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("config")
    p.add_argument("--set", action="append", default=[], help="as core.run --set")
    p.add_argument("--smooth", type=float, default=0.5,
                   help="lambda-std of the smoothed l_t, s_t compared (0: skip)")
    p.add_argument("--mid", type=float, default=MID_TIME)
    p.add_argument("--diag-num", type=int, default=16, help="samples for per-jump errors")
    p.add_argument("--no-train", action="store_true", help="skip step 1 (use what is there)")
    args = p.parse_args(argv)

    from core.run import main as run_main
    t_start = time.perf_counter()
    if not args.no_train:
        sets = sum((["--set", s] for s in args.set), [])
        rc = run_main([args.config, "--stages", "teacher,coefficients,distill", *sets])
        if rc != 0:
            return rc
    t_train = time.perf_counter() - t_start

    from core.diffusion.coefficients import store
    from core.diffusion.coefficients.numerics import smooth_coefficients
    from core.diffusion.coefficients.table import CoefficientTable
    from core.host.config import for_precond, load_config
    from core.export.jumper import Jumper, TeacherAsNetwork
    from core.evaluation.quality import metric_objects, sample_quality
    from core.diffusion.schedules import rho_grid
    from core.pipeline.stages import Run
    from plugins.preconditionings import AnalyticPrecond
    from plugins.samplers import CTMSampler

    cfg = load_config(args.config, overrides=args.set)
    d, diff, ev = cfg.distill, cfg.diffusion, cfg.evaluate
    entries = cfg.run.preconds or [cfg.precond.data]
    runs = {label(e): Run(for_precond(cfg, e), progress=False) for e in entries}
    base = Run(for_precond(cfg, entries[0], own_dir=False), progress=False)
    teacher = base.teacher
    out_dir = cfg.run.out_dir
    net = TeacherAsNetwork(teacher.denoiser(torch.float32, "cpu"), diff.sigma_data)
    jumpers = {k: Jumper(net, r.precond(), diff.sigma_data).eval() for k, r in runs.items()}
    table = store.load(cfg.coefficients.path)
    sm_table = None
    if args.smooth > 0:
        l_sm, s_sm = smooth_coefficients(table.t, table.l, table.s, args.smooth)
        sm_table = CoefficientTable(t=table.t, l=l_sm, s=s_sm,
                                    l_stderr=table.l_stderr, s_stderr=table.s_stderr)
        for e in entries:
            if e["name"] == "analytic":
                pre = AnalyticPrecond.from_table(sm_table, e.get("variant", "backward"))
                jumpers[f"{label(e)}-smooth{args.smooth:g}"] = \
                    Jumper(net, pre, diff.sigma_data).eval()

    metric_names = [n for n in d.eval if n != "trajectory"]
    metrics = metric_objects(cfg, base.ctx, metric_names)
    reference = base.data_for(ev.data, "evaluate").as_dataset()
    meta = {"shape": list(teacher.shape), "dtype": "float32",
            "num_classes": teacher.num_classes, "t_min": diff.t_min, "t_max": diff.t_max,
            "rho": diff.rho}
    mid = {2: [diff.t_max, args.mid, diff.t_min]}
    fid = metrics[0].name if metrics else None

    def quality(jumper, steps, schedules=None):
        q = sample_quality(jumper, meta, CTMSampler(0.0), steps, d.eval_num, ev.sample_batch,
                           ev.seed, "cpu", metrics, reference, ev.cache_dir,
                           schedules=schedules)
        nonlocal fid
        fid = fid if fid in next(iter(q.values())) else \
            next(k for k in next(iter(q.values())) if k.startswith("fid"))
        return {K: v[fid] for K, v in q.items()}

    # 2. teacher-initialised FID
    t0 = time.perf_counter()
    init: dict = {}
    for k, j in jumpers.items():
        with torch.no_grad():
            rho = quality(j, [1, 2, 3, 4])
            via_mid = quality(j, [], mid)
        init[k] = {"rho": {str(K): v for K, v in rho.items()}, "mid2": via_mid[2]}
        print(f"[study] teacher-initialised {k}: " +
              "  ".join(f"{K}-step {v:.2f}" for K, v in rho.items()) +
              f"  2-step via the middle time {via_mid[2]:.2f}  ({time.perf_counter() - t0:.0f}s)",
              flush=True)

    # 3. per-jump errors on the 4-step rho-grid, and the per-jump attribution in FID
    ts = rho_grid(4, diff.t_min, diff.t_max, diff.rho)
    gen = torch.Generator().manual_seed(ev.seed + 1)
    n = args.diag_num
    x_T = torch.randn((n, *teacher.shape), generator=gen, dtype=torch.float64) * diff.t_max
    labels = (torch.randint(0, teacher.num_classes, (n,), generator=gen)
              if teacher.num_classes > 0 else None)
    ref = [x_T] + teacher.reference_solve(x_T, diff.t_max, ts[1:], labels)
    per_jump: dict = {}
    for k, j in jumpers.items():
        errs = []
        for i in range(4):
            with torch.no_grad():
                y = j(ref[i].float(), torch.tensor(ts[i]), torch.tensor(ts[i + 1]), labels)
            errs.append(float(((y.double() - ref[i + 1]) ** 2).mean().sqrt()))
        per_jump[k] = errs
        print(f"[study] per-jump RMSE {k}: " + "  ".join(f"{e:.4f}" for e in errs) +
              f"  ({time.perf_counter() - t0:.0f}s)", flush=True)
    attribution: dict = {}
    for a in [k for k in jumpers if k.startswith("analytic") and "smooth" not in k]:
        attribution[a] = []
        for i in range(4):
            mixed = MixedJumper([jumpers[a] if m == i else jumpers["ctm"] for m in range(4)], ts)
            with torch.no_grad():
                attribution[a].append(quality(mixed, [4])[4])
        print(f"[study] 4-step FID, only jump i = {a}, others ctm: " +
              "  ".join(f"{v:.2f}" for v in attribution[a]), flush=True)
    t_diag = time.perf_counter() - t0

    # training comparison
    curves = {k: read_curves(r.out_dir / "metrics.csv") for k, r in runs.items()}
    result = {"config": str(cfg.path), "fid": fid, "num": d.eval_num, "seed": ev.seed,
              "schedules": {"rho": {str(K): rho_grid(K, diff.t_min, diff.t_max, diff.rho)
                                    for K in (1, 2, 3, 4)}, "mid2": mid[2]},
              "smooth": args.smooth, "smooth_note": "l_t, s_t Gaussian-smoothed over lambda "
              "(std --smooth): a DEVIATION from Eqns. (15), (17)",
              "teacher_initialised": init, "per_jump_rmse_4step": per_jump,
              "attribution_4step": attribution,
              "training": {k: {c: v for c, v in cv.items()} for k, cv in curves.items()},
              "seconds": {"train_stages": round(t_train), "study": round(t_diag)}}
    (out_dir / "study.json").write_text(json.dumps(result, indent=1))
    (out_dir / "study.md").write_text(markdown(result, ts))
    plot(result, ts, table, sm_table, out_dir / "study.png",
         out_dir / "coefficients_study.png")
    print(f"[study] -> {out_dir / 'study.md'}, study.json, study.png, coefficients_study.png "
          f"({t_train:.0f}s stages, {t_diag:.0f}s study)")
    return 0


def markdown(r: dict, ts: list[float]) -> str:
    fid = r["fid"]
    lines = [f"Teacher-initialised {fid} ({r['num']} samples, seed {r['seed']}); rho-grid "
             f"unless named; 'mid' = 2 steps via {r['schedules']['mid2'][1]:g} (not the "
             f"paper's schedule).", "",
             "| precond | 1 step | 2 steps | 2 steps (mid) | 3 steps | 4 steps |",
             "|---|---|---|---|---|---|"]
    for k, v in r["teacher_initialised"].items():
        rho = v["rho"]
        lines.append(f"| {k} | {rho['1']:.2f} | {rho['2']:.2f} | {v['mid2']:.2f} | "
                     f"{rho['3']:.2f} | {rho['4']:.2f} |")
    lines += ["", "Per-jump RMSE on the 4-step rho-grid (teacher-initialised jump from the "
              "teacher ODE's x_t vs the teacher ODE):", "",
              "| precond | " + " | ".join(f"{a:.3g} -> {b:.3g}" for a, b in zip(ts, ts[1:]))
              + " |", "|---|---|---|---|---|"]
    for k, e in r["per_jump_rmse_4step"].items():
        lines.append(f"| {k} | " + " | ".join(f"{x:.4f}" for x in e) + " |")
    for k, v in r["attribution_4step"].items():
        lines += ["", f"4-step {fid} when only jump i uses {k} and the others ctm "
                  f"(ctm everywhere: {r['teacher_initialised']['ctm']['rho']['4']:.2f}): " +
                  ", ".join(f"jump {i}: {x:.2f}" for i, x in enumerate(v))]
    lines += ["", f"Training ({fid} of the EMA student against iterations):", "",
              "| precond | steps | " + " | ".join(
                  str(it) for it, _ in next(iter(next(iter(r["training"].values())).values()),
                                            [])) + " |"]
    lines.append("|---|---|" + "---|" * len(next(iter(next(iter(
        r["training"].values())).values()), [])))
    for k, cv in r["training"].items():
        for c, pts in sorted(cv.items()):
            lines.append(f"| {k} | {c.rsplit('_', 1)[-1]} | " +
                         " | ".join(f"{v:.2f}" for _, v in pts) + " |")
    return "\n".join(lines) + "\n"


def plot(r: dict, ts, table, sm_table, path: Path, coef_path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"ctm": "C0", "analytic-forward": "C3", "analytic-backward": "C2"}
    color = lambda k: colors.get(k.split("-smooth")[0], "C7")           # noqa: E731
    style = lambda k: "--" if "smooth" in k else "-"                     # noqa: E731
    fig, ax = plt.subplots(1, 4, figsize=(17, 3.8))
    for k, v in r["teacher_initialised"].items():
        Ks = [1, 2, 3, 4]
        ax[0].plot(Ks, [v["rho"][str(K)] for K in Ks], style(k), marker="o", color=color(k),
                   label=k)
        ax[0].plot([2], [v["mid2"]], marker="*", ms=12, color=color(k), ls="none")
    ax[0].set(xlabel="steps (* = 2 steps via 0.821)", ylabel=r["fid"].split("-")[0],
              title="teacher-initialised", xticks=[1, 2, 3, 4])
    ax[0].legend(fontsize=7)
    for k, e in r["per_jump_rmse_4step"].items():
        ax[1].plot(range(4), e, style(k), marker="o", color=color(k), label=k)
    ax[1].set(xticks=range(4), xticklabels=[f"{a:.3g}->{b:.3g}" for a, b in zip(ts, ts[1:])],
              yscale="log", title="4-step: per-jump RMSE vs teacher ODE", ylabel="RMSE")
    ax[1].tick_params(axis="x", labelsize=7)
    for k, cv in r["training"].items():
        for c, pts in cv.items():
            K = c.rsplit("_", 1)[-1]
            if K not in ("1", "2", "4"):
                continue
            ls = {"1": ":", "2": "--", "4": "-"}[K]
            ax[2].plot(*zip(*pts), ls=ls, marker=".", color=color(k),
                       label=f"{k} {K}-step")
    ax[2].set(xlabel="iteration", ylabel=r["fid"].split("-")[0], title="training comparison")
    ax[2].legend(fontsize=6, ncol=2)
    for k, v in r["attribution_4step"].items():
        off = 0.4 if "backward" in k else 0.0
        ax[3].bar(np.arange(4) + off, v, width=0.4, color=color(k), label=k)
    ctm4 = r["teacher_initialised"]["ctm"]["rho"]["4"]
    ax[3].axhline(ctm4, color="C0", label="ctm everywhere")
    ax[3].set(xticks=range(4), title="4-step FID: only jump i analytic, others ctm",
              xlabel="jump i",
              ylim=(0.9 * min([ctm4] + [x for v in r["attribution_4step"].values()
                                         for x in v]), None))
    ax[3].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=70)
    plt.close(fig)

    fig, ax = plt.subplots(1, 3, figsize=(13, 3.6))
    for tab, name, ls in ((table, "Eqns. (15), (17)", "-"),
                          (sm_table, f"smoothed {r['smooth']:g} (deviation)", "--")):
        if tab is None:
            continue
        ax[0].semilogx(tab.t, tab.l, ls, marker="." if ls == "-" else None, color="C0",
                       label=f"l_t {name}")
        ax[0].semilogx(tab.t, tab.s, ls, marker="." if ls == "-" else None, color="C3",
                       label=f"s_t {name}")
        ax[1].loglog(tab.t, tab.L, ls, color="C0", label=f"L_t {name}")
        ax[1].loglog(tab.t, tab.S, ls, color="C3", label=f"S_t {name}")
    ax[0].axhline(0, color="C0", lw=0.5)
    ax[0].axhline(-1, color="C3", lw=0.5)
    ax[0].fill_between(table.t, table.s - 2 * table.s_stderr, table.s + 2 * table.s_stderr,
                       color="C3", alpha=0.2)
    for a in ts[1:-1]:
        for x in ax[:2]:
            x.axvline(a, color="k", lw=0.5, ls=":")
    ax[0].set(xlabel="t", title="l_t, s_t (CTM: 0, -1; band: s_t +- 2 stderr)")
    ax[1].set(xlabel="t", title="L_t, S_t (dotted: 4-step times)")
    ax[0].legend(fontsize=7)
    ax[1].legend(fontsize=7)
    from plugins.preconditionings import AnalyticPrecond, CTMPrecond
    tt = torch.tensor(ts[:-1], dtype=torch.float64)
    ss = torch.tensor(ts[1:], dtype=torch.float64)
    fc, gc = CTMPrecond()(tt, ss)
    rows = [("ctm", fc, gc, "C0")]
    for tab, suf in ((table, ""), (sm_table, "-smooth")):
        if tab is None:
            continue
        for v, c in (("forward", "C3"), ("backward", "C2")):
            f, g = AnalyticPrecond.from_table(tab, v)(tt, ss)
            rows.append((f"analytic-{v}{suf}", f, g, c))
    for i, (k, f, g, c) in enumerate(rows):
        ax[2].plot(range(4), g.numpy(), "--" if "smooth" in k else "-", marker="o", color=c,
                   label=f"g {k}")
        ax[2].plot(range(4), f.numpy(), "--" if "smooth" in k else "-", marker="x", color=c,
                   alpha=0.5)
    ax[2].set(xticks=range(4), xticklabels=[f"{a:.3g}->{b:.3g}" for a, b in zip(ts, ts[1:])],
              title="4-step jumps: g(t,s) (o), f(t,s) (x)")
    ax[2].tick_params(axis="x", labelsize=7)
    ax[2].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(coef_path, dpi=70)
    plt.close(fig)


if __name__ == "__main__":
    from core.base.errors import UserError
    try:
        sys.exit(main())
    except UserError as e:             # bad input: one line, exit status 2, as core.run
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
