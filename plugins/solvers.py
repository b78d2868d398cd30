"""Teacher PF-ODE solvers for dx/dt = (x - D(x, t)) / t (Eqn. 2), stepping along a time grid."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

from core.hookspecs import hookimpl


def _full(x: Tensor, t: float) -> Tensor:
    return torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device)


class EulerSolver:
    """First-order Euler: x_{i+1} = x_i + (t_{i+1} - t_i) (x_i - D(x_i, t_i)) / t_i (Eqn. 9)."""
    order = 1

    def solve(self, denoise: Callable, x: Tensor, ts: Sequence[float]) -> Tensor:
        for t0, t1 in zip(ts[:-1], ts[1:]):
            d = (x - denoise(x, _full(x, t0))) / t0
            x = x + (t1 - t0) * d
        return x


class HeunSolver:
    """EDM's Heun (2nd order): Euler predictor, trapezoidal corrector; no correction on a step
    that ends at t = 0 (the slope is undefined there)."""
    order = 2

    def solve(self, denoise: Callable, x: Tensor, ts: Sequence[float]) -> Tensor:
        for t0, t1 in zip(ts[:-1], ts[1:]):
            d0 = (x - denoise(x, _full(x, t0))) / t0
            x_next = x + (t1 - t0) * d0
            if t1 > 0:
                d1 = (x_next - denoise(x_next, _full(x, t1))) / t1
                x_next = x + (t1 - t0) * 0.5 * (d0 + d1)
            x = x_next
        return x


@hookimpl
def ctmkit_solvers():
    return {"euler": lambda options, ctx: EulerSolver(),
            "heun": lambda options, ctx: HeunSolver()}
