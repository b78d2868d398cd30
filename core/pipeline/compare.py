"""Comparing preconditionings: the summary of a ``[run] preconds`` run, and the paper's Fig. 3
(a sample metric against training iterations, one line per preconditioning, one panel per
number of jumps) drawn from the runs' ``metrics.csv``."""

from __future__ import annotations

import csv
import re
from pathlib import Path

from core.base.bounds import load_json
from core.base.errors import UserError
from core.base.io import save_json

#: metrics.csv columns of the periodic evaluation: <metric>_<K> (K = number of jumps)
EVAL_COLUMN = re.compile(r"^((?:traj_err|fid|kid)[A-Za-z0-9_.\-]*?)_(\d+)$")


def read_curves(csv_path: Path) -> dict:
    """{metric: {K: ([iterations], [values])}} from one run's metrics.csv."""
    if not csv_path.is_file():
        raise UserError(f"{csv_path}: not found (run the 'distill' stage first)")
    out: dict = {}
    with open(csv_path, newline="") as fh:
        for row in csv.DictReader(fh):
            for col, val in row.items():
                m = EVAL_COLUMN.match(col or "")
                if not m or val in (None, ""):
                    continue
                xs, ys = out.setdefault(m.group(1), {}).setdefault(int(m.group(2)), ([], []))
                xs.append(int(row["iteration"]))
                ys.append(float(val))
    return out


def plot_metric_curves(runs: dict, path: Path, metric: str | None = None) -> str:
    """Draw `metric` (default: the first FID-like column found, else the trajectory error)
    against iterations for every run in `runs` ({label: run out_dir}); returns the metric."""
    from core.evaluation.plots import _plt, _save

    curves = {label: read_curves(Path(d) / "metrics.csv") for label, d in runs.items()}
    names = sorted({m for c in curves.values() for m in c})
    if metric is None:
        metric = next((m for m in names if m.startswith("fid")), names[0] if names else None)
    if metric is None or metric not in names:
        raise UserError(f"no periodic-evaluation column {metric or ''!r} in the runs' "
                        f"metrics.csv (have: {', '.join(names) or 'none'})")
    ks = sorted({k for c in curves.values() for k in c.get(metric, {})})
    plt = _plt()
    fig, axes = plt.subplots(1, len(ks), figsize=(4.2 * len(ks), 3.6), squeeze=False)
    for ax, k in zip(axes[0], ks):
        for label, c in curves.items():
            if k in c.get(metric, {}):
                xs, ys = c[metric][k]
                ax.plot(xs, ys, "o-", ms=3, label=label)
        ax.set_title(f"{k}-step")
        ax.set_xlabel("training iteration")
        ax.set_ylabel(metric)
        ax.legend(fontsize=8)
    fig.suptitle(f"{metric} during distillation (paper Fig. 3)")
    _save(fig, path)
    return metric


def summarise(cfg, runs: list) -> None:
    """comparison.json (each preconditioning's metrics.json) and comparison.png in out_dir."""
    from core.pipeline.stages import log

    table = {}
    for r in runs:
        f = r.out_dir / "metrics.json"
        if f.is_file():
            table[r.out_dir.name] = load_json(f.read_bytes(), str(f), "metrics.json")
    if table:
        save_json(cfg.run.out_dir / "comparison.json", table)
        log(f"compare: -> {cfg.run.out_dir / 'comparison.json'}")
    dirs = {r.out_dir.name: r.out_dir for r in runs if (r.out_dir / "metrics.csv").is_file()}
    if dirs:
        try:
            metric = plot_metric_curves(dirs, cfg.run.out_dir / "comparison.png")
            log(f"compare: {metric} against iterations -> {cfg.run.out_dir / 'comparison.png'}")
        except UserError as e:
            log(f"compare: no curves ({e})")
