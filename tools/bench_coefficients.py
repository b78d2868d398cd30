"""Cost of Analytic-Precond coefficient estimation, in teacher forward-equivalents.

For a network teacher (an MLP denoiser, EDM-preconditioned) and the analytic GMM teacher, times
the estimation of l_t and s_t (one forward and a two-tangent JVP per time step and sample,
see core/diffusion/coefficients/estimate.py) and divides by the time of one plain forward pass over the same
samples, measured in the same run. Target: at most 6 forward-equivalents per (t x sample).

    python tools/bench_coefficients.py [--dim 64] [--width 512] [--samples 2048] [--times 8]

EDM image teachers (the `edm` teacher plugin's networks), in float32 as ``[coefficients]
dtype = "float32"`` runs them:

    python tools/bench_coefficients.py --edm tests/fixtures/edm/edm-ddpmpp-cond-aug.pkl
    python tools/bench_coefficients.py --cifar10-ddpmpp      # full size, random weights

An example config's teacher network (random weights) with its [coefficients] settings (dtype,
dl, batch), on --device; the stage's time (n_timesteps x n_samples) as a fraction of a Table-3
training run ([distill] iterations x the step time of tools/bench_train.py --config, measured
here with --train-iters steps, or given by --step-s):

    python tools/bench_coefficients.py --config examples/fashion_mnist.toml --device cuda
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import _common
import numpy as np
import torch
from torch import nn

from core.diffusion.coefficients.estimate import collect
from core.diffusion.schedules import log_grid
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
          dl: str = "jvp", device: str = "cpu", times_per_call: int = 1, compile: bool = False):
    ts = log_grid(n_times, 0.002, 80.0)
    x0, y0 = sample_x0(batch, torch.Generator().manual_seed(0))
    x0 = x0.to(device, dtype)
    y0 = y0.to(device) if y0 is not None else None
    tt = torch.full((batch,), 1.0, dtype=dtype, device=device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def fwd():
        with torch.no_grad():
            for _ in range(n_samples // batch):
                for t in ts:
                    denoise(x0 + t, tt * t, y0)
        sync()

    def est():
        with torch.no_grad():
            collect(denoise, sample_x0, ts, n_samples, batch, 0, device=device, progress=False,
                    dtype=dtype, dl=dl, times_per_call=times_per_call, compile=compile)
        sync()

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


def bench_config(args) -> dict:
    """An example's teacher network (random weights) and [coefficients] settings on
    args.device: time per (t x sample), forward-equivalents, and the stage's share of a Table-3
    training run."""
    import tempfile
    import tomllib

    from bench_train import DATA_SHAPES, measure, write_random_teacher
    from plugins.networks import EDMDenoiser
    from plugins.teachers.network import NetworkTeacher  # noqa: F401 (the file format)

    raw = tomllib.loads(Path(args.config).read_text())
    (h, w, c), classes = DATA_SHAPES[raw.get("data", {}).get("format")]
    coef, dist_cfg = raw.get("coefficients", {}), raw.get("distill", {})
    dtype = torch.float32 if coef.get("dtype", "float64") == "float32" else torch.float64
    dl = coef.get("dl", "jvp")
    n_t, n_s = coef.get("n_timesteps", 120), coef.get("n_samples", 4096)
    batch = args.coef_batch or coef.get("batch", 512)
    with tempfile.TemporaryDirectory() as tmp:
        from core.base.io import load_torch
        from core.host.plugins import Context, create_network
        from core.host.config import DiffusionCfg

        f = Path(tmp) / "teacher.pt"
        write_random_teacher(f, raw.get("network", {}), (c, h, w), classes)
        st = load_torch(f, "teacher")
        net = create_network(st["network"], st["options"], Context(diffusion=DiffusionCfg()),
                             st["shape"], classes, False, str(f))
        net.load_state_dict(st["state_dict"])
    den = EDMDenoiser(net, 0.5).to(args.device, dtype).eval().requires_grad_(False)

    def sample(n, g):
        x = torch.rand((n, c, h, w), generator=g, dtype=torch.float64) * 2 - 1
        return x, (torch.randint(0, classes, (n,), generator=g) if classes else None)
    k = args.times_per_call or coef.get("times_per_call", 1)
    comp = args.compile or coef.get("compile", False)
    ratio, per, per_f = bench(lambda x, t, y: den(x, t, y), sample, batch, batch, args.times,
                              repeats=2, dtype=dtype, dl=dl, device=args.device,
                              times_per_call=k, compile=comp)
    stage = per * n_t * n_s
    step = args.step_s
    if step is None:
        step = measure(args.config, args.device, args.train_iters,
                       args.train_batch)["step_s"]
    iters = dist_cfg.get("iterations", 1000)
    return dict(ratio=ratio, per=per, per_f=per_f, stage_s=stage, step_s=step, iters=iters,
                train_s=step * iters, fraction=stage / (step * iters), n_t=n_t, n_s=n_s,
                batch=batch, dtype=str(dtype).replace("torch.", ""), dl=dl,
                times_per_call=k, compile=comp)


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
    ap.add_argument("--device", default="cpu", help="cpu | cuda")
    ap.add_argument("--config", default=None, help="an example config (its teacher network "
                                                    "with random weights)")
    ap.add_argument("--coef-batch", type=int, default=None, help="default: the config's batch")
    ap.add_argument("--step-s", type=float, default=None,
                    help="the distill step time (s) of the Table-3 run; default: measured")
    ap.add_argument("--train-iters", type=int, default=5)
    ap.add_argument("--train-batch", type=int, default=None, help="default: the config's")
    ap.add_argument("--times-per-call", type=int, default=None,
                    help="[coefficients] times_per_call (default: the config's, or 1)")
    ap.add_argument("--compile", action="store_true", help="[coefficients] compile = true")
    args = ap.parse_args(argv)
    if args.config and not Path(args.config).is_file():
        ap.error(f"--config {args.config}: no such file")
    if args.config:
        r = bench_config(args)
        dev = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "CPU"
        print(f"# {_common.command_line()}")
        print(f"# torch {torch.__version__}, {dev}, teacher {r['dtype']}, dl {r['dl']}, "
              f"batch {r['batch']}, times_per_call {r['times_per_call']}, compile "
              f"{r['compile']}, {args.times} time steps timed")
        print(f"per (t x sample)   {r['per'] * 1e3:9.3f} ms  ({r['ratio']:.2f} forward-equivalents;"
              f" forward {r['per_f'] * 1e3:.3f} ms)")
        print(f"coefficient stage  {r['stage_s']:9.1f} s   ({r['n_t']} time steps x {r['n_s']} "
              f"samples)")
        print(f"training run       {r['train_s']:9.1f} s   ({r['iters']} iterations x "
              f"{r['step_s'] * 1e3:.1f} ms)")
        print(f"overhead           {100 * r['fraction']:9.2f} %   (coefficient stage / training "
              f"run; target < 1 %)")
        return r
    if args.edm or args.cifar10_ddpmpp:
        return bench_images(args)
    torch.manual_seed(0)
    print(f"# {_common.command_line()}")
    k = args.times_per_call or 1
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, float64, "
          f"{args.device}, dl/dlambda by {args.dl}, times_per_call {k}, compile {args.compile}")
    mlp = MLPDenoiser(args.dim, args.width).double().eval().to(args.device)
    gauss = lambda n, g: (torch.randn((n, args.dim), generator=g, dtype=torch.float64), None)
    gmm = GMMTeacher(np.full(8, 1 / 8), np.random.default_rng(0).normal(size=(8, args.dim)),
                     np.full(8, 0.5))
    den = gmm.denoiser()
    rows = [("mlp", mlp, gauss)]
    if args.device == "cpu":
        rows.append(("gmm", lambda x, t, y: den(x, t, y), gmm.sample_data))
    print(f"{'teacher':<8}{'fwd-equiv per (t x sample)':>28}{'us / (t x sample)':>20}"
          f"{'us / forward':>14}")
    for name, fn, sampler in rows:
        ratio, per, per_f = bench(fn, sampler, args.samples, args.batch, args.times, dl=args.dl,
                                  device=args.device, times_per_call=k, compile=args.compile)
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
