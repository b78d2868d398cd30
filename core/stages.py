"""The pipeline stages. Each reads only the config and files earlier stages left in out_dir,
writes its outputs atomically, and can be rerun alone."""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path

import numpy as np
import torch

from core import plugins
from core.coefficients import store
from core.coefficients.estimate import estimate_table
from core.config import Config
from core.errors import UserError
from core.io import save_json, save_npy
from core.schedules import coefficient_grid

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def log(msg: str) -> None:
    print(f"[ctmkit] {msg}", flush=True)


class _Deferred(Exception):
    """Raised by the dry-run context when a factory asks for the coefficient table."""


def _deferred():
    raise _Deferred()


class Run:
    """What the stages share: the config, the teacher, the plugin context."""

    def __init__(self, cfg: Config, progress: bool = True):
        self.cfg, self.progress = cfg, progress
        self.device = cfg.run.device
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise UserError(f"{cfg.path}: [run] device = {self.device!r} but no CUDA GPU is "
                            f"available")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise UserError(f"{cfg.path}: [run] device must be 'cpu' or 'cuda[:N]', "
                            f"got {self.device!r}")
        self.ctx = plugins.Context(diffusion=cfg.diffusion, device=self.device,
                                   base_dir=cfg.base_dir,
                                   coefficients_loader=self.coefficient_table)
        self.out_dir = cfg.run.out_dir

    @functools.cached_property
    def teacher(self):
        return plugins.create("teacher", self.cfg.teacher, self.ctx, "kind")

    def precond_plugin(self) -> plugins.Plugin:
        return plugins.get("precond", self.cfg.precond_name, self.cfg.precond.where("name"))

    def precond(self):
        return plugins.create("precond", self.cfg.precond, self.ctx, "name")

    def sampler(self):
        return plugins.create("sampler", self.cfg.sampler_options, self.ctx, "sampler")

    @functools.lru_cache(maxsize=1)
    def coefficient_table(self):
        table = store.load(self.cfg.coefficients.path)
        fp = table.attrs.get("teacher_fingerprint")
        if fp != self.teacher.fingerprint():
            raise UserError(f"{self.cfg.coefficients.path}: computed for another teacher "
                            f"({fp}); rerun the 'coefficients' stage")
        d = self.cfg.diffusion
        if not (np.isclose(table.t_min, d.t_min) and np.isclose(table.t_max, d.t_max)):
            raise UserError(f"{self.cfg.coefficients.path}: covers t in [{table.t_min:g}, "
                            f"{table.t_max:g}] but [diffusion] asks for [{d.t_min:g}, "
                            f"{d.t_max:g}]; rerun the 'coefficients' stage")
        return table

    def validate(self) -> None:
        """Fail fast on misconfiguration, before any stage writes anything: build the teacher
        and dry-run the preconditioning and sampler factories (a factory that asks for the
        coefficient table stops there; its remaining keys are checked when the stage runs)."""
        self.teacher
        dry = plugins.Context(diffusion=self.cfg.diffusion, device=self.device,
                              base_dir=self.cfg.base_dir, coefficients_loader=_deferred)
        for kind, section, key in (("precond", self.cfg.precond, "name"),
                                   ("sampler", self.cfg.sampler_options, "sampler")):
            try:
                plugins.create(kind, section, dry, key)
            except _Deferred:
                pass

    def data_sampler(self, path: Path | None, what: str):
        """sample(n, generator) -> (x0, labels): the teacher's own, or draws from a data file."""
        if path is None:
            if not self.teacher.can_sample_data:
                raise UserError(f"{self.cfg.path}: teacher {self.teacher.name!r} cannot sample "
                                f"its data; set [{what}] data = \"x0.npy\"")
            return self.teacher.sample_data
        from core.data import load_arrays
        x, y = load_arrays(path, self.teacher.shape)

        def sample(n, generator):
            idx = torch.randint(0, len(x), (n,), generator=generator)
            return x[idx], (y[idx] if y is not None else None)
        return sample


# --- coefficients ----------------------------------------------------------------------------

def coefficients(run: Run) -> None:
    cfg, c, d = run.cfg, run.cfg.coefficients, run.cfg.diffusion
    teacher = run.teacher
    settings = {"grid": c.grid, "n_timesteps": c.n_timesteps, "n_samples": c.n_samples,
                "batch": c.batch, "seed": c.seed, "t_min": d.t_min, "t_max": d.t_max,
                "rho": d.rho if c.grid == "edm" else None,
                "data": str(c.data) if c.data else None}
    fp = teacher.fingerprint()
    if store.reusable(c.path, fp, settings):
        log(f"coefficients: reusing {c.path} (same teacher and settings)")
        return
    ts = coefficient_grid(c.grid, c.n_timesteps, d.t_min, d.t_max, d.rho)
    den = teacher.denoiser(torch.float64, run.device)
    t0 = time.perf_counter()
    table = estimate_table(lambda x, t, y: den(x, t, y), run.data_sampler(c.data, "coefficients"),
                           teacher.dim, ts, c.n_samples, c.batch, c.seed, {}, run.device,
                           progress=run.progress)
    if not (np.all(np.isfinite(table.l)) and np.all(np.isfinite(table.s))):
        raise UserError("coefficients: the teacher produced NaN/Inf; nothing was written")
    store.write(c.path, table, grid=c.grid, n_samples=c.n_samples, teacher_fingerprint=fp,
                settings=settings)
    from core.plots import plot_coefficient_table
    plot_coefficient_table(table, c.path.with_suffix(".png"))
    log(f"coefficients: {c.n_timesteps} times x {c.n_samples} samples in "
        f"{time.perf_counter() - t0:.1f}s -> {c.path}")


