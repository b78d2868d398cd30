"""openai/consistency_models' teacher network (guided-diffusion's ``UNetModel``), our own code.

Reads the state dicts that openai/consistency_models publishes for its EDM teachers
(``edm_imagenet64_ema.pt``: ``torch.save(UNetModel(...).state_dict())``) with parameter names
identical to the original, so ``load_state_dict(sd, strict=True)`` works. Written from the
architecture (Dhariwal & Nichol 2021, "Diffusion models beat GANs", App. A; Song et al. 2023,
"Consistency models", App. C):

* sinusoidal embedding of the timestep ([cos, sin](t * 10000^(-k/half)), half = C // 2, a zero
  column when C is odd), ``time_embed`` = Linear-SiLU-Linear to 4C, plus ``label_emb``;
* ``input_blocks``: a 3x3 conv, then per level ``num_res_blocks`` residual blocks (each followed
  by self-attention when the level's downsample rate is in ``attention_resolutions``) and, except
  at the last level, a downsampling block (a residual block with 2x2 average pooling inside when
  ``resblock_updown``, else a stride-2 conv ``op`` / average pooling);
* ``middle_block``: residual block, attention, residual block;
* ``output_blocks``: per level (deepest first) ``num_res_blocks + 1`` residual blocks on
  [h, skip] concatenated, attention as above, and an upsampling block after the last of each
  level but the first (residual block with nearest 2x upsampling inside, or nearest 2x + ``conv``);
* ``out``: GroupNorm-SiLU-conv3x3.

Residual blocks (``in_layers``: GroupNorm-SiLU-conv3x3; ``emb_layers``: SiLU-Linear;
``out_layers``: GroupNorm-SiLU-Dropout-conv3x3; ``skip_connection``: identity or 1x1 conv) add
the embedding as a GroupNorm scale and shift (``use_scale_shift_norm``: norm(h) * (1 + scale) +
shift) or before the second GroupNorm. GroupNorm has 32 groups, eps 1e-5, and is computed in
float32 for float16/bfloat16 inputs (float64 stays float64). Residual sums are not rescaled.

**Attention.** openai/consistency_models builds every ``AttentionBlock`` with its default
``attention_type="flash"`` (``use_new_attention_order`` is accepted there but never read): the
qkv projection is a 1x1 *Conv2d* (weights [3C, C, 1, 1]) whose output rows are read as
(three, heads, head_dim) -- flash-attn's ``"b (three h d) s"`` layout -- and attention is
softmax(q^T k / sqrt(head_dim)) v, then ``proj_out`` (1x1 conv) and x + h. That is the default
here (``qkv_order="three_heads"``; guided-diffusion's ``QKVAttention``, the
``use_new_attention_order=True`` variant, reads the same order). guided-diffusion's default
``QKVAttentionLegacy`` reads (heads, three, head_dim) instead: ``qkv_order="heads_three"``
(but guided-diffusion's own checkpoints hold 1-D conv weights [3C, C, 1], which this module does
not read). Heads: ``channels // num_head_channels`` when ``num_head_channels != -1``, else
``num_heads`` (``num_heads_upsample`` in the decoder). Attention is a plain matmul/softmax (the
softmax in float32 for half inputs), so it runs under ``torch.func.jvp`` / ``vmap`` in float64.

**Denoiser.** ``OpenAIDenoiser`` is this network with EDM's preconditioning as
openai/consistency_models' ``KarrasDenoiser.denoise`` applies it (sigma_data 0.5):
``D = c_skip x + c_out F(c_in x, 1000 * 0.25 * ln(sigma + 1e-44), y)`` with
c_skip = sd^2/(sigma^2+sd^2), c_out = sigma sd/sqrt(sigma^2+sd^2), c_in = 1/sqrt(sigma^2+sd^2).
It is a subclass of ``UNetModel``, so its state dict has exactly the original's names. Class
labels are int64 [B] or one-hot floats [B, num_classes] (argmax); ``None`` or an unconditional
network: no label term. ``use_fp16`` is accepted and ignored: the network runs in the dtype of
its input (cast the module with ``.double()`` etc.); under ``torch.autocast`` it follows autocast.

**Student.** ``student=True`` adds ``s_time_embed`` (an MLP like ``time_embed`` whose last
Linear is zero-initialised) embedding the jump target s with the same time transform as sigma,
added to the time embedding. A student loading the teacher's weights with ``strict=False``
(missing keys: only ``s_*``) equals the teacher exactly for every s; ``s=None``: no s term.

Settings (``build_openai_unet``) use openai's script names; ``DEFAULTS`` are the ImageNet-64
EDM teacher's (``edm_imagenet64_ema.pt``, scripts/launch.sh of openai/consistency_models).
"""

