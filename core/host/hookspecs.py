"""Plugin hook specifications (pluggy project and entry-point group: ``ctmkit``).

Every hook is a *registration* hook: it returns a ``{name: factory}`` mapping (for
``ctmkit_commands``, ``{name: main}``: subcommands, see its spec). The host calls
each factory as ``factory(options, ctx)`` where ``options`` is a :class:`core.host.config.Section`
holding the plugin's own config keys (read them with its typed getters; keys nobody reads are
reported as unknown) and ``ctx`` is a :class:`core.host.plugins.Context` (diffusion settings, device,
the coefficient table on demand).

A third-party distribution exposes a module through its packaging metadata::

    [project.entry-points.ctmkit]
    my_precond = "my_package.precond"

and implements any of the hooks below with ``from core.host.hookspecs import hookimpl`` (also
``core.api.hookimpl``). What each factory's object must provide is the contract of its kind in
:mod:`core.api` (``Teacher``, ``Network``, ``Preconditioning``, ``Solver``, ``Loss``,
``Sampler``, ``Dataset``, ``Metric``, ``Discriminator``). Built-in plugins (the ``plugins`` package) are registered
through the very same hooks, and the host fetches them by name like any other.
"""

from __future__ import annotations

import pluggy

PROJECT = "ctmkit"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def ctmkit_preconditionings() -> dict:
    """Consistency-function preconditionings ``f_theta = f(t,s) x + g(t,s) D_theta`` (or F_theta).

    Each factory returns a :class:`core.api.Preconditioning` (a TorchScript-able
    ``nn.Module`` whose ``forward(t, s)`` returns the coefficients ``(f, g)``). Example::

        @hookimpl
        def ctmkit_preconditionings():
            return {"mine": lambda options, ctx: MyPrecond(ctx.diffusion.sigma_data)}
    """


@hookspec
def ctmkit_solvers() -> dict:
    """Teacher PF-ODE solvers. Each factory returns a :class:`core.api.Solver`:
    ``step(denoise, x, t0, t1) -> x`` with per-sample times t0, t1 [B] (what distillation
    calls) and ``solve(denoise, x, ts) -> x`` stepping ``dx/dt = (x - D(x, t)) / t`` along a
    common grid ``ts``. Example::

        @hookimpl
        def ctmkit_solvers():
            return {"euler": lambda options, ctx: EulerSolver()}
    """


@hookspec
def ctmkit_losses() -> dict:
    """Distillation losses (consistency/trajectory/DSM). Each factory gets the [distill] section
    and returns a :class:`core.api.Loss` (``draw``, ``inputs``, ``per_sample``; what it may call
    on its step context is :class:`core.api.StepContext`). Example::

        @hookimpl
        def ctmkit_losses():
            return {"ctm": lambda options, ctx: CTMLoss(**...)}
    """


@hookspec
def ctmkit_samplers() -> dict:
    """Samplers that run an exported jumper. Each factory returns a :class:`core.api.Sampler`:
    ``timesteps(steps, t_min, t_max, rho)`` and ``sample(jumper, x, timesteps, generator,
    class_labels=None, trajectory=None)``, called under ``no_grad``. Example::

        @hookimpl
        def ctmkit_samplers():
            return {"ctm": lambda options, ctx: CTMSampler(gamma=options.float("gamma", 0.0))}
    """


@hookspec
def ctmkit_teachers() -> dict:
    """Teachers: denoisers ``D_phi(x, t[, class_labels])``. Each factory returns a
    :class:`core.api.Teacher`. Example::

        @hookimpl
        def ctmkit_teachers():
            return {"gmm": lambda options, ctx: GMMTeacher.from_options(options)}
    """


@hookspec
def ctmkit_networks() -> dict:
    """Free-form networks F(x, t, s[, class_labels]). Each factory is called as
    ``factory(options, ctx, shape=..., num_classes=..., student=...)`` and returns an
    ``nn.Module`` meeting :class:`core.api.Network` (accepts ``s=None``, applies c_in itself,
    ends in an ``nn.Linear``, student-only weights named ``s_*``); ``student=True`` adds the
    zero-initialised s pathway.
    Example::

        @hookimpl
        def ctmkit_networks():
            return {"mlp": lambda options, ctx, **kw: MyNet(**kw)}
    """


@hookspec
def ctmkit_datasets() -> dict:
    """Datasets of x_0 (images or vectors). Each factory is called as ``factory(options, ctx)``
    with the ``[data]`` section (its ``format`` key names the plugin) and returns a
    ``core.data.datasets.Dataset`` (``core.api.Dataset``): float32 ``x`` [N, *shape] (images [N, C, H, W] in [-1, 1]),
    int64 ``y`` [N] or None, and ``fingerprint()``. Example::

        @hookimpl
        def ctmkit_datasets():
            return {"my_format": lambda options, ctx: Dataset(load(options.path("path")))}
    """


@hookspec
def ctmkit_metrics() -> dict:
    """Sample-quality metrics. Each factory is called as ``factory(options, ctx)`` and returns
    a :class:`core.api.Metric` (``name``, ``compute(samples, reference_dataset, cache_dir) ->
    {key: value}``, optionally ``describe()``)."""


@hookspec
def ctmkit_commands() -> dict:
    """Subcommands of ``ctmkit`` (as datasette's ``register_commands``). Each value is a
    function ``main(argv: list[str]) -> int | None`` (None: 0), called with the arguments after
    the command's name; the first line of its docstring is its line in ``ctmkit --help``. Bad
    input: raise :class:`core.api.UserError` (one ``error:`` line, exit status 2), or use
    ``core.api.ArgumentParser``, whose errors are that line too. A name may not be a built-in
    subcommand's (core/cli.py). Example::

        @hookimpl
        def ctmkit_commands():
            return {"summary": summary_main}
    """


@hookspec
def ctmkit_discriminators() -> dict:
    """Discriminators of the GAN term (``[discriminator] name``; ``[distill] gan_weight``).
    Each factory is called as ``factory(options, ctx, shape=..., num_classes=...)`` and
    returns a :class:`core.api.Discriminator` (``draw``, ``forward(x, labels, draws) ->
    logits [B, ...]``). Example::

        @hookimpl
        def ctmkit_discriminators():
            return {"mine": lambda options, ctx, shape, num_classes: MyDiscriminator(shape)}
    """


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
    "ctmkit_commands": "command",
    "ctmkit_discriminators": "discriminator",
}
