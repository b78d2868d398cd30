"""A third-party dataset: points on a noisy 2-D spiral, generated from a seed.

``[data] format = "spiral"`` with ``n`` points, ``turns``, ``noise`` (std around the curve),
``radius`` and ``seed``; the fingerprint changes with every option, so coefficient tables and
reference statistics computed on one spiral are not reused for another.
"""

import hashlib
import json
import math

import torch

from core.api import Dataset, hookimpl


def spiral(n: int, turns: float, radius: float, noise: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(n, generator=g, dtype=torch.float64)              # position along the curve
    angle = 2 * math.pi * turns * u
    r = radius * (0.1 + 0.9 * u)
    x = torch.stack([r * torch.cos(angle), r * torch.sin(angle)], dim=1)
    return (x + noise * torch.randn(x.shape, generator=g, dtype=torch.float64)).float()


def make(options, ctx):
    """options: the [data] section less its format."""
    settings = {"n": options.int("n", 2000, min=2),
                "turns": options.float("turns", 1.5, positive=True),
                "radius": options.float("radius", 1.0, positive=True),
                "noise": options.float("noise", 0.05, min=0.0),
                "seed": options.int("seed", 0, min=0)}
    x = spiral(**settings)
    fp = hashlib.sha256(json.dumps({"spiral": settings}).encode()).hexdigest()[:32]
    return Dataset(x, None, fp, name="spiral")


@hookimpl
def ctmkit_datasets():
    return {"spiral": make}
