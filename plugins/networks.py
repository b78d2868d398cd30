"""Network plugins: free-form networks F(x, t, s[, class_labels]) in EDM's parameterisation.

A network receives the raw x, t, s and applies EDM's input scaling itself (c_in(t) x and the
noise embedding of c_noise = log(t) / 4, paper footnote 1); the jumper forms
D = c_skip(t) x + c_out(t) F (Eqn. 3). A *teacher* network has no s input. A *student* has an
extra embedding of s whose projection is zero-initialised, so that a student made from a
teacher's weights equals the teacher at step 0 for every s (as CTM initialises students).
"""

import math
from typing import Optional

import torch
from torch import Tensor, nn

from core.hookspecs import hookimpl


class FourierEmbedding(nn.Module):
    """[cos, sin](2 pi c_noise * f_k) with fixed random frequencies, then a 2-layer MLP."""

    def __init__(self, dim: int, scale: float = 16.0, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("freqs", torch.randn(dim // 2, generator=g) * scale)
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: Tensor) -> Tensor:
        c_noise = torch.log(t).reshape(-1, 1) / 4.0
        arg = 2 * math.pi * c_noise * self.freqs.to(c_noise.dtype).reshape(1, -1)
        return self.mlp(torch.cat([torch.cos(arg), torch.sin(arg)], dim=1))


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
        self.t_emb = FourierEmbedding(emb_dim, seed=1)
        self.s_emb = FourierEmbedding(emb_dim, seed=2) if student else None
        self.s_proj = nn.Linear(emb_dim, emb_dim) if student else None
        if self.s_proj is not None:        # the zero-initialised s pathway
            nn.init.zeros_(self.s_proj.weight)
            nn.init.zeros_(self.s_proj.bias)
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
        e = self.t_emb(t)
        s_emb = self.s_emb
        s_proj = self.s_proj
        if s_emb is not None and s_proj is not None:
            s_ = t if s is None else s.reshape(-1).expand(B).to(x.dtype)
            e = e + s_proj(s_emb(s_))
        lab = self.label
        if lab is not None and class_labels is not None:
            e = e + lab(class_labels)
        e = torch.nn.functional.silu(e)
        for blk in self.blocks:
            h = blk(h, e)
        return self.out(torch.nn.functional.silu(self.out_norm(h))).reshape(x.shape)


class EDMDenoiser(nn.Module):
    """D(x, t) = c_skip(t) x + c_out(t) F(x, t) (Eqn. 3) around a teacher network."""

    def __init__(self, net: nn.Module, sigma_data: float):
        super().__init__()
        self.net = net
        self.sigma_data = float(sigma_data)

    def forward(self, x: Tensor, t: Tensor, class_labels: Optional[Tensor] = None) -> Tensor:
        B = x.shape[0]
        t64 = t.reshape(-1).expand(B).double()
        sd = self.sigma_data
        view = [B] + [1] * (x.dim() - 1)
        c_skip = (sd ** 2 / (sd ** 2 + t64 ** 2)).to(x.dtype).view(view)
        c_out = (sd * t64 / torch.sqrt(sd ** 2 + t64 ** 2)).to(x.dtype).view(view)
        return c_skip * x + c_out * self.net(x, t, None, class_labels)


class StudentNetwork(nn.Module):
    """F_theta(x, t, s) for the jumper: the student network called with its s input."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: Tensor, t: Tensor, s: Tensor,
                class_labels: Optional[Tensor] = None) -> Tensor:
        return self.net(x, t, s, class_labels)


def _mlp(options, ctx, *, shape, num_classes, student):
    dim = math.prod(shape)
    return MLP(dim, width=options.int("width", 256, min=1, max=65536),
               depth=options.int("depth", 4, min=1, max=1024),
               emb_dim=options.int("emb_dim", 64, min=2, max=65536), num_classes=num_classes,
               sigma_data=ctx.diffusion.sigma_data, student=student)


@hookimpl
def ctmkit_networks():
    return {"mlp": _mlp}