from __future__ import annotations

import math
import os
from typing import Any, Dict, List, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.api import SEmbeddingMLP
from core.base.bounds import check_network_kwargs, check_state_dict
from core.base.errors import UserError, first_line

SIGMA_DATA = 0.5

#: The ImageNet-64 EDM teacher of openai/consistency_models (edm_imagenet64_ema.pt): the flags of
#: its sampling command in scripts/launch.sh, the rest from cm/script_util.py's defaults.
DEFAULTS: Dict[str, Any] = {
    "image_size": 64,
    "in_channels": 3,
    "num_channels": 192,
    "out_channels": 3,
    "num_res_blocks": 3,
    "attention_resolutions": [32, 16, 8],      # resolutions; UNetModel gets ds = 64 // res
    "channel_mult": [1, 2, 3, 4],
    "class_cond": True,
    "num_classes": 1000,
    "num_heads": 4,
    "num_head_channels": 64,
    "num_heads_upsample": -1,
    "resblock_updown": True,
    "use_scale_shift_norm": True,
    "dropout": 0.1,
    "use_new_attention_order": False,
    "use_fp16": True,                          # ignored: the network runs in its input's dtype
    "conv_resample": True,
    "sigma_data": SIGMA_DATA,
}

#: create_model's channel_mult when it is "" (cm/script_util.py)
DEFAULT_CHANNEL_MULT = {512: [0.5, 1, 1, 2, 2, 4, 4], 256: [1, 1, 2, 2, 4, 4],
                        128: [1, 1, 2, 3, 4], 64: [1, 2, 3, 4]}

QKV_ORDERS = ("three_heads", "heads_three")


# -- building blocks -----------------------------------------------------------------------------

def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """[cos(t w_k), sin(t w_k)], w_k = exp(-ln(max_period) k / half), k < half = dim // 2, plus a
    zero column for odd dim; computed in float64 for float64 t, else in float32 (as the
    original, which casts t to float32)."""
    dtype = torch.float64 if t.dtype == torch.float64 else torch.float32
    half = dim // 2
    k = torch.arange(half, dtype=dtype, device=t.device)
    freqs = torch.exp(-math.log(max_period) * k / half)
    arg = t.to(dtype).reshape(-1, 1) * freqs.reshape(1, -1)
    out = torch.cat([torch.cos(arg), torch.sin(arg)], dim=1)
    if dim % 2 == 1:
        out = torch.cat([out, torch.zeros_like(out[:, :1])], dim=1)
    return out


class GroupNorm32(nn.GroupNorm):
    """GroupNorm(32, C, eps=1e-5) evaluated in float32 for half inputs, cast back."""

    def __init__(self, channels: int):
        super().__init__(32, channels)

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.float16 or x.dtype == torch.bfloat16:
            return F.group_norm(x.float(), self.num_groups, self.weight.float(),
                                self.bias.float(), self.eps).to(x.dtype)
        return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


def _embedding_mlp(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(cin, cout), nn.SiLU(), nn.Linear(cout, cout))


