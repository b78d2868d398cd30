"""``projected``: the projected-GAN discriminator (Sauer, Chitta, Müller & Geiger 2021,
"Projected GANs Converge Faster"), as CTM uses it for its GAN term. Our own implementation of
the paper's description:

1. DiffAugment (colour, translation, cutout; `augment`) on the images in [-1, 1], 1-channel
   images repeated to 3 channels, resized (bilinear) to `resolution` and normalised with
   ImageNet's mean and std;
2. a frozen pretrained feature network per backbone (timm's ``tf_efficientnet_lite0``, CTM's
   and the paper's choice; ``deit_base_distilled_patch16_224`` optional), its feature maps at
   four scales;
3. the random projections, fixed at initialisation and never trained: cross-channel mixing
   (a 1x1 convolution per scale) and cross-scale mixing (top-down: each scale plus the coarser
   one upsampled, then a 3x3 convolution);
4. one small trained discriminator per scale (stride-2 4x4 convolutions, LeakyReLU 0.2, down
   to 4x4 or less), whose 1x1 read-out gives a map of logits; class-conditional by projection
   (Miyato & Koyama 2018): the read-out is a `cmap` -dimensional map projected on a learned
   embedding of the label.

The logits of every scale, position and backbone are returned side by side; the host applies
the hinge loss. Deviation: the paper's mini-discriminators use batch and spectral
normalisation; these use none (a sample's logit must not depend on the other rows a process
holds, so that 2 processes = 1 process).

The backbone weights come from local files only (``weights = ["...pth" | "...safetensors"]``,
one per backbone; nothing is downloaded). ``random_weights = true``: random backbones, for
tests only. Requires timm (``pip install ctmkit[gan]``).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as Fn
from torch import Tensor, nn

from core.api import Discriminator, UserError
from plugins.discriminators import augment

BACKBONES = {"tf_efficientnet_lite0": (1, 2, 3, 4),
             "deit_base_distilled_patch16_224": (2, 5, 8, 11)}
_MEAN, _STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _timm():
    try:
        import timm
    except ImportError:
        raise UserError("[discriminator] name = \"projected\" needs timm: pip install "
                        "'ctmkit[gan]' (or pip install timm)") from None
    return timm


def _load_weights(net: nn.Module, path: Path, name: str) -> None:
    """A local weights file into the feature network; one error line when it does not fit."""
    if not path.is_file():
        raise UserError(f"[discriminator] weights: {path} not found (the {name} backbone's "
                        f"weights; nothing is downloaded)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"[discriminator] weights: {path} is not a weights file "
                        f"({e.__class__.__name__})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise UserError(f"[discriminator] weights: {path} holds no state_dict of tensors")
    own = net.state_dict()
    missing = [k for k in own if k not in state]
    wrong = [k for k in own if k in state and state[k].shape != own[k].shape]
    if missing or wrong:
        k = (missing or wrong)[0]
        why = (f"lacks {k!r}" if missing else
               f"{k} is {tuple(state[k].shape)}, not {tuple(own[k].shape)}")
        raise UserError(f"[discriminator] weights: {path} is not timm's {name} ({why}; "
                        f"{len(missing)} missing and {len(wrong)} mis-shaped tensors)")
    net.load_state_dict({k: state[k] for k in own})


class _FeatureNet(nn.Module):
    """A frozen backbone's multi-scale features (always in eval mode)."""

    def __init__(self, name: str, weights: Path | None):
        super().__init__()
        timm = _timm()
        self.net = timm.create_model(name, pretrained=False, features_only=True,
                                     out_indices=BACKBONES[name])
        if weights is not None:
            _load_weights(self.net, weights, name)
        self.channels = list(self.net.feature_info.channels())
        self.requires_grad_(False).eval()

    def train(self, mode: bool = True):
        return super().train(False)

    def forward(self, x: Tensor) -> list[Tensor]:
        return self.net(x)


class _Projection(nn.Module):
    """Random, fixed cross-channel and cross-scale mixing of the feature pyramid."""

    def __init__(self, channels: list[int], width: int):
        super().__init__()
        outs = [min(width * 2 ** i, 8 * width) for i in range(len(channels))]
        self.ccm = nn.ModuleList(nn.Conv2d(c, o, 1) for c, o in zip(channels, outs))
        self.csm = nn.ModuleList(nn.Conv2d(o, o, 3, padding=1) for o in outs)
        self.up = nn.ModuleList(nn.Conv2d(outs[i + 1], outs[i], 1)
                                for i in range(len(outs) - 1))
        self.channels = outs
        self.requires_grad_(False)

    def forward(self, feats: list[Tensor]) -> list[Tensor]:
        mixed = [m(f) for m, f in zip(self.ccm, feats)]
        out = [None] * len(mixed)
        out[-1] = self.csm[-1](mixed[-1])
        for i in range(len(mixed) - 2, -1, -1):
            coarse = Fn.interpolate(self.up[i](out[i + 1]), size=mixed[i].shape[-2:],
                                    mode="bilinear", align_corners=False)
            out[i] = self.csm[i](mixed[i] + coarse)
        return out


