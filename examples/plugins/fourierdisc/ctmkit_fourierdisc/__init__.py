"""A third-party discriminator for the GAN term ([distill] gan_weight): fixed random Fourier
features of the flattened sample, cos(W x + b) with W ~ N(0, 1 / bandwidth^2), and a trained
linear read-out (plus, class-conditional, a learned per-class read-out). One logit per sample.

``[discriminator] name = "fourier"``, ``features`` (the number of random features) and
``bandwidth``. The random features are a buffer: drawn once (the host seeds the global
generator before calling the factory, so every process draws the same) and saved in the
checkpoint with the module.
"""

import math

import torch

from core.api import Discriminator, hookimpl


class FourierDiscriminator(Discriminator):
    def __init__(self, shape, num_classes: int, features: int, bandwidth: float):
        super().__init__()
        d = math.prod(shape)
        self.register_buffer("W", torch.randn(d, features) / bandwidth)
        self.register_buffer("b", torch.rand(features) * 2 * math.pi)
        self.head = torch.nn.Linear(features, 1)
        self.per_class = torch.nn.Embedding(num_classes, features) if num_classes else None

    def forward(self, x, labels=None, draws=None):
        h = torch.cos(x.flatten(1) @ self.W + self.b) * math.sqrt(2.0 / self.W.shape[1])
        logit = self.head(h).squeeze(1)
        if self.per_class is not None and labels is not None:
            logit = logit + (self.per_class(labels) * h).sum(1)
        return logit


def make(options, ctx, shape, num_classes):
    """options: the rest of [discriminator] (name, lr and optimizer are the host's)."""
    return FourierDiscriminator(shape, num_classes, options.int("features", 128, min=1),
                                options.float("bandwidth", 1.0, positive=True))


@hookimpl
def ctmkit_discriminators():
    return {"fourier": make}
