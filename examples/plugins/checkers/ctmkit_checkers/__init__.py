"""A third-party image dataset: coloured checkerboards, made ("decoded") once into ctmkit's
on-disk uint8 store and memory-mapped by every run, stage and process afterwards.

``[data] format = "checkers"`` with ``n`` images of ``resolution`` x ``resolution`` pixels,
``squares`` per side, ``seed``, ``classes`` (image i has label i % classes), ``hflip`` and
``cache_dir`` (where the store goes; default out_dir/datastore).

What a dataset plugin returns (see core/api.py): a ``Dataset`` whose ``x`` is an
``ImageStore`` of uint8 [N, C, H, W] images -- here the one ``open_or_build`` finds or builds
in the cache folder (one builder per store, under a lock; atomic; workers decode the tasks in
parallel) -- and int64 labels. ctmkit then reads it by index only.
"""

import hashlib
import json

import numpy as np
import torch

from core.api import Dataset, ImageStore, Plan, cache_folder, hookimpl, open_or_build

CHUNK = 64                      # images per task (a worker's unit of work)


def board(i: int, resolution: int, squares: int, seed: int) -> np.ndarray:
    """Image i: uint8 [3, R, R], two colours from (seed, i) in a squares x squares board."""
    rng = np.random.default_rng([seed, i])
    a, b = rng.integers(0, 256, (2, 3), dtype=np.uint8)
    yy, xx = np.indices((resolution, resolution)) * squares // resolution
    mask = ((yy + xx) % 2 == 0)[None]
    return np.where(mask, a[:, None, None], b[:, None, None]).astype(np.uint8)


def decode(task) -> tuple:
    """One task (first, last, resolution, squares, seed) -> (uint8 [k, 3, R, R], []): a
    module-level function, so that worker processes can run it."""
    first, last, resolution, squares, seed = task
    return np.stack([board(i, resolution, squares, seed) for i in range(first, last)]), []


def make(options, ctx):
    """options: the [data] section less its format."""
    settings = {"n": options.int("n", 256, min=1),
                "resolution": options.int("resolution", 16, min=2),
                "squares": options.int("squares", 4, min=1),
                "seed": options.int("seed", 0, min=0),
                "classes": options.int("classes", 4, min=1)}
    hflip = options.bool("hflip", False)
    fp = hashlib.sha256(json.dumps({"checkers": settings}).encode()).hexdigest()[:32]
    n, r = settings["n"], settings["resolution"]
    labels = np.arange(n, dtype=np.int64) % settings["classes"]

    def plan() -> Plan:                    # called only when the store must be built
        tasks = [(i, min(i + CHUNK, n), r, settings["squares"], settings["seed"])
                 for i in range(0, n, CHUNK)]
        return Plan(n, (3, r, r), labels, decode, tasks, workers=2, settings=settings)

    cache = cache_folder(options, ctx)
    if cache is None:                      # loaded outside a run: in memory
        store = ImageStore(np.concatenate([decode(t)[0] for t in plan().tasks]), labels)
    else:
        store, _ = open_or_build(cache, f"checkers-{fp[:24]}", plan, "checkers",
                                 progress=getattr(ctx, "progress", True))
    return Dataset(store, torch.from_numpy(np.array(store.labels)), fp, hflip=hflip,
                   name="checkers")


@hookimpl
def ctmkit_datasets():
    return {"checkers": make}
