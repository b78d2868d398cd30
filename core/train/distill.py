"""The `distill` stage: CTM / CM training of a student with any preconditioning (Appendix B.2).

Per iteration: draw the global batch (data indices, noise, t/s/u indices) from the iteration's
generator, keep this rank's slice (reading only its rows of data), run the student once on [loss inputs; DSM inputs], add the loss and the
weighted DSM loss, step the optimiser, update the stop-gradient target (see Eqn. 28) and the EMAs.
Checkpoints are atomic; rerunning the same command resumes from the newest and ends with the
same weights as an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import time

import torch
from torch import Tensor

from core.base import distributed as dist
from core.train import gan, warm_start
from core.host import plugins
from core.data.datastore import to_device  # noqa: F401  (re-exported: core.train.distill.to_device)
from core.host.config import result_values
from core.train.distances import make_distance
from core.diffusion.dsm import DSMLoss
from core.diffusion.edm import denoiser_from_output
from core.base.errors import UserError
from core.export.jumper import jump
from core.diffusion.schedules import rho_grid
from core.train.students import build_student, save_student, trainable
from core.train.loop import (EMA, LRSchedule, TrainingLoop, backward, config_digest,
                           iteration_generator, make_optimizer, plot_curves,
                           with_lr_schedule)


class StepContext:
    """What a loss plugin calls: the preconditioned jumps, the teacher solver, the grid."""

    def __init__(self, *, precond, sigma_data, grid, teacher, solver, target, max_ode_steps,
                 labels=None, solve_buckets: int = 0, host: dict | None = None,
                 positive_grid: bool = False):
        self.precond, self.sigma_data, self.grid = precond, sigma_data, grid
        self.teacher, self.solver, self.target = teacher, solver, target
        self.max_ode_steps, self.labels = max_ode_steps, labels
        self.solve_buckets = solve_buckets      # 0: gather the travelling samples every step
        self.host = host or {}                  # this chunk's draws on the CPU (n, k, ...)
        # every step ends at t > 0 and the solver accepts `positive` (no check on the device)
        self.positive_grid = positive_grid

    def denoiser(self, F: Tensor, x: Tensor, t: Tensor) -> Tensor:
        return denoiser_from_output(F, x, t, self.sigma_data)

    def jump(self, F: Tensor, x: Tensor, t: Tensor, s: Tensor) -> Tensor:
        f, g = self.precond(t, s)                                         # Table 1
        return jump(x, F, t, f, g, self.sigma_data, self.precond.jumps_denoiser)

    def target_jump(self, x: Tensor, t: Tensor, s: Tensor, grad: bool = False) -> Tensor:
        with contextlib.nullcontext() if grad else torch.no_grad():
            return self.jump(self.target(x, t, s, self.labels), x, t, s)

    @torch.no_grad()
    def solve(self, x: Tensor, n: Tensor, k: Tensor, host: tuple | None = None) -> Tensor:
        """Teacher PF-ODE from grid[n] to grid[k] per sample (k - n <= max_ode_steps). Each
        step runs the teacher on the samples still travelling only, so the cost follows the
        mean number of steps, not the batch's longest path. `host`: (n, k) on the CPU, for
        the static-shape solve (``[distill] solve_buckets``), which then needs no sync."""
        if self.solve_buckets > 0:
            return self._solve_sorted(x, n, k, host)
        x = x.clone()
        for j in range(int((k - n).max().item()) if len(n) else 0):
            idx = torch.nonzero((n + j) < k).squeeze(1)
            i0 = n[idx] + j
            labels = self.labels[idx] if self.labels is not None else None
            D = lambda x_, t_: self.teacher(x_, t_, labels)
            x[idx] = self.solver.step(D, x[idx], self.grid[i0].to(x.dtype),
                                      self.grid[i0 + 1].to(x.dtype))
        return x

    def _solve_sorted(self, x: Tensor, n: Tensor, k: Tensor, host: tuple | None) -> Tensor:
        """The static-shape solve: the samples sorted by their number of steps (on the CPU,
        from the host copy of n and k: no device sync), step j runs the solver on the first
        c_j rows rounded up to a multiple of B / solve_buckets (at most `solve_buckets`
        shapes per batch size; 1: every step on the whole batch, a fixed number of masked
        steps) and keeps its result on the c_j rows still travelling. Per sample the same
        arithmetic as the gathered solve, so the two agree to float rounding (the rows a
        network sees together differ)."""
        hn, hk = host if host is not None else (n.cpu(), k.cpu())
        B = len(hn)
        steps = (hk - hn).long()
        # the plan is made on the host, its numbers read with tolist() (no tensor-value reads)
        if B == 0 or max(steps.tolist()) <= 0:
            return x.clone()
        order = torch.sort(steps, descending=True, stable=True).indices   # CPU
        steps = steps[order]
        most = steps[:1].tolist()[0]
        dev = x.device
        perm = to_device(order, dev)
        xs, ns = x[perm], n[perm]
        ls = self.labels[perm] if self.labels is not None else None
        live = to_device(steps, dev)
        last = len(self.grid) - 2                    # the largest valid start index
        q = -(-B // self.solve_buckets)
        counts = torch.bincount(steps, minlength=most + 1).flip(0).cumsum(0).flip(0).tolist()
        kw = {"positive": True} if self.positive_grid else {}
        for j in range(most):
            c = counts[j + 1]                        # rows with more than j steps
            cb = min(B, -(-c // q) * q)
            i0 = (ns[:cb] + j).clamp(max=last)
            lab = ls[:cb] if ls is not None else None
            D = lambda x_, t_, lab=lab: self.teacher(x_, t_, lab)
            out = self.solver.step(D, xs[:cb], self.grid[i0].to(x.dtype),
                                   self.grid[i0 + 1].to(x.dtype), **kw)
            keep = (live[:cb] > j).reshape([-1] + [1] * (x.dim() - 1))
            xs[:cb] = torch.where(keep, out, xs[:cb])
        res = torch.empty_like(xs)
        res[perm] = xs
        return res


class Prefetch:
    """Each iteration's generator and this rank's rows of data (x0 float32 on the host,
    labels), the next iteration's gathered in a thread while the current one trains. The
    draws are those of ``sample_rows(batch, iteration_generator(seed, it), keep)`` whether
    prefetched or not (each iteration's generator is keyed by (seed, it)); the generator is
    handed over positioned after the data draws, for the loss's draws. `pin`: put x0 in
    pinned memory (a CUDA copy from it is asynchronous)."""

    def __init__(self, sample_rows, seed: int, batch: int, keep: slice, pin: bool,
                 ahead: bool = True):
        from concurrent.futures import ThreadPoolExecutor

        self.sample_rows, self.seed, self.batch, self.keep, self.pin = \
            sample_rows, seed, batch, keep, pin
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="ctmkit-data") if ahead else None
        self.next: tuple | None = None            # (iteration, future)

    def _load(self, it: int):
        gen = iteration_generator(self.seed, it)
        x0, labels = self.sample_rows(self.batch, gen, self.keep)
        x0 = x0.float()
        if self.pin:
            x0 = x0.pin_memory()
        return gen, x0, labels

    def get(self, it: int):
        """(generator, x0 host, labels) of iteration `it`; starts gathering it + 1."""
        if self.next is not None and self.next[0] == it:
            result = self.next[1].result()
        else:
            if self.next is not None:
                self.next[1].cancel()
            result = self._load(it)
        self.next = (it + 1, self.pool.submit(self._load, it + 1)) if self.pool else None
        return result

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


def _warm_start(run, precond):
    """``[student] init = <path>``: the source run's weights (core/train/warm_start.py), or None."""
    st = run.cfg.student
    if st.init == "teacher":
        return None
    return warm_start.load(run.cfg.student_init_path, st.init_ema, st.init_optimizer,
                           run.teacher.fingerprint(), precond)


def fingerprint(run, precond_desc: dict, warm=None, gan_desc: dict | None = None) -> str:
    cfg, d = run.cfg, run.cfg.distill
    keep = gan.fingerprint_keys(result_values(d), d)   # keys that change a result (core.host.config)
    desc = {"teacher": run.teacher.fingerprint(), "precond": precond_desc,
            "distill": with_lr_schedule(keep, d),
            "network": cfg.network.data, "data": run.data_fingerprint(),
            "diffusion": vars(cfg.diffusion)}
    if warm is not None:      # its file and iteration: a changed source is another run
        desc["init"] = {k: v for k, v in warm.describe().items() if k != "path"}
    if gan_desc is not None:  # the discriminator's plugin and options
        desc["discriminator"] = gan_desc
    return config_digest(desc)


@dataclasses.dataclass
class Batch:
    """This rank's share of one iteration's global batch (or a micro-batch of it): the data
    rows (x0 on the device and its float32 CPU copy), their labels, and the loss's and the DSM
    regulariser's draws (CPU tensors, the batch as their first dimension)."""
    x0: Tensor
    x0_host: Tensor
    labels: Tensor | None
    draws: dict
    dsm_draws: dict | None
    gan_draws: tuple | None = None        # the discriminator's (real, fake) draws, or None

    def __len__(self) -> int:
        return self.x0.shape[0]

    def chunk(self, c: slice) -> "Batch":
        return Batch(self.x0[c], self.x0_host[c],
                     self.labels[c] if self.labels is not None else None,
                     {k: v[c] for k, v in self.draws.items()},
                     {k: v[c] for k, v in self.dsm_draws.items()}
                     if self.dsm_draws is not None else None,
                     tuple({k: v[c] for k, v in dr.items()} for dr in self.gan_draws)
                     if self.gan_draws is not None else None)


@dataclasses.dataclass
class Losses:
    """The batch-mean losses of one pass of the student, and that pass's output F (float32);
    with the GAN term on, its adversarial loss and the fakes (the student's jumps) too."""
    main: Tensor
    dsm: Tensor
    F: Tensor
    gan: Tensor | None = None
    fake: Tensor | None = None


def last_layer(params: list) -> int:
    """The index in `params` of the last weight matrix (the last parameter of dim >= 2): the
    layer CTM's adaptive weights balance gradients on."""
    return max(i for i, p in enumerate(params) if p.dim() >= 2)


def adaptive_weight(g_main: Tensor, g_aux: Tensor) -> Tensor:
    """CTM's adaptive weight of an auxiliary loss (Kim et al. 2024, Sec. 4.2, after Esser et
    al.'s VQGAN): w = ||grad_last L_main|| / (||grad_last L_aux|| + 1e-8), from the gradients
    of the two batch-mean losses with respect to the last weight matrix (already averaged over
    processes). Both chunk paths (`_adaptive_backward`, `Distiller._accumulate`) call this."""
    return g_main.norm() / (g_aux.norm() + 1e-8)


def distill(run) -> None:
    Distiller(run).run()


class Distiller:
    """The distill stage. One iteration, as `run` reads::

        batch = self.draw(it)                 # the global batch's draws; this rank's rows
        stats, w = self.backward(batch)       # losses (one student pass), gradients
        lr = self.step(it, stats)             # all-reduce, finite check, optimiser step,
                                              # stop-gradient target (Eqn. 28) and EMAs
        self.log(it + 1, ...); self.evaluate(it + 1); self.checkpoint(it + 1)
    """

    def __init__(self, run):
        self.run_, self.cfg = run, run.cfg
        d = self.d = run.cfg.distill
        self.world, self.device = dist.world(), run.device
        self.sl = dist.local_slice(d.batch_size, f"{self.cfg.path}: [distill]")
        self.local = self.sl.stop - self.sl.start
        self.precision = d.precision if self.device.startswith("cuda") else "fp32"
        if self.precision != d.precision and dist.is_main():
            print(f"[ctmkit] distill: precision {d.precision} needs a GPU; training in fp32 "
                  f"on CPU")
        self._build_objectives()
        self._build_modules()
        self.gan = gan.GAN(run, self.device, self.sl) if d.gan_weight != 0.0 else None
        self._build_loop()
        self._build_evaluation()
        self._build_step_inputs()

    # -- set-up ----------------------------------------------------------------------------
    def _build_objectives(self) -> None:
        cfg, d, run = self.cfg, self.d, self.run_
        self.teacher = run.teacher
        self.teacher_D = self.teacher.denoiser(torch.float32, self.device)
        self.precond = run.precond().to(self.device)
        self.solver = plugins.create("solver", _solver_section(cfg), run.ctx, "solver",
                                     d.solver)
        self.loss = plugins.create("loss", cfg.sections["distill"], run.ctx, "loss", d.loss)
        self.is_dsm = bool(getattr(self.loss, "is_dsm", False))   # no DSM regulariser then
        self.dsm = self.loss if self.is_dsm else DSMLoss()
        self.dsm_on = not self.is_dsm and d.dsm_weight != 0.0
        self.distance = make_distance(d, self.device)

    def _build_modules(self) -> None:
        d, device = self.d, self.device
        student = build_student(self.run_).to(device)
        self.warm = _warm_start(self.run_, self.precond)
        if self.warm is not None:
            warm_start.load_online(self.warm, student)
        if d.channels_last:
            student = student.to(memory_format=torch.channels_last)
            self.teacher_D = self.teacher_D.to(memory_format=torch.channels_last)
        if d.tf32 and device.startswith("cuda"):
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.student = student
        self.target = EMA(student, d.target_ema)                        # sg(theta), Eqn. (28)
        self.emas = [EMA(student, r) for r in d.ema]
        self.params = trainable(student)
        self.opt = make_optimizer(d.optimizer, self.params, d.lr, d.fused_optimizer)
        if self.warm is not None:
            warm_start.load_averages(self.warm, self.target.model, [e.model for e in self.emas])
            warm_start.load_optimizer(self.warm, self.opt)
        self.model = student
        if self.world > 1:
            self.model = torch.nn.parallel.DistributedDataParallel(
                student, device_ids=[dist.local_rank()] if device.startswith("cuda") else None)

    def _build_loop(self) -> None:
        cfg, d, precond = self.cfg, self.d, self.precond
        fp = fingerprint(self.run_, {
            "name": precond.name, "variant": precond.variant, "options": cfg.precond.data,
            "coefficients": self.run_.coefficients_digest() if precond.name == "analytic"
            else None}, self.warm, self.gan.describe() if self.gan is not None else None)
        self.origin = {"teacher_fingerprint": self.teacher.fingerprint(),
                       "precond": {"name": precond.name, "variant": precond.variant,
                                   "jumps_denoiser": bool(precond.jumps_denoiser)}}
        self.scaler = torch.amp.GradScaler("cuda") if self.precision == "fp16" else None
        modules = {"student": self.student, "target": self.target.model,
                   **{f"ema_{i}": e.model for i, e in enumerate(self.emas)}}
        fields = ["loss", "loss_main", "loss_dsm", "dsm_weight", "lr", "it_per_s"]
        more = {}
        if self.gan is not None:       # the discriminator and its optimiser: no EMA (as CTM)
            modules["discriminator"] = self.gan.D
            more = {"discriminator": self.gan.opt}
            fields[3:3] = list(gan.FIELDS)
        self.loop = TrainingLoop(
            "distill", ckdir=self.run_.out_dir / "checkpoints", fingerprint=fp,
            modules=modules, optimizer=self.opt, params=self.params, ema_source=self.student,
            emas=[self.target, *self.emas], lr=LRSchedule.of(d), warmup=d.warmup,
            grad_clip=d.grad_clip, checkpoint_extra=self.origin, iterations=d.iterations,
            checkpoint_every=d.checkpoint_every, keep_checkpoints=d.keep_checkpoints,
            metrics=self.run_.out_dir / "metrics.csv",
            fields=fields, progress=self.run_.progress, scaler=self.scaler, optimizers=more)
        diff = self.cfg.diffusion
        self.grid_host = torch.tensor(rho_grid(d.N, diff.t_min, diff.t_max, diff.rho),
                                      dtype=torch.float64)
        self.grid = self.grid_host.to(self.device)

    def _build_evaluation(self) -> None:
        cfg, d, diff = self.cfg, self.d, self.cfg.diffusion
        self.ref_cache: dict = {}
        metric_names = [n for n in d.eval if n != "trajectory"]
        unknown = [n for n in metric_names if n not in cfg.evaluate.metrics]
        if unknown:
            raise UserError(f"{cfg.path}: [distill] eval lists {unknown[0]!r}, which is "
                            f"neither \"trajectory\" nor one of [evaluate] metrics")
        self.quality = None
        if dist.is_main() and metric_names:
            from core.evaluation.quality import metric_objects
            from core.export.sampling import CTMSampler

            ref = self.run_.data_for(cfg.evaluate.data, "evaluate")
            if ref is None:
                raise UserError(f"{cfg.path}: [distill] eval metrics need a dataset ([data])")
            quiet = dataclasses.replace(self.run_.ctx, progress=False)   # no bars in the loop
            self.quality = dict(
                metrics=metric_objects(cfg, quiet, metric_names), reference=ref.as_dataset(),
                sampler=CTMSampler(0.0),
                meta={"shape": list(self.teacher.shape), "dtype": "float32",
                      "num_classes": self.teacher.num_classes, "t_min": diff.t_min,
                      "t_max": diff.t_max, "rho": diff.rho})

    def _build_step_inputs(self) -> None:
        d, diff = self.d, self.cfg.diffusion
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16 if self.precision == "bf16"
                                        else torch.float16) if self.precision != "fp32"
                         else contextlib.nullcontext())
        self.micro = d.micro_batch or self.local         # samples per forward / backward pass
        fast = ((lambda m: _compiled(m, d.compile_mode)) if d.compile
                else (lambda m: m))                        # the modules stay as they are
        self.ctx_args = dict(
            precond=self.precond, sigma_data=diff.sigma_data, grid=self.grid,
            teacher=fast(self.teacher_D), solver=self.solver, target=fast(self.target.model),
            max_ode_steps=d.max_ode_steps, solve_buckets=d.solve_buckets,
            positive_grid=diff.t_min > 0 and
            "positive" in inspect.signature(self.solver.step).parameters)
        self.model_fwd = fast(self.model)
        # the global batch's draws, this rank's rows of data only (read by index); on CUDA the
        # next iteration's rows are gathered (into pinned memory) while this one trains
        cuda = self.device.startswith("cuda")
        self.data = Prefetch(self.run_.local_rows_sampler(None, "distill"), d.seed,
                             d.batch_size, self.sl, pin=cuda, ahead=cuda)

    def _announce(self) -> None:
        cfg, d, precond = self.cfg, self.d, self.precond
        if not dist.is_main():
            return
        if precond.name == "analytic" and cfg.coefficients.smooth > 0:
            print(f"[ctmkit] distill: DEVIATION from Eqns. (15), (17): l_t, s_t smoothed "
                  f"([coefficients] smooth = {cfg.coefficients.smooth:g})")
        if d.compile and d.solve_buckets == 0 and not self.is_dsm:
            print("[ctmkit] distill: compile = true with solve_buckets = 0: the gathered "
                  "teacher solve presents a new batch size at almost every step, and each one "
                  "is compiled anew; set [distill] solve_buckets (e.g. 4) for a few static "
                  "shapes")
        for K, ts in d.eval_schedules.items():      # metrics.csv: <metric>_K = these times
            print(f"[ctmkit] distill: {K}-step evaluations on the schedule {ts}")

    # -- the iteration ---------------------------------------------------------------------
    def run(self) -> None:
        loop, d = self.loop, self.d
        self._announce()
        if loop.start == 0:
            self.evaluate(0)
        if getattr(self.precond, "check_range", False):
            self.precond(self.grid, self.grid)    # every grid time in range: checked once
            self.precond.check_range = False      # the step passes grid times only (no sync)
        self.t_last, self.it_last = time.perf_counter(), loop.start
        # loss sums since the last log row, on the device (with the GAN: its statistics and
        # the counts of the iterations that had them, see `step`)
        self.window = torch.zeros(3 if self.gan is None else 11, dtype=torch.float64,
                                  device=self.device)
        self.weights = (0.0, 0.0)                 # the last student step's DSM, GAN weights
        for it in loop.iterations():
            batch = self.draw(it)
            student, disc = self.gan.turns(it) if self.gan is not None else (True, False)
            stats, fake = None, None
            if student:
                stats, self.weights, fake = self.backward(batch)
            d_stats = self.discriminator_step(batch, fake) if disc else None
            lr = self.step(it, stats, d_stats)
            done = it + 1
            if loop.due(done, d.log_every):
                self.log(done, lr)
            paused = time.perf_counter()
            if loop.due(done, d.eval_every):
                loop.verify()
                self.evaluate(done)
            self.checkpoint(done)
            self.t_last += time.perf_counter() - paused   # it_per_s: evaluations out
        self.data.close()
        self.finish()

    def draw(self, it: int) -> Batch:
        """Iteration `it`'s draws for the global batch (from its own generator), sliced to this
        rank's rows; the data rows themselves are read for this rank only. With the GAN on, the
        discriminator's draws for the real and the fake rows (their own stream)."""
        d, sl = self.d, self.sl
        gen, x0_host, labels = self.data.get(it)
        # the loss draws see the global batch's shape and dtype (a tensor on the meta device)
        batch_like = torch.empty((d.batch_size,) + tuple(x0_host.shape[1:]), device="meta")
        draws = self.loss.draw(gen, batch_like, d.N)
        dsm_draws = self.dsm.draw(gen, batch_like) if self.dsm_on else None
        x0 = to_device(x0_host, self.device)
        labels = to_device(labels, self.device) if labels is not None else None
        b = Batch(x0, x0_host, labels, {k: v[sl] for k, v in draws.items()},
                  {k: v[sl] for k, v in dsm_draws.items()} if self.dsm_on else None)
        if self.gan is not None and self.gan.active(it):
            b.gan_draws = self.gan.draws(it, batch_like)
        return b

    def losses(self, b: Batch, model=None) -> Losses:
        """The batch-mean main and DSM losses of `b`, from one pass of the student over
        [loss inputs; DSM inputs (; the GAN's inputs)], and the GAN's adversarial term when
        `b` has its draws. The student's inputs are made on the CPU, as the draws are, with no
        copy back from the device."""
        device = self.device
        ctx = StepContext(**self.ctx_args, labels=b.labels, host=b.draws)
        n = len(b)
        parts = [self.loss.inputs(b.draws, b.x0_host, self.grid_host)]
        if self.dsm_on:
            parts.append(self.dsm.inputs(b.dsm_draws, b.x0_host))
        with_gan = b.gan_draws is not None
        if with_gan and self.d.gan_fake == "jump_to_t_min":   # the student's jump t -> t_min
            x, t, _ = parts[0]
            parts.append((x, t, torch.full_like(t, self.cfg.diffusion.t_min)))
        X = to_device(torch.cat([p[0] for p in parts]), device)
        if self.d.channels_last and X.dim() == 4:
            X = X.contiguous(memory_format=torch.channels_last)
        T = to_device(torch.cat([p[1] for p in parts]), device)
        S = to_device(torch.cat([p[2] for p in parts]), device)
        L = torch.cat([b.labels] * len(parts)) if b.labels is not None else None
        draws = {k: to_device(v, device) for k, v in b.draws.items()}
        with self.autocast:
            F = (model or self.model_fwd)(X, T, S, L).float()
            l_main = self.loss.per_sample(ctx, draws, b.x0, F[:n], self.distance).mean()
            l_dsm = (self.dsm.per_sample(ctx, {k: to_device(v, device)
                                               for k, v in b.dsm_draws.items()}, b.x0,
                                         F[n:2 * n]).mean()
                     if self.dsm_on else torch.zeros((), device=device))
            fake = self._fake(ctx, F[-n:] if self.d.gan_fake == "jump_to_t_min" else F[:n],
                              X[-n:], T[-n:], S[-n:], X[:n], T[:n], S[:n]) if with_gan else None
        if not with_gan:
            return Losses(l_main, l_dsm, F)
        l_gan = self.gan.generator_loss(fake, b.labels, b.gan_draws[1])
        return Losses(l_main, l_dsm, F, l_gan, fake)

    def _fake(self, ctx, F, Xg, Tg, Sg, X, T, S) -> Tensor:
        """The discriminator's fake from the student's output: its jump from the loss's x_t, t
        to t_min (`F` on those inputs), or its jump to s carried on to t_min by the
        stop-gradient target (`F` on the loss's inputs; gradients flow through the jump)."""
        if self.d.gan_fake == "jump_to_t_min":
            return ctx.jump(F, Xg, Tg, Sg)
        x_s = ctx.jump(F, X, T, S)
        return ctx.target_jump(x_s, S, torch.full_like(S, self.cfg.diffusion.t_min), grad=True)

    def _terms(self, ls: Losses) -> list[tuple[Tensor, object]]:
        """The auxiliary losses added to the main one, each with its weight (a number or
        "adaptive"): DSM when on, the GAN's adversarial term when this step has it."""
        terms = [(ls.dsm, self.d.dsm_weight)] if self.dsm_on else []
        if ls.gan is not None:
            terms.append((ls.gan, self.d.gan_weight))
        return terms

    def _weights(self, ws: list, ls: Losses) -> tuple:
        """(the DSM weight, the GAN weight) of a step from its terms' weights `ws`."""
        w_dsm = ws[0] if self.dsm_on else 0.0
        return w_dsm, (ws[-1] if ls.gan is not None else 0.0)

    def backward(self, b: Batch) -> tuple[Tensor, tuple, Tensor | None]:
        """The losses of `b` and their gradients in the student's parameters: (this rank's
        [main, dsm, total(, gan)] losses as float64 on the device, (the DSM weight, the GAN
        weight), the fakes detached or None)."""
        self.opt.zero_grad(set_to_none=True)
        chunks = [slice(i, min(i + self.micro, self.local))
                  for i in range(0, self.local, self.micro)]
        if len(chunks) > 1:
            return self._accumulate(b, chunks)
        ls = self.losses(b)
        terms = self._terms(ls)
        if any(isinstance(w, str) for _, w in terms):                     # "adaptive"
            ws = _balanced_backward(ls.main, terms, ls.F, self.params, self.scaler)
            total = ls.main.detach()
            for w, (l, _) in zip(ws, terms):
                total = total + w * l.detach()
        else:
            ws = [float(w) for _, w in terms]
            total = ls.main
            for w, (l, _) in zip(ws, terms):
                total = total + w * l
            backward(total, self.scaler)
        # stays on the device: no sync here (the finiteness check is settled at the next log
        # row, checkpoint or evaluation)
        out = [ls.main.detach(), ls.dsm.detach(), total.detach()]
        if ls.gan is not None:
            out.append(ls.gan.detach())
        fake = ls.fake.detach() if ls.fake is not None else None
        return torch.stack(out).double(), self._weights(ws, ls), fake

    def _accumulate(self, b: Batch, chunks: list[slice]):
        """Gradient accumulation over micro-batches (``[distill] micro_batch``): each chunk's
        losses weighted by its share of the local batch, so the gradient is the full batch's
        (to float rounding), whatever micro_batch and the world size. Gradients are
        all-reduced once, after the last chunk. With an ``"adaptive"`` weight (DSM, GAN) the
        main and auxiliary gradients are accumulated apart and combined with CTM's balance
        over the whole batch (`adaptive_weight`; a GradScaler's common factor cancels in it;
        it unscales the sum as usual). Returns what `backward` does."""
        params, scaler = self.params, self.scaler
        specs = self._terms(Losses(None, None, None, gan=0.0 if b.gan_draws else None))
        adaptive = any(isinstance(w, str) for _, w in specs)
        ws = [1.0 if isinstance(w, str) else float(w) for _, w in specs]
        acc = [[torch.zeros_like(p) for p in params] for _ in range(1 + len(specs))] \
            if adaptive else None
        sums = torch.zeros(3 + (b.gan_draws is not None), dtype=torch.float64,
                           device=b.x0.device)
        fakes = []
        sync = getattr(self.model, "no_sync", contextlib.nullcontext)
        for c in chunks:
            frac = (c.stop - c.start) / len(b)
            with sync():
                ls = self.losses(b.chunk(c), self.model_fwd or self.model)
                terms = [ls.main] + [l for l, _ in self._terms(ls)]
                if adaptive:
                    scale = scaler.scale if scaler is not None else (lambda v: v)
                    for i, l in enumerate(terms):
                        gs = torch.autograd.grad(scale(l * frac), params, allow_unused=True,
                                                 retain_graph=i < len(terms) - 1)
                        for a, g in zip(acc[i], gs):
                            if g is not None:
                                a.add_(g)
                else:
                    total = ls.main
                    for w, l in zip(ws, terms[1:]):
                        total = total + w * l
                    total = total * frac
                    (scaler.scale(total) if scaler is not None else total).backward()
            sums[:2] += torch.stack([ls.main.detach(), ls.dsm.detach()]).double() * frac
            if ls.gan is not None:
                sums[3] += ls.gan.detach().double() * frac
                fakes.append(ls.fake.detach())
        grads = ([g for a in acc for g in a] if adaptive
                 else [p.grad for p in params if p.grad is not None])
        _average_over_processes(grads)
        if adaptive:                            # main loss + w aux, each w from the whole batch
            last = last_layer(params)
            ws = [adaptive_weight(acc[0][last], acc[i + 1][last]).detach()      # no sync
                  if isinstance(w, str) else ws[i] for i, (_, w) in enumerate(specs)]
            for j, p in enumerate(params):
                g = acc[0][j]
                for w, a in zip(ws, acc[1:]):
                    g = g + w * a[j]
                p.grad = g
        aux = [sums[1]] if self.dsm_on else []
        if b.gan_draws is not None:
            aux.append(sums[3])
        total = sums[0]
        for w, v in zip(ws, aux):
            total = total + w * v
        sums[2] = total
        w_dsm = ws[0] if self.dsm_on else 0.0
        w_gan = ws[-1] if b.gan_draws is not None else 0.0
        return sums, (w_dsm, w_gan), torch.cat(fakes) if fakes else None

    def discriminator_step(self, b: Batch, fake: Tensor | None) -> Tensor:
        """One discriminator step on this iteration's real rows and fakes (the student's step's
        fakes, or, on a discriminator-only iteration, the student's jumps without gradients)."""
        if fake is None:
            with torch.no_grad():
                fake = self._fakes_only(b)
        return self.gan.step(b.x0, fake, b.labels, *b.gan_draws)

    def _fakes_only(self, b: Batch) -> Tensor:
        """The fakes of `b` (no gradients): the student on the GAN's inputs only."""
        device = self.device
        ctx = StepContext(**self.ctx_args, labels=b.labels, host=b.draws)
        x, t, s = self.loss.inputs(b.draws, b.x0_host, self.grid_host)
        if self.d.gan_fake == "jump_to_t_min":
            s = torch.full_like(t, self.cfg.diffusion.t_min)
        X, T, S = (to_device(v, device) for v in (x, t, s))
        if self.d.channels_last and X.dim() == 4:
            X = X.contiguous(memory_format=torch.channels_last)
        with self.autocast:
            F = self.student(X, T, S, b.labels).float()
            return self._fake(ctx, F, X, T, S, X, T, S).float()

    def step(self, it: int, stats: Tensor | None, d_stats: Tensor | None) -> float:
        """Iteration `it`'s statistics averaged over processes and noted for the finite check,
        then, after a student's backward (`stats`), the optimiser step: lr schedule, clipping,
        step, the stop-gradient target (Eqn. 28) and the EMAs. Returns the lr."""
        if self.gan is not None:       # [main, dsm, total, n, gan, w_gan, n_gan, d x3, n_d]
            z = torch.zeros(1, dtype=torch.float64, device=self.device)
            one = torch.ones(1, dtype=torch.float64, device=self.device)
            g = (torch.cat([stats[:3], one]) if stats is not None else torch.cat([z] * 4))
            gg = (torch.cat([stats[3:4], torch.as_tensor(self.weights[1], dtype=torch.float64,
                                                         device=self.device).reshape(1), one])
                  if stats is not None and len(stats) > 3 else torch.cat([z] * 3))
            dd = torch.cat([d_stats, one]) if d_stats is not None else torch.cat([z] * 4)
            stats = torch.cat([g, gg, dd])
        stats = dist.all_reduce_sum(stats) / self.world
        self.loop.check_finite(stats, it)
        self.window += stats
        if self.gan is not None and not self.gan.turns(it)[0]:
            return self.loop.schedule(it)          # a discriminator-only iteration
        return self.loop.step(it)

    def log(self, done: int, lr: float) -> None:
        """A metrics.csv row: the losses averaged over the iterations since the last row (with
        the GAN: each statistic over the iterations that had it)."""
        loop = self.loop
        loop.verify()                                  # the one device sync of a log window
        now = time.perf_counter()
        n = done - self.it_last
        rate = n / max(now - self.t_last, 1e-9)
        w = self.window
        if self.gan is None:
            mean = w / n                               # losses averaged over the window
        else:                                          # over the student's iterations
            mean = w[:3] / float(w[3]) if float(w[3]) > 0 else None
        self.t_last, self.it_last, self.window = now, done, torch.zeros_like(self.window)
        row = {"dsm_weight": float(self.weights[0]), "lr": lr, "it_per_s": rate}
        if mean is not None:
            row.update(loss=float(mean[2]), loss_main=float(mean[0]), loss_dsm=float(mean[1]))
        if self.gan is not None:
            if float(w[6]) > 0:
                row.update(loss_gan=float(w[4] / w[6]), gan_weight=float(w[5] / w[6]))
            if float(w[10]) > 0:
                row.update(d_loss=float(w[7] / w[10]), d_real=float(w[8] / w[10]),
                           d_fake=float(w[9] / w[10]))
        loop.log_row(done, row, row.get("loss", row.get("d_loss", 0.0)), it_s=f"{rate:.1f}")

    def checkpoint(self, done: int) -> None:
        """The progress bar, and a checkpoint when one is due (core.train.loop)."""
        self.loop.end_iteration(done)

    def evaluate(self, it: int) -> None:
        """The EMA student's trajectory error and/or sample metrics at d.eval_steps jumps."""
        if not dist.is_main():
            return
        with _range_checks(self.precond, True):   # evaluation times need not be grid times
            self._evaluate(it)

    def _evaluate(self, it: int) -> None:
        from core.evaluation.evaluate import trajectory_errors
        from core.export.jumper import Jumper

        cfg, d, diff, log = self.cfg, self.d, self.cfg.diffusion, self.loop.log
        jumper = Jumper(self.emas[0].model, self.precond, diff.sigma_data).eval()
        if "trajectory" in d.eval:
            errs = trajectory_errors(jumper, self.teacher, d.eval_steps, d.eval_num,
                                     cfg.evaluate.seed, diff.t_min, diff.t_max, diff.rho,
                                     torch.float32, reference_cache=self.ref_cache,
                                     device=self.device, schedules=d.eval_schedules)
            log.add(it, {f"traj_err_{k}": v["final_rmse"] for k, v in errs.items()})
        if self.quality is not None:
            from core.evaluation.quality import sample_quality
            q = self.quality
            res = sample_quality(jumper, q["meta"], q["sampler"], d.eval_steps, d.eval_num,
                                 cfg.evaluate.sample_batch, cfg.evaluate.seed, self.device,
                                 q["metrics"], q["reference"], cfg.evaluate.cache_dir,
                                 grid_dir=self.run_.out_dir, grid_name="distill_samples",
                                 schedules=d.eval_schedules)
            log.add(it, {f"{name}_{k}": v for k, vals in res.items()
                         for name, v in vals.items()})

    def finish(self) -> None:
        """student.pt (the first EMA) and curves.png, on rank 0."""
        if dist.is_main():
            d, out, log = self.d, self.run_.out_dir, self.loop.log
            save_student(out / "student.pt", self.emas[0].model, self.teacher.fingerprint(),
                         {"iteration": d.iterations, "precond": self.origin["precond"]})
            plot_curves(log, out / "curves.png",
                        f"distill: {d.loss} loss, {self.precond.name} preconditioning")
            final = {k: v for k, v in (log.rows[-1].items() if log.rows else [])}
            print(f"[ctmkit] distill: {d.iterations} iterations -> {out / 'student.pt'}"
                  + "".join(f"  {k} {final[k]}" for k in final
                            if k.startswith(("traj_err", "fid", "kid"))))
        dist.barrier()


