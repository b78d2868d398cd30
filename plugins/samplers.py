"""Samplers that run a jumper f_theta(x, t, s) from noise at t_max down to t_min.

Noise convention (shared with the C++ ``ctm_sample``): one CPU ``torch.Generator`` seeded once;
for each batch in order, the initial noise is ``randn([b, *shape]) * t_0`` (float32), then any
per-step noise the sampler needs, in step order.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from core.hookspecs import hookimpl
from core.schedules import rho_grid


def _full(x: Tensor, t: float) -> Tensor:
    return torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device)


def _randn_like(x: Tensor, generator: torch.Generator) -> Tensor:
    return torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)


class CTMSampler:
    """CTM's sampler (Appendix B.3): x_{t_n} = f_theta(x_{t_{n-1}}, t_{n-1}, t_n) on EDM's
    rho-grid. With gamma > 0 (CTM's gamma-sampling) each intermediate jump lands at
    u = max(sqrt(1 - gamma^2) t_n, t_min) and fresh noise of std sqrt(t_n^2 - u^2) (= gamma t_n
    unless clipped) restores noise level t_n; gamma = 0 is deterministic, gamma = 1 is exactly
    CM's multistep sampling."""

    def __init__(self, gamma: float = 0.0):
        self.gamma = gamma

    def timesteps(self, steps: int, t_min: float, t_max: float, rho: float) -> list[float]:
        return rho_grid(steps, t_min, t_max, rho)

    @torch.no_grad()
    def sample(self, jumper, x: Tensor, timesteps, generator: torch.Generator,
               class_labels: Optional[Tensor] = None, trajectory: Optional[list] = None) -> Tensor:
        K, t_min = len(timesteps) - 1, timesteps[-1]
        for n in range(K):
            t, s = timesteps[n], timesteps[n + 1]
            last = n + 1 == K
            target = s if (last or self.gamma == 0.0) else \
                max(math.sqrt(1 - self.gamma ** 2) * s, t_min)
            x = jumper(x, _full(x, t), _full(x, target), class_labels)
            if not last and self.gamma > 0.0:
                x = x + math.sqrt(s * s - target * target) * _randn_like(x, generator)
            if trajectory is not None:
                trajectory.append(x)
        return x


class CMSampler:
    """Multistep consistency sampling (Song et al. 2023, Alg. 1): jump to t_min, re-noise to the
    next grid time with std sqrt(t_n^2 - t_min^2), jump again."""

    def timesteps(self, steps: int, t_min: float, t_max: float, rho: float) -> list[float]:
        return rho_grid(steps, t_min, t_max, rho)

    @torch.no_grad()
    def sample(self, jumper, x: Tensor, timesteps, generator: torch.Generator,
               class_labels: Optional[Tensor] = None, trajectory: Optional[list] = None) -> Tensor:
        eps = timesteps[-1]
        x = jumper(x, _full(x, timesteps[0]), _full(x, eps), class_labels)
        if trajectory is not None:
            trajectory.append(x)
        for t in timesteps[1:-1]:
            x = x + math.sqrt(t * t - eps * eps) * _randn_like(x, generator)
            x = jumper(x, _full(x, t), _full(x, eps), class_labels)
            if trajectory is not None:
                trajectory.append(x)
        return x


def _ctm(options, ctx):
    return CTMSampler(gamma=options.float("gamma", 0.0, min=0.0, max=1.0))


@hookimpl
def ctmkit_samplers():
    return {"ctm": _ctm, "cm": lambda options, ctx: CMSampler()}
