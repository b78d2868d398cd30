"""torch.compile as ctmkit uses it: static shapes, and room for the few shapes a run presents."""

from __future__ import annotations

from typing import Callable

#: compiled entries dynamo keeps per function before it falls back to eager (torch's default
#: is 8; the static-shape solve and the last, smaller batch present a few more)
RECOMPILE_LIMIT = 64


def compile_static(fn: Callable, mode: str = "default") -> Callable:
    """torch.compile(fn) with static shapes (``dynamic=False``: one compile per shape) and
    dynamo's recompile limit raised to RECOMPILE_LIMIT; `mode`: torch.compile's (default,
    reduce-overhead = CUDA graphs, max-autotune, ...)."""
    import torch._dynamo

    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):     # the name changed across torch
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), RECOMPILE_LIMIT))
    return torch.compile(fn, dynamic=False, mode=None if mode == "default" else mode)
