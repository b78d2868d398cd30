"""Per-sample cost of CTM sampling: Python (eager, TorchScript, AOTInductor) vs the C++
ctm_sample (TorchScript .pt and AOTInductor .pt2), against the floor "bare network forward x NFE".

    PYTHONPATH=. python tools/bench_sampler.py      # ~1 min on 2 idle cores (AOTI compile ~20 s)

The jumper wraps a real MLP network F(x, t, s) (d=64 inputs, width 1024, 4 linear layers by
default) with CTM's preconditioning. Each sampler draws --num samples in batches of --batch
with --steps jumps (NFE = steps per sample):

* floor:               the network alone, one forward of a batch, times NFE (eager, no grad);
* python eager:        core.export.sampling.draw with the nn.Module jumper;
* python torchscript:  core.export.sampling.draw with the exported .pt loaded by core.export.jumper.load;
* python aoti:         core.export.sampling.draw with the .pt2 (core.export.aoti.export_aoti) loaded by
                       core.export.aoti.load_aoti;
* ctm_sample .pt/.pt2: the C++ binary on the same files; its own --timing figures: the sampling
                       loop (no process start, model load, warm-up or file writing), the same
                       without the first batch, and, for reference, the whole process wall time.
                       ctm_sample warms the jumper up before its loop (--warmup, default 2
                       jumps); the ".pt --warmup 0" row shows the loop without it, where the
                       first batch carries TorchScript's profiling runs. The Python samplers are
                       warmed up by an untimed first run.

Every figure is the best of --reps rounds (fewer when --max-seconds runs out); each round runs
every method once, so that load spikes on a shared machine hit all alike. All runs use the same
number of threads. On a busy machine with 2 threads per run, OpenMP's spinning makes every
figure noisy; --threads 1 is steadier there. --no-aoti leaves the AOTInductor rows out.
"""

from __future__ import annotations

import argparse
import math
import re
import shlex
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from core.export.aoti import export_aoti, load_aoti  # noqa: E402
from core.export.jumper import Jumper, export, load, make_meta  # noqa: E402
from core.export.sampling import draw  # noqa: E402
from plugins.preconditionings import CTMPrecond  # noqa: E402
from plugins.samplers import CTMSampler  # noqa: E402

warnings.filterwarnings("ignore", category=FutureWarning)   # TorchScript deprecation


class MLP(nn.Module):
    """F(x, t, s): an MLP on [x, log t / 4, log s / 4] with SiLU activations."""

    def __init__(self, dim: int, width: int, layers: int):
        super().__init__()
        sizes = [dim + 2] + [width] * (layers - 1) + [dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes, sizes[1:]))
        self.dim = dim

    def forward(self, x: Tensor, t: Tensor, s: Tensor,
                class_labels: Optional[Tensor] = None) -> Tensor:
        B = x.shape[0]
        h = torch.cat([x.reshape(B, self.dim), torch.log(t).reshape(B, 1) / 4,
                       torch.log(s).reshape(B, 1) / 4], dim=1)
        n = len(self.layers)
        for i, layer in enumerate(self.layers):
            h = layer(h)
            if i + 1 < n:
                h = torch.nn.functional.silu(h)
        return h.reshape(x.shape)