class InputConv(nn.Conv2d):
    """``input_blocks.0.0``: a 3x3 conv with the blocks' (x, emb) signature."""

    def __init__(self, cin: int, cout: int):
        super().__init__(cin, cout, 3, padding=1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        return self._conv_forward(x, self.weight, self.bias)


class Downsample(nn.Module):
    """H -> H / 2: ``op`` is a stride-2 3x3 conv (``conv_resample``) or 2x2 average pooling."""

    def __init__(self, channels: int, use_conv: bool, out_channels: int):
        super().__init__()
        if use_conv:
            self.op = nn.Conv2d(channels, out_channels, 3, stride=2, padding=1)
        else:
            self.op = nn.AvgPool2d(2, stride=2)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """H -> 2H: nearest-neighbour, then a 3x3 ``conv`` when ``conv_resample``."""

    def __init__(self, channels: int, use_conv: bool, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, out_channels, 3, padding=1) if use_conv else None

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = F.interpolate(x, scale_factor=2.0, mode="nearest")
        conv = self.conv
        if conv is not None:
            h = conv(h)
        return h


class ResBlock(nn.Module):
    """guided-diffusion's residual block; ``resample`` 1 = upsample, 2 = downsample inside it
    (after the first GroupNorm-SiLU, on both the branch and the skip path), 0 = none."""

    def __init__(self, channels: int, emb_channels: int, dropout: float, out_channels: int,
                 use_scale_shift_norm: bool, resample: int = 0):
        super().__init__()
        self.out_channels, self.resample = out_channels, resample
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(GroupNorm32(channels), nn.SiLU(),
                                       nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels if use_scale_shift_norm
                                 else out_channels))
        self.out_layers = nn.Sequential(GroupNorm32(out_channels), nn.SiLU(), nn.Dropout(dropout),
                                        nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip_connection = nn.Identity() if out_channels == channels else \
            nn.Conv2d(channels, out_channels, 1)

    def _resample(self, x: Tensor) -> Tensor:
        if self.resample == 1:
            return F.interpolate(x, scale_factor=2.0, mode="nearest")
        return F.avg_pool2d(x, 2, stride=2)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        if self.resample != 0:
            h = self.in_layers[1](self.in_layers[0](x))
            h = self.in_layers[2](self._resample(h))
            x = self._resample(x)
        else:
            h = self.in_layers(x)
        e = self.emb_layers(emb).to(h.dtype).unsqueeze(-1).unsqueeze(-1)
        if self.use_scale_shift_norm:
            scale, shift = torch.chunk(e, 2, dim=1)
            h = self.out_layers[0](h) * (1.0 + scale) + shift
            h = self.out_layers[3](self.out_layers[2](self.out_layers[1](h)))
        else:
            h = self.out_layers(h + e)
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    """x + proj_out(attention(qkv(norm(x)))) over the H*W positions (see module doc for the
    qkv row order)."""

    def __init__(self, channels: int, num_heads: int = 1, num_head_channels: int = -1,
                 qkv_order: str = "three_heads"):
        super().__init__()
        if num_head_channels != -1:
            if channels % num_head_channels:
                raise ValueError(f"{channels} attention channels are not divisible by "
                                 f"num_head_channels = {num_head_channels}")
            num_heads = channels // num_head_channels
        if num_heads < 1 or channels % num_heads:
            raise ValueError(f"{channels} attention channels cannot be split into "
                             f"{num_heads} heads")
        if qkv_order not in QKV_ORDERS:
            raise ValueError(f"qkv_order must be one of {QKV_ORDERS}, got {qkv_order!r}")
        self.num_heads = num_heads
        self.heads_first = qkv_order == "heads_three"
        self.norm = GroupNorm32(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        B, C, H, W = x.shape[0], x.shape[1], x.shape[2], x.shape[3]
        heads = self.num_heads
        d = C // heads
        qkv = self.qkv(self.norm(x))
        if self.heads_first:
            qkv = qkv.reshape(B, heads, 3, d, H * W).transpose(1, 2)
        else:
            qkv = qkv.reshape(B, 3, heads, d, H * W)
        q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]                    # [B, heads, d, HW]
        w = torch.matmul(q.transpose(-1, -2), k) * (1.0 / math.sqrt(d))   # [B, heads, HW, HW]
        if w.dtype == torch.float16 or w.dtype == torch.bfloat16:
            w = torch.softmax(w.float(), dim=-1).to(v.dtype)
        else:
            w = torch.softmax(w, dim=-1)
        a = torch.matmul(v, w.transpose(-1, -2))                     # [B, heads, d, HW]
        return x + self.proj_out(a.reshape(B, C, H, W))


class EmbedSequential(nn.Sequential):
    """guided-diffusion's TimestepEmbedSequential: children all take (x, emb)."""

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        for layer in self:
            x = layer(x, emb)
        return x


# -- the network ---------------------------------------------------------------------------------

class UNetModel(nn.Module):
    """guided-diffusion's UNetModel (openai/consistency_models' variant, see module doc).

    The constructor takes the original's arguments (``attention_resolutions`` are *downsample
    rates*, as the original's constructor receives them; ``num_classes`` None or 0 for an
    unconditional model), plus ``qkv_order`` and ``student``. ``forward(x, timesteps, y=None,
    s_timesteps=None)`` is the original's F(x, timesteps, y) (+ the student's s term)."""

    def __init__(self, image_size: int, in_channels: int, model_channels: int,
                 out_channels: int, num_res_blocks: int, attention_resolutions,
                 dropout: float = 0.0, channel_mult=(1, 2, 4, 8), conv_resample: bool = True,
                 dims: int = 2, num_classes: Optional[int] = None, use_checkpoint: bool = False,
                 use_fp16: bool = False, num_heads: int = 1, num_head_channels: int = -1,
                 num_heads_upsample: int = -1, use_scale_shift_norm: bool = False,
                 resblock_updown: bool = False, use_new_attention_order: bool = False,
                 qkv_order: str = "three_heads", student: bool = False):
        super().__init__()
        if dims != 2:
            raise ValueError(f"only 2-D images are supported (dims = {dims})")
        if num_heads_upsample == -1:
            num_heads_upsample = num_heads
        attn_ds = set(int(a) for a in attention_resolutions)
        mc = int(model_channels)
        self.image_size, self.in_channels, self.out_channels = int(image_size), int(in_channels), \
            int(out_channels)
        self.model_channels = mc
        self.num_classes = int(num_classes or 0)
        self.student = bool(student)
        emb_ch = 4 * mc

        self.time_embed = _embedding_mlp(mc, emb_ch)
        self.label_emb = nn.Embedding(self.num_classes, emb_ch) if self.num_classes > 0 else None

        def res(cin: int, cout: int, resample: int = 0) -> ResBlock:
            return ResBlock(cin, emb_ch, dropout, cout, use_scale_shift_norm, resample)

        def attn(ch: int, heads: int) -> AttentionBlock:
            return AttentionBlock(ch, heads, num_head_channels, qkv_order)

        ch = input_ch = int(channel_mult[0] * mc)
        blocks: List[nn.Module] = [EmbedSequential(InputConv(self.in_channels, ch))]
        chans, ds = [ch], 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers: List[nn.Module] = [res(ch, int(mult * mc))]
                ch = int(mult * mc)
                if ds in attn_ds:
                    layers.append(attn(ch, num_heads))
                blocks.append(EmbedSequential(*layers))
                chans.append(ch)
            if level != len(channel_mult) - 1:
                blocks.append(EmbedSequential(res(ch, ch, 2) if resblock_updown
                                              else Downsample(ch, conv_resample, ch)))
                chans.append(ch)
                ds *= 2
        self.input_blocks = nn.ModuleList(blocks)
        self.middle_block = EmbedSequential(res(ch, ch), attn(ch, num_heads), res(ch, ch))
        blocks = []
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [res(ch + chans.pop(), int(mc * mult))]
                ch = int(mc * mult)
                if ds in attn_ds:
                    layers.append(attn(ch, num_heads_upsample))
                if level and i == num_res_blocks:
                    layers.append(res(ch, ch, 1) if resblock_updown
                                  else Upsample(ch, conv_resample, ch))
                    ds //= 2
                blocks.append(EmbedSequential(*layers))
        self.output_blocks = nn.ModuleList(blocks)
        self.out = nn.Sequential(GroupNorm32(ch), nn.SiLU(),
                                 nn.Conv2d(input_ch, self.out_channels, 3, padding=1))

        # the student's s pathway: zero at initialisation
        self.s_time_embed = SEmbeddingMLP(mc, emb_ch) if self.student else None

    def network(self, x: Tensor, timesteps: Tensor, y: Optional[Tensor],
                s_timesteps: Optional[Tensor]) -> Tensor:
        """F(x, timesteps, y) of the original (timesteps [B]; y int64 [B]); s_timesteps, in the
        same units as timesteps, feeds the student's s pathway."""
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).to(x.dtype))
        s_time_embed = self.s_time_embed
        if s_time_embed is not None and s_timesteps is not None:
            emb = emb + s_time_embed(
                timestep_embedding(s_timesteps, self.model_channels).to(x.dtype))
        label_emb = self.label_emb
        if label_emb is not None and y is not None:
            emb = emb + label_emb(y)
        hs: List[Tensor] = []
        h = x
        for block in self.input_blocks:
            h = block(h, emb)
            hs.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, hs.pop()], dim=1), emb)
        return self.out(h)

    def forward(self, x: Tensor, timesteps: Tensor, y: Optional[Tensor] = None,
                s_timesteps: Optional[Tensor] = None) -> Tensor:
        return self.network(x, timesteps, y, s_timesteps)


