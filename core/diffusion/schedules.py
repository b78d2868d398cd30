"""Time grids: EDM's rho-schedule and log-uniform grids."""

from __future__ import annotations

import math

import numpy as np


def rho_grid(n_steps: int, t_min: float, t_max: float, rho: float) -> list[float]:
    """EDM's schedule t_i = (t_max^(1/rho) + i/N (t_min^(1/rho) - t_max^(1/rho)))^rho, i=0..N
    (Appendix B.2/B.3): N+1 decreasing times from t_max to t_min, endpoints exact."""
    if n_steps < 1:
        raise ValueError("n_steps must be >= 1")
    a, b = t_max ** (1.0 / rho), t_min ** (1.0 / rho)
    ts = [(a + i / n_steps * (b - a)) ** rho for i in range(n_steps + 1)]
    ts[0], ts[-1] = t_max, t_min
    return ts


def log_grid(n: int, t_min: float, t_max: float) -> np.ndarray:
    """n times uniformly spaced in log t, decreasing from t_max to t_min (Appendix B.1)."""
    ts = np.exp(np.linspace(math.log(t_max), math.log(t_min), n))
    ts[0], ts[-1] = t_max, t_min
    return ts


def coefficient_grid(kind: str, n: int, t_min: float, t_max: float, rho: float) -> np.ndarray:
    """Decreasing t (= increasing lambda = -log t), as the coefficient store orders them."""
    if kind == "log":
        return log_grid(n, t_min, t_max)
    if kind == "edm":
        return np.asarray(rho_grid(n - 1, t_min, t_max, rho), dtype=np.float64)
    raise ValueError(f"unknown grid {kind!r}")
