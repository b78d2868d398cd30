"""Metric plugins: FID and KID of image samples against a reference dataset (clean-fid).

Options (both metrics read the same keys):

* ``features`` -- ``"inception"`` (default; clean-fid's InceptionV3W, results keyed ``fid`` /
  ``kid``) or ``"feature_net"`` (an offline classifier from tools/train_feature_net.py,
  results keyed ``fid_featnet-<hash>`` / ``kid_featnet-<hash>``, never plain ``fid``).
* ``inception`` -- path to ``inception-2015-12-05.pt`` or the folder holding it (default:
  clean-fid's cache, /tmp). Never downloaded.
* ``feature_net`` -- path to the feature-net file (required when features = "feature_net"),
  or ``"auto"``: on first use, train one on the reference dataset (core/feature_net.py, labels
  required) and keep it in the metrics' cache folder as ``featnet-<dataset fingerprint>.pt``.
* ``num`` -- reference images for the statistics (default 10000; all of them if fewer).
* ``seed`` -- picks the reference subset and KID's subsets (default 0).
* ``batch`` -- images per feature-network call (default 100).
"""

from __future__ import annotations

import functools
import hashlib

from core import metrics as M
from core.errors import UserError
from core.hookspecs import hookimpl


def _extractor(kind: str, path, device: str):
    """Load once per process for FID and KID alike (a file rewritten on disk is reloaded)."""
    file = M.inception_file(path) if kind == "inception" else path
    try:
        st = file.stat()
        stamp = (str(file.resolve()), st.st_mtime_ns, st.st_size)
    except (OSError, AttributeError):
        stamp = (str(file), None, None)     # missing: the loader raises the one-line error
    return _load(kind, path, device, stamp)


@functools.lru_cache(maxsize=4)
def _load(kind: str, path, device: str, stamp):
    return M.inception(path, device) if kind == "inception" else M.feature_net(path, device)


_memo: dict = {}


def _sample_features(samples, extractor, batch: int, progress: bool):
    """Features of `samples`, reused when FID and KID measure the same samples in a row."""
    u8 = M.to_uint8(samples)
    key = (extractor.name, tuple(u8.shape), hashlib.sha256(u8.numpy().tobytes()).hexdigest())
    if _memo.get("key") != key:
        _memo.clear()
        _memo.update(key=key, feats=M.compute_features(samples, extractor, batch, progress))
    return _memo["feats"]


class AutoFeatureNet:
    """``feature_net = "auto"``: the feature net of the reference dataset, trained on first
    use and cached beside the reference statistics."""

    name = "featnet-auto"

    def __init__(self, device: str, progress: bool):
        self.device, self.progress = device, progress

    def resolve(self, reference, cache_dir):
        from pathlib import Path

        from core.feature_net import train_on
        path = Path(cache_dir) / f"featnet-{reference.fingerprint()[:16]}.pt"
        if not path.is_file():
            print(f"[ctmkit] metrics: training the feature net on the reference data -> {path}",
                  flush=True)
            meta = train_on(reference, path, progress=self.progress)
            print(f"[ctmkit] metrics: feature net test accuracy {meta['test_accuracy']:.4f}",
                  flush=True)
        return _extractor("feature_net", path, self.device)


class FeatureMetric(M.Metric):
    kind = ""

    def __init__(self, extractor, num: int = 10000, seed: int = 0, batch: int = 100,
                 progress: bool = True):
        self.extractor, self.num, self.seed, self.batch = extractor, num, seed, batch
        self.progress = progress
        self.name = M.metric_key(self.kind, extractor.name)

    def _features(self, samples, reference, cache_dir):
        if isinstance(self.extractor, AutoFeatureNet):
            self.extractor = self.extractor.resolve(reference, cache_dir)
            self.name = M.metric_key(self.kind, self.extractor.name)
        if not getattr(reference, "is_image", False):
            raise UserError(f"{self.name}: the reference dataset is not images")
        if tuple(samples.shape[1:]) != tuple(reference.shape):
            raise UserError(f"{self.name}: samples are {list(samples.shape[1:])} but the "
                            f"reference images are {list(reference.shape)}")
        ref = M.reference_stats(reference, self.extractor, self.num, cache_dir, self.seed,
                                self.batch, self.progress)
        return _sample_features(samples, self.extractor, self.batch, self.progress), ref


class FIDMetric(FeatureMetric):
    kind = "fid"

    def compute(self, samples, reference_dataset, cache_dir) -> dict[str, float]:
        feats, ref = self._features(samples, reference_dataset, cache_dir)
        return {self.name: M.fid(feats, ref)}


class KIDMetric(FeatureMetric):
    kind = "kid"

    def compute(self, samples, reference_dataset, cache_dir) -> dict[str, float]:
        feats, ref = self._features(samples, reference_dataset, cache_dir)
        return {self.name: M.kid(feats, ref["feats"], self.seed)}


def _options(options, ctx) -> dict:
    features = options.str("features", "inception", choices=("inception", "feature_net"))
    inception = options.path("inception", None)
    auto = options.str("feature_net", None) == "auto"
    net = None if auto else options.path("feature_net", None)
    num = options.int("num", 10000, min=2, max=10_000_000)
    seed = options.seed("seed", 0)
    batch = options.int("batch", 100, min=1, max=1_000_000)
    if features == "feature_net" and net is None and not auto:
        options.fail("feature_net", 'is required when features = "feature_net" (a file written '
                                    'by tools/train_feature_net.py)')
    device = str(getattr(ctx, "device", "cpu") or "cpu")
    progress = bool(getattr(ctx, "progress", True))
    if features == "feature_net" and auto:
        extractor = AutoFeatureNet(device, progress)
    else:
        extractor = _extractor(features, inception if features == "inception" else net, device)
    return dict(extractor=extractor, num=num, seed=seed, batch=batch, progress=progress)


def _fid(options, ctx):
    return FIDMetric(**_options(options, ctx))


def _kid(options, ctx):
    return KIDMetric(**_options(options, ctx))


@hookimpl
def ctmkit_metrics():
    return {"fid": _fid, "kid": _kid}
