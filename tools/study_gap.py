"""Does the consistency gap predict? (issue 22 item 2): the gap of `ctm`, `analytic` forward and
`analytic` backward, measured on the teacher before any training (core/gap.py), beside the
errors each preconditioning's student has at iteration 0 (teacher-initialised) and at the end
of a training budget.

    python tools/study_gap.py ring  [--seeds 3] [--iterations N] [--batch B] [--num 1024]
                                    [--out docs/results/gap_study_ring]
    python tools/study_gap.py image CONFIG --fid STUDY_JSON [--num 16] [--seed S]
                                    [--out DIR]

``ring``: the exact 8-mode 2-D ring of tools/bench_acceleration.py. Its `benchmark` trains
every (seed, preconditioning) with CTM (same settings as the bench, `--iterations` / `--batch`
to resize the budget) and logs the EMA student's final-point RMSE against the exact PF-ODE for
three metrics: 2 steps on the rho grid (80 -> 2.515 -> 0.002, the paper's schedule), 2 steps
via 0.6 and 3 steps on the rho grid. Then, for each seed, the gap on the same teacher with the
same coefficient table, from `--num` fixed noises drawn with that seed ([gap] seed): per jump of
each of the three schedules and over the N = 18 training grid, weighted as the CTM loss draws
its pairs (`core.gap.measure`). The teacher-initialised errors do not depend on the training
seed (zero-initialised residual, fixed evaluation noise); the gap's spread is its noise draws'.

``image``: one network teacher (e.g. examples/fashion_mnist_study.toml, after its teacher and
coefficients stages): the gap per jump of the 1..4-step rho grids and of 2 steps via 0.821,
from `--num` noises (default: 16 with seed [evaluate] seed + 1, the noises of
tools/study_images.py's per-jump errors, whose 4-step figures the jump errors here reproduce),
the reference ODE in float64, the teacher's denoiser in float32 ([gap] dtype "auto"). Beside it:
the teacher-initialised and end-of-training FIDs of a study.json written by
tools/study_images.py (`--fid`).

Both write OUT/gap_study_{ring,image}.json, .md (tables) and .png (each preconditioning's gap,
jump error, iteration-0 and end-of-budget error, each divided by `ctm`'s). The "order" columns
list the preconditionings from smallest to largest: f = analytic forward, b = analytic
backward, c = ctm.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import _common
import numpy as np

PRECONDS = ["ctm", "analytic-forward", "analytic-backward"]
SHORT = {"ctm": "c", "analytic-forward": "f", "analytic-backward": "b"}
COLOURS = {"ctm": "C0", "analytic-forward": "C3", "analytic-backward": "C2"}


# --- the gap, with core/gap.py's pieces, for any named schedules -----------------------------

def measure_gap(cfgs: dict, schedules: dict, num: int, seed: int, progress: bool) -> dict:
    """{label: core.gap.measure(...)} for the configs {label: Config} (one teacher, one
    [distill] N, one coefficient store) on the named schedules {name: times}: one reference
    ODE solve from `num` noises of `seed` for all of them (as `ctmkit gap` does per call)."""
    import torch

    from core import gap
    from core.host import plugins
    from core.diffusion.schedules import rho_grid
    from core.pipeline.stages import Run

    first = next(iter(cfgs.values()))
    d = first.diffusion
    run = Run(first, progress=False)
    teacher = run.teacher
    dtype = gap.DTYPES[first.gap.dtype] if first.gap.dtype != "auto" else \
        torch.float64 if teacher.can_sample_data else torch.float32
    grid = rho_grid(first.distill.N, d.t_min, d.t_max, d.rho)
    times = sorted({*grid, *(t for ts in schedules.values() for t in ts)}, reverse=True)
    x_T, labels = gap.fixed_noise(teacher, num, seed, d.t_max)
    states = gap.teacher_states(teacher, x_T, labels, times, {}, "study", run.device, progress)
    denoised = gap.teacher_denoised(teacher, states, labels, dtype, run.device)
    out = {}
    for label, cfg in cfgs.items():
        precond = plugins.create("precond", cfg.precond, Run(cfg, progress=False).ctx, "name")
        out[label] = gap.measure(precond, label, d.sigma_data, states, denoised, grid, schedules)
        out[label].update(num=num, seed=seed, dtype=str(dtype).replace("torch.", ""))
        out[label]["train_grid"].pop("pairs")          # 171 pairs per label: not needed here
    return out


def schedule_rms(jumps: list, key: str) -> float:
    """RMS over a schedule's jumps (as `ctmkit gap`'s table prints a schedule's row)."""
    return math.sqrt(sum(j[key] ** 2 for j in jumps) / len(jumps))


