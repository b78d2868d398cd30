"""The plugin contracts: what the host asks of each kind of plugin, in one module a plugin author
imports (``from core.api import Preconditioning, hookimpl, UserError``).

Every plugin kind registers through a hook of :mod:`core.host.hookspecs` returning
``{name: factory}``; the host builds a plugin by calling ``factory(options, ctx)`` (networks get
three keywords more, see :class:`Network`):

``options``
    a :class:`core.host.config.Section` holding the plugin's own keys. Read them with the typed
    getters ``options.str / int / float / bool / floats / ints / strs / matrix / path(key,
    default, ...)``; a key nobody reads is reported to the user as unknown once the factory
    returns. Report a bad value with ``options.fail(key, "why")`` (raises a :class:`UserError`
    naming the file, the section and the key).
``ctx``
    a :class:`core.host.plugins.Context`: ``ctx.diffusion`` (``sigma_data``, ``t_min``, ``t_max``,
    ``rho``), ``ctx.device``, ``ctx.base_dir``, ``ctx.out_dir``, ``ctx.progress`` and
    ``ctx.coefficients()`` (the validated Analytic-Precond table; loads it on demand).

Errors: raise :class:`UserError` (``core.base.errors``) for anything the user can fix; the host
prints its message as one ``error:`` line and exits with status 2. Any other exception from a
third-party plugin is reported as one line naming the plugin and its distribution.

Shapes: ``B`` is the batch, ``x`` is ``[B, *shape]`` (vectors ``[B, d]``, images
``[B, C, H, W]`` in [-1, 1]); times ``t``, ``s`` are per sample, ``[B]``. The host's own
mathematics (EDM's scalings and denoiser, the jump, DSM, the Euler / Heun step, CTM's sampling
step) lives in :mod:`core.diffusion.edm`, :mod:`core.export.jumper`, :mod:`core.diffusion.dsm`, :mod:`core.diffusion.ode` and
:mod:`core.export.sampling`; plugins may call it.
Helpers re-exported here, so that a plugin needs no other ctmkit module: ``append_dims(v, x)``
(a per-sample [B] value shaped to scale x), ``batch_times(x, t)`` (a float time as [B] of x's
dtype and device), ``add_noise(x0, t, z)`` (x_t = x_0 + t z) and ``rho_grid(steps, t_min,
t_max, rho)`` (EDM's time grid). Working examples of every kind: ``examples/plugins/``.
"""


import math
from typing import Callable, Optional, Protocol, Sequence, Tuple

import torch
from torch import Tensor, nn

from core.cli import Parser as ArgumentParser
from core.diffusion.contracts import Loss, Sampler, Solver, StepContext
from core.data.datasets import Dataset
from core.data.datastore import ImageStore, Plan, cache_folder, open_or_build
from core.diffusion.edm import add_noise, append_dims, batch_times
from core.base.errors import UserError
from core.host.hookspecs import hookimpl
from core.train.s_pathway import SEmbeddingMLP, jump_target, zero_init
from core.diffusion.schedules import rho_grid

__all__ = ["hookimpl", "UserError", "Teacher", "Network", "Preconditioning", "Solver", "Loss",
           "StepContext", "Sampler", "Dataset", "Metric", "Discriminator",
           # argparse with one error: line and exit 2, for a command plugin (core/cli.py)
           "ArgumentParser",
           # the uint8 image store of a dataset plugin (core/data/datastore.py)
           "ImageStore", "Plan", "cache_folder", "open_or_build",
           # helpers a plugin may use (the host's own conventions)
           "append_dims", "batch_times", "add_noise", "rho_grid",
           # a student network's zero-initialised s pathway (core/train/s_pathway.py)
           "zero_init", "SEmbeddingMLP", "jump_target"]


# --- teacher (hook ctmkit_teachers) ------------------------------------------------------------

