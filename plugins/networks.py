"""Network plugins: free-form networks F(x, t, s[, class_labels]) in EDM's parameterisation.

A network receives the raw x, t, s and applies EDM's input scaling itself (c_in(t) x and the
noise embedding of c_noise = log(t) / 4, paper footnote 1); the host forms
D = c_skip(t) x + c_out(t) F (see Eqn. 3); the contract is core.api.Network. A *teacher*
network has no s input. A *student* has an extra embedding of s whose projection is
zero-initialised, so that a student made from a teacher's weights equals the teacher at step 0 for every s (as CTM initialises students).
"""

import math
from typing import Optional

import torch
from torch import Tensor, nn

from core.api import jump_target, zero_init
from core.diffusion.edm import EDMDenoiser  # noqa: F401  (re-exported)
from core.host.hookspecs import hookimpl
from core.train.students import StudentNetwork  # noqa: F401  (re-exported)


class FourierEmbedding(nn.Module):
    """[cos, sin](2 pi c_noise * w_k), w_k ~ N(0, scale^2) fixed (random Fourier features) of
    c_noise = log(t) / 4; with ``mlp``, followed by Linear-SiLU-Linear (the MLP's form)."""

    def __init__(self, dim: int, scale: float = 16.0, seed: int = 0, mlp: bool = False):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("freqs", torch.randn(dim // 2, generator=g) * scale)
        self.mlp = (nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim)) if mlp
                    else None)

    def forward(self, c_noise: Tensor) -> Tensor:
        arg = 2 * math.pi * c_noise.reshape(-1, 1) * self.freqs.to(c_noise.dtype).reshape(1, -1)
        e = torch.cat([torch.cos(arg), torch.sin(arg)], dim=1)
        mlp = self.mlp
        if mlp is not None:
            e = mlp(e)
        return e


class ResBlock(nn.Module):
    def __init__(self, width: int, emb: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, width)
        self.emb = nn.Linear(emb, width)
        self.fc2 = nn.Linear(width, width)

    def forward(self, h: Tensor, e: Tensor) -> Tensor:
        y = self.fc1(torch.nn.functional.silu(self.norm(h))) + self.emb(e)
        return h + self.fc2(torch.nn.functional.silu(y))


class MLP(nn.Module):
    """Residual MLP for vector data (shape [d]) with Fourier embeddings of t and (students) s."""

    def __init__(self, dim: int, width: int = 256, depth: int = 4, emb_dim: int = 64,
                 num_classes: int = 0, sigma_data: float = 0.5, student: bool = False):
        super().__init__()
        self.dim, self.sigma_data, self.student = dim, float(sigma_data), student
        self.num_classes = num_classes
        self.inp = nn.Linear(dim, width)
        self.t_emb = FourierEmbedding(emb_dim, seed=1, mlp=True)
        self.s_emb = FourierEmbedding(emb_dim, seed=2, mlp=True) if student else None
        # the zero-initialised s pathway (core.train.s_pathway)
        self.s_proj = zero_init(nn.Linear(emb_dim, emb_dim)) if student else None
        self.label = nn.Embedding(num_classes, emb_dim) if num_classes > 0 else None
        self.blocks = nn.ModuleList([ResBlock(width, emb_dim) for _ in range(depth)])
        self.out_norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, dim)

    def forward(self, x: Tensor, t: Tensor, s: Optional[Tensor] = None,
                class_labels: Optional[Tensor] = None) -> Tensor:
        B = x.shape[0]
        t = t.reshape(-1).expand(B).to(x.dtype)
        c_in = 1.0 / torch.sqrt(self.sigma_data ** 2 + t ** 2)
        h = self.inp(x.reshape(B, -1) * c_in.reshape(-1, 1))
        e = self.t_emb(torch.log(t) / 4.0)
        s_emb = self.s_emb
        s_proj = self.s_proj
        if s_emb is not None and s_proj is not None:
            e = e + s_proj(s_emb(torch.log(jump_target(s, t)) / 4.0))
        lab = self.label
        if lab is not None and class_labels is not None:
            e = e + lab(class_labels)
        e = torch.nn.functional.silu(e)
        for blk in self.blocks:
            h = blk(h, e)
        return self.out(torch.nn.functional.silu(self.out_norm(h))).reshape(x.shape)


def _mlp(options, ctx, *, shape, num_classes, student):
    dim = math.prod(shape)
    return MLP(dim, width=options.int("width", 256, min=1, max=65536),
               depth=options.int("depth", 4, min=1, max=1024),
               emb_dim=options.int("emb_dim", 64, min=2, max=65536), num_classes=num_classes,
               sigma_data=ctx.diffusion.sigma_data, student=student)


@hookimpl
def ctmkit_networks():
    return {"mlp": _mlp}