def order(values: dict) -> str:
    """'f < b < c': the labels from the smallest value to the largest."""
    return " < ".join(SHORT[k] for k in sorted(values, key=values.get))


def ms(values) -> str:
    """'mean ± std' (std over seeds; '' when there is one value)."""
    v = np.asarray(values, dtype=float)
    if len(v) < 2:
        return f"{v.mean():.4g}"
    sd = v.std(ddof=1)
    return f"{v.mean():.4g} ± " + ("0" if sd <= 1e-12 * abs(v.mean()) else f"{sd:.2g}")


# --- the 2-D ring ------------------------------------------------------------------------------

RING_SCHEDULES = {"2-step rho-grid": "2", "2-step mid 0.6": "2@0.6", "3-step rho-grid": "3"}


def ring(args) -> dict:
    import bench_acceleration as ba

    from core.host.config import load_config
    from core.diffusion.schedules import rho_grid

    s = dict(ba.QUICK if args.quick else ba.FULL)
    s.pop("seeds")
    if args.iterations:
        s["its"] = args.iterations
    if args.batch:
        s["batch"] = args.batch
    if args.eval_every:
        s["eval_every"] = args.eval_every
    seeds = list(range(args.seeds))
    out = _common.Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    bench = ba.benchmark(s, out / "bench", seeds, PRECONDS,
                         log=lambda *a, **k: print("[study_gap]", *a, flush=True))
    s = dict(s, coefficients=str(out / "bench" / "coefficients.h5"))
    schedules = {"2": rho_grid(2, 0.002, 80.0, 7.0), "2@0.6": list(ba.MID_SCHEDULE),
                 "3": rho_grid(3, 0.002, 80.0, 7.0)}
    gaps = {}
    for seed in seeds:
        cfgs = {}
        for p in PRECONDS:
            path = out / "bench" / f"gap_{p}.toml"
            path.write_text(ba.config(str(out / "bench" / "gap_run"), ["distill"], 0, p, s))
            cfgs[p] = load_config(path)
        gaps[seed] = measure_gap(cfgs, schedules, args.num, seed, progress=False)
        print(f"[study_gap] gap, noise seed {seed}: " + "  ".join(
            f"{p} grid {gaps[seed][p]['train_grid']['gap_rms']:.4f}" for p in PRECONDS),
            flush=True)
    result = {"mode": "ring", "command": _common.command_line(),
              "settings": {k: v for k, v in s.items() if k != "coefficients"},
              "budget_reduced": s["its"] < ba.FULL["its"], "seeds": seeds, "num": args.num,
              "teacher": bench["teacher"], "schedules": schedules, "metrics": {},
              "gap": {str(k): v for k, v in gaps.items()},
              "acceleration_curves": bench["curves"]}
    for metric, key in RING_SCHEDULES.items():
        r = bench["metrics"][metric]
        rows = {}
        for p in PRECONDS:
            per = [gaps[seed][p]["schedules"][key] for seed in seeds]
            rows[p] = {
                "jumps": [[j["t"], j["s"]] for j in per[0]],
                "g": [j["g"] for j in per[0]],
                "gap_per_jump": [[jp[i]["gap_rms"] for jp in per] for i in range(len(per[0]))],
                "jump_per_jump": [[jp[i]["jump_rms"] for jp in per]
                                  for i in range(len(per[0]))],
                "gap_schedule": [schedule_rms(jp, "gap_rms") for jp in per],
                "jump_schedule": [schedule_rms(jp, "jump_rms") for jp in per],
                "gap_train_grid": [gaps[seed][p]["train_grid"]["gap_rms"] for seed in seeds],
                "init": r["init"][p], "final": r["final"][p]}
        orders = {}
        for i, seed in enumerate(seeds):
            pick = lambda k: {p: rows[p][k][i] for p in PRECONDS}  # noqa: E731
            orders[str(seed)] = {k: order(pick(k)) for k in
                                 ("gap_schedule", "jump_schedule", "gap_train_grid",
                                  "init", "final")}
            for j in range(len(rows["ctm"]["jumps"])):
                orders[str(seed)][f"gap_jump_{j}"] = order(
                    {p: rows[p]["gap_per_jump"][j][i] for p in PRECONDS})
        result["metrics"][metric] = {"schedule_key": key, "rows": rows, "orders": orders}
    result["seconds"] = time.perf_counter() - t0
    return result


