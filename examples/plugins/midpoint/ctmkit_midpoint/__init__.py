"""A third-party teacher solver: the explicit midpoint rule (RK2) for the PF-ODE
dx/dt = (x - D(x, t)) / t.

    k1 = (x - D(x, t0)) / t0,  x_m = x + (t_m - t0) k1,  k2 = (x_m - D(x_m, t_m)) / t_m,
    x1 = x + (t1 - t0) k2,     t_m = (t0 + t1) / 2   (> 0 even when t1 = 0)

``step`` takes per-sample times [B] (what distillation calls); ``solve`` walks a grid common to
all samples with plain float times. Written against core.api only.
"""

from typing import Callable, Sequence

from torch import Tensor

from core.api import Solver, append_dims, batch_times, hookimpl


class MidpointSolver(Solver):
    order = 2

    def step(self, denoise: Callable, x: Tensor, t0: Tensor, t1: Tensor) -> Tensor:
        tm = 0.5 * (t0 + t1)
        k1 = (x - denoise(x, t0)) / append_dims(t0, x)
        xm = x + append_dims(tm - t0, x) * k1
        k2 = (xm - denoise(xm, tm)) / append_dims(tm, x)
        return x + append_dims(t1 - t0, x) * k2

    def solve(self, denoise: Callable, x: Tensor, ts: Sequence[float]) -> Tensor:
        for t0, t1 in zip(ts[:-1], ts[1:]):
            tm = 0.5 * (t0 + t1)
            k1 = (x - denoise(x, batch_times(x, t0))) / t0
            xm = x + (tm - t0) * k1
            x = x + (t1 - t0) * (xm - denoise(xm, batch_times(x, tm))) / tm
        return x


@hookimpl
def ctmkit_solvers():
    # a solver takes no options: [distill] solver = "midpoint" selects it
    return {"midpoint": lambda options, ctx: MidpointSolver()}
