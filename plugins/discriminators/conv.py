"""``conv``: a small discriminator trained from scratch, for vectors and small images (and
tests). Images: stride-2 4x4 convolutions (LeakyReLU 0.2) down to at most 4x4, widths doubling
from `width`; vectors: `depth` linear layers of `width`. The logit is a linear read-out of the
last features, plus, class-conditional, the projection term <embed(y), h> (Miyato & Koyama
2018). No normalisation layers: each sample is judged on its own."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from core.api import Discriminator
from plugins.discriminators import augment


class ConvDiscriminator(Discriminator):
    def __init__(self, shape, num_classes: int = 0, width: int = 64, depth: int = 3,
                 policies=()):
        super().__init__()
        self.shape, self.policies = tuple(shape), list(policies)
        act = lambda: nn.LeakyReLU(0.2)
        if len(shape) == 3:
            C, H, W = shape
            layers, c = [], C
            for i in range(max(1, int(math.ceil(math.log2(max(H, W) / 4))))):
                cout = width * 2 ** min(i, 3)
                layers += [nn.Conv2d(c, cout, 4, 2, 1), act()]
                c = cout
            self.body = nn.Sequential(*layers, nn.Flatten())
            with torch.no_grad():
                feat = self.body(torch.zeros(1, *shape)).shape[1]
        else:
            layers, c = [nn.Flatten()], math.prod(shape)
            for _ in range(depth):
                layers += [nn.Linear(c, width), act()]
                c = width
            self.body, feat = nn.Sequential(*layers), c
        self.out = nn.Linear(feat, 1)
        self.embed = nn.Embedding(num_classes, feat) if num_classes > 0 else None

    def draw(self, gen, x):
        return augment.draw(gen, x.shape, self.policies) if self.policies else {}

    def forward(self, x: Tensor, labels=None, draws=None) -> Tensor:
        if self.policies and draws:
            x = augment.apply(x, draws)
        h = self.body(x)
        logit = self.out(h).squeeze(1)
        if self.embed is not None and labels is not None:
            logit = logit + (self.embed(labels) * h).sum(1) / math.sqrt(h.shape[1])
        return logit


def make(options, ctx, shape, num_classes):
    images = len(shape) == 3
    return ConvDiscriminator(shape, num_classes, options.int("width", 64, min=1, max=4096),
                             options.int("depth", 3, min=1, max=16),
                             augment.policies(options, "augment", [], images))