def ring_markdown(r: dict) -> str:
    st = r["settings"]
    lines = [f"`{r['command']}` — exact 8-mode ring; CTM training {st['its']} iterations at "
             f"batch {st['batch']} (EMA {st['ema']}, evaluation every {st['eval_every']} on "
             f"{st['eval_num']} noises), seeds {r['seeds']}; gap from {r['num']} noises per "
             f"seed (seed = the training seed); mean ± std over seeds. Errors: the EMA "
             f"student's final-point RMSE vs the exact PF-ODE. Per jump: gap_rms / jump "
             f"error (g).", ""]
    for metric in [k for k in RING_SCHEDULES if k in r["metrics"]]:
        m = r["metrics"][metric]
        rows = m["rows"]
        jumps = rows["ctm"]["jumps"]
        names = [f"{a:.4g} → {b:.4g}" for a, b in jumps]
        lines += [f"**{metric}**", "",
                  "| preconditioning | " + " | ".join(names) +
                  " | gap, schedule RMS | jump error, schedule RMS | training-grid gap | "
                  "iteration 0 | end of budget |",
                  "|---|" + "---|" * (len(names) + 5)]
        for p in PRECONDS:
            row = rows[p]
            lines.append(f"| `{p}` | " + " | ".join(
                f"{ms(row['gap_per_jump'][j])} / {ms(row['jump_per_jump'][j])} "
                f"({row['g'][j]:.4g})" for j in range(len(names)))
                + f" | {ms(row['gap_schedule'])} | {ms(row['jump_schedule'])} | "
                f"{ms(row['gap_train_grid'])} | {ms(row['init'])} | {ms(row['final'])} |")
        lines += ["", "order (smallest first; one entry per seed when they differ):", ""]
        for name, get in ring_order_keys(len(names)):
            per_seed = [order({p: get(rows[p], i) for p in PRECONDS})
                        for i in range(len(r["seeds"]))]
            shown = per_seed[0] if len(set(per_seed)) == 1 else " | ".join(per_seed)
            lines.append(f"- {name}: {shown}")
        lines.append("")
    return "\n".join(lines) + "\n"


def ring_order_keys(n_jumps: int) -> list:
    """(name, row -> seed index -> value) of every quantity whose order is listed."""
    keys = []
    for j in range(n_jumps):
        keys.append((f"gap, jump {j}", lambda row, i, j=j: row["gap_per_jump"][j][i]))
        keys.append((f"jump error, jump {j}", lambda row, i, j=j: row["jump_per_jump"][j][i]))
    for name, field in (("gap, schedule RMS", "gap_schedule"),
                        ("jump error, schedule RMS", "jump_schedule"),
                        ("training-grid gap", "gap_train_grid"),
                        ("iteration 0", "init"), ("end of budget", "final")):
        keys.append((name, lambda row, i, field=field: row[field][i]))
    return keys


# --- an image teacher ---------------------------------------------------------------------------

def image(args) -> dict:
    from core.diffusion.coefficients import store  # noqa: F401  (the store must be there: see below)
    from core.host.config import for_precond, load_config
    from core.base.errors import UserError
    from core.diffusion.schedules import rho_grid

    cfg = load_config(args.config)
    entries = {(e.get("label") or e["name"] + (f"-{e['variant']}" if e.get("variant") else "")): e
               for e in (cfg.run.preconds or [cfg.precond.data])}
    missing = [p for p in PRECONDS if p not in entries]
    if missing:
        raise UserError(f"{args.config}: [run] preconds lacks {missing}; the study compares "
                        f"{PRECONDS}")
    if not cfg.coefficients.path.exists():
        raise UserError(f"{cfg.coefficients.path}: no coefficient store; run `python -m "
                        f"core.run {args.config} --stages teacher,coefficients` first")
    d = cfg.diffusion
    schedules = {str(K): rho_grid(K, d.t_min, d.t_max, d.rho) for K in (1, 2, 3, 4)}
    schedules[f"2@{args.mid:g}"] = [d.t_max, args.mid, d.t_min]
    seed = args.seed if args.seed is not None else cfg.evaluate.seed + 1
    t0 = time.perf_counter()
    cfgs = {p: for_precond(cfg, entries[p], own_dir=False) for p in PRECONDS}
    gaps = measure_gap(cfgs, schedules, args.num, seed, progress=True)
    result = {"mode": "image", "command": _common.command_line(), "config": args.config,
              "num": args.num, "seed": seed, "schedules": schedules, "gap": gaps}
    attach_fid(result, args.fid)
    result["seconds"] = time.perf_counter() - t0
    return result


