"""Distillation losses and distances (paper Eqn. 5, Eqn. 7, and the DSM loss of Sec. 5.1).

A loss draws its random quantities for the *global* batch from the iteration's generator (so
any number of processes sees the same draws) and computes per-sample values on its slice; every
loss has the same three methods: ``draw(gen, x0, N)``, ``inputs(draws, x0, grid)`` (the student's
(x, t, s) for this loss) and ``per_sample(ctx, draws, x0, F, distance)``.
`core.distill.StepContext` gives it the networks:

    ctx.jump(F, x, t, s)        f(t, s) x + g(t, s) D  (or F)    from a network output F
    ctx.student(x, t, s)        F_theta, with gradients (through DDP)
    ctx.target(x, t, s)         F_sg(theta), no gradients (Eqn. 28's EMA copy)
    ctx.teacher(x, t)           D_phi
    ctx.grid                    the N+1 EDM times t_0 = t_max > ... > t_N = t_min (float64)
"""

import math

import torch
from torch import Tensor

from core.errors import UserError
from core.hookspecs import hookimpl


# --- distances: per-sample values [B] ----------------------------------------------------------

def l2(a: Tensor, b: Tensor) -> Tensor:
    return ((a - b) ** 2).flatten(1).mean(1)


def l1(a: Tensor, b: Tensor) -> Tensor:
    return (a - b).abs().flatten(1).mean(1)


def pseudo_huber(a: Tensor, b: Tensor) -> Tensor:
    """sqrt(||a - b||^2 + c^2) - c with c = 0.00054 sqrt(d) (Song & Dhariwal 2023)."""
    d = a[0].numel()
    c = 0.00054 * math.sqrt(d)
    return torch.sqrt(((a - b) ** 2).flatten(1).sum(1) + c * c) - c


class LPIPS(torch.nn.Module):
    """LPIPS (Zhang et al. 2018) between images in [-1, 1], upsampled bilinearly to 224x224 as
    CM and CTM do; grey images are repeated to 3 channels. The linear heads ship with the
    `lpips` package; the backbone needs torchvision's ImageNet weights on disk: `weights` (a
    file), else torch's hub cache (``$TORCH_HOME/hub/checkpoints/<file>``). `random_backbone`
    keeps a randomly initialised backbone (for tests only: the values mean nothing)."""

    FILES = {"vgg": "vgg16-397923af.pth", "alex": "alexnet-owt-7be5be79.pth"}

    def __init__(self, net: str = "vgg", weights=None, random_backbone: bool = False,
                 resolution: int = 224):
        super().__init__()
        import warnings
        from pathlib import Path

        import lpips

        if net not in self.FILES:
            raise UserError(f"lpips: net must be one of {', '.join(self.FILES)}, got {net!r}")
        self.resolution = resolution
        file = Path(weights) if weights else Path(torch.hub.get_dir()) / "checkpoints" / \
            self.FILES[net]
        if not random_backbone and not file.is_file():
            raise UserError(f"the LPIPS distance needs torchvision's ImageNet {net} weights "
                            f"({self.FILES[net]}), not found at {file}: download "
                            f"https://download.pytorch.org/models/{self.FILES[net]} there or set "
                            f"[distill] lpips_weights = \"/path/to/{self.FILES[net]}\"")
        with warnings.catch_warnings():     # torchvision's 'pretrained=' deprecation
            warnings.simplefilter("ignore")
            self.model = lpips.LPIPS(net=net, pnet_rand=True, verbose=False)
        if not random_backbone:
            self._load_backbone(net, file)
        self.model.eval().requires_grad_(False)

    def _load_backbone(self, net: str, file) -> None:
        import torchvision
        from core.io import torch_load

        tv = (torchvision.models.vgg16() if net == "vgg" else torchvision.models.alexnet())
        try:
            tv.load_state_dict(torch_load(file, "LPIPS backbone weights"))
        except RuntimeError as e:
            raise UserError(f"{file}: not torchvision's {net} weights "
                            f"({str(e).splitlines()[0][:100]})") from None
        slices = [m for name, m in self.model.net.named_children() if name.startswith("slice")]
        for sl in slices:                   # lpips' slices hold torchvision's feature layers
            for idx, layer in sl.named_children():
                layer.load_state_dict(tv.features[int(idx)].state_dict())

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        if a.dim() != 4:
            raise UserError("the lpips distance needs image data [B, C, H, W]")
        if a.shape[1] == 1:
            a, b = a.repeat(1, 3, 1, 1), b.repeat(1, 3, 1, 1)
        if a.shape[-1] != self.resolution:
            size = (self.resolution, self.resolution)
            a = torch.nn.functional.interpolate(a, size=size, mode="bilinear", align_corners=False)
            b = torch.nn.functional.interpolate(b, size=size, mode="bilinear", align_corners=False)
        return self.model(a, b).flatten()


DISTANCES = {"l2": l2, "l1": l1, "pseudo_huber": pseudo_huber}


def make_distance(cfg, device: str = "cpu"):
    """The per-sample distance of a [distill] config (`DistillCfg`)."""
    if cfg.distance == "lpips":
        return LPIPS(cfg.lpips_net, cfg.lpips_weights, cfg.lpips_random).to(device)
    return DISTANCES[cfg.distance]


def _view(v: Tensor, x: Tensor) -> Tensor:
    return v.reshape([-1] + [1] * (x.dim() - 1)).to(x.dtype)


