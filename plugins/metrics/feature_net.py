"""The offline feature network for FID / KID when Inception's weights are not on disk: a small
CNN classifier trained on a labelled image dataset, saved as TorchScript with an exported
``features`` method (its penultimate layer) and ``meta.json`` (format ``ctmkit.feature_net``).
Its numbers are reported as ``fid_featnet-<hash>`` (plugins/metrics/fid.py) -- not comparable with
Inception FIDs. Trained by ``tools/train_feature_net.py`` or, with the metric option
``feature_net = "auto"``, on first use from the reference dataset."""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from core.base.errors import UserError

FORMAT, VERSION = "ctmkit.feature_net", 1


class FeatureNet(nn.Module):
    """conv-bn-relu-pool x2, conv-bn-relu, 3x3 average pool, linear -> 128 (features), linear."""

    def __init__(self, in_channels: int, num_classes: int, feature_dim: int = 128,
                 width: int = 32):
        super().__init__()
        self.in_channels = in_channels
        self.feature_dim = feature_dim

        def block(cin, cout):
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                    nn.ReLU()]
        self.body = nn.Sequential(
            *block(in_channels, width), nn.MaxPool2d(2),
            *block(width, 2 * width), nn.MaxPool2d(2),
            *block(2 * width, 2 * width), nn.AdaptiveAvgPool2d(3), nn.Flatten(),
            nn.Linear(2 * width * 9, feature_dim), nn.ReLU())
        self.head = nn.Linear(feature_dim, num_classes)

    @torch.jit.export
    def features(self, x: Tensor) -> Tensor:
        """Penultimate-layer features [B, feature_dim] of images [B, C, H, W] in [-1, 1]."""
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor, batch: int = 1000) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(x), batch):
        correct += int((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum())
    return correct / len(x)


@torch.enable_grad()          # also when called from a no_grad evaluation
def train(x: Tensor, y: Tensor, num_classes: int, epochs: int = 2, batch: int = 128,
          seed: int = 0, lr: float = 2e-3, progress: bool = True) -> FeatureNet:
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = FeatureNet(x.shape[1], num_classes)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * ((len(x) + batch - 1) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps,
                                                pct_start=0.15)
    loss_fn = nn.CrossEntropyLoss()
    bar = tqdm(total=steps, desc="feature net", unit="it", disable=not progress)
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), batch):
            idx = perm[i:i + batch]
            loss = loss_fn(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}", refresh=False)
    bar.close()
    return model.eval()


def save(model: FeatureNet, out: Path, meta: dict) -> None:
    from core.base.io import atomic_path

    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)   # TorchScript is deprecated in 2.14
        scripted = torch.jit.script(model.eval())
        torch.jit.save(scripted, buf, _extra_files={"meta.json": json.dumps(meta, sort_keys=True)})
    with atomic_path(out) as tmp:
        tmp.write_bytes(buf.getvalue())


def split(x: Tensor, y: Tensor, seed: int, fraction: float = 0.1):
    """(train x, train y, test x, test y): a seeded `fraction` held out for the accuracy."""
    if len(x) < 2:
        raise UserError("need at least 2 images to hold out a test set")
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed + 1))
    n_test = max(1, int(len(x) * fraction))
    take = (lambda i: x.subset(i)) if hasattr(x, "subset") else (lambda i: x[i])
    return take(perm[n_test:]), y[perm[n_test:]], take(perm[:n_test]), y[perm[:n_test]]


def train_on(dataset, out: Path, epochs: int = 2, batch: int = 128, seed: int = 0,
             progress: bool = True, test=None, extra_meta: dict | None = None) -> dict:
    """Train on a labelled `core.data.datasets.Dataset`, measure the accuracy on `test` (a dataset)
    or, without one, on a seeded 10% held out; write `out`. Returns the file's meta.json."""
    at = f"{dataset.name}: " if dataset.name else ""
    if dataset.y is None or not dataset.is_image:
        raise UserError(f"{at}a feature net needs labelled images; the dataset "
                        f"{'has no labels' if dataset.y is None else 'is not images'}")
    if test is None:
        x, y, xt, yt = split(dataset.view(), dataset.y, seed)     # rows read per batch
        test_fp = "held-out 10%"
    else:
        x, y, xt, yt, test_fp = (dataset.view(), dataset.y, test.view(), test.y,
                                 test.fingerprint())
    num_classes = max(int(y.max()), int(yt.max())) + 1
    if num_classes < 2:
        raise UserError(f"{at}a classifier needs at least 2 classes")
    model = train(x, y, num_classes, epochs, batch, seed, progress=progress)
    acc = accuracy(model, xt, yt)
    meta = {"format": FORMAT, "version": VERSION, "dataset_fingerprint": dataset.fingerprint(),
            "test_fingerprint": test_fp, "shape": list(dataset.shape),
            "num_classes": num_classes, "test_accuracy": round(acc, 6),
            "feature_dim": model.feature_dim, "train_examples": len(x),
            "test_examples": len(xt), "epochs": epochs, "batch": batch, "seed": seed,
            **(extra_meta or {})}
    save(model, out, meta)
    return meta
