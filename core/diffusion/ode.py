"""Steps of the teacher PF-ODE dx/dt = (x - D(x, t)) / t along a time grid: Euler and EDM's
Heun, with per-sample times (the built-in ``euler`` / ``heun`` solver plugins, and the host's
own solves: reference trajectories, teacher sample grids)."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from core.diffusion.contracts import Solver
from core.diffusion.edm import append_dims


class EulerSolver(Solver):
    """First-order Euler, x_{i+1} = x_i + (t_{i+1} - t_i) (x_i - D(x_i, t_i)) / t_i."""
    order = 1

    def step(self, denoise: Callable, x: Tensor, t0: Tensor, t1: Tensor,
             positive: bool = False) -> Tensor:
        return x + append_dims(t1 - t0, x) * (x - denoise(x, t0)) / append_dims(t0, x)  # Eqn. (9)


class HeunSolver(Solver):
    """EDM's Heun (2nd order): Euler predictor, trapezoidal corrector; no correction on a step
    that ends at t = 0 (the slope is undefined there). ``positive=True``: the caller knows
    every t1 > 0, so the step skips that check (a device sync on a GPU)."""
    order = 2

    def step(self, denoise: Callable, x: Tensor, t0: Tensor, t1: Tensor,
             positive: bool = False) -> Tensor:
        h = append_dims(t1 - t0, x)
        d0 = (x - denoise(x, t0)) / append_dims(t0, x)                   # Eqn. (2)
        x_next = x + h * d0
        if positive or bool((t1 > 0).all()):
            d1 = (x_next - denoise(x_next, t1)) / append_dims(t1, x)
            return x + h * 0.5 * (d0 + d1)
        safe = torch.where(t1 > 0, t1, torch.ones_like(t1))
        d1 = (x_next - denoise(x_next, safe)) / append_dims(safe, x)
        return torch.where(append_dims(t1 > 0, x) > 0, x + h * 0.5 * (d0 + d1), x_next)
