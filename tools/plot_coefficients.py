"""Preconditioning pictures: f(t, eps) and g(t, eps) against log t for every built-in
preconditioning (paper Fig. 2c), and g(t, s) heat maps (Fig. 4), as one PNG.

    python tools/plot_coefficients.py runs/quickstart/coefficients.h5 [--out coefficients_fg.png]

The same as ``ctmkit plot coefficients`` (core/commands.py).
"""

from __future__ import annotations

import sys

import _common  # noqa: F401  (puts the checkout on sys.path)
from core.commands import plot_main


def main(argv=None) -> int:
    return plot_main(["coefficients", *(sys.argv[1:] if argv is None else argv)],
                     prog="python tools/plot_coefficients.py")


if __name__ == "__main__":
    sys.exit(main())
