"""``SongUNet``: the DDPM++ / NCSN++ U-Net of Song et al. 2021 as configured by EDM.

Written from Song et al. 2021 ("Score-based generative modeling through SDEs", App. H: DDPM++
= positional noise embedding, [1, 1] resampling filter, standard encoder/decoder; NCSN++ =
random Fourier embedding, [1, 3, 3, 1] FIR filter, "residual" progressive input and skip/
standard output) and the layout of EDM's pickled state:

* the noise embedding ``map_noise`` of c_noise (its cos/sin halves swapped to [sin, cos]), plus
  ``map_label`` of the one-hot label scaled by sqrt(label_dim) and ``map_augment`` of the
  augmentation labels (when given), then ``map_layer0``-SiLU-``map_layer1``-SiLU;
* ``enc`` (an ``nn.ModuleDict``): ``{R}x{R}_conv`` at the top level, then per level a
  ``{R}x{R}_down`` block, optional progressive-input modules (``aux_down`` + ``aux_skip`` for
  encoder_type "skip", ``aux_residual`` for "residual") and ``{R}x{R}_block{i}``;
* ``dec``: ``{R}x{R}_in0`` (attention) + ``_in1`` at the lowest level or ``{R}x{R}_up``
  elsewhere, ``num_blocks + 1`` blocks on [h, skip] (attention on the last one at the attention
  resolutions), and the output head ``aux_norm`` + ``aux_conv`` (at every level for
  decoder_type "skip", summed through ``aux_up``; only at the top level for "standard").

*Student* (``student=True``): ``s_map_noise``, ``s_map_layer0``, ``s_map_layer1`` embed the
jump target's c_noise like the t path does; ``s_map_layer1`` is zero-initialised and its output
is added to ``map_layer1``'s before the final SiLU, so a student holding the teacher's weights
(``strict=False``, missing keys only ``s_*``) equals the teacher for every s.
"""

import math
from typing import List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.api import jump_target, zero_init
from plugins.edm.layers import Conv2d, FourierEmbedding, GroupNorm, Linear, \
    PositionalEmbedding, UNetBlock

# roles of the enc/dec entries ("main", "main_cat" = concatenate a skip first, "aux_down",
# "aux_skip", "aux_residual", "aux_up", "aux_norm", "aux_conv"), fixed at construction so that
# forward is a TorchScript-friendly loop


def _swap_halves(emb: Tensor) -> Tensor:
    """[cos, sin] -> [sin, cos] (the order DDPM++/NCSN++ were trained with)."""
    return emb.reshape(emb.shape[0], 2, -1).flip(1).reshape(emb.shape)