class OpenAIDenoiser(UNetModel):
    """D(x, sigma[, class_labels][, s]) = c_skip x + c_out F(c_in x, 250 ln(sigma + 1e-44), y):
    openai/consistency_models' KarrasDenoiser.denoise around UNetModel (state dict names
    unchanged). ``model_output`` gives F alone (the raw network output)."""

    def __init__(self, *args, sigma_data: float = SIGMA_DATA, **kwargs):
        super().__init__(*args, **kwargs)
        self.sigma_data = float(sigma_data)

    def _labels(self, class_labels: Optional[Tensor], B: int) -> Optional[Tensor]:
        if class_labels is None or self.num_classes == 0:
            return None
        if class_labels.dim() == 2:                      # one-hot [B, num_classes]
            return class_labels.argmax(dim=1).reshape(-1).expand(B)
        return class_labels.reshape(-1).to(torch.int64).expand(B)

    def _sigma(self, sigma: Tensor, x: Tensor) -> Tensor:
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        return sigma.reshape(-1).to(dtype).expand(x.shape[0])

    @torch.jit.export
    def model_output(self, x: Tensor, sigma: Tensor, class_labels: Optional[Tensor] = None,
                     s: Optional[Tensor] = None) -> Tensor:
        """F(c_in x, c_noise(sigma), y) with c_noise = 1000 * 0.25 * ln(sigma + 1e-44)."""
        B = x.shape[0]
        sig = self._sigma(sigma, x)
        sd = self.sigma_data
        c_in = (1.0 / torch.sqrt(sig ** 2 + sd ** 2)).to(x.dtype).reshape(B, 1, 1, 1)
        c_noise = 1000 * 0.25 * torch.log(sig + 1e-44)
        c_noise_s: Optional[Tensor] = None
        if s is not None:
            c_noise_s = 1000 * 0.25 * torch.log(self._sigma(s, x) + 1e-44)
        return self.network(c_in * x, c_noise, self._labels(class_labels, B), c_noise_s)

    def forward(self, x: Tensor, sigma: Tensor, class_labels: Optional[Tensor] = None,
                s: Optional[Tensor] = None) -> Tensor:
        B = x.shape[0]
        sig = self._sigma(sigma, x)
        sd = self.sigma_data
        c_skip = (sd ** 2 / (sig ** 2 + sd ** 2)).to(x.dtype).reshape(B, 1, 1, 1)
        c_out = (sig * sd / torch.sqrt(sig ** 2 + sd ** 2)).to(x.dtype).reshape(B, 1, 1, 1)
        return c_skip * x + c_out * self.model_output(x, sigma, class_labels, s)


