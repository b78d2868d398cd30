"""The paper's Fig. 3: a sample metric (FID by default) against distillation iterations, one
line per run (e.g. CTM vs Analytic-Precond), one panel per number of jumps.

    python tools/plot_fid_curves.py runs/fmnist_smoke/ctm runs/fmnist_smoke/analytic-backward \
        --out fig3.png [--metric fid_featnet-1a2b3c4d] [--labels ctm analytic]

The same as ``ctmkit plot fid`` (core/commands.py). Reads each run's metrics.csv (columns
<metric>_<K> written by distill's periodic evaluation, ``[distill] eval = ["fid"]``).
"""

from __future__ import annotations

import sys

import _common  # noqa: F401  (puts the checkout on sys.path)
from core.commands import plot_main


def main(argv=None) -> int:
    return plot_main(["fid", *(sys.argv[1:] if argv is None else argv)],
                     prog="python tools/plot_fid_curves.py")


if __name__ == "__main__":
    sys.exit(main())
