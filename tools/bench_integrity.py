"""Cost of the whole-file digests of exported jumpers (core/base/integrity.py), against the load.

Exports a TorchScript jumper of an MLP network of about --mb MiB of weights, then times, best
of --repeats: ``check_archive`` (the whole-archive digest, what a load adds), the whole
``core.export.jumper.load`` (read, digest, TorchScript load, payload digest, probe), and ``sha256`` of
the file's bytes (the floor of any whole-file digest, and the cost of a ``.pt2`` sidecar check).
With the binary (build/ctm_sample), also ctm_sample's own ``--timing`` load figure.

    python tools/bench_integrity.py [--mb 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import hashlib
import re
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Optional

import _common
import torch
from torch import Tensor, nn

from core.base.integrity import check_archive
from core.export.jumper import Jumper, export, load, make_meta
from plugins.preconditionings import CTMPrecond

ROOT = Path(_common.__file__).resolve().parent.parent


class Wide(nn.Module):
    """F(x, t, s) for 2-D x through `layers` square layers of `width`."""

    def __init__(self, width: int, layers: int):
        super().__init__()
        self.inp = nn.Linear(4, width)
        self.hidden = nn.ModuleList(nn.Linear(width, width) for _ in range(layers))
        self.out = nn.Linear(width, 2)

    def forward(self, x: Tensor, t: Tensor, s: Tensor,
                class_labels: Optional[Tensor] = None) -> Tensor:
        h = self.inp(torch.cat([x, t.reshape(-1, 1), s.reshape(-1, 1)], dim=1))
        for layer in self.hidden:
            h = torch.tanh(layer(h))
        return self.out(h)


def best_of(n: int, fn) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mb", type=float, default=64.0, help="MiB of float32 weights")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    width = 1024
    layers = max(1, int(args.mb * 2 ** 20 / (4 * width * width)))
    P = CTMPrecond()
    meta = make_meta(P, sigma_data=0.5, t_min=0.002, t_max=80.0, rho=7.0, shape=[2],
                     num_classes=0, dtype="float32")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "jumper.pt"
        export(Jumper(Wide(width, layers), P, 0.5), path, meta)
        data = path.read_bytes()
        size = len(data) / 2 ** 20
        t_digest = best_of(args.repeats, lambda: check_archive(data, str(path)))
        t_sha = best_of(args.repeats, lambda: hashlib.sha256(data).hexdigest())
        t_load = best_of(args.repeats, lambda: load(path))
        print(f"jumper: {size:.1f} MiB ({layers} layers of {width}x{width})")
        print(f"whole-archive digest (check_archive): {t_digest * 1e3:.1f} ms "
              f"({size / t_digest:.0f} MiB/s)")
        print(f"sha256 of the file's bytes (.pt2 sidecar check): {t_sha * 1e3:.1f} ms")
        print(f"core.export.jumper.load in all: {t_load * 1e3:.1f} ms "
              f"(the digest is {100 * t_digest / t_load:.0f}% of it)")
        binary = ROOT / "build" / "ctm_sample"
        if binary.is_file():
            loads = []
            for _ in range(args.repeats):
                proc = subprocess.run([str(binary), "--model", str(path), "--out",
                                       str(Path(tmp) / "x.npy"), "--num", "1", "--warmup", "0",
                                       "--timing", "--quiet"], capture_output=True, text=True)
                m = re.search(r"load=([0-9.]+)s", proc.stderr)
                if m:
                    loads.append(float(m.group(1)))
            if loads:
                print(f"ctm_sample --timing load (read, digest, load): {min(loads) * 1e3:.1f} ms")
    print(f"command: python tools/bench_integrity.py --mb {args.mb:g} --repeats {args.repeats}")


if __name__ == "__main__":
    main()
