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

import math
from typing import Optional

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from core.diffusion.contracts import Sampler
from core.base.dtypes import DTYPES
from core.diffusion.edm import batch_times
from core.diffusion.schedules import rho_grid



def randn_like(x: Tensor, generator: torch.Generator) -> Tensor:
    """Per-step noise like x, drawn on the CPU from `generator` (the convention above)."""
    return torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)


class CTMSampler(Sampler):
    """CTM's sampler (Appendix B.3): x_{t_n} = f_theta(x_{t_{n-1}}, t_{n-1}, t_n) on EDM's
    rho-grid. With gamma > 0 (CTM's gamma-sampling) each intermediate jump lands at
    u = max(sqrt(1 - gamma^2) t_n, t_min) and fresh noise of std sqrt(t_n^2 - u^2) (= gamma t_n
    unless clipped) restores noise level t_n; gamma = 0 is deterministic, gamma = 1 is exactly
    CM's multistep sampling. The C++ ``ctm_sample`` implements the same."""
    runs_in_ctm_sample = True

    def __init__(self, gamma: float = 0.0):
        self.gamma = gamma

    def timesteps(self, steps: int, t_min: float, t_max: float, rho: float) -> list[float]:
        return rho_grid(steps, t_min, t_max, rho)

    @torch.no_grad()
    def sample(self, jumper, x: Tensor, timesteps, generator: torch.Generator,
               class_labels: Optional[Tensor] = None, trajectory: Optional[list] = None) -> Tensor:
        K, t_min = len(timesteps) - 1, timesteps[-1]
        for n in range(K):
            t, s = timesteps[n], timesteps[n + 1]
            last = n + 1 == K
            target = s if (last or self.gamma == 0.0) else \
                max(math.sqrt(1 - self.gamma ** 2) * s, t_min)
            x = jumper(x, batch_times(x, t), batch_times(x, target), class_labels)
            if not last and self.gamma > 0.0:
                x = x + math.sqrt(s * s - target * target) * randn_like(x, generator)
            if trajectory is not None:
                trajectory.append(x)
        return x


@torch.no_grad()
def draw(jumper, meta: dict, sampler, timesteps: list[float], num: int, batch: int, seed: int,
         device: str = "cpu", class_label: Optional[int] = None, progress: bool = True
         ) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """(samples [num, *shape] float32, labels [num] or None)."""
    shape = list(meta["shape"])
    dtype = DTYPES[meta["dtype"]]
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
