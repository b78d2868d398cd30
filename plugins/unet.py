"""The ``unet`` network plugin: a DDPM++-style U-Net for images [C, H, W] in EDM's parameterisation.

Written from the papers' descriptions: DDPM++ (Song et al. 2021, "Score-based generative modeling
through stochastic differential equations", Sec. 4.4 / App. H: residual blocks with
GroupNorm-SiLU-conv, embedding injected into every residual block, residual sums rescaled by
1/sqrt(2), self-attention at chosen resolutions and in the middle, skip connections concatenated
in the decoder) with EDM's preconditioning (Karras et al. 2022, Table 1: the network sees
c_in(t) x and c_noise(t) = log(t) / 4; the jumper forms D = c_skip x + c_out F).

Like ``plugins.networks.MLP``, the network takes the raw ``(x, t, s, class_labels)`` and applies
c_in and the noise embedding itself. A *student* (``student=True``) has an extra embedding of s
(modules ``s_embed``, ``s_map``; the final linear of ``s_map`` is zero-initialised) added to the
time embedding, so a student that loads a teacher's weights with ``strict=False`` (missing keys:
only ``s_*``) equals the teacher exactly at initialisation, for every s.

The output layer is a 3x3 convolution whose weights are held by an ``nn.Linear`` (``out.proj``,
[C_out, C_in * 9], the same default initialisation as ``nn.Conv2d``) and registered last, so
that core.train.students' "zero the last nn.Linear" makes a residual student R_theta zero at init.

Options (``[network]`` with ``name = "unet"``):

==================  ============  =============================================================
key                 default       meaning
==================  ============  =============================================================
model_channels      32            channels at the first level; the embedding has 4x as many
channel_mult        [1, 2, 2]     channels per level = model_channels * mult; one level per
                                  entry, each after the first at half the resolution (ceil)
num_blocks          2             residual blocks per level (the decoder has num_blocks + 1)
attn_resolutions    [lowest]      spatial sizes (image height at a level) with self-attention
                                  after every residual block; ``[]`` for none (the middle
                                  block always has attention); default: the lowest level's size
num_heads           1             attention heads (must divide every attended channel count)
dropout             0.0           dropout before each residual block's second conv
embedding           "positional"  noise embedding of c_noise: "positional" (sinusoidal,
                                  Vaswani et al.) | "fourier" (fixed random frequencies)
scale_shift         true          inject the embedding as GroupNorm scale and shift (true) or
                                  add it before the second GroupNorm (false, DDPM++'s form)
resample            "conv"        downsampling: "conv" (3x3, stride 2) | "avgpool" (2x2);
                                  upsampling is always nearest to the skip's size + 3x3 conv
==================  ============  =============================================================

Example configurations (parameter counts measured with this module)::

    # CPU-small, Fashion-MNIST 28x28x1 (levels 28, 14, 7): 1,191,233 parameters
    # unconditional (num_classes = 10 adds 1,280); 24.3 GFLOP per forward of a batch of 64
    # (about 0.35 s forward, 1.0 s forward+backward+Adam step with one CPU thread)
    [network]
    name = "unet"
    model_channels = 32
    channel_mult = [1, 2, 2]
    num_blocks = 1
    attn_resolutions = [7]

    # CIFAR-10-size DDPM++ (EDM's config), 32x32x3 (levels 32, 16, 8): 57,443,075 parameters
    # unconditional (num_classes = 10 adds 5,120); with scale_shift = false 53,634,563, with
    # resample = "avgpool" 56,262,915 (EDM's DDPM++ resamples inside residual blocks instead)
    [network]
    name = "unet"
    model_channels = 128
    channel_mult = [2, 2, 2]
    num_blocks = 4
    attn_resolutions = [16]
    dropout = 0.13
"""

import math
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.api import SEmbeddingMLP, jump_target
from core.base.bounds import check_network_kwargs
from core.host.hookspecs import hookimpl
from plugins.networks import FourierEmbedding