# -- settings ------------------------------------------------------------------------------------

#: UNetModel's constructor arguments (build_openai_unet(..., raw=True) takes exactly these)
RAW_KEYS = ("image_size", "in_channels", "model_channels", "out_channels", "num_res_blocks",
            "attention_resolutions", "dropout", "channel_mult", "conv_resample", "dims",
            "num_classes", "use_checkpoint", "use_fp16", "num_heads", "num_head_channels",
            "num_heads_upsample", "use_scale_shift_norm", "resblock_updown",
            "use_new_attention_order")
#: accepted in the script-style settings, without effect on the network
IGNORED_KEYS = ("use_fp16", "use_checkpoint", "sigma_min", "sigma_max", "weight_schedule",
                "learn_sigma")
EXTRA_KEYS = ("qkv_order", "sigma_data")


def _int_list(value, key: str) -> list:
    if isinstance(value, str):
        value = [v for v in value.replace(" ", "").split(",") if v]
    try:
        out = [float(v) if key == "channel_mult" else int(v) for v in value]
    except (TypeError, ValueError):
        raise UserError(f"openai unet: {key} must be a list of numbers or a comma-separated "
                        f"string, got {value!r}") from None
    return [int(v) if float(v).is_integer() else v for v in out]


def _setting_int(cfg: dict, key: str, lo: int) -> int:
    v = cfg[key]
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise UserError(f"openai unet: {key} must be an integer >= {lo}, got {v!r}")
    return v