def _average_over_processes(grads: list) -> None:
    """Each gradient averaged over the processes, in place, in one all-reduce."""
    if dist.world() > 1 and grads:
        flat = dist.all_reduce_sum(torch.cat([g.reshape(-1) for g in grads])) / dist.world()
        i = 0
        for g in grads:
            g.copy_(flat[i:i + g.numel()].view_as(g))
            i += g.numel()


@contextlib.contextmanager
def _range_checks(precond, on: bool):
    """The preconditioning's optional ``check_range`` (core.api.Preconditioning) set to `on`
    meanwhile."""
    old = getattr(precond, "check_range", None)
    if old is not None:
        precond.check_range = on
    try:
        yield
    finally:
        if old is not None:
            precond.check_range = old


def _adaptive_backward(l_main: Tensor, l_dsm: Tensor, F: Tensor, params, scaler) -> Tensor:
    """CTM's adaptive DSM weight and the backward of L_main + w L_dsm (`_balanced_backward`
    with the one term); returns w."""
    return _balanced_backward(l_main, [(l_dsm, "adaptive")], F, params, scaler)[0]


def _balanced_backward(l_main: Tensor, terms: list, F: Tensor, params, scaler) -> list:
    """The backward of L_main + sum_i w_i L_i for `terms` [(L_i, weight_i)], each weight a
    number or "adaptive": CTM's w_i = ||grad_last L_main|| / ||grad_last L_i|| over the last
    weight matrix (`adaptive_weight`; gradients averaged over ranks first). It goes back
    through the losses (LPIPS, the target's jump, the discriminator) once: their gradients
    with respect to the student's output F first, then from F to the last weight matrix for
    the weights (a short path), then from F through the student once. The same gradients as
    differentiating each loss with respect to the last weight and then the weighted sum, with
    one backward through the loss networks fewer. Returns the weights (adaptive ones as 0-dim
    device tensors: no sync).

    With fp16's GradScaler every loss is scaled (w is scale-free); when the scaled gradients
    overflow, w is non-finite, the scaler skips this step, and w is taken as 0 for the logged
    loss of the iteration (without a scaler a non-finite w stays, and stops the run)."""
    scale = scaler.scale if scaler is not None else (lambda v: v)
    g_main, = torch.autograd.grad(scale(l_main), F)                 # through the loss, once
    gs = [torch.autograd.grad(scale(l), F)[0] for l, _ in terms]
    adaptive = [i for i, (_, w) in enumerate(terms) if isinstance(w, str)]
    last = params[last_layer(params)]
    g1, = torch.autograd.grad(F, last, g_main, retain_graph=True)
    rest = [torch.autograd.grad(F, last, gs[i], retain_graph=True)[0] for i in adaptive]
    both = dist.all_reduce_sum(torch.stack([g1, *rest]).detach()) / dist.world()
    ws = [None if isinstance(w, str) else float(w) for _, w in terms]
    for j, i in enumerate(adaptive):
        w = adaptive_weight(both[0], both[j + 1])
        if scaler is not None:
            w = torch.where(torch.isfinite(w), w, torch.zeros_like(w))
        ws[i] = w.detach()
    g = g_main
    for w, gi in zip(ws, gs):
        g = g + w * gi
    F.backward(g)
    return ws


def _compiled(module, mode: str = "default"):
    """torch.compile'd forward of `module` (its parameters shared, its state_dict untouched).

    Static shapes (``dynamic=False``): the static-shape solve presents a handful of batch
    sizes, each compiled once (the recompile limit is raised to fit them), and inductor's
    dynamic-shape path fails on channels_last convolutions (torch 2.14, CPU). Donated buffers
    are off: the adaptive DSM weight differentiates the losses with ``retain_graph=True``,
    which a backward compiled with donated buffers refuses."""
    import torch._functorch.config

    from core.base.compiled import compile_static

    torch._functorch.config.donated_buffer = False
    return compile_static(module, mode)


def _solver_section(cfg):
    from core.host.config import Section
    return Section("distill", {"solver": cfg.distill.solver}, str(cfg.path), cfg.base_dir)
