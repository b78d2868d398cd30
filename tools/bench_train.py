"""Distillation throughput and the overhead of a training step over the network passes it needs.

One CTM iteration (Eqn. 7 + DSM) on a batch of B needs: the student's forward + backward on 2B
inputs (loss and DSM parts together), the stop-gradient jumper's forward on B twice (target path)
and forward + backward on B once (the student's path to eps), the teacher's solver, 2 forwards
(Heun; 1 for Euler) on B per grid step (the drawn mean number of steps), and with the LPIPS
distance one LPIPS forward + backward on B pairs. The floor is the time of those bare passes,
measured on the same networks and shapes in the same run; the overhead is
(step time / floor) - 1.

    python tools/bench_train.py [--width 256] [--batch 128] [--iters 60] [--precond analytic]
    python tools/bench_train.py --config examples/fashion_mnist.toml --device cuda --iters 30
    python tools/bench_train.py --config examples/cifar10.toml --device cpu --batch 2 --iters 3 \\
        --set solve_buckets=4 --set compile=true

The step time is the steady state's: a run of 2 x --iters iterations, timed over its last
--iters (the it_per_s of metrics.csv, which leaves out evaluations and checkpoints). "host
reads / step": the tensor values a step reads back on the host, each a device sync on a GPU
(host_reads_per_step; --no-reads skips the two short profiled runs it takes).

With --config the example's [network], [diffusion] and [distill] settings are used as they are
(the teacher: that network with random weights; the data: random images of the dataset's shape;
[precond] ctm, or analytic with a small coefficient table; no evaluations; LPIPS with a random
backbone when its weights are not on disk: the same cost). --set KEY=VALUE overrides a
[distill] key (TOML value), e.g. solve_buckets=4.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import resource
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import _common
import numpy as np
import torch

from core.run import main as core_main

CONFIG = """
[run]
out_dir = "out"
stages = {stages}
device = "{device}"
[teacher]
kind = "gmm"
weights = [0.5, 0.5]
means = [[-1.0, 0.0, 0.5, 0.0], [1.0, 0.5, 0.0, -0.5]]
stds = [0.3, 0.4]
[network]
name = "mlp"
width = {width}
depth = 4
emb_dim = 64
[precond]
name = "{precond}"
[coefficients]
n_timesteps = 40
n_samples = 256
batch = 256
[distill]
iterations = {iters}
batch_size = {batch}
checkpoint_every = {iters}
eval_every = 100000
log_every = {log}
N = 18
max_ode_steps = 17
{extra}"""

#: the stages of a bench run, by [precond] name (Analytic-Precond needs its table first)
STAGES = {"ctm": ["distill"], "analytic": ["coefficients", "distill"]}

#: the host read-backs of tensor values: .item(), float(), int(), bool() of a tensor
#: (aten::_local_scalar_dense) and nonzero; each one a device sync on a GPU
HOST_READS = ("aten::_local_scalar_dense", "aten::nonzero")

#: image shape (H, W, C) and classes of an example's dataset format, for random stand-in data
DATA_SHAPES = {"idx": ((28, 28, 1), 10), "cifar10": ((32, 32, 3), 10)}


def timed(fn, repeats=5, sync=lambda: None) -> float:
    fn()
    sync()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + " }"
    return repr(v)


def dump_toml(tables: dict) -> str:
    lines = []
    for name, body in tables.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in body.items()]
    return "\n".join(lines) + "\n"


def parse_sets(sets) -> dict:
    out = {}
    for s in sets or []:
        key, _, value = s.partition("=")
        try:
            out[key.strip()] = tomllib.loads(f"v = {value.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            print(f"error: --set {s}: not KEY=VALUE with a TOML value", file=sys.stderr)
            raise SystemExit(2) from None
    return out


def run_config(cfg: Path) -> None:
    """core.run on a bench config; its own one-line error (stderr) and exit status if it fails.
    torch.compile's caches are emptied first: every run builds new modules, and their compiled
    entries would otherwise pile up until dynamo's recompile limit sends later runs to eager."""
    import torch._dynamo

    torch._dynamo.reset()
    rc = core_main([str(cfg), "--no-progress"])
    if rc != 0:
        raise SystemExit(rc)


