"""Train the offline feature network for FID/KID when the Inception weights are unavailable.

A small CNN classifier (three 3x3 conv layers with batch norm, a 128-d penultimate layer) is
trained on a labelled image dataset and written as TorchScript with an exported ``features``
method (the penultimate layer) and an extra file ``meta.json`` (format ``ctmkit.feature_net``,
version 1, the training data's fingerprint, image shape, number of classes, test accuracy,
feature dimension). Use it with the fid/kid metric options ``features = "feature_net"`` and
``feature_net = "<file>"``; its numbers are reported as ``fid_featnet-<hash>`` -- they are not
comparable with Inception FIDs.

    python tools/train_feature_net.py --data /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz \\
        --format idx --test-data /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz \\
        --out featnet-fmnist.pt [--epochs 2] [--batch 128] [--limit N] [--seed 0]

Without ``--test-data`` a seeded 10% of the training data is held out for the test accuracy.
"""

from __future__ import annotations

import argparse
import sys
import time
import types
from pathlib import Path

import _common

from core.errors import UserError
from core.feature_net import train_on


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def _guess_format(path: str) -> str:
    name = Path(path).name.lower()
    if name.endswith((".npy", ".npz", ".h5", ".hdf5")):
        return "array"
    if "idx" in name or "ubyte" in name:
        return "idx"
    if "cifar" in name:
        return "cifar10"
    if Path(path).is_dir():
        return "folder"
    raise UserError(f"{path}: cannot guess the data format; pass --format "
                    f"idx|array|folder|cifar10")


def load_dataset(path: str, fmt: str | None, limit: int | None = None):
    from core import datasets
    from core.config import Section

    options = {"format": fmt or _guess_format(path), "path": str(path)}
    if limit is not None:
        options["limit"] = limit
    ctx = types.SimpleNamespace(base_dir=Path.cwd())
    ds = datasets.load(Section("data", options, "<cli>", Path.cwd()), ctx)
    if not ds.is_image:
        raise UserError(f"{path}: not an image dataset (shape {list(ds.shape)})")
    if ds.y is None:
        raise UserError(f"{path}: the dataset has no labels; a feature net needs a labelled set")
    if ds.shape[0] not in (1, 3):
        raise UserError(f"{path}: images must have 1 or 3 channels, got {ds.shape[0]}")
    return ds


def main(argv=None) -> int:
    ap = _Parser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="labelled training images")
    ap.add_argument("--format", choices=("idx", "array", "folder", "cifar10"), default=None,
                    help="dataset format (default: guessed from the path)")
    ap.add_argument("--test-data", default=None,
                    help="labelled test images (default: hold out 10%% of --data)")
    ap.add_argument("--out", required=True, help="TorchScript file to write")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--limit", type=int, default=None, help="use the first N training images")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    for key in ("epochs", "batch", "limit"):
        v = getattr(args, key)
        if v is not None and v < 1:
            ap.error(f"--{key} must be >= 1, got {v}")
    try:
        t0 = time.perf_counter()
        train_ds = load_dataset(args.data, args.format, args.limit)
        test_ds = None
        if args.test_data is not None:
            test_ds = load_dataset(args.test_data, args.format)
            if test_ds.shape != train_ds.shape:
                raise UserError(f"{args.test_data}: test images are {list(test_ds.shape)}, "
                                f"training images {list(train_ds.shape)}")
        t_load = time.perf_counter() - t0

        t1 = time.perf_counter()
        out = Path(args.out)
        meta = train_on(train_ds, out, args.epochs, args.batch, args.seed,
                        progress=not args.no_progress, test=test_ds,
                        extra_meta={"command": _common.command_line()})
        t_train = time.perf_counter() - t1
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"test accuracy {meta['test_accuracy']:.4f} on {meta['test_examples']} images "
          f"({meta['train_examples']} training images, "
          f"{args.epochs} epoch(s), {t_train:.1f} s training and testing, {t_load:.1f} s "
          f"loading); "
          f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
