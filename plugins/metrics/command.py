"""``ctmkit feature-net``: train the offline feature network for FID / KID (the metric
plugin's subcommand, added through the ``ctmkit_commands`` hook like a third-party one)."""

from __future__ import annotations

import sys
import time
import types
from pathlib import Path

from core.api import ArgumentParser as Parser
from core.base.errors import UserError


def _fail(e: UserError) -> int:
    print(f"error: {e}", file=sys.stderr)
    return 2


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


def load_labelled_images(path: str, fmt: str | None, limit: int | None = None):
    """A labelled image dataset through the dataset plugins, as ``[data]`` would read it."""
    from core.data import datasets
    from core.host.config import Section

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


FEATURE_NET_HELP = """\
Train the offline feature network for FID/KID when the Inception weights are unavailable: a
small CNN classifier (three 3x3 conv layers with batch norm, a 128-d penultimate layer) trained
on a labelled image dataset, written as TorchScript with an exported ``features`` method and a
``meta.json`` extra file (format ctmkit.feature_net, version 1, the data's fingerprint, image
shape, classes, test accuracy, feature dimension). Use it with the fid/kid metric options
features = "feature_net", feature_net = "<file>"; its numbers are reported as
fid_featnet-<hash>, not comparable with Inception FIDs. Without --test-data a seeded 10% of the
training data is held out for the test accuracy."""


def feature_net_main(argv: list[str], prog: str = "ctmkit feature-net",
                     command: str | None = None) -> int:
    """``ctmkit feature-net --data D --out F``: train the FID/KID feature net."""
    from plugins.metrics.feature_net import train_on

    ap = Parser(prog=prog, description=FEATURE_NET_HELP.replace("%", "%%"))
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
        train_ds = load_labelled_images(args.data, args.format, args.limit)
        test_ds = None
        if args.test_data is not None:
            test_ds = load_labelled_images(args.test_data, args.format)
            if test_ds.shape != train_ds.shape:
                raise UserError(f"{args.test_data}: test images are {list(test_ds.shape)}, "
                                f"training images {list(train_ds.shape)}")
        t_load = time.perf_counter() - t0
        t1 = time.perf_counter()
        out = Path(args.out)
        meta = train_on(train_ds, out, args.epochs, args.batch, args.seed,
                        progress=not args.no_progress, test=test_ds,
                        extra_meta={"command": command or " ".join([prog, *argv])})
        t_train = time.perf_counter() - t1
    except UserError as e:
        return _fail(e)
    print(f"test accuracy {meta['test_accuracy']:.4f} on {meta['test_examples']} images "
          f"({meta['train_examples']} training images, {args.epochs} epoch(s), {t_train:.1f} s "
          f"training and testing, {t_load:.1f} s loading); wrote {out}")
    return 0
