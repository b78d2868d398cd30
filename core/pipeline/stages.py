"""The pipeline stages. Each reads only the config and files earlier stages left in out_dir,
writes its outputs atomically, and can be rerun alone."""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path

import numpy as np
import torch

from core import REPO
from core.host import plugins
from core.diffusion.coefficients import store
from core.host.config import Config, result_values
from core.base.dtypes import DTYPES
from core.base.errors import UserError, first_line
from core.base.io import save_json, save_npy
from core.diffusion.schedules import coefficient_grid


def log(msg: str) -> None:
    print(f"[ctmkit] {msg}", flush=True)


class _Deferred(Exception):
    """Raised by the dry-run context when a factory asks for the coefficient table."""


def _deferred():
    raise _Deferred()


class Run:
    """What the stages share: the config, the teacher, the plugin context."""

    def __init__(self, cfg: Config, progress: bool = True, data=None):
        """`data`: an already loaded DataSource of the same [data] section (the runs of one
        [run] preconds comparison share theirs)."""
        self.cfg, self.progress = cfg, progress
        self.device = cfg.run.device
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise UserError(f"{cfg.path}: [run] device = {self.device!r} but no CUDA GPU is "
                            f"available")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise UserError(f"{cfg.path}: [run] device must be 'cpu' or 'cuda[:N]', "
                            f"got {self.device!r}")
        self.out_dir = cfg.run.out_dir
        self.ctx = plugins.Context(diffusion=cfg.diffusion, device=self.device,
                                   base_dir=cfg.base_dir, out_dir=self.out_dir,
                                   progress=progress,
                                   coefficients_loader=self.coefficient_table)
        self._data = data

    def warm_start_file(self) -> Path | None:
        """A warm start's source file ([student] init), or None for init = "teacher"."""
        from core.train.warm_start import source_file
        p = self.cfg.student_init_path
        return source_file(p) if p is not None else None

    def teacher_file(self) -> Path:
        """Where the 'teacher' stage writes the trained network."""
        return (self.cfg.teacher.path("path", "teacher.pt", base=self.out_dir)
                if self.cfg.teacher_kind == "network" else self.out_dir / "teacher.pt")

    @functools.cached_property
    def teacher(self):
        return plugins.create("teacher", self.cfg.teacher, self.ctx, "kind")

    def precond(self):
        return plugins.create("precond", self.cfg.precond, self.ctx, "name")

    def sampler(self):
        return plugins.create("sampler", self.cfg.sampler_options, self.ctx, "sampler",
                              self.cfg.sample.sampler)

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

    def data_source(self):
        """The [data] section as a DataSource, or None when the config has none."""
        if self._data is None and self.cfg.data.data:
            from core.data.source import DataSource
            self._data = DataSource(self.cfg.data, self.ctx)
        return self._data

    def data_fingerprint(self) -> str:
        src = self.data_source()
        return src.fingerprint() if src is not None else self.teacher.fingerprint()

    def coefficients_digest(self) -> str:
        """The store's content digest (checked as it is read)."""
        return str(store.load(self.cfg.coefficients.path).attrs["payload_sha256"])[:32]

    def validate(self, stages=()) -> None:
        """Fail fast on misconfiguration, before any stage writes anything: build the teacher
        and dry-run the preconditioning and sampler factories (a factory that asks for the
        coefficient table stops there; its remaining keys are checked when the stage runs)."""
        if self.cfg.data.data:
            self.data_source()
        if not ("teacher" in stages and self.cfg.teacher_kind == "network"):
            self.teacher    # a network teacher is built once the 'teacher' stage has run
        plugins.get("network", self.cfg.network.data.get("name"), self.cfg.network.where("name"))
        plugins.get("loss", self.cfg.distill.loss, self.cfg.sections["distill"].where("loss"))
        self._check_plugin_sections(stages)
        plugins.get("solver", self.cfg.distill.solver,
                    self.cfg.sections["distill"].where("solver"))
        if "distill" in stages and self.cfg.distill.gan_weight != 0.0 and not (
                "teacher" in stages and self.cfg.teacher_kind == "network"):
            from core.train import gan
            gan.probe(self)                    # the discriminator's options and weights
        if self.cfg.evaluate.metrics:          # e.g. a missing Inception file, before training
            from core.evaluation.quality import metric_objects
            metric_objects(self.cfg, self.ctx)
        dry = plugins.Context(diffusion=self.cfg.diffusion, device=self.device,
                              base_dir=self.cfg.base_dir, coefficients_loader=_deferred)
        for kind, section, key, name in (
                ("precond", self.cfg.precond, "name", self.cfg.precond_name),
                ("sampler", self.cfg.sampler_options, "sampler", self.cfg.sample.sampler)):
            try:
                built = plugins.create(kind, section, dry, key, name)
            except _Deferred:
                continue
            if kind == "precond":
                _check_scriptable(built, name)
            if kind == "sampler" and "sample" in stages and self.cfg.sample.runner == "ctm_sample":
                ctm_sample_binary(self.cfg, built)

    def _check_plugin_sections(self, stages) -> None:
        """Typos in [distill] (the loss plugin's keys) and [network] (the network plugin's) are
        errors even in runs whose stages do not use them: build the loss, and the network
        (when [network] has options) for the teacher's or the data's shape."""
        import copy

        from core.host.config import Section
        dist_sec = self.cfg.sections["distill"]
        probe = Section("distill", dist_sec.data, dist_sec.source, dist_sec.base_dir)
        probe._read = set(dist_sec._read)
        plugins.create("loss", probe, self.ctx, "loss", self.cfg.distill.loss)
        options = {k: v for k, v in self.cfg.network.data.items() if k != "name"}
        if not options:
            return
        if "teacher" in stages and self.cfg.teacher_kind == "network":
            src = self.data_source()
            if src is None:
                return                     # the teacher stage says what is missing
            shape, num_classes = tuple(src.load().shape), src.num_classes
        else:
            shape, num_classes = self.teacher.shape, self.teacher.num_classes
        plugins.create_network(self.cfg.network.data.get("name", "mlp"),
                               copy.deepcopy(options), self.ctx, shape, num_classes, True,
                               str(self.cfg.path))

    def data_for(self, path: Path | None, what: str):
        """The x_0 source of a stage: the file `path` (a stage's own `data` key), else [data],
        else the teacher's own data distribution; None for the teacher's."""
        from core.data.source import DataSource

        if path is not None:
            return DataSource.from_file(path, self.teacher.shape)
        if self.data_source() is not None:
            return self.data_source().load(self.teacher.shape)
        if not self.teacher.can_sample_data:
            raise UserError(f"{self.cfg.path}: teacher {self.teacher.name!r} cannot sample "
                            f"its data; add a [data] section or set [{what}] data")
        return None

    def data_sampler(self, path: Path | None, what: str):
        """sample(n, generator) -> (x0, labels) for a stage (see `data_for`)."""
        source = self.data_for(path, what)
        return source.sample if source is not None else self.teacher.sample_data

    def local_rows_sampler(self, path: Path | None, what: str):
        """sample(n, generator, keep) -> rows `keep` of what `data_sampler`'s sample(n,
        generator) returns, from the same draws: a dataset reads only those rows (one rank's
        share of a global batch); the teacher's own distribution draws all n and slices."""
        source = self.data_for(path, what)
        if source is not None:
            return source.sample_rows

        def teacher_rows(n, generator, keep):
            x, y = self.teacher.sample_data(n, generator)
            return x[keep], (y[keep] if y is not None else None)
        return teacher_rows


