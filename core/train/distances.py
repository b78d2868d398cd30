"""Per-sample distances d(a, b) -> [B] for the distillation losses (``[distill] distance``):
l2, l1, pseudo_huber and LPIPS."""

import math

import torch
from torch import Tensor

from core.base.errors import UserError, first_line


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
        from core.base.io import torch_load

        tv = (torchvision.models.vgg16() if net == "vgg" else torchvision.models.alexnet())
        try:
            tv.load_state_dict(torch_load(file, "LPIPS backbone weights"))
        except RuntimeError as e:
            raise UserError(f"{file}: not torchvision's {net} weights "
                            f"({first_line(e, 100)})") from None
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