def attach_fid(result: dict, source: str | None) -> None:
    """The rows and orders of an image result: its gaps beside the FIDs of the study.json
    `source` (read now: it may be written while the gap is measured; None: no FIDs)."""
    study = json.loads(_common.Path(source).read_text()) if source else \
        {"fid": None, "teacher_initialised": {}, "training": {}}
    gaps, schedules = result["gap"], result["schedules"]
    result.update(fid_source=source, fid=study["fid"], rows={}, orders={})
    for key in schedules:
        K, _, mid = key.partition("@")
        rows = {}
        for p in PRECONDS:
            jumps = gaps[p]["schedules"][key]
            ti = study["teacher_initialised"].get(p)
            curve = study["training"].get(p, {})
            col = next((c for c in curve if c.rsplit("_", 1)[-1] == K), None)
            rows[p] = {"gap_per_jump": [j["gap_rms"] for j in jumps],
                       "jump_per_jump": [j["jump_rms"] for j in jumps],
                       "g": [j["g"] for j in jumps],
                       "gap_schedule": schedule_rms(jumps, "gap_rms"),
                       "jump_schedule": schedule_rms(jumps, "jump_rms"),
                       "gap_train_grid": gaps[p]["train_grid"]["gap_rms"],
                       "init": None if ti is None else ti["mid2"] if mid else ti["rho"][K],
                       "final": None if mid or col is None else curve[col][-1][1],
                       "final_iteration": None if mid or col is None else curve[col][-1][0]}
        result["rows"][key] = rows
        pick = lambda k: {p: rows[p][k] for p in PRECONDS if rows[p][k] is not None}  # noqa
        result["orders"][key] = {k: order(pick(k)) for k in
                                 ("gap_schedule", "jump_schedule", "init", "final")
                                 if len(pick(k)) == len(PRECONDS)}
        for j in range(len(rows["ctm"]["gap_per_jump"])):
            result["orders"][key][f"gap_jump_{j}"] = order(
                {p: rows[p]["gap_per_jump"][j] for p in PRECONDS})
            result["orders"][key][f"jump_jump_{j}"] = order(
                {p: rows[p]["jump_per_jump"][j] for p in PRECONDS})


def image_markdown(r: dict) -> str:
    fid = r["fid"]
    lines = [f"`{r['command']}` — gap from {r['num']} noises (seed {r['seed']}), float64 "
             f"reference ODE; {fid} from `{r['fid_source']}`. Per jump: gap_rms / jump error "
             f"(g).", "",
             "| steps | preconditioning | per jump: gap / jump error (g) | gap, schedule RMS | "
             "jump error, schedule RMS | training-grid gap | FID iteration 0 | FID end |",
             "|---|---|---|---|---|---|---|---|"]
    for key, rows in r["rows"].items():
        times = r["schedules"][key]
        for p in PRECONDS:
            row = rows[p]
            per = "; ".join(f"{a:.3g}→{b:.3g}: {gp:.4g} / {jp:.4g} ({g:.4g})" for a, b, gp, jp, g
                            in zip(times, times[1:], row["gap_per_jump"], row["jump_per_jump"],
                                   row["g"]))
            end = "–" if row["final"] is None else f"{row['final']:.1f}"
            start = "–" if row["init"] is None else f"{row['init']:.1f}"
            lines.append(f"| {key} | `{p}` | {per} | {row['gap_schedule']:.4g} | "
                         f"{row['jump_schedule']:.4g} | {row['gap_train_grid']:.4g} | "
                         f"{start} | {end} |")
    lines += ["", "order (smallest first):", ""]
    for key, o in r["orders"].items():
        lines.append(f"- {key}: " + ", ".join(f"{k} {v}" for k, v in o.items()))
    return "\n".join(lines) + "\n"


# --- the figure --------------------------------------------------------------------------------