def best_of(reps: int, fn) -> float:
    best = math.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--num", type=int, default=2048, help="samples per run (default 2048)")
    ap.add_argument("--batch", type=int, default=64, help="batch size (default 64)")
    ap.add_argument("--steps", type=int, default=4, help="jumps = NFE per sample (default 4)")
    ap.add_argument("--dim", type=int, default=64, help="data dimension (default 64)")
    ap.add_argument("--width", type=int, default=1024, help="MLP width (default 1024)")
    ap.add_argument("--layers", type=int, default=4, help="linear layers (default 4)")
    ap.add_argument("--reps", type=int, default=5, help="runs per method, best kept (default 5)")
    ap.add_argument("--max-seconds", type=float, default=60.0,
                    help="start no new round after this many seconds (default 60; at least one "
                         "round runs)")
    ap.add_argument("--threads", type=int, default=0,
                    help="CPU threads for every method (default: torch's default)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    ap.add_argument("--no-aoti", action="store_true",
                    help="leave out the AOTInductor (.pt2) rows (no compile)")
    args = ap.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    device = args.device

    build = subprocess.run([sys.executable, str(ROOT / "tools" / "build_cpp.py"), "--quiet"],
                           cwd=ROOT, capture_output=True, text=True)
    if build.returncode != 0:
        sys.stderr.write(build.stdout + build.stderr)
        return 1
    binary = build.stdout.strip().splitlines()[-1]

    torch.manual_seed(0)
    net = MLP(args.dim, args.width, args.layers).eval()
    precond = CTMPrecond()
    jumper = Jumper(net, precond, 0.5).eval()
    meta = make_meta(precond, sigma_data=0.5, t_min=0.002, t_max=80.0, rho=7.0,
                     shape=[args.dim], num_classes=0, dtype="float32")
    sampler = CTMSampler(0.0)
    ts = sampler.timesteps(args.steps, meta["t_min"], meta["t_max"], meta["rho"])
    nfe = args.steps

    with tempfile.TemporaryDirectory(prefix="ctm_bench_") as tmp:
        path = Path(tmp) / "jumper.pt"
        export(jumper, path, meta)
        scripted, _ = load(path, device)
        path2 = Path(tmp) / "jumper.pt2"
        aoti = None
        if not args.no_aoti:
            export_aoti(jumper.to(device), path2, meta)
            aoti, _ = load_aoti(path2, device)
        jumper_dev = jumper.to(device)

        # floor: the bare network forward on one batch, times NFE per sample
        x = torch.randn(args.batch, args.dim, device=device)
        t = torch.full((args.batch,), 1.0, device=device)

        def forward_batch():
            with torch.inference_mode():
                for _ in range(20):
                    net(x, t, t)
                sync(device)
        forward_batch()                           # warm-up

        def py_run(module):
            def go():
                draw(module, meta, sampler, ts, args.num, args.batch, 0, device,
                     progress=False)
            return go
        py_methods = {"eager": jumper_dev, "script": scripted}
        if aoti is not None:
            py_methods["py_aoti"] = aoti
        for module in py_methods.values():
            py_run(module)()                      # warm-up (allocator, TorchScript profiling)

        def cpp_cmd(model: Path, *extra: str) -> list[str]:
            return [binary, "--model", str(model), "--out", str(Path(tmp) / "samples.npy"),
                    "--steps", str(args.steps), "--num", str(args.num), "--batch",
                    str(args.batch), "--seed", "0", "--device", device, "--threads",
                    str(threads), "--timing", "--quiet", *extra]

        def cpp_run(cmd) -> tuple[float, float, float]:
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            wall = time.perf_counter() - t0
            if proc.returncode != 0:
                raise SystemExit(proc.stderr)
            loop = float(re.search(r" sample=([0-9.eE+-]+)s", proc.stderr).group(1))
            warm = float(re.search(r" warm_per_sample=([0-9.eEna+-]+)s", proc.stderr).group(1))
            return loop, warm, wall

        cpp_methods = {"pt": cpp_cmd(path), "pt_nowarm": cpp_cmd(path, "--warmup", "0")}
        if aoti is not None:
            cpp_methods["pt2"] = cpp_cmd(path2)

        # Round-robin over the methods, best of --reps: load spikes on a shared machine then
        # hit every method alike.
        best: dict[str, float] = {}

        def keep(key: str, value: float) -> None:
            if not math.isnan(value):
                best[key] = min(best.get(key, math.inf), value)

        rounds, start = 0, time.perf_counter()
        while rounds < args.reps and (rounds == 0 or
                                      time.perf_counter() - start < args.max_seconds):
            rounds += 1
            keep("floor", best_of(1, forward_batch) / 20 * nfe / args.batch)
            for key, module in py_methods.items():
                keep(key, best_of(1, py_run(module)) / args.num)
            for key, cmd in cpp_methods.items():
                loop, warm, wall = cpp_run(cmd)
                keep(f"{key}_loop", loop / args.num)
                keep(f"{key}_warm", warm)
                keep(f"{key}_wall", wall / args.num)

    print(f"command: {shlex.join([sys.executable] + sys.argv)}")
    for key, cmd in cpp_methods.items():
        print(f"ctm_sample: {shlex.join(cmd).replace(tmp, '$TMP')}")
    print(f"device {device}, {threads} threads; MLP d={args.dim}, width {args.width}, "
          f"{args.layers} layers; batch {args.batch}, {args.num} samples, NFE {nfe}; "
          f"best of {rounds} round(s)")
    print(f"{'method':<40}{'ms/sample':>12}{'x floor':>10}")
    floor = best["floor"]
    rows = [("floor (network forward x NFE)", "floor"),
            ("python eager (nn.Module)", "eager"),
            ("python torchscript (.pt)", "script"),
            ("python aoti (.pt2)", "py_aoti"),
            ("ctm_sample .pt (sampling loop)", "pt_loop"),
            ("ctm_sample .pt (loop after 1st batch)", "pt_warm"),
            ("ctm_sample .pt --warmup 0 (loop)", "pt_nowarm_loop"),
            ("ctm_sample .pt --warmup 0 (after 1st)", "pt_nowarm_warm"),
            ("ctm_sample .pt2 (sampling loop)", "pt2_loop"),
            ("ctm_sample .pt2 (loop after 1st batch)", "pt2_warm"),
            ("ctm_sample .pt (whole process)", "pt_wall"),
            ("ctm_sample .pt2 (whole process)", "pt2_wall")]
    for name, key in rows:
        if key in best:
            value = best[key]
            print(f"{name:<40}{value * 1e3:>12.4f}{value / floor:>10.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
