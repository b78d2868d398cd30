"""A complete third-party ctmkit plugin: the preconditioning f = (s/t)^p, g = 1 - (s/t)^p.

p = 1 is CTM's Euler step. It satisfies the boundary condition f(t, t) = 1, g(t, t) = 0, and
it mixes x with the denoiser D_theta (``jumps_denoiser = True``) like CTM does.
"""

from typing import Tuple

from torch import Tensor

from core.host.hookspecs import hookimpl
from core.api import Preconditioning


class PowerLawPrecond(Preconditioning):
    def __init__(self, power: float):
        super().__init__()
        self.name, self.variant, self.jumps_denoiser = "powerlaw", "", True
        self.power = float(power)

    def forward(self, t: Tensor, s: Tensor) -> Tuple[Tensor, Tensor]:
        r = (s.double() / t.double()) ** self.power
        return r, 1.0 - r


def make(options, ctx):
    """options: this plugin's keys of [precond]; ctx: diffusion settings, device, coefficients."""
    return PowerLawPrecond(options.float("power", 1.0, positive=True))


@hookimpl
def ctmkit_preconditionings():
    return {"powerlaw": make}
