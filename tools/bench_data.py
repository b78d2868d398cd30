"""Paper-scale data: memory, batch gathers and store builds of the uint8 image store.

    python tools/bench_data.py --images 100000 --resolution 64
    python tools/bench_data.py --images 1281167 --resolution 64 --zip-images 20000

Builds a synthetic dataset of N uint8 images [N, 3, R, R] (a .npy written chunk by chunk, and
a smaller EDM dataset_tool zip of --zip-images PNGs) in --work, then prints, each with its
command:

1. the peak anonymous memory (RssAnon of /proc/self/status, sampled every 5 ms) of a process
   that runs 3 distillation iterations on the .npy (``[data] format = "array"``: memory-mapped),
   against the same run on the first 1,000 images, and the dataset's uint8 / float32 sizes;
2. the batch gather rate from a warm page cache: --batch random rows of the map, converted to
   float32 [-1, 1] (``Dataset.rows``), on one core (torch threads = 1);
3. the store build rate of the zip (``[data] format = "edm"``) per worker count.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import _common

ROOT = _common.ROOT

#: the process whose peak RssAnon figure 1 reports: core.run with a sampling thread
PEAK_RUNNER = r"""
import sys, threading, time
sys.path.insert(0, {root!r})
peak = [0]
def anon():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
def watch():
    while True:
        peak[0] = max(peak[0], anon())
        time.sleep(0.005)