def write_random_teacher(path: Path, network: dict, shape, num_classes: int,
                         sigma_data: float = 0.5, seed: int = 0) -> None:
    """A `network` teacher file with the [network] table's architecture and random weights."""
    from core.host.config import DiffusionCfg
    from core.base.io import save_torch
    from core.host.plugins import Context, create_network
    from plugins.teachers.network import FORMAT

    name = network.get("name", "mlp")
    options = {k: v for k, v in network.items() if k != "name"}
    torch.manual_seed(seed)
    net = create_network(name, options, Context(diffusion=DiffusionCfg(sigma_data=sigma_data)),
                         shape, num_classes, False, str(path))
    save_torch(path, {"format": FORMAT, "version": 1, "network": name, "options": options,
                      "shape": list(shape), "num_classes": num_classes,
                      "sigma_data": sigma_data,
                      "state_dict": {k: v.cpu() for k, v in net.state_dict().items()}})


def config_from_example(example: Path, tmp: Path, device: str, iters: int, batch, sets: dict,
                        image_shape=None, log_every: int | None = None,
                        precond: str = "ctm") -> str:
    """The bench config of an example: its [network], [diffusion] and [distill] as they are."""
    raw = tomllib.loads(example.read_text())
    data = raw.get("data", {})
    fmt = data.get("format")
    if image_shape is None:
        if fmt not in DATA_SHAPES:
            raise SystemExit(f"{example}: [data] format {fmt!r}: pass --image-shape H,W,C[,K]")
        (hwc, classes) = DATA_SHAPES[fmt]
    else:
        hwc, classes = tuple(image_shape[:3]), (image_shape[3] if len(image_shape) > 3 else 0)
    if not data.get("conditional", True):
        classes = 0
    rng = np.random.default_rng(0)
    n = 512
    arrays = {"x": rng.integers(0, 256, (n, *hwc)).astype(np.uint8)}
    if classes:
        arrays["y"] = np.arange(n) % classes
    np.savez(tmp / "data.npz", **arrays)
    network = dict(raw.get("network", {}))
    diffusion = dict(raw.get("diffusion", {}))
    sd = float(diffusion.get("sigma_data", 0.5))
    write_random_teacher(tmp / "teacher.pt", network, (hwc[2], hwc[0], hwc[1]), classes, sd)
    d = dict(raw.get("distill", {}))
    d.update(iterations=iters, checkpoint_every=iters, log_every=log_every or iters, eval=[],
             eval_every=10 ** 9)
    if batch:
        d["batch_size"] = batch
        d.pop("micro_batch", None)
    if d.get("distance") == "lpips":
        hub = Path(torch.hub.get_dir()) / "checkpoints" / "vgg16-397923af.pth"
        if not (d.get("lpips_weights") or hub.is_file()):
            d["lpips_random"] = True          # same network, same cost
    d.update(sets)
    tables = {"run": {"out_dir": "out", "stages": STAGES[precond], "device": device},
              "data": {"format": "array", "path": str(tmp / "data.npz")},
              "network": network, "teacher": {"kind": "network", "path": str(tmp / "teacher.pt")},
              "precond": {"name": precond}, "distill": d}
    if precond == "analytic":        # a small table: it only has to exist
        tables["coefficients"] = {"n_timesteps": 16, "n_samples": 16, "batch": 16,
                                  "dtype": "float32", "path": str(tmp / "coefficients.h5")}
    if diffusion:
        tables["diffusion"] = diffusion
    return dump_toml(tables)


def host_reads_per_step(text, folder: Path, k1: int = 2, k2: int = 5,
                        cuda: bool = False) -> float | tuple[float, float]:
    """The device syncs a distill step makes on a GPU, counted on any device: the host
    read-backs of tensor values (HOST_READS, from torch.profiler's op events) per iteration,
    as the difference of a k2- and a k1-iteration run over k2 - k1 (start-up, the evaluations
    and the one log row and checkpoint at the end cancel). `text(n)`: the config of an
    n-iteration run, logging and checkpointing only at its end. Not seen: copies to the host
    (.cpu(), no-ops on the CPU) and, on the CPU, which tensors would be on the GPU (reads of
    host tensors count too, except torch.optim's own, see _in_optimizer_step).

    With `cuda`: (that count, the synchronizing CUDA calls per iteration that
    torch.cuda.set_sync_debug_mode reports, copies included)."""
    import warnings

    from torch.profiler import ProfilerActivity, profile

    counts, syncs = [], []
    for k in (k1, k2):
        d = folder / f"reads{k}"
        d.mkdir()
        (d / "c.toml").write_text(text(k))
        with contextlib.redirect_stdout(io.StringIO()), \
                profile(activities=[ProfilerActivity.CPU]) as prof, \
                warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if cuda:
                torch.cuda.set_sync_debug_mode("warn")
            try:
                run_config(d / "c.toml")
            finally:
                if cuda:
                    torch.cuda.set_sync_debug_mode(0)
        counts.append(sum(1 for e in prof.events()
                          if e.name in HOST_READS and not _in_optimizer_step(e)))
        syncs.append(sum("synchroniz" in str(w.message) for w in caught))
    reads = (counts[1] - counts[0]) / (k2 - k1)
    return (reads, (syncs[1] - syncs[0]) / (k2 - k1)) if cuda else reads


