"""A third-party sampler: stochastic multistep consistency sampling on a log-uniform grid.

Each step jumps to t_min with the exported jumper, then re-noises to the next grid time t with
std s_noise * sqrt(t^2 - t_min^2) (s_noise = 1 is CM's multistep sampling, Song et al. 2023,
Alg. 1); the grid is log-uniform in t (``schedule = "log"``) or EDM's rho grid (``"rho"``).
Per-step noise comes from the CPU generator, in step order (the host's convention).
"""

import math
from typing import Optional

import torch
from torch import Tensor

from core.api import Sampler, batch_times, hookimpl, rho_grid


class LogCMSampler(Sampler):
    def __init__(self, schedule: str, s_noise: float):
        self.schedule, self.s_noise = schedule, s_noise

    def timesteps(self, steps: int, t_min: float, t_max: float, rho: float) -> list[float]:
        if self.schedule == "rho":
            return rho_grid(steps, t_min, t_max, rho)
        a, b = math.log(t_max), math.log(t_min)
        ts = [math.exp(a + i / steps * (b - a)) for i in range(steps + 1)]
        ts[0], ts[-1] = t_max, t_min
        return ts

    def sample(self, jumper, x: Tensor, timesteps, generator: torch.Generator,
               class_labels: Optional[Tensor] = None,
               trajectory: Optional[list] = None) -> Tensor:
        eps = timesteps[-1]
        for i, t in enumerate(timesteps[:-1]):
            if i > 0:                                       # re-noise from eps up to t
                z = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
                x = x + self.s_noise * math.sqrt(t * t - eps * eps) * z
            x = jumper(x, batch_times(x, t), batch_times(x, eps), class_labels)
            if trajectory is not None:
                trajectory.append(x)
        return x


def make(options, ctx):
    """options: the rest of [sample] (steps, num, ... are the host's)."""
    return LogCMSampler(options.str("schedule", "log", choices=("log", "rho")),
                        options.float("s_noise", 1.0, positive=True))


@hookimpl
def ctmkit_samplers():
    return {"logcm": make}