class Teacher:
    """A teacher diffusion model: the denoiser D_phi(x, t[, class_labels]) and facts about it.

    Attributes a subclass sets: ``name`` (its plugin name), ``shape`` (one sample's shape, a
    tuple of ints), ``num_classes`` (0: unconditional; else labels are int64 in
    [0, num_classes)), ``can_sample_data`` (True when :meth:`sample_data` works).

    Required: :meth:`denoiser`, :meth:`fingerprint`. Optional: :meth:`sample_data` (an analytic
    data distribution), :meth:`reference_solve` (a more accurate ODE solution than the default
    Heun one) and ``student_network()``: an ``nn.Module`` F_theta(x, t, s, class_labels) with
    the teacher's architecture and weights plus a zero-initialised s pathway, in float32,
    such that the jumper's D_theta(x, t, s) = c_skip x + c_out F_theta equals D_phi(x, t) for
    every s at initialisation. A teacher without it gets a residual student (core.train.students).
    """
    name: str = ""
    shape: tuple = ()
    num_classes: int = 0
    can_sample_data: bool = False

    @property
    def dim(self) -> int:
        return math.prod(self.shape)

    def denoiser(self, dtype: torch.dtype = torch.float64, device: str = "cpu") -> nn.Module:
        """A TorchScript-able module ``forward(x, t, class_labels=None) -> D_phi(x, t)``: x of
        `dtype` on `device`, t [B] (or a scalar) of x's dtype, result shaped and typed like x.
        A fresh module each call (the caller may move or cast it); no gradients needed."""
        raise NotImplementedError

    def fingerprint(self) -> str:
        """A digest that changes whenever the denoiser would (used to reuse coefficients)."""
        raise NotImplementedError

    def sample_data(self, n: int, generator: torch.Generator) -> tuple[Tensor, Optional[Tensor]]:
        """n draws (x_0 float64 [n, *shape], int64 class labels [n] or None) from the data
        distribution, all randomness from `generator`."""
        raise UserError(f"teacher {self.name!r} cannot sample its data distribution; "
                        f"give a data file ([coefficients] data / [evaluate] data)")

    def reference_solve(self, x: Tensor, t_start: float, times: list[float],
                        class_labels: Optional[Tensor] = None) -> list[Tensor]:
        """High-accuracy teacher PF-ODE solution from x at t_start, returned (float64) at each
        of the decreasing `times`. Default: Heun with >= 64 log-uniform steps per segment."""
        from core.diffusion.ode import HeunSolver

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


# --- network (hook ctmkit_networks) ------------------------------------------------------------

class Network(Protocol):
    """A free-form network F(x, t, s=None, class_labels=None) -> [B, *shape] in EDM's
    parameterisation; the factory is called as ``factory(options, ctx, shape=(...),
    num_classes=k, student=bool)`` and returns an ``nn.Module`` (TorchScript-able: the
    exported jumper contains it).

    * ``forward(x, t, s=None, class_labels=None)``: x [B, *shape] float32 (float64 when the
      coefficient stage asks), t and s [B] (or scalars; broadcast them to B) of x's dtype,
      class_labels int64 [B] or None. It gets the *raw* x and t and applies c_in(t) =
      1 / sqrt(sigma_data^2 + t^2) and the noise embedding c_noise(t) itself; the host forms
      D = c_skip(t) x + c_out(t) F (:func:`core.diffusion.edm.denoiser_from_output`).
    * ``student=False`` (a teacher) must accept ``s=None``; ``student=True`` adds an embedding of
      s whose projection is zero-initialised, so that the student loading the teacher's
      weights with ``strict=False`` equals the teacher for every s. Every student-only weight
      is named ``s_*`` (the only missing keys allowed when a student loads a teacher file).
    * The last ``nn.Linear`` among ``modules()`` is the output layer: a residual student
      R_theta (teachers without a student form) is zeroed there, so it must end the forward.
    """

    def __call__(self, x: Tensor, t: Tensor, s: Optional[Tensor] = None,
                 class_labels: Optional[Tensor] = None) -> Tensor: ...


# --- preconditioning (hook ctmkit_preconditionings) ---------------------------------------------

class Preconditioning(nn.Module):
    """The coefficients of f_theta(x, t, s) = f(t, s) x + g(t, s) D_theta(x, t, s) (or
    F_theta when ``jumps_denoiser`` is False; paper Table 1).

    Attributes: ``name`` (the plugin name), ``variant`` (a string, "" if none; recorded in the
    exported file), ``jumps_denoiser`` (bool). ``forward(t, s) -> (f, g)``: t, s [B] of any float
    dtype; returns two float64 [B] tensors satisfying the boundary condition f(t, t) = 1,
    g(t, t) = 0. Must be TorchScript-able (it is exported inside the jumper) and pure (no
    state changes); times outside its valid range raise.

    Optional attribute ``check_range`` (bool, True when present): a preconditioning whose
    range check reads its times back on the host (a device sync on a GPU, per call) declares
    it; the distill stage checks the whole time grid once, then sets it False while every time
    it passes is a grid time (the training step), and back to True around evaluations."""
    name: str = ""
    variant: str = ""
    jumps_denoiser: bool = True

    def forward(self, t: Tensor, s: Tensor) -> Tuple[Tensor, Tensor]:  # pragma: no cover
        raise NotImplementedError


