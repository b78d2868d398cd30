"""A third-party distillation loss: consistency distillation (CM, Song et al. 2023) with a
per-time-step weight lambda(t_n),

    lambda(t_n) * d( f_theta(x_t, t_n, eps), f_sg(Solver(x_t, t_n, t_{n+1}), t_{n+1}, eps) )

``weighting = "uniform"`` is plain CM; ``"inverse_gap"`` is lambda = 1 / (t_n - t_{n+1})
(Song & Dhariwal 2023, improved CT), normalised to mean 1 over the grid. Only core.api and the
StepContext methods are used.
"""

import torch
from torch import Tensor

from core.api import Loss, add_noise, hookimpl


class WeightedCMLoss(Loss):
    def __init__(self, weighting: str):
        self.weighting = weighting

    def draw(self, gen, x0, N: int):
        B = x0.shape[0]                     # every random quantity, drawn on the CPU from gen
        return {"n": torch.randint(0, N, (B,), generator=gen),
                "z": torch.randn(x0.shape, generator=gen, dtype=x0.dtype)}

    def inputs(self, draws, x0, grid):
        t = grid[draws["n"]]
        return add_noise(x0, t, draws["z"]), t, torch.full_like(t, float(grid[-1]))

    def weights(self, grid: Tensor, n: Tensor) -> Tensor:
        if self.weighting == "uniform":
            return torch.ones_like(grid[n])
        w = 1.0 / (grid[:-1] - grid[1:])                        # [N], one per step t_n -> t_n+1
        return (w / w.mean())[n]

    def per_sample(self, ctx, draws, x0, F, distance) -> Tensor:
        grid = ctx.grid
        n = draws["n"].to(x0.device)
        t, t_next = grid[n], grid[n + 1]
        x_t = add_noise(x0, t, draws["z"].to(x0.device))
        eps = torch.full_like(t, float(grid[-1]))
        student = ctx.jump(F, x_t, t, eps)
        with torch.no_grad():
            target = ctx.target_jump(ctx.solve(x_t, n, n + 1), t_next, eps)
        return self.weights(grid, n).to(student.dtype) * distance(student, target)


def make(options, ctx):
    """options: the [distill] section (its other keys are the host's)."""
    return WeightedCMLoss(options.str("weighting", "inverse_gap",
                                      choices=("uniform", "inverse_gap")))


@hookimpl
def ctmkit_losses():
    return {"weighted_cm": make}
