"""EDM's parameterisation of the denoiser (Karras et al. 2022), as the paper uses it (Sec. 2.1):

    D(x, t) = c_skip(t) x + c_out(t) F(x, t),   x_t = x_0 + t z,   z ~ N(0, I)

The scalings are computed in float64 from float64 t and cast to x's dtype. Everything here is
TorchScript-able (the exported jumper calls it).
"""

from typing import Optional, Tuple

import torch
from torch import Tensor, nn


def append_dims(v: Tensor, x: Tensor) -> Tensor:
    """A per-sample value v ([B] or a scalar) as [B, 1, ..., 1] in x's dtype, to scale x."""
    return v.reshape([-1] + [1] * (x.dim() - 1)).to(x.dtype)


def batch_times(x: Tensor, t: float) -> Tensor:
    """The time t for every sample of x: [B] of x's dtype, on x's device."""
    return torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device)


def edm_scalings(t: Tensor, sigma_data: float) -> Tuple[Tensor, Tensor]:
    """(c_skip(t), c_out(t)) in float64."""
    t, sd = t.double(), sigma_data
    return sd ** 2 / (sd ** 2 + t ** 2), sd * t / torch.sqrt(sd ** 2 + t ** 2)  # Eqn. (3)


def denoiser_from_output(F: Tensor, x: Tensor, t: Tensor, sigma_data: float) -> Tensor:
    """D = c_skip(t) x + c_out(t) F: a network's output F as a denoiser (see Eqn. 3)."""
    c_skip, c_out = edm_scalings(t, sigma_data)
    return append_dims(c_skip, x) * x + append_dims(c_out, x) * F


def output_from_denoiser(D: Tensor, x: Tensor, t: Tensor, sigma_data: float) -> Tensor:
    """F = (D - c_skip(t) x) / c_out(t): a denoiser's output D as a network output (Eqn. 3
    inverted)."""
    c_skip, c_out = edm_scalings(t, sigma_data)
    return (D - append_dims(c_skip, x) * x) / append_dims(c_out, x)


def add_noise(x0: Tensor, t: Tensor, z: Tensor) -> Tensor:
    """x_t = x_0 + t z (EDM's forward process, q(x_t | x_0) = N(x_0, t^2 I))."""
    return x0 + append_dims(t, x0) * z


class EDMDenoiser(nn.Module):
    """D(x, t) = c_skip(t) x + c_out(t) F(x, t) around a teacher network F (s = None)."""

    def __init__(self, net: nn.Module, sigma_data: float):
        super().__init__()
        self.net = net
        self.sigma_data = float(sigma_data)

    def forward(self, x: Tensor, t: Tensor, class_labels: Optional[Tensor] = None) -> Tensor:
        F = self.net(x, t, None, class_labels)
        return denoiser_from_output(F, x, t.reshape(-1).expand(x.shape[0]), self.sigma_data)


class TeacherAsNetwork(nn.Module):
    """F_theta(x, t, s) := F_phi(x, t) = (D_phi(x, t) - c_skip(t) x) / c_out(t) for every s:
    the student at the paper's initialisation point (``[student] init = "teacher"``), so that
    D_theta(x, t, s) = D_phi(x, t)."""

    def __init__(self, denoiser: nn.Module, sigma_data: float):
        super().__init__()
        self.denoiser = denoiser
        self.sigma_data = float(sigma_data)

    def forward(self, x: Tensor, t: Tensor, s: Tensor,
                class_labels: Optional[Tensor] = None) -> Tensor:
        return output_from_denoiser(self.denoiser(x, t, class_labels), x, t, self.sigma_data)