# --- solver, loss, sampler (hooks ctmkit_solvers, ctmkit_losses, ctmkit_samplers) -------------
# Solver, StepContext, Loss, Sampler: defined in core.diffusion.contracts (the host's own Euler / Heun
# solvers, DSM loss and CTM sampler derive from them there) and re-exported above.


# --- dataset (hook ctmkit_datasets): core.data.datasets.Dataset, re-exported above --------------------
# A dataset factory gets the [data] section (its ``format`` key names the plugin) and returns a
# core.data.datasets.Dataset(x, y, fingerprint, hflip=..., name=...):
#
# * x, images: a core.data.datastore.ImageStore -- uint8 [N, C, H, W] (0..255, read as x / 127.5 - 1
#   in [-1, 1]), best memory-mapped read-only (``np.load(path, mmap_mode="r")``, or a store
#   decoded once with ``core.data.datastore.open_or_build``) so every process shares one copy and
#   none holds the set; or
# * x, small float data: a float tensor [N, *shape] in memory (vectors, float images in
#   [-1, 1]);
# * y: int64 [N] or None; fingerprint: a string that changes with the content and settings.
#
# ctmkit reads a dataset by index only -- ``draw``/``rows``/``sample`` (random batches, the
# float conversion and flips on the batch's device), ``view``/``batches`` (in order, batch by
# batch) -- never as one tensor; ``Dataset.x`` still materialises everything for small sets.
# A dataset that is not a finite set (an analytic sampler) is a teacher with ``sample_data``
# instead. Example: examples/plugins/checkers (images made once into a store, then mapped).


# --- metric (hook ctmkit_metrics) --------------------------------------------------------------

class Metric:
    """A sample-quality metric (what a ``ctmkit_metrics`` factory returns).

    ``compute(samples, reference_dataset, cache_dir)`` gets the generated images (float
    [N, C, H, W] in [-1, 1]), the reference :class:`core.data.datasets.Dataset` and a folder for
    cached reference statistics, and returns ``{key: value}`` (finite floats; keys become
    metrics.json entries and metrics.csv columns ``<key>_<K>``).
    """

    name: str = "metric"

    def compute(self, samples, reference_dataset, cache_dir) -> dict[str, float]:
        raise NotImplementedError

    def describe(self) -> Optional[dict]:
        """What the last :meth:`compute` measured with (features, mode, reference), as a
        JSON-serialisable dict, or None. :func:`core.evaluation.quality.compute_metrics` reports it as
        ``"<name>_info"``."""
        return None


# --- discriminator (hook ctmkit_discriminators) -------------------------------------------------

class Discriminator(torch.nn.Module):
    """The GAN term's discriminator (CTM, Kim et al. 2024, Sec. 4.2; docs/gan.md). A factory is
    called as ``factory(options, ctx, shape=..., num_classes=...)`` (options: the rest of the
    ``[discriminator]`` table; shape: one sample's shape; num_classes: 0 unconditional) and
    returns an ``nn.Module`` with

    * ``draw(gen, x) -> {key: tensor}``: every random quantity of one call (augmentations) for
      the *global* batch from the CPU generator `gen`, each tensor with the batch as its first
      dimension (the host slices them per process); x gives the batch's shape and dtype only
      (a tensor on the ``meta`` device). The default: no randomness, ``{}``;
    * ``forward(x, labels, draws) -> logits [B, ...]``: real-valued logits (any number per
      sample, e.g. one per scale and position; higher = more real) of images or vectors x in
      the data's scale ([-1, 1] for images), labels int64 [B] or None, draws on x's device.

    The host trains the parameters that require gradients (freeze a pretrained feature
    network with ``requires_grad_(False)``) with the hinge loss
    ``mean(relu(1 - D(real))) + mean(relu(1 + D(fake)))``, averages their gradients over
    processes, saves the module's ``state_dict`` and its optimiser in the checkpoint, and
    gives the student the adversarial term ``-mean(D(fake))``. It seeds the global generator
    before calling the factory (every process builds the same initial weights). The module
    must treat samples independently (no batch statistics): real and fake rows go through it
    in one call, and the rows a process sees depend on the number of processes."""

    def draw(self, gen: torch.Generator, x: Tensor) -> dict:
        return {}