class _MiniD(nn.Module):
    """One scale's trained discriminator: a logit map, class-projected when conditional."""

    def __init__(self, c: int, size: int, width: int, num_classes: int, cmap: int):
        super().__init__()
        layers = []
        while size > 4:
            cout = min(2 * c, 4 * width)
            layers += [nn.Conv2d(c, cout, 4, 2, 1), nn.LeakyReLU(0.2)]
            c, size = cout, (size + 1) // 2
        self.body = nn.Sequential(*layers)
        self.cmap = cmap if num_classes > 0 else 0
        self.out = nn.Conv2d(c, self.cmap or 1, 1)
        self.embed = nn.Embedding(num_classes, cmap) if num_classes > 0 else None

    def forward(self, h: Tensor, labels: Tensor | None) -> Tensor:
        o = self.out(self.body(h))
        if self.embed is None:
            return o.flatten(1)
        e = self.embed(labels)[:, :, None, None]
        return ((o * e).sum(1) / math.sqrt(self.cmap)).flatten(1)


class ProjectedDiscriminator(Discriminator):
    def __init__(self, shape, num_classes: int, backbones: list[str], weights: list | None,
                 resolution: int, width: int, cmap: int, policies):
        super().__init__()
        self.channels, self.resolution, self.policies = shape[0], resolution, list(policies)
        self.features = nn.ModuleList(_FeatureNet(b, w) for b, w in
                                      zip(backbones, weights or [None] * len(backbones)))
        self.register_buffer("mean", torch.tensor(_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_STD).view(1, 3, 1, 1), persistent=False)
        probe = torch.zeros(1, 3, resolution, resolution)
        self.projections, self.heads = nn.ModuleList(), nn.ModuleList()
        for f in self.features:
            sizes = [t.shape[-1] for t in f(probe)]
            proj = _Projection(f.channels, width)
            self.projections.append(proj)
            self.heads.append(nn.ModuleList(_MiniD(c, s, width, num_classes, cmap)
                                            for c, s in zip(proj.channels, sizes)))

    def draw(self, gen, x):
        return augment.draw(gen, x.shape, self.policies) if self.policies else {}

    def forward(self, x: Tensor, labels=None, draws=None) -> Tensor:
        if self.policies and draws:
            x = augment.apply(x, draws)
        if self.channels == 1:
            x = x.repeat(1, 3, 1, 1)
        if x.shape[-1] != self.resolution or x.shape[-2] != self.resolution:
            x = Fn.interpolate(x, size=(self.resolution, self.resolution), mode="bilinear",
                               align_corners=False)
        x = ((x + 1) / 2 - self.mean) / self.std
        logits = []
        for f, proj, heads in zip(self.features, self.projections, self.heads):
            for h, head in zip(proj(f(x)), heads):
                logits.append(head(h, labels))
        return torch.cat(logits, dim=1)


def make(options, ctx, shape, num_classes):
    if len(shape) != 3 or shape[0] not in (1, 3):
        raise UserError(f"{options.where('name')}: projected judges images with 1 or 3 "
                        f"channels through ImageNet feature networks; the samples have shape "
                        f"{list(shape)} (use name = \"conv\")")
    backbones = options.strs("backbones", ["tf_efficientnet_lite0"])
    for b in backbones:
        if b not in BACKBONES:
            options.fail("backbones", f"unknown backbone {b!r} (known: {', '.join(BACKBONES)})")
    if not backbones:
        options.fail("backbones", "names no backbone")
    random = options.bool("random_weights", False)
    weights = options._get("weights", None)
    if weights is not None:
        if not isinstance(weights, list) or not all(isinstance(w, str) for w in weights):
            options.fail("weights", f"expected a list of file paths, got {weights!r}")
        weights = [(Path(w) if Path(w).is_absolute() else options.base_dir / w) for w in weights]
        if len(weights) != len(backbones):
            options.fail("weights", f"gives {len(weights)} files for {len(backbones)} "
                                    f"backbones ({', '.join(backbones)})")
    elif not random:
        options.fail("weights", f"is required: local weight files of timm's "
                                f"{', '.join(backbones)} (nothing is downloaded; "
                                f"random_weights = true for tests)")
    if random:
        weights = None
    resolution = options.int("resolution", 224, min=16, max=1024)
    width = options.int("width", 64, min=1, max=1024)
    cmap = options.int("cmap", 64, min=1, max=4096)
    policies = augment.policies(options, "augment", list(augment.POLICIES), len(shape) == 3)
    if "deit_base_distilled_patch16_224" in backbones and resolution != 224:
        options.fail("resolution", "must be 224 with deit_base_distilled_patch16_224")
    return ProjectedDiscriminator(shape, num_classes, backbones, weights, resolution, width,
                                  cmap, policies)
