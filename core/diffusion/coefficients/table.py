"""The coefficient table {t, lambda, l, s, L, S, eta} and its integration / interpolation.

With lambda = -log t and the free parameters l_t, s_t (Section 3.2):

    L_t   = exp( int_{lambda_T}^{lambda_t} l dlambda )          (below Eqn. 11)
    S_t   = exp( int_{lambda_T}^{lambda_t} s dlambda )          (above Eqn. 12)
    eta_t =      int_{lambda_T}^{lambda_t} L S dlambda          (above Eqn. 12)

so L = S = 1 and eta = 0 at t = t_max. Between the estimated grid points l and s are
interpolated by cubic Hermite splines (slopes from 4th-order finite differences), then the
integrals are cumulative trapezoids on a dense uniform lambda grid (h ~ 1e-3). The dense grid is also what the exported
jumper interpolates at run time, so training, sampling and the store agree to round-off.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from core.diffusion.coefficients.numerics import derivative
from core.base.errors import UserError

#: points of the dense, uniform-in-lambda table shipped inside exported jumpers
DENSE_POINTS = 8193


def _cumtrapz(y: np.ndarray, dx: float) -> np.ndarray:
    out = np.zeros_like(y)
    out[1:] = np.cumsum(0.5 * (y[1:] + y[:-1]) * dx)
    return out


def hermite(xq: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Cubic Hermite interpolation of y(x) at xq (x increasing), slopes by 4th-order finite
    differences: O(h^4) where np.interp is O(h^2)."""
    dy = derivative(x, y)
    i = np.clip(np.searchsorted(x, xq, side="right") - 1, 0, len(x) - 2)
    h = x[i + 1] - x[i]
    u = (xq - x[i]) / h
    h00, h10 = 2 * u ** 3 - 3 * u ** 2 + 1, u ** 3 - 2 * u ** 2 + u
    h01, h11 = -2 * u ** 3 + 3 * u ** 2, u ** 3 - u ** 2
    return h00 * y[i] + h10 * h * dy[i] + h01 * y[i + 1] + h11 * h * dy[i + 1]


@dataclass
class DenseTable:
    """l, log L, log S, eta on a uniform lambda grid lam0 + i * dlam, i = 0..n-1."""
    lam0: float
    dlam: float
    l: np.ndarray
    s: np.ndarray
    logL: np.ndarray
    logS: np.ndarray
    eta: np.ndarray

    @property
    def lam(self) -> np.ndarray:
        return self.lam0 + self.dlam * np.arange(len(self.l))


def integrate(lam: np.ndarray, l: np.ndarray, s: np.ndarray, n_dense: int = DENSE_POINTS
              ) -> DenseTable:
    """Dense L, S, eta from l, s given at increasing `lam` (piecewise-linear in lambda)."""
    lam_d = np.linspace(lam[0], lam[-1], n_dense)
    dlam = (lam[-1] - lam[0]) / (n_dense - 1)
    l_d = hermite(lam_d, lam, l)
    s_d = hermite(lam_d, lam, s)
    logL = _cumtrapz(l_d, dlam)
    logS = _cumtrapz(s_d, dlam)
    LS = np.exp(logL + logS)
    # trapezoid + Euler-Maclaurin end correction (d(LS)/dlambda = (l + s) LS): O(h^4), which
    # matters where the forward variant's f = 1 - (eta_s - eta_t)/S_t cancels (s << t)
    eta = _cumtrapz(LS, dlam) - dlam ** 2 / 12 * ((l_d + s_d) * LS - (l_d[0] + s_d[0]) * LS[0])
    return DenseTable(float(lam[0]), float(dlam), l_d, s_d, logL, logS, eta)


@dataclass
class CoefficientTable:
    """Arrays ordered by ascending lambda (= descending t), as in the HDF5 store."""
    t: np.ndarray
    l: np.ndarray
    s: np.ndarray
    l_stderr: np.ndarray
    s_stderr: np.ndarray
    attrs: dict = field(default_factory=dict)
    s_guarded: np.ndarray | None = None   # True where E||g||^2 ~ 0 made s_t undefined

    def __post_init__(self):
        self.t = np.asarray(self.t, dtype=np.float64)
        self.lam = -np.log(self.t)
        self._dense = integrate(self.lam, np.asarray(self.l, np.float64),
                                np.asarray(self.s, np.float64))
        at = self._at_lam(self.lam)
        self.L, self.S, self.eta = at["L"], at["S"], at["eta"]
        self.L[0] = self.S[0] = 1.0
        self.eta[0] = 0.0

    @property
    def t_min(self) -> float:
        return float(self.t[-1])

    @property
    def t_max(self) -> float:
        return float(self.t[0])

    def dense(self) -> DenseTable:
        return self._dense

    def _at_lam(self, lam: np.ndarray) -> dict:
        import torch

        from core.diffusion.coefficients.lookup import lookup

        d = self._dense
        arrays = [torch.from_numpy(a) for a in (d.l, d.s, d.logL, d.logS, d.eta)]
        out = lookup(torch.as_tensor(lam, dtype=torch.float64), d.lam0, d.dlam, *arrays)
        return {k: v.numpy() for k, v in zip(("l", "s", "L", "S", "eta"), out)}

    def at(self, t) -> dict:
        """l, s, L, S, eta interpolated at times t in [t_min, t_max]; outside is an error."""
        t = np.asarray(t, dtype=np.float64)
        tol = 1e-9
        if np.any(~np.isfinite(t)) or np.any(t < self.t_min * (1 - tol)) or \
                np.any(t > self.t_max * (1 + tol)):
            bad = t[(~np.isfinite(t)) | (t < self.t_min * (1 - tol)) | (t > self.t_max * (1 + tol))]
            raise UserError(f"time {float(bad.flat[0]):g} is outside the coefficient table's "
                            f"range [{self.t_min:g}, {self.t_max:g}]")
        return self._at_lam(-np.log(np.clip(t, self.t_min, self.t_max)))