# --- coefficients ----------------------------------------------------------------------------

def coefficient_settings(cfg, data_fingerprint: str | None) -> dict:
    """What a store's numbers depend on (its `settings`, which decide reuse): the
    [coefficients] keys that change a result (core.host.config), the x_0 source by its content
    fingerprint, and [diffusion]'s time range (rho only on the edm grid)."""
    c, d = cfg.coefficients, cfg.diffusion
    settings = dict(result_values(c), data=data_fingerprint, t_min=d.t_min, t_max=d.t_max,
                    rho=d.rho if c.grid == "edm" else None)
    if c.smooth == 0:      # only when > 0: the default store (settings, digest) stays as it was
        del settings["smooth"]
    return settings


def coefficients(run: Run) -> None:
    c, d = run.cfg.coefficients, run.cfg.diffusion
    teacher = run.teacher
    source = run.data_for(c.data, "coefficients")
    settings = coefficient_settings(run.cfg, source.fingerprint() if source is not None
                                    else None)
    fp = teacher.fingerprint()
    if store.reusable(c.path, fp, settings):
        log(f"coefficients: reusing {c.path} (same teacher and settings)")
        return
    from core.base import distributed as dist
    from core.diffusion.coefficients.estimate import collect, finalize
    from core.diffusion.coefficients.table import CoefficientTable

    ts = coefficient_grid(c.grid, c.n_timesteps, d.t_min, d.t_max, d.rho)
    dtype = DTYPES[c.dtype]
    den = teacher.denoiser(dtype, run.device)
    t0 = time.perf_counter()
    n_batches = -(-c.n_samples // c.batch)
    mine = list(range(dist.rank(), n_batches, dist.world()))       # batches shard over ranks
    sample_x0 = source.sample if source is not None else teacher.sample_data
    stats = collect(lambda x, t, y: den(x, t, y), sample_x0, ts,
                    c.n_samples, c.batch, c.seed, run.device, batches=mine,
                    progress=run.progress and dist.is_main(), dtype=dtype, dl=c.dl,
                    times_per_call=c.times_per_call, compile=c.compile)
    stats = dist.all_reduce_sum(torch.from_numpy(stats)).numpy()   # other ranks' rows are 0
    if not dist.is_main():
        return
    est = finalize(ts, stats, teacher.dim)
    if c.smooth > 0:       # a deviation from Eqns. (15), (17): see numerics.smooth
        from core.diffusion.coefficients.numerics import smooth_coefficients
        est.l, est.s = smooth_coefficients(ts, est.l, est.s, c.smooth)
        log(f"coefficients: l_t, s_t smoothed over lambda (std {c.smooth:g}): a DEVIATION "
            f"from Eqns. (15), (17)")
    table = CoefficientTable(t=ts, l=est.l, s=est.s, l_stderr=est.l_stderr,
                             s_stderr=est.s_stderr, s_guarded=est.s_guarded)
    if not (np.all(np.isfinite(table.l)) and np.all(np.isfinite(table.s))):
        raise UserError("coefficients: the teacher produced NaN/Inf; nothing was written")
    store.write(c.path, table, grid=c.grid, n_samples=c.n_samples, teacher_fingerprint=fp,
                settings=settings)
    from core.evaluation.plots import plot_coefficient_table
    plot_coefficient_table(table, c.path.with_suffix(".png"))
    log(f"coefficients: {c.n_timesteps} times x {c.n_samples} samples in "
        f"{time.perf_counter() - t0:.1f}s -> {c.path}")


# --- export ----------------------------------------------------------------------------------

def export(run: Run) -> None:
    from core.export.jumper import Jumper, TeacherAsNetwork, export as export_jumper, make_meta

    from core.train.students import load_student

    cfg, d = run.cfg, run.cfg.diffusion
    teacher = run.teacher
    precond = run.precond()
    dtype = DTYPES[cfg.export.dtype]
    student_file = run.out_dir / "student.pt"
    source = cfg.export.source
    if source == "auto":
        source = "student" if student_file.exists() else "teacher"
    if source == "student":
        if not student_file.exists():
            raise UserError(f"{student_file}: not found; run the 'distill' stage or set "
                            f"[export] source = \"teacher\"")
        network = load_student(run, student_file).to(dtype)
    else:
        network = TeacherAsNetwork(teacher.denoiser(dtype, "cpu"), d.sigma_data)
    jumper = Jumper(network, precond, d.sigma_data)
    meta = make_meta(precond, sigma_data=d.sigma_data, t_min=d.t_min, t_max=d.t_max, rho=d.rho,
                     shape=teacher.shape, num_classes=teacher.num_classes, dtype=cfg.export.dtype,
                     student=("distilled" if source == "student" else "teacher-initialised"),
                     teacher_fingerprint=teacher.fingerprint())
    export_jumper(jumper, cfg.export.path, meta)
    log(f"export: {source} {precond.name}{'/' + precond.variant if precond.variant else ''} "
        f"jumper -> {cfg.export.path}")
    if cfg.export.aoti:
        from core.export.aoti import export_aoti
        pt2 = cfg.export.path.with_suffix(".pt2")
        export_aoti(jumper, pt2, meta)
        log(f"export: AOTInductor package -> {pt2}")


# --- sample ----------------------------------------------------------------------------------

def load_exported(run: Run):
    from core.export.jumper import load
    return load(run.cfg.export.path, run.device)


def sample(run: Run) -> None:
    from core.export.sampling import draw

    cfg, s = run.cfg, run.cfg.sample
    jumper, meta = load_exported(run)
    sampler = run.sampler()
    ts = s.timesteps or sampler.timesteps(s.steps, meta["t_min"], meta["t_max"], meta["rho"])
    if ts[0] > meta["t_max"] * (1 + 1e-9) or ts[-1] < meta["t_min"] * (1 - 1e-9):
        raise UserError(f"{cfg.path}: [sample] timesteps must lie in [{meta['t_min']}, "
                        f"{meta['t_max']}]")
    shape = list(meta["shape"])
    if s.formats and (len(shape) != 3 or shape[0] not in (1, 3)):
        raise UserError(f"{cfg.path}: [sample] formats = {s.formats} are image formats; this "
                        f"jumper makes samples of shape {shape}")
    t0 = time.perf_counter()
    out = run.out_dir / "samples.npy"
    if s.runner == "ctm_sample":
        x, labels = _ctm_sample(run, sampler, ts, out)
    else:
        x, labels = draw(jumper, meta, sampler, ts, s.num, s.batch, s.seed, run.device,
                         progress=run.progress)
        if not np.all(np.isfinite(x)):
            raise UserError("sample: the jumper produced NaN/Inf; samples.npy was not written")
        save_npy(out, x)
        if labels is not None:
            save_npy(run.out_dir / "samples.labels.npy", labels)
    _save_formats(run, x, labels)
    title = f"{meta['precond']}{'/' + meta['variant'] if meta['variant'] else ''} jumper, " \
            f"{len(ts) - 1} steps"
    if len(meta["shape"]) == 3:
        from core.evaluation.images import save_grid
        save_grid(torch.from_numpy(x[:64]), run.out_dir / "samples.png",
                  labels=None if labels is None else labels[:64])
    else:
        from core.evaluation.plots import plot_samples
        ref = None
        if run.teacher.can_sample_data:
            ref = run.teacher.sample_data(len(x), torch.Generator().manual_seed(s.seed))[0]
            ref = ref.numpy()
        plot_samples(x, run.out_dir / "samples.png", title, ref)
    log(f"sample: {s.num} samples, {len(ts) - 1} steps, {s.runner}, "
        f"{time.perf_counter() - t0:.1f}s -> {out}")


def _save_formats(run: Run, x: np.ndarray, labels) -> None:
    """``[sample] formats``: the samples also as ADM's / EDM's evaluators read them."""
    from core.export import sample_files
    formats = run.cfg.sample.formats
    if "npz" in formats:
        log(f"sample: -> {sample_files.save_npz(run.out_dir / 'samples.npz', x, labels)}")
    if "png" in formats:
        log(f"sample: -> {sample_files.save_png_folder(run.out_dir / 'samples', x)}/")


def _check_scriptable(precond, name: str) -> None:
    """The exported jumper is TorchScript: a preconditioning that does not script fails here,
    before any training, not at export."""
    from core.export.jumper import script
    try:
        script(precond)
    except Exception as e:  # noqa: BLE001 - TorchScript's frontend raises many types
        raise UserError(f"preconditioning {name!r} ({plugins.get('precond', name).source}) is "
                        f"not TorchScript-able, so it cannot be exported: "
                        f"{first_line(e, 160, '(no message)')}") from None


def ctm_sample_binary(cfg, sampler) -> Path:
    """The C++ sampler for [sample] runner = "ctm_sample" (which implements CTM's sampler)."""
    if not getattr(sampler, "runs_in_ctm_sample", False):
        raise UserError(f"{cfg.path}: [sample] runner = \"ctm_sample\" implements the ctm "
                        f"sampler only, not {cfg.sample.sampler!r}")
    import os

    binary = cfg.sample.binary or REPO / "build" / "ctm_sample"
    if not binary.is_file():
        raise UserError(f"{binary}: ctm_sample not found; build it with python "
                        f"tools/build_cpp.py or set [sample] binary")
    if not os.access(binary, os.X_OK):
        raise UserError(f"{binary}: ctm_sample is not executable (chmod +x, or set [sample] "
                        f"binary)")
    return binary


def _child_dies_with_parent():
    """A `preexec_fn` (Linux): the kernel sends the child SIGKILL when ctmkit dies, kill -9
    included, so no ctm_sample outlives the run that started it. Elsewhere None: the child is
    still killed when ctmkit is interrupted or terminated (subprocess.run kills it)."""
    import ctypes
    import os
    import signal
    import sys

    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl    # resolved before the fork
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(1, signal.SIGKILL)                           # PR_SET_PDEATHSIG
        if os.getppid() != parent:                         # ctmkit died before prctl
            os._exit(1)
    return preexec


def _ctm_sample(run: Run, sampler, ts: list, out: Path):
    """Run the C++ sampler on the exported file into a scratch name beside `out`; only finite
    samples are renamed into place (with their labels). Returns (samples, labels or None)."""
    import os
    import subprocess

    cfg, s = run.cfg, run.cfg.sample
    binary = ctm_sample_binary(cfg, sampler)
    scratch = out.with_name(f".{out.stem}.ctm_sample.npy")
    # ctm_sample writes <stem>.npy, <stem>.labels.npy (conditional) and <stem>.png (images)
    made = [scratch, scratch.with_name(scratch.stem + ".labels.npy"),
            scratch.with_suffix(".png")]
    cmd = [str(binary), "--model", str(cfg.export.path), "--out", str(scratch),
           "--timesteps", ",".join(repr(float(t)) for t in ts), "--num", str(s.num),
           "--batch", str(s.batch), "--seed", str(s.seed), "--gamma", repr(sampler.gamma),
           "--device", run.device, "--quiet"]
    try:
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace",
                                  preexec_fn=_child_dies_with_parent())
        except OSError as e:          # not an executable format, ...
            raise UserError(f"{binary}: cannot run ctm_sample ({e.strerror or e})") from None
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["(no message)"])[-1]
            raise UserError(f"sample: ctm_sample failed (status {proc.returncode}): {last}")
        if not scratch.is_file():
            raise UserError(f"{binary}: ctm_sample exited 0 but wrote no samples; is it "
                            f"ctmkit's ctm_sample?")
        from core.data.source import check_array_sizes
        check_array_sizes(scratch)
        try:
            x = np.load(scratch, allow_pickle=False)
            labels = np.load(made[1], allow_pickle=False) if made[1].is_file() else None
        except (ValueError, OSError) as e:
            raise UserError(f"{binary}: ctm_sample wrote an unreadable array "
                            f"({e.__class__.__name__})") from None
        if x.ndim < 2 or len(x) != s.num:
            raise UserError(f"{binary}: ctm_sample wrote samples of shape {x.shape}, expected "
                            f"{s.num} samples")
        if not np.all(np.isfinite(x)):
            raise UserError("sample: the jumper produced NaN/Inf; samples.npy was not written")
        os.replace(scratch, out)
        if labels is not None:
            os.replace(made[1], out.with_name(out.stem + ".labels.npy"))
        return x, labels
    finally:
        for f in made:
            f.unlink(missing_ok=True)


