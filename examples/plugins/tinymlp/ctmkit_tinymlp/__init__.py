"""A third-party network: a small MLP F(x, t, s=None, class_labels=None) meeting the network
contract of core.api.Network:

* it gets the raw x and t, applies c_in(t) = 1 / sqrt(sigma_data^2 + t^2) and embeds
  c_noise(t) = log(t) / 4 itself;
* a student (``student=True``) also embeds s, through weights named ``s_*`` whose projection
  starts at zero, so that a student loading a teacher's weights equals it for every s;
* the output layer ``out`` is the last ``nn.Linear`` registered (a residual student is zeroed
  there), and the module is TorchScript-able.
"""

import math
from typing import Optional

import torch
from torch import Tensor, nn

from core.api import hookimpl


def sinusoidal(c: Tensor, freqs: Tensor) -> Tensor:
    arg = c.reshape(-1, 1) * freqs.to(c.dtype).reshape(1, -1)
    return torch.cat([torch.cos(arg), torch.sin(arg)], dim=1)


class TinyMLP(nn.Module):
    def __init__(self, dim: int, width: int, depth: int, num_classes: int, sigma_data: float,
                 student: bool):
        super().__init__()
        self.sigma_data = float(sigma_data)
        self.register_buffer("freqs", torch.exp(torch.linspace(0.0, math.log(100.0), width // 2)))
        self.t_mlp = nn.Linear(2 * (width // 2), width)
        # the s pathway (students only): every weight named s_*, its projection zeroed
        self.s_embed = nn.Sequential(nn.Linear(2 * (width // 2), width), nn.SiLU(),
                                     nn.Linear(width, width)) if student else None
        if self.s_embed is not None:
            nn.init.zeros_(self.s_embed[2].weight)
            nn.init.zeros_(self.s_embed[2].bias)
        self.label = nn.Embedding(num_classes, width) if num_classes > 0 else None
        self.inp = nn.Linear(dim, width)
        self.hidden = nn.ModuleList([nn.Linear(width, width) for _ in range(depth)])
        self.out = nn.Linear(width, dim)                    # registered last: the output layer

    def forward(self, x: Tensor, t: Tensor, s: Optional[Tensor] = None,
                class_labels: Optional[Tensor] = None) -> Tensor:
        B = x.shape[0]
        t = t.reshape(-1).expand(B).to(x.dtype)
        c_in = 1.0 / torch.sqrt(self.sigma_data ** 2 + t ** 2)
        e = self.t_mlp(sinusoidal(torch.log(t) / 4.0, self.freqs))
        s_embed = self.s_embed                  # a local, so TorchScript can refine Optional
        if s_embed is not None:
            s_ = t if s is None else s.reshape(-1).expand(B).to(x.dtype)
            e = e + s_embed(sinusoidal(torch.log(s_) / 4.0, self.freqs))
        label = self.label
        if label is not None and class_labels is not None:
            e = e + label(class_labels)
        h = self.inp(x.reshape(B, -1) * c_in.reshape(-1, 1)) + e
        for layer in self.hidden:
            h = h + layer(torch.nn.functional.silu(h))
        return self.out(torch.nn.functional.silu(h)).reshape(x.shape)


def make(options, ctx, *, shape, num_classes, student):
    """options: [network] less its name; shape, num_classes: the data's; student: add s."""
    return TinyMLP(math.prod(shape), options.int("width", 64, min=2, max=4096),
                   options.int("depth", 2, min=0, max=64), num_classes,
                   ctx.diffusion.sigma_data, student)


@hookimpl
def ctmkit_networks():
    return {"tinymlp": make}
