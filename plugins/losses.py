"""The built-in distillation losses ``ctm`` (see Eqn. 7), ``cm`` (see Eqn. 5) and ``dsm`` (the
DSM loss of Sec. 5.1, core.diffusion.dsm). The loss contract (``draw``, ``inputs``, ``per_sample``) and
what a loss may call on its step context are in core.api (Loss, StepContext); the distances
live in core.train.distances (re-exported here).
"""

import torch
from torch import Tensor

from core.api import Loss
from core.train.distances import DISTANCES, LPIPS, l1, l2, make_distance, pseudo_huber  # noqa: F401
from core.diffusion.dsm import DSMLoss
from core.diffusion.edm import add_noise
from core.host.hookspecs import hookimpl


def _host(ctx, key: str):
    """This chunk's draw `key` on the CPU, when the step context holds it (lets the
    static-shape solve plan its steps without a device sync), else None."""
    return (getattr(ctx, "host", None) or {}).get(key)


class CTMLoss(Loss):
    """d( f_sg(f_theta(x_t, t, s), s, eps), f_sg(f_sg(Solver(x_t, t, u), u, s), s, eps) )
    with t > u >= s drawn per sample on the N-point EDM grid and the teacher solver taking at most
    `max_ode_steps` grid steps from t to u."""

    def __init__(self, max_ode_steps: int):
        self.max_ode_steps = max_ode_steps

    def draw(self, gen, x0, N: int):
        B = x0.shape[0]
        n = torch.randint(0, N, (B,), generator=gen)                        # t = t_n
        m = n + 1 + (torch.rand(B, generator=gen, dtype=torch.float64) * (N - n)).long()  # s
        span = torch.minimum(m - n, torch.full_like(n, self.max_ode_steps))
        k = n + 1 + (torch.rand(B, generator=gen, dtype=torch.float64) * span).long()      # u
        return {"n": n, "m": torch.clamp(m, max=N), "k": torch.minimum(k, m),
                "z": torch.randn(x0.shape, generator=gen, dtype=x0.dtype)}

    def inputs(self, d, x0, grid):
        t, s = grid[d["n"]], grid[d["m"]]
        return add_noise(x0, t, d["z"]), t, s

    def per_sample(self, ctx, d, x0, F, distance) -> Tensor:
        grid = ctx.grid
        n, m, k = (d[key].to(x0.device) for key in ("n", "m", "k"))
        t, s, u = grid[n], grid[m], grid[k]
        x_t = add_noise(x0, t, d["z"].to(x0.device))
        eps = grid[-1:].expand(t.shape[0]).clone()            # t_min (no device sync)
        student = ctx.jump(F, x_t, t, s)
        with torch.no_grad():
            hn, hk = _host(ctx, "n"), _host(ctx, "k")
            x_u = ctx.solve(x_t, n, k, host=(hn, hk) if hn is not None and hk is not None
                            else None)
            target = ctx.target_jump(ctx.target_jump(x_u, u, s), s, eps)
        # gradient flows through the input of the stop-gradient jumper, not into its weights
        student_0 = ctx.target_jump(student, s, eps, grad=True)
        return distance(student_0, target)                                # Eqn. (7)


class CMLoss(Loss):
    """d( f_theta(x_t, t, eps), f_sg(Solver(x_t, t, t'), t', eps) ), t' the next grid
    time after t."""

    def draw(self, gen, x0, N: int):
        B = x0.shape[0]
        return {"n": torch.randint(0, N, (B,), generator=gen),
                "z": torch.randn(x0.shape, generator=gen, dtype=x0.dtype)}

    def inputs(self, d, x0, grid):
        t = grid[d["n"]]
        return add_noise(x0, t, d["z"]), t, torch.full_like(t, float(grid[-1]))

    def per_sample(self, ctx, d, x0, F, distance) -> Tensor:
        grid = ctx.grid
        n = d["n"].to(x0.device)
        t, t_next = grid[n], grid[n + 1]
        x_t = add_noise(x0, t, d["z"].to(x0.device))
        eps = grid[-1:].expand(t.shape[0]).clone()            # t_min (no device sync)
        student = ctx.jump(F, x_t, t, eps)
        with torch.no_grad():
            hn = _host(ctx, "n")
            x_u = ctx.solve(x_t, n, n + 1, host=(hn, hn + 1) if hn is not None else None)
            target = ctx.target_jump(x_u, t_next, eps)
        return distance(student, target)                                  # Eqn. (5)


@hookimpl
def ctmkit_losses():
    """Factories get the [distill] section (options) and the plugin context."""
    return {"ctm": lambda options, ctx: CTMLoss(options.int("max_ode_steps", 17, min=1)),
            "cm": lambda options, ctx: CMLoss(),
            "dsm": lambda options, ctx: DSMLoss()}
