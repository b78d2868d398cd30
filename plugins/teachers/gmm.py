"""An analytic teacher: the exact denoiser of an isotropic Gaussian mixture.

Data q_0 = sum_k w_k N(mu_k, sigma_k^2 I) in any dimension d. Under x_t = x_0 + t eps,
q_t = sum_k w_k N(mu_k, (sigma_k^2 + t^2) I) and the exact denoiser is

    D(x, t) = E[x_0 | x_t = x] = sum_k r_k(x, t) (sigma_k^2 x + t^2 mu_k) / (sigma_k^2 + t^2)

with responsibilities r_k proportional to w_k N(x; mu_k, (sigma_k^2 + t^2) I).
"""


import hashlib
import json
import math
from typing import Optional

import torch
from torch import Tensor, nn

from core.api import Teacher


class GMMDenoiser(nn.Module):
    def __init__(self, weights: Tensor, means: Tensor, stds: Tensor, shape: list[int]):
        super().__init__()
        self.register_buffer("log_w", torch.log(weights))
        self.register_buffer("means", means)                 # [K, d]
        self.register_buffer("var0", stds ** 2)               # [K]
        self.shape = shape
        self.dim = int(means.shape[1])

    def forward(self, x: Tensor, t: Tensor, class_labels: Optional[Tensor] = None) -> Tensor:
        B = x.shape[0]
        xf = x.reshape(B, self.dim)
        t2 = (t.to(xf.dtype).reshape(-1, 1) ** 2).expand(B, 1)             # [B, 1]
        var = self.var0.to(xf.dtype).reshape(1, -1) + t2                    # [B, K]
        mu = self.means.to(xf.dtype)
        sq = ((xf.unsqueeze(1) - mu.unsqueeze(0)) ** 2).sum(-1)             # [B, K]
        logp = self.log_w.to(xf.dtype) - 0.5 * self.dim * torch.log(var) - 0.5 * sq / var
        r = torch.softmax(logp, dim=1)                                      # responsibilities
        post = (self.var0.to(xf.dtype).reshape(1, -1, 1) * xf.unsqueeze(1)
                + t2.unsqueeze(-1) * mu.unsqueeze(0)) / var.unsqueeze(-1)  # [B, K, d]
        return (r.unsqueeze(-1) * post).sum(1).reshape(x.shape)


class GMMTeacher(Teacher):
    name = "gmm"
    can_sample_data = True

    def __init__(self, weights, means, stds, shape=None):
        w = torch.as_tensor(weights, dtype=torch.float64)
        self.weights = w / w.sum()
        self.means = torch.as_tensor(means, dtype=torch.float64)
        self.stds = torch.as_tensor(stds, dtype=torch.float64)
        d = self.means.shape[1]
        self.shape = tuple(shape) if shape else (d,)
        if math.prod(self.shape) != d:
            raise ValueError(f"shape {list(self.shape)} does not hold {d} values")

    @classmethod
    def from_options(cls, options) -> "GMMTeacher":
        weights = options.floats("weights", positive=True)
        means = options.matrix("means")
        stds = options.floats("stds", positive=True)
        shape = options.shape("shape", None)
        if not (len(weights) == len(means) == len(stds)):
            options.fail("weights", f"weights, means and stds must have one entry per "
                         f"component; got {len(weights)}, {len(means)}, {len(stds)}")
        d = len(means[0])
        if shape is not None and math.prod(shape) != d:
            options.fail("shape", f"{shape} does not hold the means' {d} values")
        return cls(weights, means, stds, shape)

    def denoiser(self, dtype=torch.float64, device="cpu") -> GMMDenoiser:
        return GMMDenoiser(self.weights.to(dtype), self.means.to(dtype), self.stds.to(dtype),
                           list(self.shape)).to(device)

    def fingerprint(self) -> str:
        desc = {"kind": "gmm", "weights": self.weights.tolist(), "means": self.means.tolist(),
                "stds": self.stds.tolist(), "shape": list(self.shape)}
        return "gmm:" + hashlib.sha256(json.dumps(desc).encode()).hexdigest()[:32]

    def sample_data(self, n, generator):
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn((n, self.means.shape[1]), generator=generator, dtype=torch.float64)
        x = self.means[k] + self.stds[k, None] * z
        return x.reshape(n, *self.shape), None

    def reference_solve(self, x, t_start, times, class_labels=None, steps_per_unit: int = 100):
        """RK4 on dx/du = x - D(x, e^u), u = log t (smooth on the whole range), float64,
        `steps_per_unit` steps per unit of log t (max error ~1e-9 at the default, checked against the closed form in the tests)."""
        D = self.denoiser(torch.float64, str(x.device))
        rhs = lambda y, u: y - D(y, torch.full((y.shape[0],), math.exp(u), dtype=y.dtype,
                                                device=y.device))
        out, y, u0 = [], x.double(), math.log(t_start)
        for t1 in times:
            u1 = math.log(t1)
            n = max(1, int(math.ceil(steps_per_unit * (u0 - u1))))
            h = (u1 - u0) / n
            for i in range(n):
                u = u0 + i * h
                k1 = rhs(y, u)
                k2 = rhs(y + 0.5 * h * k1, u + 0.5 * h)
                k3 = rhs(y + 0.5 * h * k2, u + 0.5 * h)
                k4 = rhs(y + h * k3, u + h)
                y = y + h / 6.0 * (k1 + 2 * k2 + 2 * k3 + k4)
            out.append(y)
            u0 = u1
        return out
