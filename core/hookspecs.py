"""Plugin hook specifications (pluggy project and entry-point group: ``ctmkit``).

Every hook is a *registration* hook: it returns a ``{name: factory}`` mapping. The host calls
each factory as ``factory(options, ctx)`` where ``options`` is a :class:`core.config.Section`
holding the plugin's own config keys (read them with its typed getters; keys nobody reads are
reported as unknown) and ``ctx`` is a :class:`core.plugins.Context` (diffusion settings, device,
the coefficient table on demand).

A third-party distribution exposes a module through its packaging metadata::

    [project.entry-points.ctmkit]
    my_precond = "my_package.precond"

and implements any of the hooks below with ``from core.hookspecs import hookimpl``.
Built-in plugins (the ``plugins`` package) are registered through the very same hooks.
"""

from __future__ import annotations

import pluggy

PROJECT = "ctmkit"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def ctmkit_preconditionings() -> dict:
    """Consistency-function preconditionings ``f_theta = f(t,s) x + g(t,s) D_theta`` (or F_theta).

    Each factory returns a :class:`plugins.preconditionings.Preconditioning` (a TorchScript-able
    ``nn.Module`` whose ``forward(t, s)`` returns the coefficients ``(f, g)``). Example::

        @hookimpl
        def ctmkit_preconditionings():
            return {"mine": lambda options, ctx: MyPrecond(ctx.diffusion.sigma_data)}
    """


@hookspec
def ctmkit_solvers() -> dict:
    """Teacher PF-ODE solvers. Each factory returns an object with
    ``solve(denoise, x, ts) -> x`` stepping ``dx/dt = (x - D(x, t)) / t`` along ``ts``. Example::

        @hookimpl
        def ctmkit_solvers():
            return {"euler": lambda options, ctx: EulerSolver()}
    """


@hookspec
def ctmkit_losses() -> dict:
    """Distillation losses (consistency/trajectory/DSM). Example::

        @hookimpl
        def ctmkit_losses():
            return {"ctm": lambda options, ctx: CTMLoss(**...)}
    """


@hookspec
def ctmkit_samplers() -> dict:
    """Samplers that run an exported jumper. Each factory returns an object with
    ``timesteps(steps, t_min, t_max, rho)`` and ``sample(jumper, x, timesteps, generator,
    class_labels)``. Example::

        @hookimpl
        def ctmkit_samplers():
            return {"ctm": lambda options, ctx: CTMSampler(gamma=options.float("gamma", 0.0))}
    """


@hookspec
def ctmkit_teachers() -> dict:
    """Teachers: denoisers ``D_phi(x, t[, class_labels])``. Each factory returns a
    :class:`plugins.teachers.base.Teacher`. Example::

        @hookimpl
        def ctmkit_teachers():
            return {"gmm": lambda options, ctx: GMMTeacher.from_options(options)}
    """


@hookspec
def ctmkit_networks() -> dict:
    """Free-form networks F(x, t, s[, class_labels]). Each factory is called as
    ``factory(options, ctx, shape=..., num_classes=..., student=...)`` and returns an
    ``nn.Module``; ``student=True`` adds the zero-initialised s pathway (see plugins/networks.py).
    Example::

        @hookimpl
        def ctmkit_networks():
            return {"mlp": lambda options, ctx, **kw: MyNet(**kw)}
    """


@hookspec
def ctmkit_datasets() -> dict:
    """Datasets of x_0 (images or vectors). Each factory is called as ``factory(options, ctx)``
    with the ``[data]`` section (its ``format`` key names the plugin) and returns a
    ``core.datasets.Dataset``: float32 ``x`` [N, *shape] (images [N, C, H, W] in [-1, 1]),
    int64 ``y`` [N] or None, and ``fingerprint()``. Example::

        @hookimpl
        def ctmkit_datasets():
            return {"my_format": lambda options, ctx: Dataset(load(options.path("path")))}
    """


@hookspec
def ctmkit_metrics() -> dict:
    """Sample-quality metrics. Each factory is called as ``factory(options, ctx)`` and returns
    a ``core.metrics.Metric`` (``name``, ``compute(samples, reference) -> dict``)."""


#: hook name -> the KIND printed by ``--list-plugins``
KINDS = {
    "ctmkit_teachers": "teacher",
    "ctmkit_preconditionings": "precond",
    "ctmkit_solvers": "solver",
    "ctmkit_losses": "loss",
    "ctmkit_samplers": "sampler",
    "ctmkit_networks": "network",
    "ctmkit_datasets": "dataset",
    "ctmkit_metrics": "metric",
}
