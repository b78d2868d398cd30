"""The denoising score matching loss E_t E[w(t) ||D(x_t, t) - x_0||^2] with EDM's log-normal
noise levels ln t ~ N(P_mean, P_std^2) and weight w(t) = (t^2 + sigma_data^2) / (t sigma_data)^2
(Sec. 5.1): the teacher stage's loss, and the regulariser distillation adds to its main loss."""

import torch
from torch import Tensor

from core.diffusion.contracts import Loss
from core.diffusion.edm import add_noise


def dsm_per_sample(D: Tensor, x0: Tensor, sigma: Tensor, sigma_data: float) -> Tensor:
    """w(sigma) ||D - x_0||^2 / d per sample, [B] in x0's dtype."""
    weight = (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2
    return weight.to(x0.dtype) * ((D - x0) ** 2).flatten(1).mean(1)


class DSMLoss(Loss):
    """E_t E[w(t) ||D_theta(x_t, t, t) - x_0||^2], t log-normal, EDM weighting (Sec. 5.1)."""

    is_dsm = True

    def __init__(self, p_mean: float = -1.2, p_std: float = 1.2):
        self.p_mean, self.p_std = p_mean, p_std

    def draw(self, gen, x0, N: int = 0):
        B = x0.shape[0]
        sigma = torch.exp(self.p_mean + self.p_std * torch.randn(B, generator=gen,
                                                                   dtype=torch.float64))
        return {"sigma": sigma, "z": torch.randn(x0.shape, generator=gen, dtype=x0.dtype)}

    def inputs(self, d, x0, grid=None):
        return add_noise(x0, d["sigma"], d["z"]), d["sigma"], d["sigma"]

    def per_sample(self, ctx, d, x0, F, distance=None) -> Tensor:
        sigma = d["sigma"].to(x0.device)
        x = add_noise(x0, sigma, d["z"])
        return dsm_per_sample(ctx.denoiser(F, x, sigma), x0, sigma, ctx.sigma_data)