# --- export ----------------------------------------------------------------------------------

def export(run: Run) -> None:
    from core.jumper import Jumper, TeacherAsNetwork, export as export_jumper, make_meta

    cfg, d = run.cfg, run.cfg.diffusion
    teacher = run.teacher
    precond = run.precond()
    dtype = DTYPES[cfg.export.dtype]
    network = TeacherAsNetwork(teacher.denoiser(dtype, "cpu"), d.sigma_data)
    jumper = Jumper(network, precond, d.sigma_data)
    meta = make_meta(precond, sigma_data=d.sigma_data, t_min=d.t_min, t_max=d.t_max, rho=d.rho,
                     shape=teacher.shape, num_classes=teacher.num_classes, dtype=cfg.export.dtype,
                     student_init=cfg.student_init, teacher_fingerprint=teacher.fingerprint())
    export_jumper(jumper, cfg.export.path, meta)
    log(f"export: {precond.name}{'/' + precond.variant if precond.variant else ''} jumper "
        f"-> {cfg.export.path}")


# --- sample ----------------------------------------------------------------------------------

def load_exported(run: Run):
    from core.jumper import load
    return load(run.cfg.export.path, run.device)


def sample(run: Run) -> None:
    from core.sampling import draw

    cfg, s = run.cfg, run.cfg.sample
    jumper, meta = load_exported(run)
    sampler = run.sampler()
    ts = s.timesteps or sampler.timesteps(s.steps, meta["t_min"], meta["t_max"], meta["rho"])
    if ts[0] > meta["t_max"] * (1 + 1e-9) or ts[-1] < meta["t_min"] * (1 - 1e-9):
        raise UserError(f"{cfg.path}: [sample] timesteps must lie in [{meta['t_min']}, "
                        f"{meta['t_max']}]")
    t0 = time.perf_counter()
    x, labels = draw(jumper, meta, sampler, ts, s.num, s.batch, s.seed, run.device,
                     progress=run.progress)
    if not np.all(np.isfinite(x)):
        raise UserError("sample: the jumper produced NaN/Inf; samples.npy was not written")
    save_npy(run.out_dir / "samples.npy", x)
    if labels is not None:
        save_npy(run.out_dir / "samples.labels.npy", labels)
    from core.plots import plot_samples
    ref = None
    if run.teacher.can_sample_data:
        ref = run.teacher.sample_data(len(x), torch.Generator().manual_seed(s.seed))[0].numpy()
    title = f"{meta['precond']}{'/' + meta['variant'] if meta['variant'] else ''} jumper, " \
            f"{len(ts) - 1} steps"
    plot_samples(x, run.out_dir / "samples.png", title, ref)
    log(f"sample: {s.num} samples, {len(ts) - 1} steps, {time.perf_counter() - t0:.1f}s "
        f"-> {run.out_dir / 'samples.npy'}")


# --- evaluate --------------------------------------------------------------------------------

def evaluate(run: Run) -> None:
    from core.evaluate import distribution_distance, trajectory_errors

    cfg, e = run.cfg, run.cfg.evaluate
    teacher = run.teacher
    jumper, meta = load_exported(run)
    if meta.get("teacher_fingerprint") not in (None, teacher.fingerprint()):
        raise UserError(f"{cfg.export.path}: exported for another teacher; rerun 'export'")
    dtype = DTYPES.get(meta["dtype"], torch.float32)
    traj = trajectory_errors(jumper, teacher, e.steps, e.num, e.seed, meta["t_min"],
                             meta["t_max"], meta["rho"], dtype)
    metrics = {"precond": meta["precond"], "variant": meta["variant"],
               "trajectory_error": {str(k): v for k, v in traj.items()}}
    samples_path = run.out_dir / "samples.npy"
    if samples_path.is_file():
        try:
            x = np.load(samples_path)
        except (ValueError, OSError) as err:
            raise UserError(f"{samples_path}: unreadable ({err.__class__.__name__})") from None
        if x.shape[1:] != tuple(teacher.shape):
            raise UserError(f"{samples_path}: shape {x.shape} does not match the teacher's "
                            f"{tuple(teacher.shape)}")
        ref, _ = run.data_sampler(e.data, "evaluate")(len(x), torch.Generator().manual_seed(
            e.seed + 7919))
        name, value = distribution_distance(x, ref.numpy(), e.projections, e.seed)
        metrics["samples"] = {"num": int(len(x)), name: value}
    save_json(run.out_dir / "metrics.json", metrics)
    for k, v in traj.items():
        log(f"evaluate: {k}-step trajectory error  final {v['final_rmse']:.4g}  "
            f"path {v['path_rmse']:.4g}")
    if "samples" in metrics:
        log(f"evaluate: samples {json.dumps(metrics['samples'])}")
    log(f"evaluate: -> {run.out_dir / 'metrics.json'}")


STAGE_FUNCTIONS = {"coefficients": coefficients, "export": export, "sample": sample,
                   "evaluate": evaluate}
