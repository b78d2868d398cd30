"""Datasets of x_0: what every dataset plugin returns, and `load()` that picks the plugin.

A dataset holds all of its examples in memory as float32 ``x`` [N, *shape] -- images are
[N, C, H, W] scaled to [-1, 1] -- and int64 labels ``y`` [N] (or None). The loaders for each
on-disk format live in ``plugins/datasets.py`` and register through the ``ctmkit_datasets`` hook.
"""

from __future__ import annotations

import hashlib
from typing import Optional

import torch
from torch import Tensor


class Dataset:
    def __init__(self, x: Tensor, y: Optional[Tensor], fingerprint: str, hflip: bool = False,
                 name: str = ""):
        self.x, self.y, self._fingerprint = x, y, fingerprint
        self.hflip, self.name = hflip, name

    @property
    def shape(self) -> tuple:
        return tuple(self.x.shape[1:])

    @property
    def is_image(self) -> bool:
        return self.x.dim() == 4

    @property
    def num_classes(self) -> int:
        return 0 if self.y is None else int(self.y.max()) + 1

    def __len__(self) -> int:
        return len(self.x)

    def sample(self, n: int, generator: torch.Generator) -> tuple[Tensor, Optional[Tensor]]:
        """n examples drawn uniformly with replacement (and flipped left-right with
        probability 1/2 when ``hflip``), all randomness from `generator`."""
        idx = torch.randint(0, len(self.x), (n,), generator=generator)
        x = self.x[idx]
        if self.hflip:
            flip = torch.rand(n, generator=generator) < 0.5
            x = torch.where(flip.view([-1] + [1] * (x.dim() - 1)), x.flip(-1), x)
        return x, (self.y[idx] if self.y is not None else None)

    def fingerprint(self) -> str:
        return self._fingerprint + (":hflip" if self.hflip else "")


def digest(*parts: bytes | str) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode() if isinstance(p, str) else p)
    return h.hexdigest()[:32]


def load(section, ctx) -> Dataset:
    """The dataset the ``[data]`` section describes: its ``format`` key names the dataset
    plugin, which reads the rest of the section; a key nobody read is reported as unknown."""
    from core import plugins
    from core.errors import UserError

    name = section.str("format")
    dataset = plugins.build("dataset", name, section, ctx, section.where("format"))
    if not isinstance(dataset, Dataset):
        raise UserError(f"dataset plugin {name!r} ({plugins.get('dataset', name).source}) "
                        f"returned a {type(dataset).__name__}, not a core.datasets.Dataset")
    return dataset
