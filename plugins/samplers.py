"""Samplers that run a jumper f_theta(x, t, s) from noise at t_max down to t_min: ``ctm``
(core.export.sampling.CTMSampler, CTM's sampling step) and ``cm``. The contract is core.api.Sampler.

Noise convention (shared with the C++ ``ctm_sample``): one CPU ``torch.Generator`` seeded once;
for each batch in order, the initial noise is ``randn([b, *shape]) * t_0`` (float32), then any
per-step noise the sampler needs, in step order.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from core.api import Sampler
from core.host.hookspecs import hookimpl
from core.diffusion.edm import batch_times
from core.export.sampling import CTMSampler, randn_like  # noqa: F401  (ctm, re-exported)
from core.diffusion.schedules import rho_grid


class CMSampler(Sampler):
    """Multistep consistency sampling (Song et al. 2023, Alg. 1): jump to t_min, re-noise to the
    next grid time with std sqrt(t_n^2 - t_min^2), jump again."""

    def timesteps(self, steps: int, t_min: float, t_max: float, rho: float) -> list[float]:
        return rho_grid(steps, t_min, t_max, rho)

    @torch.no_grad()
    def sample(self, jumper, x: Tensor, timesteps, generator: torch.Generator,
               class_labels: Optional[Tensor] = None, trajectory: Optional[list] = None) -> Tensor:
        eps = timesteps[-1]
        x = jumper(x, batch_times(x, timesteps[0]), batch_times(x, eps), class_labels)
        if trajectory is not None:
            trajectory.append(x)
        for t in timesteps[1:-1]:
            x = x + math.sqrt(t * t - eps * eps) * randn_like(x, generator)
            x = jumper(x, batch_times(x, t), batch_times(x, eps), class_labels)
            if trajectory is not None:
                trajectory.append(x)
        return x


def _ctm(options, ctx):
    return CTMSampler(gamma=options.float("gamma", 0.0, min=0.0, max=1.0))


@hookimpl
def ctmkit_samplers():
    return {"ctm": _ctm, "cm": lambda options, ctx: CMSampler()}
