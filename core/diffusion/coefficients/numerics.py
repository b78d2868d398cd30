"""Finite differences on arbitrary grids."""

import numpy as np


def fornberg_weights(x0: float, x: np.ndarray) -> np.ndarray:
    """Weights w with sum_j w_j f(x_j) ~ f'(x0), exact for polynomials of degree len(x) - 1
    (Fornberg 1988, the first-derivative column of his recursion)."""
    n = len(x)
    c = np.zeros((n, 2))
    c1, c4 = 1.0, x[0] - x0
    c[0, 0] = 1.0
    for i in range(1, n):
        mn = min(i, 1)
        c2, c5, c4 = 1.0, c4, x[i] - x0
        for j in range(i):
            c3 = x[i] - x[j]
            c2 *= c3
            if j == i - 1:
                for k in range(mn, 0, -1):
                    c[i, k] = c1 * (k * c[i - 1, k - 1] - c5 * c[i - 1, k]) / c2
                c[i, 0] = -c1 * c5 * c[i - 1, 0] / c2
            for k in range(mn, 0, -1):
                c[j, k] = (c4 * c[j, k] - k * c[j, k - 1]) / c3
            c[j, 0] = c4 * c[j, 0] / c3
        c1 = c2
    return c[:, 1]


def derivative(x: np.ndarray, y: np.ndarray, points: int = 5) -> np.ndarray:
    """dy/dx on an arbitrary increasing grid with `points`-point (4th-order) stencils,
    centred inside and one-sided at the ends. np.gradient's 2nd order is not enough: the
    s_t estimate multiplies the error of dl/dlambda by E[g.x]/E||g||^2, large at small t."""
    n = len(x)
    out = np.empty(n)
    for i in range(n):
        lo = min(max(0, i - points // 2), n - points)
        idx = slice(lo, lo + points)
        out[i] = fornberg_weights(x[i], x[idx]) @ y[idx]
    return out


def smooth(x: np.ndarray, y: np.ndarray, width: float) -> np.ndarray:
    """Gaussian kernel smoothing of y(x) (x increasing) with standard deviation `width` in x
    units: a Nadaraya-Watson mean over the points and their odd reflections about both ends,
    y(2 x_e - x) = 2 y_e - y(x). It keeps both end values (exactly: they are reset after the
    sums) and constants exactly, and linear functions on a uniform grid. width = 0 returns y.

    ``[coefficients] smooth``: NOT part of the paper. Applied to l_t and s_t it replaces the
    per-time minimisers of Eqns. (15) and (17) by local averages over lambda, a deviation
    made only to study how the noise / wiggles of the estimates affect the jumps."""
    y = np.asarray(y, dtype=np.float64)
    if width == 0:
        return y.copy()
    x = np.asarray(x, dtype=np.float64)
    xs = np.concatenate([2 * x[0] - x[:0:-1], x, 2 * x[-1] - x[-2::-1]])
    ys = np.concatenate([2 * y[0] - y[:0:-1], y, 2 * y[-1] - y[-2::-1]])
    w = np.exp(-0.5 * ((x[:, None] - xs[None, :]) / width) ** 2)
    out = (w @ ys) / w.sum(1)
    out[0], out[-1] = y[0], y[-1]
    return out


def smooth_coefficients(t: np.ndarray, l: np.ndarray, s: np.ndarray,
                        width: float) -> tuple[np.ndarray, np.ndarray]:
    """l_t and s_t each smoothed over lambda = -log t (`smooth`, std `width`): the
    ``[coefficients] smooth`` DEVIATION from Eqns. (15), (17)."""
    lam = -np.log(t)
    return smooth(lam, l, width), smooth(lam, s, width)
