"""Layers of EDM's networks, with EDM's parameter and buffer names.

Written from the papers (Song et al. 2021 for DDPM++/NCSN++, Dhariwal & Nichol 2021 for ADM,
Karras et al. 2022 for the EDM variants) and from the names and shapes in EDM's pickled
state: every module here stores exactly the tensors an EDM snapshot holds under the same
names (``weight``, ``bias``, ``resample_filter``, ``freqs``), so a state dict read by
``plugins.edm.unpickle`` loads with ``strict=True``.

Differences from a plain torch layer that the weights rely on:

* ``Conv2d`` resamples with a fixed separable FIR filter (``resample_filter``, the outer product
  of e.g. [1, 1] or [1, 3, 3, 1], normalised to sum 1), applied depthwise with stride 2 before
  the convolution (down) or as a transposed depthwise convolution (up, gain 4); ``fused`` does
  the convolution first (down) or last (up) with the padding moved accordingly. A kernel size of
  0 resamples only (no weight, no bias). Tensors that EDM leaves ``None`` are registered as
  ``None`` and so are absent from the state dict, as in EDM.
* ``GroupNorm`` uses min(32, C // 4) groups.
* ``UNetBlock`` is the residual block of both U-Nets: GroupNorm-SiLU-conv3x3 (with up/down
  resampling), the embedding added (DDPM++) or applied as scale and shift (ADM, "adaptive
  scale"), GroupNorm-SiLU-dropout-conv3x3, the skip (a 1x1 conv when channels or resolution
  change), rescaled by ``skip_scale``; then optional multi-head self-attention whose qkv
  channels are laid out (head, channel, q/k/v).

All layers compute in the input's dtype (weights are cast), use no in-place ops and no custom
autograd, so they script with TorchScript and run under ``torch.func.jvp``/``vmap`` and
``torch.autocast``. Every layer that can sit in a U-Net's ``enc``/``dec`` dict takes
``forward(x, emb=None)`` so the U-Nets can call them uniformly in TorchScript.
"""

import math
from typing import List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn


def init_weight(shape: Sequence[int], mode: str, fan_in: int, fan_out: int,
                generator: Optional[torch.Generator] = None) -> Tensor:
    """Glorot (xavier_*) or He (kaiming_*) initialisation, uniform or normal."""
    if mode == "xavier_uniform":
        bound = math.sqrt(6.0 / (fan_in + fan_out))
        return bound * (torch.rand(shape, generator=generator) * 2 - 1)
    if mode == "xavier_normal":
        return math.sqrt(2.0 / (fan_in + fan_out)) * torch.randn(shape, generator=generator)
    if mode == "kaiming_uniform":
        return math.sqrt(3.0 / fan_in) * (torch.rand(shape, generator=generator) * 2 - 1)
    if mode == "kaiming_normal":
        return math.sqrt(1.0 / fan_in) * torch.randn(shape, generator=generator)
    raise ValueError(f"unknown init_mode {mode!r}")


