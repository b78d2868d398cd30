"""A third-party metric: the sliced Wasserstein-2 distance between the generated samples and
the reference dataset, both flattened to vectors,

    SW2 = ( mean_k W2^2(<x, v_k>, <y, v_k>) )^(1/2),  v_k uniform on the unit sphere,

each 1-D W2 from sorted projections (quantiles on a common grid when the sizes differ).
``[evaluate.metric] projections`` (number of directions) and ``seed``.
"""

import torch

from core.api import Metric, hookimpl


class SlicedW2(Metric):
    name = "swd"

    def __init__(self, projections: int, seed: int):
        self.projections, self.seed = projections, seed
        self.reference = None

    def compute(self, samples, reference_dataset, cache_dir):
        x = samples.reshape(len(samples), -1).double()
        g = torch.Generator().manual_seed(self.seed)
        v = torch.randn(x.shape[1], self.projections, generator=g, dtype=torch.float64)
        v = v / v.norm(dim=0, keepdim=True)
        # the reference set is read batch by batch (Dataset.batches): only its projections
        # [N, projections] are held, never the images themselves
        y_proj = torch.cat([b.reshape(len(b), -1).double() @ v
                            for b in reference_dataset.batches(1024)])
        q = torch.linspace(0.0, 1.0, min(len(x), len(y_proj)), dtype=torch.float64)
        px = torch.quantile((x @ v), q, dim=0)
        py = torch.quantile(y_proj, q, dim=0)
        self.reference = {"source": "dataset", "fingerprint": reference_dataset.fingerprint(),
                          "num": len(y_proj)}
        return {"swd": float(((px - py) ** 2).mean().sqrt())}

    def describe(self):
        """What the last number measured: raw pixels, projected; the reference set."""
        return {"features": {"name": f"raw, {self.projections} projections (seed {self.seed})"},
                "reference": self.reference}


def make(options, ctx):
    """options: the [evaluate.metric] table (shared by every metric of [evaluate] metrics)."""
    return SlicedW2(options.int("projections", 128, min=1), options.int("seed", 0, min=0))


@hookimpl
def ctmkit_metrics():
    return {"swd": make}
