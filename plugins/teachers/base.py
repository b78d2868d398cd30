"""What every teacher provides: a denoiser D_phi(x, t[, class_labels]) and a few facts about it."""


import math
from typing import Optional

import torch
from torch import Tensor, nn

from core.errors import UserError


class Teacher:
    name: str = ""
    shape: tuple = ()
    num_classes: int = 0
    can_sample_data: bool = False

    @property
    def dim(self) -> int:
        return math.prod(self.shape)

    def denoiser(self, dtype: torch.dtype = torch.float64, device: str = "cpu") -> nn.Module:
        """A TorchScript-able module ``forward(x, t, class_labels=None) -> D_phi(x, t)``."""
        raise NotImplementedError

    def fingerprint(self) -> str:
        """A digest that changes whenever the denoiser would (used to reuse coefficients)."""
        raise NotImplementedError

    def sample_data(self, n: int, generator: torch.Generator) -> tuple[Tensor, Optional[Tensor]]:
        """n draws (x_0, class labels or None) from the data distribution."""
        raise UserError(f"teacher {self.name!r} cannot sample its data distribution; "
                        f"give a data file ([coefficients] data / [evaluate] data)")

    def reference_solve(self, x: Tensor, t_start: float, times: list[float],
                        class_labels: Optional[Tensor] = None) -> list[Tensor]:
        """High-accuracy teacher PF-ODE solution from x at t_start, returned at each of the
        decreasing `times`. Default: Heun with >= 64 log-uniform steps per segment, float64."""
        from plugins.solvers import HeunSolver

        D = self.denoiser(torch.float64, str(x.device))
        den = lambda x_, t_: D(x_, t_, class_labels)
        out, cur, t0 = [], x.double(), t_start
        for t1 in times:
            if t1 < t0:
                n = max(64, int(math.ceil(64 * math.log(t0 / t1))))
                grid = torch.exp(torch.linspace(math.log(t0), math.log(t1), n + 1,
                                                dtype=torch.float64)).tolist()
                cur = HeunSolver().solve(den, cur, grid)
            out.append(cur)
            t0 = t1
        return out