# --- evaluate --------------------------------------------------------------------------------

#: teacher ODE solutions shared by the evaluations of one process (a [run] preconds comparison
#: solves the teacher's ODE once for all of its preconditionings)
_REFERENCE_ODE: dict = {}


def evaluate(run: Run) -> None:
    from core.evaluation.evaluate import distribution_distance, trajectory_errors

    cfg, e = run.cfg, run.cfg.evaluate
    teacher = run.teacher
    jumper, meta = load_exported(run)
    if meta.get("teacher_fingerprint") not in (None, teacher.fingerprint()):
        raise UserError(f"{cfg.export.path}: exported for another teacher; rerun 'export'")
    dtype = DTYPES.get(meta["dtype"], torch.float32)
    metrics = {"precond": meta["precond"], "variant": meta["variant"]}
    if meta["precond"] == "analytic" and cfg.coefficients.smooth > 0:
        metrics["deviation"] = (f"[coefficients] smooth = {cfg.coefficients.smooth:g}: l_t, s_t "
                                f"smoothed over lambda, not Eqns. (15), (17)")
    check_schedules(e.schedules, meta, cfg.sections["evaluate"].where("schedules"))
    if e.trajectory:
        traj = trajectory_errors(jumper, teacher, e.steps, e.num, e.seed, meta["t_min"],
                                 meta["t_max"], meta["rho"], dtype, device=run.device,
                                 reference_cache=_REFERENCE_ODE.setdefault(
                                     teacher.fingerprint(), {}), schedules=e.schedules)
        metrics["trajectory_error"] = {str(k): v for k, v in traj.items()}
        for k, v in traj.items():
            log(f"evaluate: {k}-step trajectory error  final {v['final_rmse']:.4g}  "
                f"path {v['path_rmse']:.4g}"
                + (f"  (schedule {v['schedule']})" if "schedule" in v else ""))
    if e.metrics:
        from core.evaluation.quality import compute_metrics, metric_objects, sample_quality

        objs = metric_objects(cfg, run.ctx)
        reference = run.data_for(e.data, "evaluate")
        if reference is None:
            raise UserError(f"{cfg.path}: [evaluate] metrics need a dataset ([data] or "
                            f"[evaluate] data)")
        reference = reference.as_dataset()
        q = sample_quality(jumper, meta, run.sampler(), e.steps, e.sample_num, e.sample_batch,
                           e.seed, run.device, objs, reference, e.cache_dir,
                           grid_dir=run.out_dir, progress=run.progress, info=True,
                           schedules=e.schedules)
        metrics["quality"] = {str(k): v for k, v in q.items()}
        for k, v in q.items():
            if isinstance(k, int):          # "info": what each metric is, not a step count
                log(f"evaluate: {k}-step " + "  ".join(f"{n} {x:.4g}" for n, x in v.items()))
    samples_path = run.out_dir / "samples.npy"
    if samples_path.exists():
        from core.data.source import check_array_sizes
        check_array_sizes(samples_path)
        try:
            x = np.load(samples_path, allow_pickle=False)
        except (ValueError, OSError) as err:
            raise UserError(f"{samples_path}: unreadable ({err.__class__.__name__})") from None
        if x.ndim < 2 or x.shape[1:] != tuple(teacher.shape) or len(x) < 2:
            raise UserError(f"{samples_path}: shape {x.shape} does not match the teacher's "
                            f"[N >= 2, {', '.join(map(str, teacher.shape))}]")
        if not np.issubdtype(x.dtype, np.floating) or not np.all(np.isfinite(x)):
            raise UserError(f"{samples_path}: holds NaN/Inf or non-float values; rerun 'sample' "
                            f"(metrics.json was not written)")
        if e.metrics:
            metrics["samples"] = {"num": int(len(x)),
                                  **compute_metrics(objs, torch.from_numpy(x), reference,
                                                    e.cache_dir)}
        else:
            ref, _ = run.data_sampler(e.data, "evaluate")(len(x), torch.Generator().manual_seed(
                e.seed + 7919))
            name, value = distribution_distance(x, ref.numpy(), e.projections, e.seed)
            metrics["samples"] = {"num": int(len(x)), name: value}
        log(f"evaluate: samples {json.dumps(metrics['samples'])}")
    bad = _non_finite(metrics)
    if bad:
        raise UserError(f"evaluate: {bad} is NaN/Inf (the jumper's samples diverge?); "
                        f"metrics.json was not written")
    save_json(run.out_dir / "metrics.json", metrics)
    log(f"evaluate: -> {run.out_dir / 'metrics.json'}")


