"""Cost of Analytic-Precond coefficient estimation, in teacher forward-equivalents.

For a network teacher (an MLP denoiser, EDM-preconditioned) and the analytic GMM teacher, times
the estimation of l_t and s_t (one forward and a two-tangent JVP per time step and sample,
see core/coefficients/estimate.py) and divides by the time of one plain forward pass over the same
samples, measured in the same run. Target: at most 6 forward-equivalents per (t x sample).

    python tools/bench_coefficients.py [--dim 64] [--width 512] [--samples 2048] [--times 8]
"""

from __future__ import annotations

import argparse
import time

import _common
import numpy as np
import torch
from torch import nn

from core.coefficients.estimate import collect
from core.schedules import log_grid
from plugins.teachers.gmm import GMMTeacher


class MLPDenoiser(nn.Module):
    """D(x, t) = c_skip x + c_out F(c_in x, log t / 4): a network-like teacher."""

    def __init__(self, dim: int, width: int, depth: int = 4, sigma_data: float = 0.5):
        super().__init__()
        layers, d = [], dim + 1
        for _ in range(depth):
            layers += [nn.Linear(d, width), nn.SiLU()]
            d = width
        self.net = nn.Sequential(*layers, nn.Linear(d, dim))
        self.sd = sigma_data

    def forward(self, x, t, class_labels=None):
        t = t.reshape(-1, 1)
        c_skip = self.sd ** 2 / (self.sd ** 2 + t ** 2)
        c_out = self.sd * t / (self.sd ** 2 + t ** 2).sqrt()
        c_in = 1 / (self.sd ** 2 + t ** 2).sqrt()
        return c_skip * x + c_out * self.net(torch.cat([c_in * x, t.log() / 4], 1))


def bench(denoise, sample_x0, n_samples, batch, n_times, repeats=3):
    ts = log_grid(n_times, 0.002, 80.0)
    x0, _ = sample_x0(batch, torch.Generator().manual_seed(0))
    x0 = x0.double()
    tt = torch.full((batch,), 1.0, dtype=torch.float64)

    def fwd():
        with torch.no_grad():
            for _ in range(n_samples // batch):
                for t in ts:
                    denoise(x0 + t, tt * t, None)

    def est():
        with torch.no_grad():
            collect(denoise, sample_x0, ts, n_samples, batch, 0, progress=False)

    fwd(), est()                                             # warm-up
    t_f = t_e = float("inf")
    for _ in range(repeats):          # interleaved, so load changes hit both alike
        t_f = min(t_f, _timed(fwd))
        t_e = min(t_e, _timed(est))
    return t_e / t_f, t_e / (n_times * n_samples), t_f / (n_times * n_samples)


def _timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--samples", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--times", type=int, default=8)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    print(f"# {_common.command_line()}")
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, float64, CPU")
    mlp = MLPDenoiser(args.dim, args.width).double().eval()
    gauss = lambda n, g: (torch.randn((n, args.dim), generator=g, dtype=torch.float64), None)
    gmm = GMMTeacher(np.full(8, 1 / 8), np.random.default_rng(0).normal(size=(8, args.dim)),
                     np.full(8, 0.5))
    den = gmm.denoiser()
    rows = [("mlp", mlp, gauss), ("gmm", lambda x, t, y: den(x, t, y), gmm.sample_data)]
    print(f"{'teacher':<8}{'fwd-equiv per (t x sample)':>28}{'us / (t x sample)':>20}"
          f"{'us / forward':>14}")
    for name, fn, sampler in rows:
        ratio, per, per_f = bench(fn, sampler, args.samples, args.batch, args.times)
        print(f"{name:<8}{ratio:>28.2f}{per * 1e6:>20.2f}{per_f * 1e6:>14.2f}")
    print("target: <= 6 forward-equivalents (one forward for D, then J v and dD/dlambda as two "
          "vmapped tangents of one JVP; the GMM's forward is too cheap for the ratio to mean much)")


if __name__ == "__main__":
    main()
