"""Datasets of x_0: what every dataset plugin returns, and `load()` that picks the plugin.

A dataset holds its examples in one of two forms:

* images as a `core.data.datastore.ImageStore`: uint8 [N, C, H, W] (memory-mapped from the on-disk
  store, or in memory), converted to float32 x / 127.5 - 1 in [-1, 1] per batch, on the device
  the batch goes to -- a process's memory does not grow with N;
* a float tensor ``x`` [N, *shape] in memory (vectors, small float image arrays).

Labels are int64 ``y`` [N] (or None). Readers never take the whole set: `draw` + `rows` (or
`sample`) gather a batch by index, `batches` walks the set in order. The loaders for each
on-disk format live in ``plugins/datasets.py`` and register through the ``ctmkit_datasets`` hook.
"""

from __future__ import annotations

import hashlib
from typing import Iterator, Optional

import torch
from torch import Tensor

from core.data.datastore import ImageStore, to_device, to_unit


class Dataset:
    """`x`: a float Tensor [N, *shape] or an ImageStore (uint8 images); `y`: int64 [N] or None;
    `fingerprint`: a digest of the content and the settings that change it."""

    def __init__(self, x, y: Optional[Tensor], fingerprint: str, hflip: bool = False,
                 name: str = ""):
        self.data, self.y, self._fingerprint = x, y, fingerprint
        self.hflip, self.name = hflip, name

    @property
    def store(self) -> Optional[ImageStore]:
        """The uint8 image store, or None for in-memory float data."""
        return self.data if isinstance(self.data, ImageStore) else None

    @property
    def x(self) -> Tensor:
        """Every example as one float32 tensor: materialises the whole set (4 bytes a value).
        For small sets and old plugins; ctmkit itself reads through `rows` and `batches`."""
        return self.rows(torch.arange(len(self)))

    @property
    def shape(self) -> tuple:
        return tuple(self.data.shape[1:]) if self.store is None else self.store.shape

    @property
    def is_image(self) -> bool:
        return len(self.shape) == 3

    @property
    def num_classes(self) -> int:
        return 0 if self.y is None else int(self.y.max()) + 1

    def __len__(self) -> int:
        return len(self.data)

    def draw(self, n: int, generator: torch.Generator) -> tuple[Tensor, Optional[Tensor]]:
        """The indices of n examples drawn uniformly with replacement and, when ``hflip``,
        which of them to flip (probability 1/2): all the randomness `sample` uses."""
        idx = torch.randint(0, len(self), (n,), generator=generator)
        flip = torch.rand(n, generator=generator) < 0.5 if self.hflip else None
        return idx, flip

    def rows(self, idx: Tensor, flip: Optional[Tensor] = None, device="cpu") -> Tensor:
        """Examples `idx` as float32 on `device` (flipped left-right where `flip`): only these
        rows are read; uint8 images are copied to the device as uint8, converted there."""
        if self.store is not None:
            x = to_unit(to_device(self.store.gather(idx), device))
        else:
            x = self.data[idx].to(device=device, dtype=torch.float32)
        if flip is not None:
            flip = flip.to(x.device).view([-1] + [1] * (x.dim() - 1))
            x = torch.where(flip, x.flip(-1), x)
        return x

    def labels(self, idx: Tensor) -> Optional[Tensor]:
        return self.y[idx] if self.y is not None else None

    def sample(self, n: int, generator: torch.Generator) -> tuple[Tensor, Optional[Tensor]]:
        """n examples drawn uniformly with replacement (and flipped left-right with
        probability 1/2 when ``hflip``), all randomness from `generator`."""
        idx, flip = self.draw(n, generator)
        return self.rows(idx, flip), self.labels(idx)

    def sample_rows(self, n: int, generator: torch.Generator, keep: slice,
                    device="cpu") -> tuple[Tensor, Optional[Tensor]]:
        """Rows `keep` of what ``sample(n, generator)`` returns, reading only those rows
        (one rank's share of a global batch; the draws are the global batch's)."""
        idx, flip = self.draw(n, generator)
        idx, flip = idx[keep], (flip[keep] if flip is not None else None)
        return self.rows(idx, flip, device), self.labels(idx)

    def batches(self, batch: int, idx: Optional[Tensor] = None,
                device="cpu") -> Iterator[Tensor]:
        """The examples `idx` (default: all, in order) as float32 batches of at most `batch`."""
        idx = torch.arange(len(self)) if idx is None else idx
        for i in range(0, len(idx), batch):
            yield self.rows(idx[i:i + batch], device=device)

    def view(self, idx: Optional[Tensor] = None) -> "Rows":
        """The examples `idx` (default: all) as a lazy sequence: ``len``, ``shape`` and
        slicing (``view[i:j]``, float32) read only the rows asked for."""
        return Rows(self, torch.arange(len(self)) if idx is None else idx)

    def fingerprint(self) -> str:
        return self._fingerprint + (":hflip" if self.hflip else "")


class Rows:
    """Rows `idx` of a Dataset, read on slicing: what a batch-wise reader (the feature
    extractors, a metric plugin) takes in place of one [N, ...] tensor."""

    def __init__(self, dataset: Dataset, idx: Tensor):
        self.dataset, self.idx = dataset, idx

    def __len__(self) -> int:
        return len(self.idx)

    @property
    def shape(self) -> tuple:
        return (len(self.idx),) + self.dataset.shape

    def __getitem__(self, i) -> Tensor:
        """Float32 rows: `i` a slice or a 1-D index tensor (positions in this view)."""
        if not isinstance(i, (slice, Tensor)):
            raise TypeError("Rows are read by slices or index tensors")
        return self.dataset.rows(self.idx[i])

    def subset(self, i: Tensor) -> "Rows":
        """Positions `i` of this view, as a view (nothing is read)."""
        return Rows(self.dataset, self.idx[i])


def digest(*parts: bytes | str) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode() if isinstance(p, str) else p)
    return h.hexdigest()[:32]


def load(section, ctx) -> Dataset:
    """The dataset the ``[data]`` section describes: its ``format`` key names the dataset
    plugin, which reads the rest of the section; a key nobody read is reported as unknown."""
    from core.host import plugins
    from core.base.errors import UserError

    name = section.str("format")
    dataset = plugins.build("dataset", name, section, ctx, section.where("format"))
    if not isinstance(dataset, Dataset):
        raise UserError(f"dataset plugin {name!r} ({plugins.get('dataset', name).source}) "
                        f"returned a {type(dataset).__name__}, not a core.data.datasets.Dataset")
    return dataset
