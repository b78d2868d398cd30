"""DiffAugment (Zhao et al. 2020, "Differentiable Augmentation for Data-Efficient GAN
Training"), as the projected GAN uses it: the same differentiable, per-sample random
transforms on real and fake images before the discriminator.

* ``color``: brightness (add U(-0.5, 0.5)), saturation (scale each pixel's deviation from its
  channel mean by U(0, 2)), contrast (scale the deviation from the image mean by U(0.5, 1.5));
* ``translation``: an integer shift of up to 1/8 of the image size in each direction, zeros
  shifted in;
* ``cutout``: a square of half the image size, centred anywhere in the image, set to zero.

The draws come from a CPU generator for the whole batch (`draw`), so every process and a
resumed run see the same transforms of the same samples. Our own implementation of the
paper's description."""

from __future__ import annotations

import torch
from torch import Tensor

POLICIES = ("color", "translation", "cutout")


def draw(gen: torch.Generator, shape, policies) -> dict:
    """The random quantities of `policies` for a batch of images of `shape` [B, C, H, W]."""
    B, H, W = shape[0], shape[-2], shape[-1]
    out = {}
    if "color" in policies:
        u = torch.rand(B, 3, generator=gen)
        out.update(brightness=u[:, 0] - 0.5, saturation=u[:, 1] * 2.0,
                   contrast=u[:, 2] + 0.5)
    if "translation" in policies:
        sh, sw = int(H * 0.125 + 0.5), int(W * 0.125 + 0.5)
        out.update(shift_y=torch.randint(-sh, sh + 1, (B,), generator=gen),
                   shift_x=torch.randint(-sw, sw + 1, (B,), generator=gen))
    if "cutout" in policies:
        out.update(cut_y=torch.randint(0, H + (1 - H % 2), (B,), generator=gen),
                   cut_x=torch.randint(0, W + (1 - W % 2), (B,), generator=gen))
    return out


def apply(x: Tensor, d: dict) -> Tensor:
    """`x` [B, C, H, W] transformed by the draws `d` (those of `draw`)."""
    if "brightness" in d:
        x = x + d["brightness"].to(x)[:, None, None, None]
        mean = x.mean(dim=1, keepdim=True)
        x = (x - mean) * d["saturation"].to(x)[:, None, None, None] + mean
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - mean) * d["contrast"].to(x)[:, None, None, None] + mean
    if "shift_y" in d:
        x = _translate(x, d["shift_y"].to(x.device), d["shift_x"].to(x.device))
    if "cut_y" in d:
        B, _, H, W = x.shape
        ys = torch.arange(H, device=x.device)[None, :] - d["cut_y"].to(x.device)[:, None]
        xs = torch.arange(W, device=x.device)[None, :] - d["cut_x"].to(x.device)[:, None]
        inside = ((ys.abs() < (H // 2 + 1) // 2)[:, :, None]
                  & (xs.abs() < (W // 2 + 1) // 2)[:, None, :])
        x = x * (~inside)[:, None].to(x.dtype)
    return x


def _translate(x: Tensor, dy: Tensor, dx: Tensor) -> Tensor:
    """Each image shifted by (dy, dx) pixels, zeros where nothing is shifted in."""
    B, C, H, W = x.shape
    iy = torch.arange(H, device=x.device)[None, :] - dy[:, None]          # source rows [B, H]
    ix = torch.arange(W, device=x.device)[None, :] - dx[:, None]
    valid = ((iy >= 0) & (iy < H))[:, :, None] & ((ix >= 0) & (ix < W))[:, None, :]
    idx = iy.clamp(0, H - 1)[:, :, None] * W + ix.clamp(0, W - 1)[:, None, :]
    out = x.flatten(2).gather(2, idx.flatten(1)[:, None, :].expand(B, C, H * W))
    return out.view(B, C, H, W) * valid[:, None].to(x.dtype)


def policies(options, key: str, default: list, images: bool) -> list:
    """The ``augment`` option: a list of POLICIES (none for vectors)."""
    v = options.strs(key, default)
    for p in v:
        if p not in POLICIES:
            options.fail(key, f"unknown policy {p!r} (known: {', '.join(POLICIES)})")
    if v and not images:
        options.fail(key, "augments images; the samples are vectors (use augment = [])")
    return v
