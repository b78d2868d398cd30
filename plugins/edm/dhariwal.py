"""``DhariwalUNet``: the ADM U-Net of Dhariwal & Nichol 2021 ("Diffusion models beat GANs") as
configured by EDM (its ImageNet-64 teacher).

Written from the ADM paper (residual blocks with adaptive GroupNorm scale/shift from the
embedding, box-filter up/down-sampling inside the residual blocks, multi-head attention with
64 channels per head at the chosen resolutions, a class embedding added to the time embedding)
and the layout of EDM's pickled state:

* ``map_noise`` (positional, no endpoint) of c_noise, plus ``map_augment`` of the augmentation
  labels (when given), then ``map_layer0``-SiLU-``map_layer1``, plus ``map_label`` of the
  one-hot label (no bias), then SiLU;
* ``enc``: ``{R}x{R}_conv`` at the top level, ``{R}x{R}_down`` at the others, then
  ``{R}x{R}_block{i}``; ``dec``: ``{R}x{R}_in0`` + ``_in1`` at the lowest level, ``{R}x{R}_up``
  elsewhere, then ``num_blocks + 1`` blocks on [h, skip]; ``out_norm`` + ``out_conv``.

*Student* (``student=True``): ``s_map_noise``, ``s_map_layer0``, ``s_map_layer1`` embed the jump
target's c_noise like the t path; ``s_map_layer1`` is zero-initialised and added before the
final SiLU, so a student holding the teacher's weights equals the teacher for every s.
"""

import math
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.api import jump_target, zero_init
from plugins.edm.layers import Conv2d, GroupNorm, Linear, PositionalEmbedding, UNetBlock


class DhariwalUNet(nn.Module):
    """F(x, c_noise[, class_labels][, augment_labels][, s_noise]) for x [B, C, H, W]."""

    dec_cat: List[bool]

    def __init__(self, img_resolution: int, in_channels: int, out_channels: int,
                 label_dim: int = 0, augment_dim: int = 0, model_channels: int = 192,
                 channel_mult: Sequence[int] = (1, 2, 3, 4), channel_mult_emb: int = 4,
                 num_blocks: int = 3, attn_resolutions: Sequence[int] = (32, 16, 8),
                 dropout: float = 0.10, label_dropout: float = 0.0, student: bool = False):
        super().__init__()
        channel_mult = [int(m) for m in channel_mult]
        attn_resolutions = [int(r) for r in attn_resolutions]
        self.img_resolution = img_resolution
        self.in_channels, self.out_channels = in_channels, out_channels
        self.label_dim, self.augment_dim = int(label_dim), int(augment_dim)
        self.label_dropout = float(label_dropout)
        self.student = bool(student)
        emb_channels = model_channels * channel_mult_emb
        init = dict(init_mode="kaiming_uniform", init_weight=math.sqrt(1 / 3),
                    init_bias=math.sqrt(1 / 3))
        init_zero = dict(init_mode="kaiming_uniform", init_weight=0.0, init_bias=0.0)
        block_kwargs = dict(emb_channels=emb_channels, channels_per_head=64, dropout=dropout,
                            init=init, init_zero=init_zero)

        self.map_noise = PositionalEmbedding(model_channels)
        self.map_augment = Linear(augment_dim, model_channels, bias=False,
                                  init_mode="kaiming_normal", init_weight=0.0) \
            if augment_dim else None
        self.map_layer0 = Linear(model_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)
        self.map_label = Linear(label_dim, emb_channels, bias=False, init_mode="kaiming_normal",
                                init_weight=math.sqrt(label_dim)) if label_dim else None

        enc: dict = {}
        cout = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, model_channels * mult
                enc[f"{res}x{res}_conv"] = Conv2d(cin, cout, 3, **init)
            else:
                enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **block_kwargs)
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                enc[f"{res}x{res}_block{idx}"] = UNetBlock(
                    cin, cout, attention=(res in attn_resolutions), **block_kwargs)
        self.enc = nn.ModuleDict(enc)
        skips = [blk.out_channels for blk in enc.values()]

        dec: dict = {}
        dec_cat: List[bool] = []
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, **block_kwargs)
                dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **block_kwargs)
                dec_cat += [False, False]
            else:
                dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, **block_kwargs)
                dec_cat.append(False)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                dec[f"{res}x{res}_block{idx}"] = UNetBlock(
                    cin, cout, attention=(res in attn_resolutions), **block_kwargs)
                dec_cat.append(True)
        self.dec = nn.ModuleDict(dec)
        self.dec_cat = dec_cat
        self.out_norm = GroupNorm(cout)
        self.out_conv = Conv2d(cout, out_channels, 3, **init_zero)

        if student:
            self.s_map_noise = PositionalEmbedding(model_channels)
            self.s_map_layer0 = Linear(model_channels, emb_channels, **init)
            self.s_map_layer1 = zero_init(Linear(emb_channels, emb_channels, **init))
        else:
            self.s_map_noise = None
            self.s_map_layer0 = None
            self.s_map_layer1 = None

    def forward(self, x: Tensor, noise_labels: Tensor, class_labels: Optional[Tensor] = None,
                augment_labels: Optional[Tensor] = None,
                s_noise_labels: Optional[Tensor] = None) -> Tensor:
        emb = self.map_noise(noise_labels)
        map_augment = self.map_augment
        if map_augment is not None and augment_labels is not None:
            emb = emb + map_augment(augment_labels.to(emb.dtype))
        emb = self.map_layer1(F.silu(self.map_layer0(emb)))
        map_label = self.map_label
        if map_label is not None and class_labels is not None:
            lab = class_labels.to(emb.dtype)
            if self.training and self.label_dropout > 0:
                keep = torch.rand([x.shape[0], 1], device=x.device) >= self.label_dropout
                lab = lab * keep.to(lab.dtype)
            emb = emb + map_label(lab)
        s_map_noise = self.s_map_noise
        s_map_layer0 = self.s_map_layer0
        s_map_layer1 = self.s_map_layer1
        if s_map_noise is not None and s_map_layer0 is not None and s_map_layer1 is not None:
            s_emb = s_map_noise(jump_target(s_noise_labels, noise_labels))
            emb = emb + s_map_layer1(F.silu(s_map_layer0(s_emb)))
        emb = F.silu(emb)

        skips: List[Tensor] = []
        for block in self.enc.values():
            x = block(x, emb)
            skips.append(x)
        i = 0
        for block in self.dec.values():
            if self.dec_cat[i]:
                x = torch.cat([x, skips.pop()], dim=1)
            i += 1
            x = block(x, emb)
        return self.out_conv(F.silu(self.out_norm(x)))
