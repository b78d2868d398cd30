"""Preconditioning pictures: f(t, eps) and g(t, eps) against log t for every built-in
preconditioning (paper Fig. 2c), and g(t, s) heat maps (Fig. 4), as one PNG.

    python tools/plot_coefficients.py runs/quickstart/coefficients.h5 [--out coefficients_fg.png]
"""

from __future__ import annotations

import argparse
import sys

import _common
from core.coefficients import store
from core.errors import UserError
from core.plots import plot_coefficient_table, plot_preconditionings


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("coefficients", help="an HDF5 coefficient store (stage 'coefficients')")
    ap.add_argument("--out", help="PNG path (default: beside the store, *_preconditionings.png)")
    ap.add_argument("--sigma-data", type=float, default=0.5)
    args = ap.parse_args(argv)
    try:
        table = store.load(args.coefficients)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = _common.Path(args.out) if args.out else \
        _common.Path(args.coefficients).with_name(
            _common.Path(args.coefficients).stem + "_preconditionings.png")
    plot_preconditionings(_common.builtin_preconds(table, args.sigma_data), table.t_min,
                          table.t_max, out)
    table_png = out.with_name(out.stem + "_table.png")
    plot_coefficient_table(table, table_png)
    print(f"# {_common.command_line()}")
    print(f"wrote {out} and {table_png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