def _host(ctx, key: str):
    """This chunk's draw `key` on the CPU, when the step context holds it (lets the
    static-shape solve plan its steps without a device sync), else None."""
    return (getattr(ctx, "host", None) or {}).get(key)


class DSMLoss:
    """E_t E[w(t) ||D_theta(x_t, t, t) - x_0||^2], t log-normal, EDM weighting (Sec. 5.1)."""

    def __init__(self, p_mean: float = -1.2, p_std: float = 1.2):
        self.p_mean, self.p_std = p_mean, p_std

    def draw(self, gen, x0, N: int = 0):
        B = x0.shape[0]
        sigma = torch.exp(self.p_mean + self.p_std * torch.randn(B, generator=gen,
                                                                   dtype=torch.float64))
        return {"sigma": sigma, "z": torch.randn(x0.shape, generator=gen, dtype=x0.dtype)}

    def inputs(self, d, x0, grid=None):
        x = x0 + _view(d["sigma"], x0) * d["z"]
        return x, d["sigma"], d["sigma"]

    def per_sample(self, ctx, d, x0, F, distance=None) -> Tensor:
        sigma, sd = d["sigma"].to(x0.device), ctx.sigma_data
        x = x0 + _view(sigma, x0) * d["z"]
        D = ctx.denoiser(F, x, sigma)
        weight = (sigma ** 2 + sd ** 2) / (sigma * sd) ** 2
        return weight.to(x0.dtype) * ((D - x0) ** 2).flatten(1).mean(1)


class CTMLoss:
    """Eqn. (7): d( f_sg(f_theta(x_t, t, s), s, eps), f_sg(f_sg(Solver(x_t, t, u), u, s), s, eps) )
    with t > u >= s drawn per sample on the N-point EDM grid and the teacher solver taking at most
    `max_ode_steps` grid steps from t to u."""

    def __init__(self, max_ode_steps: int):
        self.max_ode_steps = max_ode_steps

    def draw(self, gen, x0, N: int):
        B = x0.shape[0]
        n = torch.randint(0, N, (B,), generator=gen)                        # t = t_n
        m = n + 1 + (torch.rand(B, generator=gen, dtype=torch.float64) * (N - n)).long()  # s
        span = torch.minimum(m - n, torch.full_like(n, self.max_ode_steps))
        k = n + 1 + (torch.rand(B, generator=gen, dtype=torch.float64) * span).long()      # u
        return {"n": n, "m": torch.clamp(m, max=N), "k": torch.minimum(k, m),
                "z": torch.randn(x0.shape, generator=gen, dtype=x0.dtype)}

    def inputs(self, d, x0, grid):
        t, s = grid[d["n"]], grid[d["m"]]
        return x0 + _view(t, x0) * d["z"], t, s

    def per_sample(self, ctx, d, x0, F, distance) -> Tensor:
        grid = ctx.grid
        n, m, k = (d[key].to(x0.device) for key in ("n", "m", "k"))
        t, s, u = grid[n], grid[m], grid[k]
        x_t = x0 + _view(t, x0) * d["z"].to(x0.device)
        eps = grid[-1:].expand(t.shape[0]).clone()            # t_min (no device sync)
        student = ctx.jump(F, x_t, t, s)
        with torch.no_grad():
            hn, hk = _host(ctx, "n"), _host(ctx, "k")
            x_u = ctx.solve(x_t, n, k, host=(hn, hk) if hn is not None and hk is not None
                            else None)
            target = ctx.target_jump(ctx.target_jump(x_u, u, s), s, eps)
        # gradient flows through the input of the stop-gradient jumper, not into its weights
        student_0 = ctx.target_jump(student, s, eps, grad=True)
        return distance(student_0, target)


class CMLoss:
    """Eqn. (5): d( f_theta(x_t, t, eps), f_sg(Solver(x_t, t, t'), t', eps) ), t' the next grid
    time after t."""

    def draw(self, gen, x0, N: int):
        B = x0.shape[0]
        return {"n": torch.randint(0, N, (B,), generator=gen),
                "z": torch.randn(x0.shape, generator=gen, dtype=x0.dtype)}

    def inputs(self, d, x0, grid):
        t = grid[d["n"]]
        return x0 + _view(t, x0) * d["z"], t, torch.full_like(t, float(grid[-1]))

    def per_sample(self, ctx, d, x0, F, distance) -> Tensor:
        grid = ctx.grid
        n = d["n"].to(x0.device)
        t, t_next = grid[n], grid[n + 1]
        x_t = x0 + _view(t, x0) * d["z"].to(x0.device)
        eps = grid[-1:].expand(t.shape[0]).clone()            # t_min (no device sync)
        student = ctx.jump(F, x_t, t, eps)
        with torch.no_grad():
            hn = _host(ctx, "n")
            x_u = ctx.solve(x_t, n, n + 1, host=(hn, hn + 1) if hn is not None else None)
            target = ctx.target_jump(x_u, t_next, eps)
        return distance(student, target)


@hookimpl
def ctmkit_losses():
    """Factories get the [distill] section (options) and the plugin context."""
    return {"ctm": lambda options, ctx: CTMLoss(options.int("max_ode_steps", 17, min=1)),
            "cm": lambda options, ctx: CMLoss(),
            "dsm": lambda options, ctx: DSMLoss()}