SKIP_SCALE = 1.0 / math.sqrt(2.0)        # DDPM++ rescales every residual sum by 1/sqrt(2)


def norm(channels: int, eps: float = 1e-6) -> nn.GroupNorm:
    """GroupNorm with at most 32 groups and at least 4 channels a group, dividing `channels`."""
    groups = max(1, min(32, channels // 4))
    while channels % groups:
        groups -= 1
    return nn.GroupNorm(groups, channels, eps=eps)


# -- noise embeddings of c_noise = log(t) / 4 -----------------------------------------------------

class PositionalEmbedding(nn.Module):
    """[cos, sin](c_noise * w_k), w_k = max_positions^(-k / (dim/2)): the transformer's sinusoids."""

    def __init__(self, dim: int, max_positions: float = 10000.0):
        super().__init__()
        half = dim // 2
        freqs = torch.pow(1.0 / max_positions, torch.arange(half, dtype=torch.float64) / half)
        self.register_buffer("freqs", freqs.float(), persistent=False)

    def forward(self, c: Tensor) -> Tensor:
        arg = c.reshape(-1, 1) * self.freqs.to(c.dtype).reshape(1, -1)
        return torch.cat([torch.cos(arg), torch.sin(arg)], dim=1)


def _embedding(kind: str, dim: int, seed: int) -> nn.Module:
    return PositionalEmbedding(dim) if kind == "positional" else FourierEmbedding(dim, seed=seed)


def _embedding_mlp(dim: int, emb: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, emb), nn.SiLU(), nn.Linear(emb, emb))


# -- blocks --------------------------------------------------------------------------------------

class Attention(nn.Module):
    """Multi-head self-attention over the H*W positions: x + proj(softmax(q^T k / sqrt(d)) v),
    rescaled by 1/sqrt(2). Plain matmul/softmax, so it works under vmap + jvp in float64."""

    def __init__(self, channels: int, heads: int):
        super().__init__()
        self.heads, self.skip_scale = heads, SKIP_SCALE
        self.norm = norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape[0], x.shape[1], x.shape[2], x.shape[3]
        d = C // self.heads
        qkv = self.qkv(self.norm(x)).reshape(B, 3, self.heads, d, H * W)
        q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]                      # [B, heads, d, HW]
        w = torch.softmax(torch.matmul(q.transpose(-1, -2), k) / math.sqrt(d), dim=-1)
        a = torch.matmul(v, w.transpose(-1, -2))                       # [B, heads, d, HW]
        return (x + self.proj(a.reshape(B, C, H, W))) * self.skip_scale


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv3x3, embedding injection, GroupNorm-SiLU-dropout-conv3x3, plus the
    (1x1-projected when channels change) input, rescaled; then optional self-attention."""

    def __init__(self, cin: int, cout: int, emb: int, dropout: float, scale_shift: bool,
                 attention: bool, heads: int):
        super().__init__()
        self.cout, self.scale_shift, self.skip_scale = cout, scale_shift, SKIP_SCALE
        self.norm0 = norm(cin)
        self.conv0 = nn.Conv2d(cin, cout, 3, padding=1)
        self.affine = nn.Linear(emb, 2 * cout if scale_shift else cout)
        self.norm1 = norm(cout)
        self.dropout = nn.Dropout(dropout)
        self.conv1 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else None
        self.attn = Attention(cout, heads) if attention else None

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv0(F.silu(self.norm0(x)))
        p = self.affine(emb).unsqueeze(-1).unsqueeze(-1)
        if self.scale_shift:
            scale, shift = p[:, :self.cout], p[:, self.cout:]
            h = F.silu(self.norm1(h) * (scale + 1.0) + shift)
        else:
            h = F.silu(self.norm1(h + p))
        h = self.conv1(self.dropout(h))
        skip = self.skip
        h = (h + (x if skip is None else skip(x))) * self.skip_scale
        attn = self.attn
        if attn is not None:
            h = attn(h)
        return h


class Downsample(nn.Module):
    """H -> ceil(H / 2): a stride-2 3x3 conv, or 2x2 average pooling (ceil mode)."""

    def __init__(self, channels: int, mode: str):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1) if mode == "conv" \
            else None

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        conv = self.conv
        if conv is not None:
            return conv(x)
        return F.avg_pool2d(x, 2, stride=2, ceil_mode=True)


class DecoderBlock(nn.Module):
    """A residual block on [h, the latest skip] (concatenated along channels)."""

    def __init__(self, block: ResBlock):
        super().__init__()
        self.block = block

    def forward(self, x: Tensor, emb: Tensor, skips: List[Tensor]) -> Tensor:
        return self.block(torch.cat([x, skips.pop()], dim=1), emb)


class Upsample(nn.Module):
    """Nearest-neighbour upsampling to the next skip's exact size (28 <- 14 <- 7), then conv3x3."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor, emb: Tensor, skips: List[Tensor]) -> Tensor:
        ref = skips[-1]
        return self.conv(F.interpolate(x, size=[ref.shape[2], ref.shape[3]], mode="nearest"))