threading.Thread(target=watch, daemon=True).start()
from core.run import main
rc = main([{config!r}, "--no-progress"])
peak[0] = max(peak[0], anon())
print("PEAK_RSS_ANON", peak[0], rc, flush=True)
sys.exit(rc)
"""

CONFIG = """
[run]
out_dir = "{out}"
stages = ["distill"]
seed = 0
[diffusion]
t_min = 0.002
t_max = 80.0
[data]
format = "array"
path = "{data}"
range = "byte"
hflip = true
{limit}
[network]
name = "unet"
model_channels = 8
channel_mult = [1]
num_blocks = 1
attn_resolutions = []
[teacher]
kind = "gmm"
weights = [1.0]
means = [[{zeros}]]
stds = [0.5]
shape = [3, {r}, {r}]
[precond]
name = "ctm"
[distill]
iterations = 3
batch_size = 8
N = 8
max_ode_steps = 2
checkpoint_every = 100
log_every = 1
eval = []
"""


def write_npy(path: Path, n: int, r: int, chunk: int = 8192) -> None:
    """A uint8 [n, 3, r, r] .npy of random images, written chunk by chunk (bounded memory)."""
    import numpy as np

    if path.exists() and np.load(path, mmap_mode="r").shape == (n, 3, r, r):
        return
    tmp = path.with_suffix(".tmp.npy")
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(n, 3, r, r))
    rng = np.random.default_rng(0)
    for i in range(0, n, chunk):
        out[i:i + chunk] = rng.integers(0, 256, (min(chunk, n - i), 3, r, r), dtype=np.uint8)
    out.flush()
    del out
    os.replace(tmp, path)


def write_zip(path: Path, n: int, r: int) -> None:
    """An EDM dataset_tool zip of n random r x r RGB PNGs (stored, as dataset_tool writes)."""
    import io
    import zipfile

    import numpy as np
    from PIL import Image

    if path.exists():
        return
    tmp = path.with_suffix(".tmp.zip")
    rng = np.random.default_rng(1)
    labels = []
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as z:
        for i in range(n):
            name = f"{i // 1000:05d}/img{i:08d}.png"
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (r, r, 3), dtype=np.uint8)).save(buf, "png")
            z.writestr(name, buf.getvalue())
            labels.append([name, i % 1000])
        z.writestr("dataset.json", json.dumps({"labels": labels}))
    os.replace(tmp, path)


def peak_anon(work: Path, data: Path, r: int, limit: int | None) -> int:
    """Peak RssAnon (bytes) of a 3-iteration distill run on `data` (its first `limit`)."""
    name = f"run-{limit or 'all'}"
    out = work / name
    shutil.rmtree(out, ignore_errors=True)
    cfg = work / f"{name}.toml"
    cfg.write_text(textwrap.dedent(CONFIG.format(
        out=out, data=data, r=r, limit=f"limit = {limit}" if limit else "",
        zeros=", ".join(["0.0"] * (3 * r * r)))))
    code = PEAK_RUNNER.format(root=str(ROOT), config=str(cfg))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)))
    line = next((ln for ln in res.stdout.splitlines() if ln.startswith("PEAK_RSS_ANON")), None)
    if res.returncode != 0 or line is None:
        sys.exit(f"error: the distill run failed:\n{res.stderr[-3000:]}")
    return int(line.split()[1])


def gather_rate(data: Path, batch: int, repeats: int) -> tuple[float, float]:
    """(median ms per batch of uint8 rows, median ms of float32 rows on the CPU) for `batch`
    random rows of the map (``ImageStore.gather``, ``Dataset.rows``), warm page cache."""
    import types

    import torch

    from core.host.config import Section
    from core.data.datasets import load

    torch.set_num_threads(1)
    ds = load(Section("data", {"format": "array", "path": str(data), "range": "byte",
                               "hflip": True}, "bench", data.parent),
              types.SimpleNamespace(base_dir=data.parent))
    g = torch.Generator().manual_seed(0)

    def median(fn) -> float:
        for _ in range(3):                               # warm the page cache and the code
            fn(*ds.draw(batch, g))
        times = []
        for _ in range(repeats):
            idx, flip = ds.draw(batch, g)
            t0 = time.perf_counter()
            fn(idx, flip)
            times.append(time.perf_counter() - t0)
        return sorted(times)[len(times) // 2] * 1e3
    return median(lambda idx, flip: ds.store.gather(idx)), median(ds.rows)


def build_rate(zip_path: Path, work: Path, workers: int) -> float:
    """Images per second of building the zip's store with `workers` processes (cold store)."""
    import types

    from core.host.config import Section
    from core.data.datasets import load

    cache = work / f"cache-{workers}"
    shutil.rmtree(cache, ignore_errors=True)
    t0 = time.perf_counter()
    ds = load(Section("data", {"format": "edm", "path": str(zip_path), "workers": workers,
                               "cache_dir": str(cache)}, "bench", work),
              types.SimpleNamespace(base_dir=work, progress=False))
    rate = len(ds) / (time.perf_counter() - t0)
    shutil.rmtree(cache, ignore_errors=True)
    return rate


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=100_000)
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--zip-images", type=int, default=None,
                    help="images in the zip (default: min(--images, 10000))")
    ap.add_argument("--batch", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--work", type=Path, default=Path("/tmp/ctmkit-bench-data"))
    ap.add_argument("--skip", nargs="*", default=[], choices=("memory", "gather", "build"))
    args = ap.parse_args(argv)
    n, r = args.images, args.resolution
    args.work.mkdir(parents=True, exist_ok=True)
    cmd = _common.command_line()
    u8, f32 = n * 3 * r * r, n * 3 * r * r * 4
    free = shutil.disk_usage(args.work).free
    if free < u8 * 1.1:
        sys.exit(f"error: {args.work}: {free / 1e9:.1f} GB free, the .npy needs {u8 / 1e9:.1f}")
    data = args.work / f"images-{n}-{r}.npy"
    t0 = time.perf_counter()
    write_npy(data, n, r)
    print(f"[bench_data] {data}: {n} x 3 x {r} x {r} uint8 ({u8 / 1e9:.2f} GB; float32 "
          f"{f32 / 1e9:.2f} GB), ready in {time.perf_counter() - t0:.0f} s", flush=True)
    if "memory" not in args.skip:
        small, big = peak_anon(args.work, data, r, 1000), peak_anon(args.work, data, r, None)
        print(f"peak RssAnon, 3 distill iterations: {big / 1e9:.3f} GB on {n} images vs "
              f"{small / 1e9:.3f} GB on 1000 (+{(big - small) / 1e9:.3f} GB; the dataset is "
              f"{u8 / 1e9:.2f} GB uint8, {f32 / 1e9:.2f} GB float32; target: within 0.5 GB)"
              f"   [{cmd}]", flush=True)
    if "gather" not in args.skip:
        ms, ms_float = gather_rate(data, args.batch, args.repeats)
        print(f"batch gather (warm page cache, 1 thread): {args.batch} uint8 images of {r}x{r} "
              f"in {ms:.1f} ms = {args.batch / ms * 1e3:,.0f} images/s (target: < 20 ms, "
              f"> 100,000 images/s); converted to float32 and flipped on the CPU (on a GPU this "
              f"happens on the device): {ms_float:.1f} ms   [{cmd}]", flush=True)
    if "build" not in args.skip:
        zn = args.zip_images or min(n, 10_000)
        zip_path = args.work / f"edm-{zn}-{r}.zip"
        write_zip(zip_path, zn, r)
        for w in args.workers:
            rate = build_rate(zip_path, args.work, w)
            print(f"store build from an EDM zip of {zn} PNGs ({r}x{r}): {rate:,.0f} images/s "
                  f"with {w} worker(s) ({os.cpu_count()} cores)   [{cmd}]", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
