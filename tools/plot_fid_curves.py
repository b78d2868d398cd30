"""The paper's Fig. 3: a sample metric (FID by default) against distillation iterations, one
line per run (e.g. CTM vs Analytic-Precond), one panel per number of jumps.

    python tools/plot_fid_curves.py runs/fmnist_smoke/ctm runs/fmnist_smoke/analytic-backward \
        --out fig3.png [--metric fid_featnet-1a2b3c4d] [--labels ctm analytic]

Reads each run's metrics.csv (columns <metric>_<K> written by distill's periodic evaluation,
``[distill] eval = ["fid"]``).
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.compare import plot_metric_curves  # noqa: E402
from core.errors import UserError  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path, help="run folders holding metrics.csv")
    p.add_argument("--out", type=Path, default=Path("fig3.png"))
    p.add_argument("--metric", help="column family, e.g. fid or fid_featnet-xxxx (default: "
                   "the first FID column)")
    p.add_argument("--labels", nargs="+", help="legend labels (default: folder names)")
    a = p.parse_args(argv)
    labels = a.labels or [r.name for r in a.runs]
    if len(labels) != len(a.runs):
        print("error: --labels needs one label per run", file=sys.stderr)
        return 2
    try:
        metric = plot_metric_curves(dict(zip(labels, a.runs)), a.out, a.metric)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{metric} against iterations -> {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