class OutConv(nn.Module):
    """The output 3x3 conv with its weights in an nn.Linear [cout, cin * 9] (see module doc)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.cin, self.cout = cin, cout
        self.proj = nn.Linear(cin * 9, cout)

    def forward(self, x: Tensor) -> Tensor:
        w = self.proj.weight.reshape(self.cout, self.cin, 3, 3)
        return F.conv2d(x, w, self.proj.bias, padding=1)


# -- the network ---------------------------------------------------------------------------------

class UNet(nn.Module):
    """F(x, t[, s][, class_labels]) for x [B, C, H, W]; t, s of shape [B] or broadcastable."""

    def __init__(self, shape, model_channels: int = 32, channel_mult=(1, 2, 2),
                 num_blocks: int = 2, attn_resolutions=None, num_heads: int = 1,
                 dropout: float = 0.0, embedding: str = "positional", scale_shift: bool = True,
                 resample: str = "conv", num_classes: int = 0, sigma_data: float = 0.5,
                 student: bool = False):
        super().__init__()
        C, H, _ = (int(v) for v in shape)
        mc, mult = int(model_channels), [int(m) for m in channel_mult]
        if embedding not in ("positional", "fourier"):
            raise ValueError(f"embedding must be 'positional' or 'fourier', got {embedding!r}")
        if resample not in ("conv", "avgpool"):
            raise ValueError(f"resample must be 'conv' or 'avgpool', got {resample!r}")
        res = level_resolutions(H, len(mult))
        attn = set([res[-1]] if attn_resolutions is None else (int(r) for r in attn_resolutions))
        self.sigma_data, self.student, self.num_classes = float(sigma_data), student, num_classes
        noise_ch, emb_ch = 2 * max(1, mc // 2), 4 * mc

        # embedding of c_noise(t) (and the label), then the student's zero-initialised s pathway
        self.embed = _embedding(embedding, noise_ch, seed=1)
        self.t_map = _embedding_mlp(noise_ch, emb_ch)
        self.label = nn.Embedding(num_classes, emb_ch) if num_classes > 0 else None

        def block(cin, cout, r):
            return ResBlock(cin, cout, emb_ch, dropout, scale_shift, r in attn, num_heads)

        self.conv_in = nn.Conv2d(C, mc, 3, padding=1)
        enc, skip_ch, cur = [], [mc], mc
        for i, m in enumerate(mult):
            for _ in range(num_blocks):
                enc.append(block(cur, mc * m, res[i]))
                cur = mc * m
                skip_ch.append(cur)
            if i < len(mult) - 1:
                enc.append(Downsample(cur, resample))
                skip_ch.append(cur)
        self.enc = nn.ModuleList(enc)
        self.mid = nn.ModuleList([
            ResBlock(cur, cur, emb_ch, dropout, scale_shift, True, num_heads),
            ResBlock(cur, cur, emb_ch, dropout, scale_shift, False, num_heads)])
        dec: list = []
        for i in reversed(range(len(mult))):
            for _ in range(num_blocks + 1):
                dec.append(DecoderBlock(block(cur + skip_ch.pop(), mc * mult[i], res[i])))
                cur = mc * mult[i]
            if i > 0:
                dec.append(Upsample(cur))
        self.dec = nn.ModuleList(dec)
        self.norm_out = norm(cur)

        self.s_embed = _embedding(embedding, noise_ch, seed=2) if student else None
        self.s_map = SEmbeddingMLP(noise_ch, emb_ch) if student else None
        self.out = OutConv(cur, C)          # registered last: the network's last nn.Linear

    def forward(self, x: Tensor, t: Tensor, s: Optional[Tensor] = None,
                class_labels: Optional[Tensor] = None) -> Tensor:
        B = x.shape[0]
        t = t.reshape(-1).expand(B).to(x.dtype)
        c_in = 1.0 / torch.sqrt(self.sigma_data ** 2 + t ** 2)
        emb = self.t_map(self.embed(torch.log(t) / 4.0))
        s_embed = self.s_embed
        s_map = self.s_map
        if s_embed is not None and s_map is not None:
            emb = emb + s_map(s_embed(torch.log(jump_target(s, t)) / 4.0))
        label = self.label
        if label is not None and class_labels is not None:
            emb = emb + label(class_labels.reshape(-1))
        emb = F.silu(emb)

        h = self.conv_in(x * c_in.reshape(-1, 1, 1, 1))
        skips = [h]
        for blk in self.enc:
            h = blk(h, emb)
            skips.append(h)
        for blk in self.mid:
            h = blk(h, emb)
        for blk in self.dec:
            h = blk(h, emb, skips)
        return self.out(F.silu(self.norm_out(h)))


def level_resolutions(size: int, levels: int) -> list:
    """The spatial size at each level: 28 -> [28, 14, 7], 32 -> [32, 16, 8] (ceil halving)."""
    out = [int(size)]
    for _ in range(levels - 1):
        out.append((out[-1] + 1) // 2)
    return out


def _unet(options, ctx, *, shape, num_classes, student):
    if len(shape) != 3:
        options.fail("name", f"the unet network needs image data of shape (C, H, W), got shape "
                             f"{tuple(shape)}")
    mc = options.int("model_channels", 32, min=1, max=4096)
    mult = options.ints("channel_mult", [1, 2, 2], min=1, max=64, length=16)
    res = level_resolutions(shape[1], len(mult))
    if options.has("attn_resolutions") and options.data["attn_resolutions"] == []:
        attn = options.strs("attn_resolutions")          # the empty list: no level attention
    else:
        attn = options.ints("attn_resolutions", [res[-1]], min=1, max=4096, length=16)
    bad = [r for r in attn if r not in res]
    if bad:
        options.fail("attn_resolutions", f"no level has resolution {bad[0]} (levels: "
                                         f"{', '.join(map(str, res))})")
    heads = options.int("num_heads", 1, min=1, max=1024)
    blocks = options.int("num_blocks", 2, min=1, max=64)
    check_network_kwargs(dict(model_channels=mc, channel_mult=mult, num_blocks=blocks),
                         options.where("model_channels"))
    attended = [mc * m for m, r in zip(mult, res) if r in attn] + [mc * mult[-1]]
    if any(c % heads for c in attended):
        options.fail("num_heads", f"must divide the attended channel counts "
                                  f"{sorted(set(attended))}, got {heads}")
    return UNet(shape, model_channels=mc, channel_mult=mult,
                num_blocks=blocks, attn_resolutions=attn,
                num_heads=heads, dropout=options.float("dropout", 0.0, min=0.0, max=1.0),
                embedding=options.str("embedding", "positional", choices=("positional", "fourier")),
                scale_shift=options.bool("scale_shift", True),
                resample=options.str("resample", "conv", choices=("conv", "avgpool")),
                num_classes=num_classes, sigma_data=ctx.diffusion.sigma_data, student=student)


@hookimpl
def ctmkit_networks():
    return {"unet": _unet}