class Linear(nn.Module):
    """y = x W^T + b, W [out_features, in_features]."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 init_mode: str = "kaiming_normal", init_weight: float = 1.0,
                 init_bias: float = 0.0):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        w = _init(init_mode, [out_features, in_features], in_features, out_features)
        self.weight = nn.Parameter(w * init_weight)
        if bias:
            b = _init(init_mode, [out_features], in_features, out_features)
            self.bias = nn.Parameter(b * init_bias)
        else:
            self.register_parameter("bias", None)

    def forward(self, x: Tensor) -> Tensor:
        y = torch.matmul(x, self.weight.to(x.dtype).t())
        b = self.bias
        if b is not None:
            y = y + b.to(y.dtype)
        return y


def _init(mode: str, shape: List[int], fan_in: int, fan_out: int) -> Tensor:
    return init_weight(shape, mode, fan_in, fan_out)


def resample_kernel(taps: Sequence[float]) -> Tensor:
    """The 2-D FIR filter [1, 1, k, k]: outer(f, f) / sum(f)^2."""
    f = torch.as_tensor([float(v) for v in taps], dtype=torch.float32)
    return (torch.outer(f, f) / f.sum().square()).reshape(1, 1, len(taps), len(taps))


class Conv2d(nn.Module):
    """kxk convolution (k = ``kernel``; 0 = none) with optional FIR up/down-sampling by 2."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, bias: bool = True,
                 up: bool = False, down: bool = False, resample_filter: Sequence[float] = (1, 1),
                 fused_resample: bool = False, init_mode: str = "kaiming_normal",
                 init_weight: float = 1.0, init_bias: float = 0.0):
        super().__init__()
        if up and down:
            raise ValueError("Conv2d cannot both upsample and downsample")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.up, self.down, self.fused_resample = bool(up), bool(down), bool(fused_resample)
        self.w_pad = kernel // 2
        self.f_pad = (len(resample_filter) - 1) // 2
        fan_in, fan_out = in_channels * kernel * kernel, out_channels * kernel * kernel
        if kernel:
            w = _init(init_mode, [out_channels, in_channels, kernel, kernel], fan_in, fan_out)
            self.weight = nn.Parameter(w * init_weight)
        else:
            self.register_parameter("weight", None)
        if kernel and bias:
            self.bias = nn.Parameter(_init(init_mode, [out_channels], fan_in, fan_out) * init_bias)
        else:
            self.register_parameter("bias", None)
        self.register_buffer("resample_filter",
                             resample_kernel(resample_filter) if (up or down) else None)

    def forward(self, x: Tensor, emb: Optional[Tensor] = None) -> Tensor:
        w = self.weight
        b = self.bias
        f = self.resample_filter
        conv_done = False
        if f is not None:
            f = f.to(x.dtype)
            cin, cout = self.in_channels, self.out_channels
            if self.fused_resample and self.up and w is not None:
                x = F.conv_transpose2d(x, (f * 4).tile([cin, 1, 1, 1]), groups=cin, stride=2,
                                       padding=max(self.f_pad - self.w_pad, 0))
                x = F.conv2d(x, w.to(x.dtype), padding=max(self.w_pad - self.f_pad, 0))
                conv_done = True
            elif self.fused_resample and self.down and w is not None:
                x = F.conv2d(x, w.to(x.dtype), padding=self.w_pad + self.f_pad)
                x = F.conv2d(x, f.tile([cout, 1, 1, 1]), groups=cout, stride=2)
                conv_done = True
            elif self.up:
                x = F.conv_transpose2d(x, (f * 4).tile([cin, 1, 1, 1]), groups=cin, stride=2,
                                       padding=self.f_pad)
            else:
                x = F.conv2d(x, f.tile([cin, 1, 1, 1]), groups=cin, stride=2, padding=self.f_pad)
        if w is not None and not conv_done:
            x = F.conv2d(x, w.to(x.dtype), padding=self.w_pad)
        if b is not None:
            x = x + b.to(x.dtype).reshape(1, -1, 1, 1)
        return x


class GroupNorm(nn.Module):
    """GroupNorm with min(num_groups, C // min_channels_per_group) groups and an affine map."""

    def __init__(self, num_channels: int, num_groups: int = 32, min_channels_per_group: int = 4,
                 eps: float = 1e-5):
        super().__init__()
        self.num_groups = max(1, min(num_groups, num_channels // min_channels_per_group))
        self.in_channels, self.eps = num_channels, float(eps)
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: Tensor, emb: Optional[Tensor] = None) -> Tensor:
        return F.group_norm(x, self.num_groups, self.weight.to(x.dtype), self.bias.to(x.dtype),
                            self.eps)


class PositionalEmbedding(nn.Module):
    """[cos, sin](c * w_k), w_k = (1 / max_positions)^(k / (n/2 - endpoint)), k < n/2.

    The frequencies are formed in float32 (as the pickled networks were trained with) and kept as
    a non-persistent buffer, so float32 outputs match the original bit for bit."""

    def __init__(self, num_channels: int, max_positions: int = 10000, endpoint: bool = False):
        super().__init__()
        self.num_channels, self.max_positions, self.endpoint = num_channels, max_positions, endpoint
        half = num_channels // 2
        k = torch.arange(half, dtype=torch.float32) / (half - (1 if endpoint else 0))
        freqs = (1.0 / max_positions) ** k
        self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, c: Tensor) -> Tensor:
        arg = torch.outer(c.reshape(-1), self.freqs.to(c.dtype))
        return torch.cat([torch.cos(arg), torch.sin(arg)], dim=1)


