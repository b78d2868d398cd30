"""Drawing samples from a jumper: the one place that fixes the random-number convention.

Per run, one CPU ``torch.Generator`` seeded with ``seed``. For each batch, in order:
1. class labels, when the model is class-conditional and no fixed label is given:
   ``randint(0, num_classes, [b])`` (int64);
2. the initial noise ``randn([b, *shape]) * t_0`` (the first time of the grid, t_max unless
   explicit timesteps say otherwise; float32, or the jumper's dtype);
3. whatever per-step noise the sampler draws (CTM's gamma > 0, CM's multistep), in step order.
The C++ ``ctm_sample`` follows the same order, so both produce the same samples.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from tqdm.auto import tqdm

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def draw(jumper, meta: dict, sampler, timesteps: list[float], num: int, batch: int, seed: int,
         device: str = "cpu", class_label: Optional[int] = None, progress: bool = True
         ) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """(samples [num, *shape] float32, labels [num] or None)."""
    shape = list(meta["shape"])
    dtype = _DTYPES[meta["dtype"]]
    n_cls = int(meta.get("num_classes", 0))
    gen = torch.Generator().manual_seed(seed)
    out, labels_out = [], []
    with tqdm(total=num, desc="sample", unit="img", disable=not progress, leave=False) as bar:
        for lo in range(0, num, batch):
            b = min(batch, num - lo)
            labels = None
            if n_cls > 0:
                labels = (torch.full((b,), class_label, dtype=torch.long) if class_label is not None
                          else torch.randint(0, n_cls, (b,), generator=gen))
                labels_out.append(labels.numpy())
                labels = labels.to(device)
            x = (torch.randn([b] + shape, generator=gen, dtype=dtype) * timesteps[0]).to(device)
            x = sampler.sample(jumper, x, timesteps, gen, labels)
            out.append(x.float().cpu().numpy())
            bar.update(b)
    return np.concatenate(out), (np.concatenate(labels_out) if labels_out else None)
