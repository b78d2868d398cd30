"""Teacher PF-ODE solvers for dx/dt = (x - D(x, t)) / t (Eqn. 2), stepping along a time grid."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

from core.hookspecs import hookimpl


def _full(x: Tensor, t: float) -> Tensor:
    return torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device)


def _col(t: Tensor, x: Tensor) -> Tensor:
    return t.reshape([-1] + [1] * (x.dim() - 1)).to(x.dtype)


class Solver:
    """``step(denoise, x, t0, t1)`` takes one step with per-sample times t0, t1 (shape [B]);
    ``solve`` walks a common grid."""

    def solve(self, denoise: Callable, x: Tensor, ts: Sequence[float]) -> Tensor:
        for t0, t1 in zip(ts[:-1], ts[1:]):
            x = self.step(denoise, x, _full(x, t0), _full(x, t1))
        return x


class EulerSolver(Solver):
    """First-order Euler: x_{i+1} = x_i + (t_{i+1} - t_i) (x_i - D(x_i, t_i)) / t_i (Eqn. 9)."""
    order = 1

    def step(self, denoise: Callable, x: Tensor, t0: Tensor, t1: Tensor,
             positive: bool = False) -> Tensor:
        return x + _col(t1 - t0, x) * (x - denoise(x, t0)) / _col(t0, x)


class HeunSolver(Solver):
    """EDM's Heun (2nd order): Euler predictor, trapezoidal corrector; no correction on a step
    that ends at t = 0 (the slope is undefined there). ``positive=True``: the caller knows
    every t1 > 0, so the step skips that check (a device sync on a GPU)."""
    order = 2

    def step(self, denoise: Callable, x: Tensor, t0: Tensor, t1: Tensor,
             positive: bool = False) -> Tensor:
        h = _col(t1 - t0, x)
        d0 = (x - denoise(x, t0)) / _col(t0, x)
        x_next = x + h * d0
        if positive or bool((t1 > 0).all()):
            d1 = (x_next - denoise(x_next, t1)) / _col(t1, x)
            return x + h * 0.5 * (d0 + d1)
        safe = torch.where(t1 > 0, t1, torch.ones_like(t1))
        d1 = (x_next - denoise(x_next, safe)) / _col(safe, x)
        return torch.where(_col(t1 > 0, x) > 0, x + h * 0.5 * (d0 + d1), x_next)


@hookimpl
def ctmkit_solvers():
    return {"euler": lambda options, ctx: EulerSolver(),
            "heun": lambda options, ctx: HeunSolver()}