def _in_optimizer_step(event) -> bool:
    """Inside torch.optim's step (its record_function "Optimizer.step#..."): there an unfused
    optimiser reads its per-parameter step counters, which torch keeps on the host (also on
    a GPU), so those reads are no device syncs."""
    while event is not None:
        if event.name.startswith("Optimizer.step#"):
            return True
        event = event.cpu_parent
    return False


def measure(config: str | None = None, device: str = "cpu", iters: int = 60, batch=None,
            width: int = 256, sets: dict | None = None, image_shape=None,
            precond: str = "ctm", count_reads: bool = True) -> dict:
    """Step time, samples/s, peak memory, floor and overhead of one configuration. The step
    time is the steady state's: one run of 2 x `iters` iterations, 1 / the it_per_s that
    metrics.csv logs over its last `iters` (which leaves out evaluations, checkpoints and the
    first iterations' warm-up: imports, torch.compile, the caching allocator). With
    `count_reads`, also the host read-backs per step (`host_reads_per_step`)."""
    from core.host.config import parse_config
    from core.pipeline.stages import Run
    from core.train.students import build_student
    from plugins.losses import CMLoss, CTMLoss, DSMLoss, make_distance

    sets = dict(sets or {})
    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if config is None:
            extra = "".join(f"{k} = {_toml_value(v)}\n" for k, v in sets.items())
            text = lambda n, log: CONFIG.format(width=width, iters=n, batch=batch or 128,
                                                device=device, extra=extra, log=log,
                                                precond=precond,
                                                stages=_toml_value(STAGES[precond]))
        else:
            text = lambda n, log: config_from_example(Path(config), tmp, device, n, batch, sets,
                                                      image_shape, log, precond)
        cfg = tmp / "c.toml"
        cfg.write_text(text(2 * iters, iters))
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        with contextlib.redirect_stdout(io.StringIO()):
            run_config(cfg)
            peak = (torch.cuda.max_memory_allocated() if cuda else
                    resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
            import csv
            with open(tmp / "out" / "metrics.csv", newline="") as fh:
                rows = [r for r in csv.DictReader(fh) if r.get("it_per_s")]
            step = 1.0 / float(rows[-1]["it_per_s"])
        reads = syncs = None
        if count_reads:
            reads = host_reads_per_step(lambda n: text(n, n), tmp, cuda=cuda)
            if cuda:
                reads, syncs = reads

        run = Run(parse_config(tomllib.loads(cfg.read_text()), cfg), progress=False)
        d = run.cfg.distill
        B = d.batch_size
        prec = d.precision if cuda else "fp32"
        autocast = (torch.autocast("cuda", dtype=torch.bfloat16 if prec == "bf16"
                                   else torch.float16) if prec != "fp32"
                    else contextlib.nullcontext())
        net = build_student(run).to(device)
        tgt = build_student(run).to(device).requires_grad_(False)
        teacher = run.teacher.denoiser(torch.float32, device)
        shape, classes = tuple(run.teacher.shape), run.teacher.num_classes
        g = torch.Generator().manual_seed(0)
        x = torch.randn((B, *shape), generator=g).to(device)
        t = (torch.rand(B, generator=g) * 10 + 0.01).to(device)
        y = torch.randint(0, classes, (B,), generator=g).to(device) if classes else None
        loss = run_loss(run)
        dsm_on = not isinstance(loss, DSMLoss) and d.dsm_weight != 0.0
        m = 2 if dsm_on else 1
        xm, tm = torch.cat([x] * m), torch.cat([t] * m)
        ym = torch.cat([y] * m) if y is not None else None

        def fwd_bwd_student():
            net.zero_grad(set_to_none=True)
            with autocast:
                out = net(xm, tm, tm, ym).float()
            out.square().mean().backward()

        def fwd_target():
            with torch.no_grad(), autocast:
                tgt(x, t, t, y)

        def fwd_bwd_input_target():
            xi = x.clone().requires_grad_(True)
            with autocast:
                out = tgt(xi, t, t, y).float()
            out.square().mean().backward()

        def teacher_pass():
            with torch.no_grad(), autocast:
                teacher(x, t, y)

        order = 2 if d.solver == "heun" else 1
        if isinstance(loss, CTMLoss):
            draws = loss.draw(torch.Generator().manual_seed(0), torch.zeros(100_000, 1), d.N)
            mean_steps = float((draws["k"] - draws["n"]).float().mean())
            n_tf, n_tb = 2, 1
        elif isinstance(loss, CMLoss):
            mean_steps, n_tf, n_tb = 1.0, 1, 0
        else:
            mean_steps, n_tf, n_tb = 0.0, 0, 0
        floor = (timed(fwd_bwd_student, sync=sync) + n_tf * timed(fwd_target, sync=sync)
                 + (n_tb * timed(fwd_bwd_input_target, sync=sync) if n_tb else 0.0)
                 + (order * mean_steps * timed(teacher_pass, sync=sync) if mean_steps else 0.0))
        if d.distance == "lpips" and not isinstance(loss, DSMLoss):
            dist = make_distance(d, device)
            a = torch.rand((B, *shape), generator=g).to(device) * 2 - 1

            def lpips_pass():
                ai = a.clone().requires_grad_(True)
                with autocast:
                    v = dist(ai, x.clamp(-1, 1)).float()
                v.mean().backward()
            floor += timed(lpips_pass, sync=sync)
    return {"step_s": step, "it_per_s": 1 / step, "samples_per_s": B / step, "floor_s": floor,
            "overhead": step / floor - 1, "peak_bytes": peak, "peak_kind":
            "CUDA max allocated" if cuda else "process max RSS", "batch": B,
            "mean_steps": mean_steps, "precision": prec, "host_reads": reads, "cuda_syncs": syncs,
            "precond": precond,
            "device": torch.cuda.get_device_name(0) if cuda else "CPU",
            "network": dict(run.cfg.network.data), "options": sets}


def run_loss(run):
    from core.host import plugins
    return plugins.create("loss", run.cfg.sections["distill"], run.ctx, "loss",
                          run.cfg.distill.loss)


def report(r: dict, what: str) -> str:
    return (f"step time          {r['step_s'] * 1e3:9.2f} ms   ({r['samples_per_s']:,.0f} "
            f"samples/s, {r['it_per_s']:.2f} it/s, batch {r['batch']})\n"
            f"floor (bare passes){r['floor_s'] * 1e3:9.2f} ms   (teacher steps per sample: "
            f"{r['mean_steps']:.2f})\n"
            f"peak memory        {r['peak_bytes'] / 2 ** 20:9.1f} MiB ({r['peak_kind']})\n"
            + (f"host reads / step  {r['host_reads']:9.2f}      (tensor values read back on "
               f"the host: a device sync each on a GPU)\n" if r.get("host_reads") is not None
               else "")
            + (f"CUDA syncs / step  {r['cuda_syncs']:9.2f}      (torch.cuda.set_sync_debug_mode, "
               f"copies included)\n" if r.get("cuda_syncs") is not None else "")
            + f"overhead           {100 * r['overhead']:9.1f} %    (step / floor = "
            f"{1 + r['overhead']:.2f}x; {what})")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--batch", type=int, default=None, help="default: 128, or the config's")
    ap.add_argument("--iters", type=int, default=60)
    ap.add_argument("--device", default="cpu", help="cpu | cuda")
    ap.add_argument("--config", default=None, help="an example config, e.g. "
                                                    "examples/fashion_mnist.toml")
    ap.add_argument("--image-shape", default=None,
                    help="H,W,C[,classes] of --config's data, when its format is not known")
    ap.add_argument("--precond", default="ctm", choices=sorted(STAGES),
                    help="the preconditioning (analytic: backward, a small coefficient table "
                         "first)")
    ap.add_argument("--no-reads", action="store_true",
                    help="skip counting the host read-backs per step (two short profiled runs)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a [distill] key (TOML value), e.g. solve_buckets=4")
    args = ap.parse_args(argv)
    if args.iters < 2:
        ap.error("--iters must be at least 2")
    if args.config and not Path(args.config).is_file():
        ap.error(f"--config {args.config}: no such file")
    shape = [int(v) for v in args.image_shape.split(",")] if args.image_shape else None
    r = measure(args.config, args.device, args.iters, args.batch, args.width,
                parse_sets(args.set), shape, args.precond, not args.no_reads)
    print(f"# {_common.command_line()}")
    what = (f"{args.config}, network {r['network']}" if args.config else
            f"gmm teacher + MLP residual (width {args.width}, depth 4)")
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, {r['device']}, "
          f"{r['precision']}; {what}; precond {r['precond']}; options {r['options'] or 'none'}")
    print(report(r, args.config or "default config"))
    return r


if __name__ == "__main__":
    main()