class SongUNet(nn.Module):
    """F(x, c_noise[, class_labels][, augment_labels][, s_noise]) for x [B, C, H, W]."""

    enc_roles: List[str]
    dec_roles: List[str]

    def __init__(self, img_resolution: int, in_channels: int, out_channels: int,
                 label_dim: int = 0, augment_dim: int = 0, model_channels: int = 128,
                 channel_mult: Sequence[int] = (1, 2, 2, 2), channel_mult_emb: int = 4,
                 num_blocks: int = 4, attn_resolutions: Sequence[int] = (16,),
                 dropout: float = 0.10, label_dropout: float = 0.0,
                 embedding_type: str = "positional", channel_mult_noise: int = 1,
                 encoder_type: str = "standard", decoder_type: str = "standard",
                 resample_filter: Sequence[int] = (1, 1), student: bool = False):
        super().__init__()
        if embedding_type not in ("fourier", "positional"):
            raise ValueError(f"SongUNet: unknown embedding_type {embedding_type!r}")
        if encoder_type not in ("standard", "skip", "residual"):
            raise ValueError(f"SongUNet: unknown encoder_type {encoder_type!r}")
        if decoder_type not in ("standard", "skip"):
            raise ValueError(f"SongUNet: unknown decoder_type {decoder_type!r}")
        channel_mult = [int(m) for m in channel_mult]
        attn_resolutions = [int(r) for r in attn_resolutions]
        resample_filter = [float(v) for v in resample_filter]
        self.img_resolution = img_resolution
        self.in_channels, self.out_channels = in_channels, out_channels
        self.label_dim, self.augment_dim = int(label_dim), int(augment_dim)
        self.label_dropout = float(label_dropout)
        self.label_scale = math.sqrt(label_dim) if label_dim else 1.0
        self.student = bool(student)
        emb_channels = model_channels * channel_mult_emb
        noise_channels = model_channels * channel_mult_noise
        init = dict(init_mode="xavier_uniform")
        init_zero = dict(init_mode="xavier_uniform", init_weight=1e-5)
        init_attn = dict(init_mode="xavier_uniform", init_weight=float(np.sqrt(0.2)))
        block_kwargs = dict(emb_channels=emb_channels, num_heads=1, dropout=dropout,
                            skip_scale=float(np.sqrt(0.5)), eps=1e-6,
                            resample_filter=resample_filter, resample_proj=True,
                            adaptive_scale=False, init=init, init_zero=init_zero,
                            init_attn=init_attn)

        def embedding() -> nn.Module:
            if embedding_type == "positional":
                return PositionalEmbedding(noise_channels, endpoint=True)
            return FourierEmbedding(noise_channels)

        self.map_noise = embedding()
        self.map_label = Linear(label_dim, noise_channels, **init) if label_dim else None
        self.map_augment = Linear(augment_dim, noise_channels, bias=False, **init) \
            if augment_dim else None
        self.map_layer0 = Linear(noise_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)

        enc: dict = {}
        enc_roles: List[str] = []
        cout, caux = in_channels, in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, model_channels
                enc[f"{res}x{res}_conv"] = Conv2d(cin, cout, 3, **init)
                enc_roles.append("main")
            else:
                enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **block_kwargs)
                enc_roles.append("main")
                if encoder_type == "skip":
                    enc[f"{res}x{res}_aux_down"] = Conv2d(caux, caux, 0, down=True,
                                                          resample_filter=resample_filter)
                    enc[f"{res}x{res}_aux_skip"] = Conv2d(caux, cout, 1, **init)
                    enc_roles += ["aux_down", "aux_skip"]
                if encoder_type == "residual":
                    enc[f"{res}x{res}_aux_residual"] = Conv2d(
                        caux, cout, 3, down=True, resample_filter=resample_filter,
                        fused_resample=True, **init)
                    enc_roles.append("aux_residual")
                    caux = cout
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                enc[f"{res}x{res}_block{idx}"] = UNetBlock(
                    cin, cout, attention=(res in attn_resolutions), **block_kwargs)
                enc_roles.append("main")
        self.enc = nn.ModuleDict(enc)
        self.enc_roles = enc_roles
        skips = [blk.out_channels for name, blk in enc.items() if "aux" not in name]

        dec: dict = {}
        dec_roles: List[str] = []
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, **block_kwargs)
                dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **block_kwargs)
                dec_roles += ["main", "main"]
            else:
                dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, **block_kwargs)
                dec_roles.append("main")
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                dec[f"{res}x{res}_block{idx}"] = UNetBlock(
                    cin, cout, attention=(idx == num_blocks and res in attn_resolutions),
                    **block_kwargs)
                dec_roles.append("main_cat")
            if decoder_type == "skip" or level == 0:
                if decoder_type == "skip" and level < len(channel_mult) - 1:
                    dec[f"{res}x{res}_aux_up"] = Conv2d(out_channels, out_channels, 0, up=True,
                                                        resample_filter=resample_filter)
                    dec_roles.append("aux_up")
                dec[f"{res}x{res}_aux_norm"] = GroupNorm(cout, eps=1e-6)
                dec[f"{res}x{res}_aux_conv"] = Conv2d(cout, out_channels, 3, **init_zero)
                dec_roles += ["aux_norm", "aux_conv"]
        self.dec = nn.ModuleDict(dec)
        self.dec_roles = dec_roles

        # the student's s pathway (registered last; its last layer is zero)
        if student:
            self.s_map_noise = embedding() if embedding_type == "positional" \
                else FourierEmbedding(noise_channels, seed=2)
            self.s_map_layer0 = Linear(noise_channels, emb_channels, **init)
            self.s_map_layer1 = zero_init(Linear(emb_channels, emb_channels, **init))
        else:
            self.s_map_noise = None
            self.s_map_layer0 = None
            self.s_map_layer1 = None

    def forward(self, x: Tensor, noise_labels: Tensor, class_labels: Optional[Tensor] = None,
                augment_labels: Optional[Tensor] = None,
                s_noise_labels: Optional[Tensor] = None) -> Tensor:
        emb = _swap_halves(self.map_noise(noise_labels))
        map_label = self.map_label
        if map_label is not None and class_labels is not None:
            lab = class_labels.to(emb.dtype)
            if self.training and self.label_dropout > 0:
                keep = torch.rand([x.shape[0], 1], device=x.device) >= self.label_dropout
                lab = lab * keep.to(lab.dtype)
            emb = emb + map_label(lab * self.label_scale)
        map_augment = self.map_augment
        if map_augment is not None and augment_labels is not None:
            emb = emb + map_augment(augment_labels.to(emb.dtype))
        emb = self.map_layer1(F.silu(self.map_layer0(emb)))
        s_map_noise = self.s_map_noise
        s_map_layer0 = self.s_map_layer0
        s_map_layer1 = self.s_map_layer1
        if s_map_noise is not None and s_map_layer0 is not None and s_map_layer1 is not None:
            s_emb = _swap_halves(s_map_noise(jump_target(s_noise_labels, noise_labels)))
            emb = emb + s_map_layer1(F.silu(s_map_layer0(s_emb)))
        emb = F.silu(emb)

        # encoder
        skips: List[Tensor] = []
        aux = x
        i = 0
        for block in self.enc.values():
            role = self.enc_roles[i]
            i += 1
            if role == "aux_down":
                aux = block(aux)
            elif role == "aux_skip":
                x = x + block(aux)
                skips[-1] = x
            elif role == "aux_residual":
                x = (x + block(aux)) / math.sqrt(2)
                skips[-1] = x
                aux = x
            else:
                x = block(x, emb)
                skips.append(x)

        # decoder
        out: Optional[Tensor] = None
        tmp = x
        i = 0
        for block in self.dec.values():
            role = self.dec_roles[i]
            i += 1
            if role == "aux_up":
                assert out is not None
                out = block(out)
            elif role == "aux_norm":
                tmp = block(x)
            elif role == "aux_conv":
                tmp = block(F.silu(tmp))
                out = tmp if out is None else tmp + out
            else:
                if role == "main_cat":
                    x = torch.cat([x, skips.pop()], dim=1)
                x = block(x, emb)
        assert out is not None
        return out
