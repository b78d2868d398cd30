"""A third-party teacher: the exact denoiser of one isotropic Gaussian N(mu, sigma^2 I).

Under x_t = x_0 + t z, q_t = N(mu, (sigma^2 + t^2) I), so

    D(x, t) = E[x_0 | x_t = x] = (sigma^2 x + t^2 mu) / (sigma^2 + t^2)

and the PF-ODE has the closed-form solution x(t1) = mu + (x(t0) - mu) sqrt((sigma^2 + t1^2) /
(sigma^2 + t0^2)), which this teacher gives as its exact ``reference_solve``.
"""

import hashlib
import json
import math
from typing import Optional

import torch
from torch import Tensor, nn

from core.api import Teacher, hookimpl


class GaussianDenoiser(nn.Module):                        # TorchScript-able
    def __init__(self, mean: Tensor, var: float):
        super().__init__()
        self.register_buffer("mean", mean)
        self.var = float(var)

    def forward(self, x: Tensor, t: Tensor, class_labels: Optional[Tensor] = None) -> Tensor:
        t2 = (t.to(x.dtype).reshape(-1) ** 2).expand(x.shape[0])
        t2 = t2.reshape([-1] + [1] * (x.dim() - 1))
        mu = self.mean.to(x.dtype).reshape([1] + list(x.shape[1:]))
        return (self.var * x + t2 * mu) / (self.var + t2)


class GaussianTeacher(Teacher):
    name = "gaussian"
    can_sample_data = True
    num_classes = 0

    def __init__(self, mean: list, std: float):
        self.mean = torch.tensor(mean, dtype=torch.float64)
        self.std = float(std)
        self.shape = (len(mean),)

    def denoiser(self, dtype=torch.float64, device="cpu") -> nn.Module:
        return GaussianDenoiser(self.mean.to(dtype), self.std ** 2).to(device)

    def fingerprint(self) -> str:
        desc = json.dumps({"kind": "gaussian", "mean": self.mean.tolist(), "std": self.std})
        return hashlib.sha256(desc.encode()).hexdigest()[:32]

    def sample_data(self, n: int, generator: torch.Generator):
        z = torch.randn((n, *self.shape), generator=generator, dtype=torch.float64)
        return self.mean + self.std * z, None

    def reference_solve(self, x, t_start, times, class_labels=None):
        v = self.std ** 2
        mu = self.mean.to(x.device)
        return [mu + (x.double() - mu) * math.sqrt((v + t * t) / (v + t_start * t_start))
                for t in times]


def make(options, ctx):
    """options: [teacher] less its kind."""
    return GaussianTeacher(options.floats("mean", [0.0, 0.0]),
                           options.float("std", 0.5, positive=True))


@hookimpl
def ctmkit_teachers():
    return {"gaussian": make}
