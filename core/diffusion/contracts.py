"""The bases of the plugin kinds that the host's own mathematics implements: `Solver` (the
Euler / Heun solvers of core.diffusion.ode), `Loss` with its `StepContext` (core.diffusion.dsm's DSM loss) and
`Sampler` (core.export.sampling's CTM sampler). Plugin authors import them from ``core.api``, which
re-exports them; they are defined here, below the modules that derive from them, so that
``core.api`` (which re-exports those modules' helpers too) imports them and nothing imports
``core.api`` back."""

from __future__ import annotations

from typing import Callable, Optional, Protocol, Sequence

import torch
from torch import Tensor

from core.diffusion.edm import batch_times


# --- solver (hook ctmkit_solvers) ---------------------------------------------------------------

class Solver:
    """A teacher PF-ODE solver for dx/dt = (x - D(x, t)) / t.

    Required: ``step(denoise, x, t0, t1) -> x`` taking one step from t0 to t1 with
    *per-sample* times t0, t1 [B] of x's dtype (distillation's samples travel between
    different grid times; 0 < t1 < t0 there, t1 = 0 may occur elsewhere). ``denoise(x, t)``
    is the teacher's D_phi (labels bound), called on a subset of the batch with t of the same
    length. No gradients flow (the host calls it under ``no_grad``); x keeps its dtype.
    ``solve(denoise, x, ts)`` walks a grid ts common to all samples (default: ``step`` per
    interval). Attribute ``order`` (int) is informative. Optional keyword of ``step``:
    ``positive=False``; the host passes ``positive=True`` when it knows every t1 > 0, so a
    solver may skip checking that on the device (a host-device sync on a GPU)."""
    order: int = 1

    def step(self, denoise: Callable, x: Tensor, t0: Tensor, t1: Tensor) -> Tensor:
        raise NotImplementedError

    def solve(self, denoise: Callable, x: Tensor, ts: Sequence[float]) -> Tensor:
        for t0, t1 in zip(ts[:-1], ts[1:]):
            x = self.step(denoise, x, batch_times(x, t0), batch_times(x, t1))
        return x


# --- loss (hook ctmkit_losses) -----------------------------------------------------------------

class StepContext(Protocol):
    """What a loss may call during a distillation step (:class:`core.train.distill.StepContext`).

    ``ctx.jump(F, x, t, s)``         f(t, s) x + g(t, s) D (or F) from a student output F
    ``ctx.denoiser(F, x, t)``        c_skip(t) x + c_out(t) F
    ``ctx.target_jump(x, t, s, grad=False)``  the stop-gradient target's jump (EMA weights;
                                     ``grad=True`` lets gradients flow through x, not weights)
    ``ctx.solve(x, n, k, host=None)``  the teacher ODE from grid[n] to grid[k] per sample
                                     (k - n <= max_ode_steps), no gradients; ``host``: the
                                     CPU copies (n, k) if the loss has them (``ctx.host``, this
                                     chunk's draws on the CPU), so no device sync is needed
    ``ctx.teacher(x, t)``            D_phi;  ``ctx.grid``: the N+1 EDM times t_0 = t_max > ...
                                     > t_N = t_min (float64, on the device);
    ``ctx.sigma_data``, ``ctx.labels`` (int64 [B] or None), ``ctx.max_ode_steps``
    """


class Loss:
    """A distillation loss. The host calls, per iteration:

    1. ``draw(gen, x0, N) -> {key: tensor}``: every random quantity for the *global* batch
       from the CPU generator `gen`, each tensor with the batch as its first dimension (the
       host slices them per process and micro-batch). x0 gives the global batch's shape
       [B_global, *shape] and dtype (float32) only: it is a tensor on the ``meta`` device, no
       values -- each process reads only its own rows of data;
    2. ``inputs(draws, x0, grid) -> (x, t, s)``: the student's inputs for this slice, on the
       CPU (grid: the N+1 float64 times); the host runs the student once on them and on the
       DSM inputs together;
    3. ``per_sample(ctx, draws, x0, F, distance) -> [B]``: the loss per sample, on the device,
       differentiable w.r.t. F (the student's output for ``inputs``) through ``ctx``'s methods
       (:class:`StepContext`); ``distance(a, b) -> [B]`` is ``[distill] distance``.

    ``is_dsm``: the loss is itself DSM, so the host adds no DSM regulariser. The host averages
    per_sample over the batch and processes; it runs under autocast when ``[distill]
    precision`` asks."""
    is_dsm: bool = False

    def draw(self, gen: torch.Generator, x0: Tensor, N: int) -> dict:
        raise NotImplementedError

    def inputs(self, draws: dict, x0: Tensor, grid: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        raise NotImplementedError

    def per_sample(self, ctx: StepContext, draws: dict, x0: Tensor, F: Tensor,
                   distance: Callable) -> Tensor:
        raise NotImplementedError


# --- sampler (hook ctmkit_samplers) ------------------------------------------------------------

class Sampler:
    """Runs an exported jumper f_theta(x, t, s, class_labels) (:class:`core.export.jumper.Jumper`)
    from noise down to t_min.

    ``timesteps(steps, t_min, t_max, rho) -> list[float]``: steps + 1 decreasing times from
    t_max to t_min. ``sample(jumper, x, timesteps, generator, class_labels=None,
    trajectory=None) -> x``: x is the initial noise [B, *shape] at timesteps[0]; the host calls
    it under ``torch.no_grad()``. Per-step noise must come from the CPU `generator`, in step
    order (the convention of core.export.sampling, shared with the C++ ``ctm_sample``); append each
    step's state to `trajectory` when given. ``runs_in_ctm_sample``: True only for CTM's
    gamma-sampling with attribute ``gamma`` (what the C++ runner implements)."""
    runs_in_ctm_sample: bool = False

    def timesteps(self, steps: int, t_min: float, t_max: float, rho: float) -> list[float]:
        raise NotImplementedError

    def sample(self, jumper, x: Tensor, timesteps, generator: torch.Generator,
               class_labels: Optional[Tensor] = None,
               trajectory: Optional[list] = None) -> Tensor:
        raise NotImplementedError
