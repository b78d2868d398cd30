"""The student's zero-initialised s pathway: CTM's initialisation, under which the student
F_theta(x, t, s) made from the teacher's weights equals the teacher at step 0 for every s.

A student network embeds the jump target s as it embeds t and adds the result to its t
embedding, e = e_t(t) + e_s(s). e_s ends in a linear layer whose weight and bias are zero
(`zero_init`), so e_s(s) = 0 until training moves it. Every network keeps the parameter names
its s pathway always had, so students and checkpoints saved before this module existed load
unchanged; this module holds what they share:

* `zero_init(layer)`: the zero last layer (every built-in network: networks.py ``s_proj``,
  unet.py ``s_map``, the EDM U-Nets' ``s_map_layer1``, the openai UNet's ``s_time_embed``);
* `SEmbeddingMLP`: Linear -> SiLU -> zero Linear as an ``nn.Sequential`` (state-dict names
  ``0``, ``2``): unet.py's ``s_map`` and the openai UNet's ``s_time_embed`` (EDM's U-Nets
  hold the same MLP as two layers of their own, ``s_map_layer0`` and ``s_map_layer1``: their
  state dicts name them so);
* `jump_target(s, t)`: s, or t where no s is given (the teacher's call, F(x, t) = F(x, t, t)).

Plugin authors get these through ``core.api``.
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor, nn


def zero_init(layer: nn.Module) -> nn.Module:
    """`layer` with its weight and bias set to zero (returned, for use in an expression)."""
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


class SEmbeddingMLP(nn.Sequential):
    """e_s = Linear(emb, emb)(SiLU(Linear(dim, emb)(embedding of s))), the last Linear zero:
    the s pathway's MLP, with the state-dict names of ``nn.Sequential`` (``0``, ``2``)."""

    def __init__(self, dim: int, emb: int):
        super().__init__(nn.Linear(dim, emb), nn.SiLU(), nn.Linear(emb, emb))
        zero_init(self[2])


def jump_target(s: Optional[Tensor], t: Tensor) -> Tensor:
    """The s the pathway embeds: `s` as a [B] tensor of t's dtype, or `t` ([B]) without one."""
    if s is None:
        return t
    return s.reshape(-1).expand(t.shape[0]).to(t.dtype)
