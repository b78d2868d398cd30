"""The built-in teacher PF-ODE solvers ``euler`` and ``heun`` (core.diffusion.ode), by name."""

from core.api import Solver  # noqa: F401  (re-exported)
from core.host.hookspecs import hookimpl
from core.diffusion.ode import EulerSolver, HeunSolver


@hookimpl
def ctmkit_solvers():
    return {"euler": lambda options, ctx: EulerSolver(),
            "heun": lambda options, ctx: HeunSolver()}