def check_schedules(schedules: dict, meta: dict, where: str) -> None:
    """Explicit schedules ([evaluate] schedules, [distill] eval_schedules) were checked against
    [diffusion]; the jumper must cover the same times (an export from another [diffusion])."""
    for K, ts in schedules.items():
        if not (np.isclose(ts[0], meta["t_max"], rtol=1e-6, atol=0)
                and np.isclose(ts[-1], meta["t_min"], rtol=1e-6, atol=0)):
            raise UserError(f"{where}: {K} = {ts} must run from the jumper's t_max "
                            f"{meta['t_max']:g} to its t_min {meta['t_min']:g}; rerun 'export'")


def _non_finite(obj, where: str = "") -> str | None:
    """The dotted name of the first NaN / Inf number in a nested dict, or None."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            found = _non_finite(v, f"{where}.{k}" if where else str(k))
            if found:
                return found
    elif isinstance(obj, float) and not np.isfinite(obj):
        return where
    return None


def teacher(run: Run) -> None:
    from core.train.teacher import train_teacher
    train_teacher(run)
    run.__dict__.pop("teacher", None)      # rebuild from the new file when next needed
    from core.base import distributed as dist
    if dist.is_main() and len(run.teacher.shape) == 3:
        teacher_grid(run)


@torch.no_grad()
def teacher_grid(run: Run, rows: int = 8, steps: int = 18) -> None:
    """teacher_samples.png: images from the teacher's PF-ODE (EDM's Heun sampler, `steps`
    steps on the rho grid); a conditional teacher gets one class per grid column."""
    from core.evaluation.images import save_grid
    from core.diffusion.ode import HeunSolver
    from core.diffusion.schedules import rho_grid

    d, teacher = run.cfg.diffusion, run.teacher
    gen = torch.Generator().manual_seed(run.cfg.sample.seed)
    cols = teacher.num_classes or 8
    n = rows * cols
    x = torch.randn((n, *teacher.shape), generator=gen) * d.t_max
    labels = torch.arange(n) % teacher.num_classes if teacher.num_classes else None
    D = teacher.denoiser(torch.float32, run.device)
    x = HeunSolver().solve(lambda x_, t_: D(x_, t_, labels if labels is None else
                                            labels.to(run.device)),
                           x.to(run.device), rho_grid(steps, d.t_min, d.t_max, d.rho))
    save_grid(x.cpu(), run.out_dir / "teacher_samples.png", nrow=cols)
    log(f"teacher: {n} samples ({steps} Heun steps) -> {run.out_dir / 'teacher_samples.png'}")


def distill(run: Run) -> None:
    from core.train.distill import distill as run_distill
    run_distill(run)
