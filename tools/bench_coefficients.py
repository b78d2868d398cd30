"""Cost of Analytic-Precond coefficient estimation, in teacher forward-equivalents.

For a network teacher (an MLP denoiser, EDM-preconditioned) and the analytic GMM teacher, times
the estimation of l_t and s_t (one forward and a two-tangent JVP per time step and sample,
see core/coefficients/estimate.py) and divides by the time of one plain forward pass over the same
samples, measured in the same run. Target: at most 6 forward-equivalents per (t x sample).

    python tools/bench_coefficients.py [--dim 64] [--width 512] [--samples 2048] [--times 8]

EDM image teachers (the `edm` teacher plugin's networks), in float32 as ``[coefficients]
dtype = "float32"`` runs them:

    python tools/bench_coefficients.py --edm ../shared/fixtures/edm/edm-ddpmpp-cond-aug.pkl
    python tools/bench_coefficients.py --cifar10-ddpmpp      # full size, random weights
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

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


def bench(denoise, sample_x0, n_samples, batch, n_times, repeats=3, dtype=torch.float64,
          dl: str = "jvp"):
    ts = log_grid(n_times, 0.002, 80.0)
    x0, _ = sample_x0(batch, torch.Generator().manual_seed(0))
    x0 = x0.to(dtype)
    tt = torch.full((batch,), 1.0, dtype=dtype)

    def fwd():
        with torch.no_grad():
            for _ in range(n_samples // batch):
                for t in ts:
                    denoise(x0 + t, tt * t, None)

    def est():
        with torch.no_grad():
            collect(denoise, sample_x0, ts, n_samples, batch, 0, progress=False, dtype=dtype,
                    dl=dl)

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
    ap.add_argument("--edm", action="append", default=[], metavar="PKL",
                    help="also an EDM snapshot teacher (float32; repeatable)")
    ap.add_argument("--cifar10-ddpmpp", action="store_true",
                    help="also EDM's CIFAR-10 DDPM++ network (55.7M parameters, random weights)")
    ap.add_argument("--dl", default="jvp", choices=("jvp", "fd"),
                    help="dl/dlambda by nested JVP (the default) or finite differences")
    ap.add_argument("--image-samples", type=int, default=8, help="samples for image teachers")
    ap.add_argument("--image-batch", type=int, default=4)
    ap.add_argument("--image-times", type=int, default=2)
    args = ap.parse_args(argv)
    if args.edm or args.cifar10_ddpmpp:
        return bench_images(args)
    torch.manual_seed(0)
    print(f"# {_common.command_line()}")
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, float64, CPU, "
          f"dl/dlambda by {args.dl}")
    mlp = MLPDenoiser(args.dim, args.width).double().eval()
    gauss = lambda n, g: (torch.randn((n, args.dim), generator=g, dtype=torch.float64), None)
    gmm = GMMTeacher(np.full(8, 1 / 8), np.random.default_rng(0).normal(size=(8, args.dim)),
                     np.full(8, 0.5))
    den = gmm.denoiser()
    rows = [("mlp", mlp, gauss), ("gmm", lambda x, t, y: den(x, t, y), gmm.sample_data)]
    print(f"{'teacher':<8}{'fwd-equiv per (t x sample)':>28}{'us / (t x sample)':>20}"
          f"{'us / forward':>14}")
    for name, fn, sampler in rows:
        ratio, per, per_f = bench(fn, sampler, args.samples, args.batch, args.times, dl=args.dl)
        print(f"{name:<8}{ratio:>28.2f}{per * 1e6:>20.2f}{per_f * 1e6:>14.2f}")
    print("target: <= 6 forward-equivalents (one forward for D, then J v and dD/dlambda as two "
          "vmapped tangents of one JVP; the GMM's forward is too cheap for the ratio to mean much)")


#: EDM's CIFAR-10 DDPM++ teacher (edm-cifar10-32x32-cond-vp.pkl's EDMPrecond settings)
CIFAR10_DDPMPP = dict(img_resolution=32, img_channels=3, label_dim=10, sigma_data=0.5,
                      model_type="SongUNet", embedding_type="positional", encoder_type="standard",
                      decoder_type="standard", channel_mult_noise=1, resample_filter=[1, 1],
                      model_channels=128, channel_mult=[2, 2, 2], num_blocks=4,
                      attn_resolutions=[16], dropout=0.13, augment_dim=9)


def bench_images(args) -> None:
    from plugins.edm.precond import build_precond, load_edm_network

    print(f"# {_common.command_line()}")
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, float32, CPU, "
          f"dl/dlambda by {args.dl}")
    nets = [(Path(p).name, load_edm_network(p)) for p in args.edm]
    if args.cifar10_ddpmpp:
        torch.manual_seed(0)
        nets.append(("cifar10-ddpmpp (random weights)",
                     build_precond("EDMPrecond", CIFAR10_DDPMPP).eval()))
    print(f"{'teacher':<36}{'params':>10}{'fwd-equiv per (t x sample)':>28}"
          f"{'ms / (t x sample)':>19}{'ms / forward-sample':>21}")
    for name, net in nets:
        net.requires_grad_(False)
        shape = (net.img_channels, net.img_resolution, net.img_resolution)
        labels = net.label_dim

        def den(x, t, y, net=net, labels=labels):
            y = torch.zeros(x.shape[0], dtype=torch.long) if labels and y is None else y
            return net(x, t, y, None)

        def sample(n, g, shape=shape):
            return torch.rand((n, *shape), generator=g) * 2 - 1, None
        ratio, per, per_f = bench(den, sample, args.image_samples, args.image_batch,
                                  args.image_times, repeats=2, dtype=torch.float32, dl=args.dl)
        params = sum(p.numel() for p in net.parameters())
        print(f"{name:<36}{params / 1e6:>9.2f}M{ratio:>28.2f}{per * 1e3:>19.1f}"
              f"{per_f * 1e3:>21.1f}")


if __name__ == "__main__":
    main()