def build_openai_unet(settings: Mapping[str, Any], student: bool = False,
                      raw: bool = False) -> OpenAIDenoiser:
    """An ``OpenAIDenoiser`` from openai-style settings.

    ``raw=False`` (user-facing, script names): ``DEFAULTS`` overridden by `settings`;
    ``model_channels`` or ``num_channels``; ``attention_resolutions`` are *resolutions* (a list
    or "32,16,8"), converted to downsample rates ``image_size // res`` -- or give the rates
    directly as ``attention_ds``; ``channel_mult`` a list, "1,2,3,4", or "" (create_model's
    default for the image size); conditional iff ``class_cond`` (``num_classes``, default 1000).
    ``raw=True``: `settings` are UNetModel's constructor keyword arguments as the original
    received them (``attention_resolutions`` already downsample rates, e.g. the fixture's
    ``unet_kwargs``), no DEFAULTS. Both also take ``qkv_order`` and ``sigma_data``.
    Bad settings raise UserError."""
    settings = dict(settings)
    extra = {k: settings.pop(k) for k in EXTRA_KEYS if k in settings}
    qkv_order = extra.get("qkv_order", "three_heads")
    if qkv_order not in QKV_ORDERS:
        raise UserError(f"openai unet: qkv_order must be one of {', '.join(QKV_ORDERS)}, "
                        f"got {qkv_order!r}")
    try:
        sigma_data = float(extra.get("sigma_data", SIGMA_DATA))
    except (TypeError, ValueError):
        raise UserError(f"openai unet: sigma_data must be a number, "
                        f"got {extra['sigma_data']!r}") from None
    if raw:
        unknown = [k for k in settings if k not in RAW_KEYS]
        if unknown:
            raise UserError(f"openai unet: unknown UNetModel argument {unknown[0]!r}")
        kwargs = settings
    else:
        try:
            kwargs = _script_settings(settings)
        except (TypeError, ValueError) as e:
            raise UserError(f"openai unet: bad settings ({first_line(e, 160)})") from None
    check_network_kwargs(kwargs, "openai unet")
    try:
        return OpenAIDenoiser(**kwargs, qkv_order=qkv_order, student=student,
                              sigma_data=sigma_data)
    except (TypeError, ValueError, KeyError, IndexError) as e:
        raise UserError(f"openai unet: bad settings ({first_line(e, 160)})") from None