def plot(r: dict, path) -> None:
    """Per schedule: each quantity of each preconditioning divided by ctm's (1 = ctm), so the
    orderings read off one axis; error bars: std over seeds (ring)."""
    from core.evaluation.plots import _plt, _save

    plt = _plt()
    if r["mode"] == "ring":
        panels = {m: r["metrics"][m]["rows"] for m in RING_SCHEDULES if m in r["metrics"]}
    else:
        panels = r["rows"]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    for ax, (name, rows) in zip(axes[0], panels.items()):
        n_j = len(rows["ctm"]["gap_per_jump"])
        keys = [f"{q} jump {j}" for j in range(n_j) for q in ("gap", "err.")] + \
            ["gap sched.", "err. sched.", "grid gap", "iter 0", "end"]
        for p in PRECONDS:
            vals, errs = [], []
            for k in keys:
                if " jump " in k:
                    j = int(k.rsplit(" ", 1)[1])
                    field = "gap_per_jump" if k.startswith("gap") else "jump_per_jump"
                    a, c = rows[p][field][j], rows["ctm"][field][j]
                else:
                    field = {"gap sched.": "gap_schedule", "err. sched.": "jump_schedule",
                             "grid gap": "gap_train_grid", "iter 0": "init", "end": "final"}[k]
                    a, c = rows[p][field], rows["ctm"][field]
                if a is None or c is None:
                    vals.append(np.nan)
                    errs.append(0.0)
                    continue
                ratio = np.asarray(a, dtype=float) / np.asarray(c, dtype=float)
                vals.append(float(np.mean(ratio)))
                errs.append(float(np.std(ratio, ddof=1)) if ratio.size > 1 else 0.0)
            vals = np.clip(vals, 0.03, None)             # forward's gaps near 0: drawn at 0.03
            ax.errorbar(range(len(keys)), vals, yerr=errs, marker="o", capsize=3,
                        color=COLOURS[p], label=p)
        ax.axhline(1.0, color="k", lw=0.5)
        lo, hi = ax.get_ylim()
        if hi / max(lo, 1e-9) > 4:                   # the ring's forward: orders of magnitude
            ax.set_yscale("log")
        ax.set_xticks(range(len(keys)))
        ax.set_xticklabels(keys, rotation=45, ha="right", fontsize=7)
        ax.set_title(name if r["mode"] == "ring" else
                     f"{name.split('@')[0]} steps" + (f" via {name.split('@')[1]}" if "@" in name
                                                      else ", rho grid"), fontsize=9)
    axes[0][0].set_ylabel("value / ctm's (clipped at 0.03)")
    axes[0][0].legend(fontsize=7)
    _save(fig, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="mode", required=True)
    pr = sub.add_parser("ring", help="the exact 2-D ring of tools/bench_acceleration.py")
    pr.add_argument("--seeds", type=int, default=3)
    pr.add_argument("--quick", action="store_true", help="bench_acceleration's quick settings "
                    "(batch 64, EMA 0.99, evaluation every 50) instead of its full ones")
    pr.add_argument("--iterations", type=int, help="training budget (default: the bench's)")
    pr.add_argument("--batch", type=int, help="training batch (default: the bench's)")
    pr.add_argument("--eval-every", type=int, help="default: the bench's")
    pr.add_argument("--num", type=int, default=1024, help="gap noises per seed")
    pr.add_argument("--out", default=str(_common.ROOT / "runs" / "gap_study_ring"))
    pi = sub.add_parser("image", help="a network teacher with a tools/study_images.py study")
    pi.add_argument("config")
    pi.add_argument("--fid", help="a study.json of tools/study_images.py (read after the "
                    "measurement; or attach one later with render --fid)")
    pi.add_argument("--num", type=int, default=16)
    pi.add_argument("--seed", type=int, help="default: [evaluate] seed + 1 (study_images')")
    pi.add_argument("--mid", type=float, default=0.821, help="the 2-step middle time")
    pi.add_argument("--out", default=str(_common.ROOT / "runs" / "gap_study_image"))
    pn = sub.add_parser("render", help="the .md and .png again from a gap_study_*.json")
    pn.add_argument("json")
    pn.add_argument("--fid", help="image mode: (re)attach this study.json's FIDs")
    args = p.parse_args(argv)

    from core.base.io import save_json, write_bytes

    if args.mode == "render":
        stem = _common.Path(args.json).resolve().with_suffix("")
        result = json.loads(stem.with_suffix(".json").read_text())
        args.mode = result["mode"]
        if args.fid and args.mode == "image":
            attach_fid(result, args.fid)
            save_json(stem.with_suffix(".json"), result)
    else:
        result = ring(args) if args.mode == "ring" else image(args)
        out = _common.Path(args.out).resolve()
        out.mkdir(parents=True, exist_ok=True)
        stem = out / f"gap_study_{args.mode}"
        save_json(stem.with_suffix(".json"), result)
    md = ring_markdown(result) if args.mode == "ring" else image_markdown(result)
    write_bytes(stem.with_suffix(".md"), md.encode())
    plot(result, stem.with_suffix(".png"))
    print(md)
    print(f"[study_gap] -> {stem}.json, .md, .png ({result['seconds']:.0f}s)")
    return 0


if __name__ == "__main__":
    from core.base.errors import UserError
    try:
        sys.exit(main())
    except UserError as e:             # bad input: one line, exit status 2, as core.run
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
