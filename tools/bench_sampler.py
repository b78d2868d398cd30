"""Per-sample cost of CTM sampling: Python eager vs Python TorchScript vs the C++ ctm_sample,
against the floor "bare network forward x NFE".

    PYTHONPATH=. python tools/bench_sampler.py      # ~20 s on 2 idle cores, < 2 min on busy ones

The jumper wraps a real MLP network F(x, t, s) (d=64 inputs, width 1024, 4 linear layers by
default) with CTM's preconditioning. Each sampler draws --num samples in batches of --batch
with --steps jumps (NFE = steps per sample):

* floor:               the network alone, one forward of a batch, times NFE (eager, no grad);
* python eager:        core.sampling.draw with the nn.Module jumper;
* python torchscript:  core.sampling.draw with the exported file loaded by core.jumper.load;
* ctm_sample:          the C++ binary on the same file; its own --timing figures: the sampling
                       loop (no process start, model load or file writing), the same without
                       the first batch (which carries TorchScript's profiling runs; the Python
                       samplers are warmed up before timing), and, for reference, the whole
                       process wall time.

Every figure is the best of --reps rounds (fewer when --max-seconds runs out); each round runs
every method once, so that load spikes on a shared machine hit all alike. All runs use the same
number of threads. On a busy machine with 2 threads per run, OpenMP's spinning makes every
figure noisy; --threads 1 is steadier there.
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

from core.jumper import Jumper, export, load, make_meta  # noqa: E402
from core.sampling import draw  # noqa: E402
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
        py_run(jumper_dev)()                      # warm-up (allocator, TorchScript profiling)
        py_run(scripted)()

        cmd = [binary, "--model", str(path), "--out", str(Path(tmp) / "samples.npy"),
               "--steps", str(args.steps), "--num", str(args.num), "--batch", str(args.batch),
               "--seed", "0", "--device", device, "--threads", str(threads), "--timing",
               "--quiet"]

        def cpp_run() -> tuple[float, float, float]:
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            wall = time.perf_counter() - t0
            if proc.returncode != 0:
                raise SystemExit(proc.stderr)
            loop = float(re.search(r" sample=([0-9.eE+-]+)s", proc.stderr).group(1))
            warm = float(re.search(r" warm_per_sample=([0-9.eEna+-]+)s", proc.stderr).group(1))
            return loop, warm, wall

        # Round-robin over the methods, best of --reps: load spikes on a shared machine then
        # hit every method alike.
        best = dict.fromkeys(("floor", "eager", "script", "cpp_loop", "cpp_warm", "cpp_wall"),
                             math.inf)
        rounds, start = 0, time.perf_counter()
        while rounds < args.reps and (rounds == 0 or
                                      time.perf_counter() - start < args.max_seconds):
            rounds += 1
            best["floor"] = min(best["floor"], best_of(1, forward_batch) / 20 * nfe / args.batch)
            best["eager"] = min(best["eager"], best_of(1, py_run(jumper_dev)) / args.num)
            best["script"] = min(best["script"], best_of(1, py_run(scripted)) / args.num)
            loop, warm, wall = cpp_run()
            best["cpp_loop"] = min(best["cpp_loop"], loop / args.num)
            if not math.isnan(warm):
                best["cpp_warm"] = min(best["cpp_warm"], warm)
            best["cpp_wall"] = min(best["cpp_wall"], wall / args.num)

    print(f"command: {shlex.join([sys.executable] + sys.argv)}")
    print(f"ctm_sample: {shlex.join(cmd).replace(tmp, '$TMP')}")
    print(f"device {device}, {threads} threads; MLP d={args.dim}, width {args.width}, "
          f"{args.layers} layers; batch {args.batch}, {args.num} samples, NFE {nfe}; "
          f"best of {rounds} round(s)")
    print(f"{'method':<34}{'ms/sample':>12}{'x floor':>10}")
    floor = best["floor"]
    rows = [("floor (network forward x NFE)", floor),
            ("python eager (nn.Module)", best["eager"]),
            ("python torchscript (loaded file)", best["script"]),
            ("ctm_sample (sampling loop)", best["cpp_loop"]),
            ("ctm_sample (loop after 1st batch)", best["cpp_warm"]),
            ("ctm_sample (whole process)", best["cpp_wall"])]
    for name, value in rows:
        print(f"{name:<34}{value * 1e3:>12.4f}{value / floor:>10.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