def _script_settings(settings: dict) -> dict:
    known = set(DEFAULTS) | set(IGNORED_KEYS) | {"model_channels", "attention_ds"}
    unknown = [k for k in settings if k not in known]
    if unknown:
        raise UserError(f"openai unet: unknown setting {unknown[0]!r}")
    if "model_channels" in settings:
        if "num_channels" in settings and settings["num_channels"] != settings["model_channels"]:
            raise UserError("openai unet: model_channels and num_channels disagree")
        settings["num_channels"] = settings.pop("model_channels")
    if settings.get("learn_sigma", False):
        raise UserError("openai unet: learn_sigma = true is not supported (EDM teachers "
                        "predict the mean only)")
    cfg = {**DEFAULTS, **settings}
    size = _setting_int(cfg, "image_size", 1)
    mult = cfg["channel_mult"]
    if mult == "" or mult is None:
        if size not in DEFAULT_CHANNEL_MULT:
            raise UserError(f"openai unet: no default channel_mult for image_size {size}; "
                            f"set channel_mult")
        mult = DEFAULT_CHANNEL_MULT[size]
    mult = _int_list(mult, "channel_mult")
    if not mult:
        raise UserError("openai unet: channel_mult is empty")
    if "attention_ds" in cfg:
        ds = _int_list(cfg["attention_ds"], "attention_ds")
    else:
        res = _int_list(cfg["attention_resolutions"], "attention_resolutions")
        bad = [r for r in res if r < 1 or size % r]
        if bad:
            raise UserError(f"openai unet: attention resolution {bad[0]} does not divide "
                            f"image_size {size}")
        ds = [size // r for r in res]
    num_classes = None
    if cfg["class_cond"]:
        num_classes = _setting_int(cfg, "num_classes", 1)
    in_ch = _setting_int(cfg, "in_channels", 1)
    return dict(image_size=size, in_channels=in_ch,
                model_channels=_setting_int(cfg, "num_channels", 1),
                out_channels=_setting_int(cfg, "out_channels", 1),
                num_res_blocks=_setting_int(cfg, "num_res_blocks", 1),
                attention_resolutions=tuple(ds), dropout=float(cfg["dropout"]),
                channel_mult=tuple(mult), conv_resample=bool(cfg["conv_resample"]),
                num_classes=num_classes, num_heads=int(cfg["num_heads"]),
                num_head_channels=int(cfg["num_head_channels"]),
                num_heads_upsample=int(cfg["num_heads_upsample"]),
                use_scale_shift_norm=bool(cfg["use_scale_shift_norm"]),
                resblock_updown=bool(cfg["resblock_updown"]),
                use_new_attention_order=bool(cfg["use_new_attention_order"]))


# -- state dicts ---------------------------------------------------------------------------------

def load_openai_state_dict(path: str | os.PathLike) -> Dict[str, Tensor]:
    """``torch.load(path, map_location="cpu", weights_only=True)`` of a UNetModel state dict;
    a missing, truncated or foreign file raises a one-line UserError."""
    from core.base.io import torch_load

    sd = torch_load(path, "openai UNetModel state dict")
    if not isinstance(sd, Mapping) or not sd or not all(
            isinstance(k, str) and isinstance(v, Tensor) for k, v in sd.items()):
        raise UserError(f"{path}: not a UNetModel state dict (expected a mapping of parameter "
                        f"names to tensors)")
    return dict(sd)


def check_openai_state_dict(model: nn.Module, sd: Mapping[str, Tensor],
                            source: str = "state dict") -> None:
    """UserError (one line) naming the first key of `sd` that does not fit `model`: missing
    (the student's ``s_*`` keys may be missing), unexpected, or of another shape."""
    own = model.state_dict()
    check_state_dict(sd, source, own)
    hint = "; are the network settings those of the checkpoint?"
    for key, value in own.items():
        if key not in sd:
            if key.startswith("s_"):
                continue
            raise UserError(f"{source}: missing key {key!r}{hint}")
        if tuple(sd[key].shape) != tuple(value.shape):
            got = tuple(sd[key].shape)
            why = " (a 1-D conv: guided-diffusion's own format, not consistency_models')" \
                if key.endswith((".qkv.weight", ".proj_out.weight")) and len(got) == 3 else ""
            raise UserError(f"{source}: key {key!r} has shape {list(got)}, the network expects "
                            f"{list(value.shape)}{why}{hint}")
    for key in sd:
        if key not in own:
            raise UserError(f"{source}: unexpected key {key!r}{hint}")


def load_openai_teacher(path: str | os.PathLike, settings: Mapping[str, Any],
                        student: bool = False, raw: bool = False) -> OpenAIDenoiser:
    """Build (``build_openai_unet``), check and load the state dict at `path`; eval mode. A
    student gets the teacher's weights and its zero-initialised s pathway."""
    net = build_openai_unet(settings, student=student, raw=raw)
    sd = load_openai_state_dict(path)
    check_openai_state_dict(net, sd, str(path))
    net.load_state_dict(sd, strict=not student)
    return net.eval()