class FourierEmbedding(nn.Module):
    """[cos, sin](2 pi c * f_k) with fixed random f_k ~ N(0, scale^2) (buffer ``freqs``)."""

    def __init__(self, num_channels: int, scale: float = 16.0, seed: Optional[int] = None):
        super().__init__()
        g = None if seed is None else torch.Generator().manual_seed(seed)
        self.num_channels = num_channels
        self.register_buffer("freqs", torch.randn(num_channels // 2, generator=g) * scale)

    def forward(self, c: Tensor) -> Tensor:
        arg = torch.outer(c.reshape(-1), (2 * np.pi * self.freqs).to(c.dtype))
        return torch.cat([torch.cos(arg), torch.sin(arg)], dim=1)


class UNetBlock(nn.Module):
    """Residual block with embedding injection, optional up/down-sampling and self-attention."""

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, up: bool = False,
                 down: bool = False, attention: bool = False, num_heads: Optional[int] = None,
                 channels_per_head: int = 64, dropout: float = 0.0, skip_scale: float = 1.0,
                 eps: float = 1e-5, resample_filter: Sequence[float] = (1, 1),
                 resample_proj: bool = False, adaptive_scale: bool = True,
                 init: Optional[dict] = None, init_zero: Optional[dict] = None,
                 init_attn: Optional[dict] = None):
        super().__init__()
        init = dict(init or {})
        init_zero = dict(init_zero or dict(init_weight=0.0))
        init_attn = dict(init_attn) if init_attn is not None else init
        self.in_channels, self.out_channels = in_channels, out_channels
        self.emb_channels = emb_channels
        self.num_heads = 0 if not attention else (
            num_heads if num_heads is not None else out_channels // channels_per_head)
        self.dropout, self.skip_scale = float(dropout), float(skip_scale)
        self.adaptive_scale = bool(adaptive_scale)

        self.norm0 = GroupNorm(in_channels, eps=eps)
        self.conv0 = Conv2d(in_channels, out_channels, 3, up=up, down=down,
                            resample_filter=resample_filter, **init)
        self.affine = Linear(emb_channels, out_channels * (2 if adaptive_scale else 1), **init)
        self.norm1 = GroupNorm(out_channels, eps=eps)
        self.conv1 = Conv2d(out_channels, out_channels, 3, **init_zero)
        if out_channels != in_channels or up or down:
            kernel = 1 if (resample_proj or out_channels != in_channels) else 0
            self.skip = Conv2d(in_channels, out_channels, kernel, up=up, down=down,
                               resample_filter=resample_filter, **init)
        else:
            self.skip = None
        if self.num_heads:
            self.norm2 = GroupNorm(out_channels, eps=eps)
            self.qkv = Conv2d(out_channels, out_channels * 3, 1, **init_attn)
            self.proj = Conv2d(out_channels, out_channels, 1, **init_zero)
        else:
            self.norm2 = None
            self.qkv = None
            self.proj = None

    def forward(self, x: Tensor, emb: Optional[Tensor] = None) -> Tensor:
        assert emb is not None, "UNetBlock needs the embedding"
        orig = x
        h = self.conv0(F.silu(self.norm0(x)))
        p = self.affine(emb).unsqueeze(2).unsqueeze(3).to(h.dtype)
        if self.adaptive_scale:
            scale, shift = p[:, :self.out_channels], p[:, self.out_channels:]
            h = F.silu(shift + self.norm1(h) * (scale + 1))
        else:
            h = F.silu(self.norm1(h + p))
        h = self.conv1(F.dropout(h, p=self.dropout, training=self.training))
        skip = self.skip
        h = (h + (orig if skip is None else skip(orig))) * self.skip_scale

        norm2 = self.norm2
        qkv = self.qkv
        proj = self.proj
        if norm2 is not None and qkv is not None and proj is not None:
            B, C, H, W = h.shape[0], h.shape[1], h.shape[2], h.shape[3]
            heads = self.num_heads
            d = C // heads
            t = qkv(norm2(h)).reshape(B * heads, d, 3, H * W)
            q, k, v = t[:, :, 0], t[:, :, 1], t[:, :, 2]                   # [B*heads, d, HW]
            w = torch.softmax(torch.matmul(q.transpose(1, 2), k / math.sqrt(d)), dim=2)
            a = torch.matmul(v, w.transpose(1, 2))                         # [B*heads, d, HW]
            h = (proj(a.reshape(B, C, H, W)) + h) * self.skip_scale
        return h
