"""The built-in teacher PF-ODE solvers ``euler`` and ``heun`` (core.ode), by name."""

from core.api import Solver  # noqa: F401  (re-exported)
from core.hookspecs import hookimpl
from core.ode import EulerSolver, HeunSolver


@hookimpl
def ctmkit_solvers():
    return {"euler": lambda options, ctx: EulerSolver(),
            "heun": lambda options, ctx: HeunSolver()}
