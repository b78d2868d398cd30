"""Metric plugins: FID and KID of image samples against a reference dataset (clean-fid).

Options (both metrics read the same keys):

* ``features`` -- ``"inception"`` (default; clean-fid's InceptionV3W, results keyed ``fid`` /
  ``kid``) or ``"feature_net"`` (an offline classifier from tools/train_feature_net.py,
  results keyed ``fid_featnet-<hash>`` / ``kid_featnet-<hash>``, never plain ``fid``).
* ``mode`` -- Inception only: ``"clean"`` (default; clean-fid's PIL bicubic resize to 299
  outside the network, keys ``fid`` / ``kid``) or ``"legacy_tensorflow"`` (clean-fid's
  legacy_tensorflow mode: the network's own TensorFlow-style bilinear resize, as TF FID,
  StyleGAN2-ADA and EDM; keys ``fid_legacy_tf`` / ``kid_legacy_tf``).
* ``inception`` -- path to ``inception-2015-12-05.pt`` or the folder holding it (default:
  clean-fid's cache, /tmp). Never downloaded.
* ``reference`` -- FID with Inception features only: an ``.npz`` of precomputed reference
  statistics (``mu`` [2048], ``sigma`` [2048, 2048], e.g. EDM's ``cifar10-32x32.npz``, which
  were computed as ``mode = "legacy_tensorflow"``) used instead of statistics of the reference
  dataset. KID needs reference features, so it refuses this option.
* ``feature_net`` -- path to the feature-net file (required when features = "feature_net"),
  or ``"auto"``: on first use, train one on the reference dataset (plugins/metrics/feature_net.py, labels
  required) and keep it in the metrics' cache folder as ``featnet-<dataset fingerprint>.pt``.
* ``num`` -- reference images for the statistics (default 10000; all of them if fewer).
* ``seed`` -- picks the reference subset and KID's subsets (default 0).
* ``batch`` -- images per feature-network call (default 100).

Each metric's :meth:`describe` (reported as ``"<key>_info"`` by core.evaluation.quality) names its
feature network (name, file, sha256), mode and reference (dataset fingerprint and number of
images, or the .npz file and its sha256).
"""

from __future__ import annotations

import functools
import hashlib

from plugins.metrics import fid as M
from core.base.errors import UserError
from core.host.hookspecs import hookimpl


def _extractor(kind: str, path, device: str, mode: str = "clean"):
    """Load once per process for FID and KID alike (a file rewritten on disk is reloaded)."""
    file = M.inception_file(path) if kind == "inception" else path
    try:
        st = file.stat()
        stamp = (str(file.resolve()), st.st_mtime_ns, st.st_size)
    except (OSError, AttributeError):
        stamp = (str(file), None, None)     # missing: the loader raises the one-line error
    return _load(kind, path, device, stamp, mode)


@functools.lru_cache(maxsize=4)
def _load(kind: str, path, device: str, stamp, mode: str = "clean"):
    if kind == "inception":
        return M.inception(path, device, mode)
    return M.feature_net(path, device)


def _reference_npz(path):
    """Validated reference statistics, loaded once per file version."""
    try:
        st = path.stat()
        stamp = (st.st_mtime_ns, st.st_size)
    except OSError:
        stamp = None                        # missing: the loader raises the one-line error
    return _load_npz(str(path), stamp)


@functools.lru_cache(maxsize=2)
def _load_npz(path: str, stamp):
    return M.load_reference_npz(path)


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

        from plugins.metrics.feature_net import train_on
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
                 progress: bool = True, reference: dict | None = None):
        self.extractor, self.num, self.seed, self.batch = extractor, num, seed, batch
        self.progress, self.reference = progress, reference
        self.name = M.metric_key(self.kind, extractor.name)
        self._source = None                 # the reference of the last compute

    def describe(self):
        if self._source is None:
            return None
        return M.describe(self.kind, self.extractor, self._source)

    def _features(self, samples, reference, cache_dir):
        if self.reference is not None:      # precomputed statistics (.npz): no reference data
            feats = _sample_features(samples, self.extractor, self.batch, self.progress)
            self._source = self.reference["source"]
            return feats, self.reference
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
        self._source = ref["source"]
        return _sample_features(samples, self.extractor, self.batch, self.progress), ref


class FIDMetric(FeatureMetric):
    kind = "fid"

    def compute(self, samples, reference_dataset, cache_dir) -> dict[str, float]:
        feats, ref = self._features(samples, reference_dataset, cache_dir)
        return {self.name: M.fid(feats, ref)}


class KIDMetric(FeatureMetric):
    kind = "kid"

    def __init__(self, extractor, *args, reference: dict | None = None, **kw):
        if reference is not None:
            raise UserError("kid needs the reference images' features, not precomputed mu/sigma")
        super().__init__(extractor, *args, **kw)

    def compute(self, samples, reference_dataset, cache_dir) -> dict[str, float]:
        feats, ref = self._features(samples, reference_dataset, cache_dir)
        return {self.name: M.kid(feats, ref["feats"], self.seed)}


def _options(options, ctx, kind: str) -> dict:
    features = options.str("features", "inception", choices=("inception", "feature_net"))
    mode = options.str("mode", "clean", choices=tuple(M.INCEPTION_MODES))
    inception = options.path("inception", None)
    reference = options.path("reference", None)
    auto = options.str("feature_net", None) == "auto"
    net = None if auto else options.path("feature_net", None)
    num = options.int("num", 10000, min=2, max=10_000_000)
    seed = options.seed("seed", 0)
    batch = options.int("batch", 100, min=1, max=1_000_000)
    if features == "feature_net" and net is None and not auto:
        options.fail("feature_net", 'is required when features = "feature_net" (a file written '
                                    'by tools/train_feature_net.py)')
    if features != "inception" and mode != "clean":
        options.fail("mode", f'{mode!r} is an Inception mode; it needs features = "inception" '
                             f'(a feature net always sees images at their native size)')
    if reference is not None:
        if features != "inception":
            options.fail("reference", 'precomputed statistics (.npz) are Inception statistics; '
                                      'they need features = "inception"')
        if kind != "fid":
            options.fail("reference", f"{kind} needs the reference images' features, not just "
                                      f"the mu/sigma of {reference.name}; drop {kind} from "
                                      f"[evaluate] metrics or remove reference")
        reference = _reference_npz(reference)
    device = str(getattr(ctx, "device", "cpu") or "cpu")
    progress = bool(getattr(ctx, "progress", True))
    if features == "feature_net" and auto:
        extractor = AutoFeatureNet(device, progress)
    else:
        extractor = _extractor(features, inception if features == "inception" else net, device,
                               mode)
    out = dict(extractor=extractor, num=num, seed=seed, batch=batch, progress=progress)
    if reference is not None:
        out["reference"] = reference
    return out


def _fid(options, ctx):
    return FIDMetric(**_options(options, ctx, "fid"))


def _kid(options, ctx):
    return KIDMetric(**_options(options, ctx, "kid"))


@hookimpl
def ctmkit_metrics():
    return {"fid": _fid, "kid": _kid}


@hookimpl
def ctmkit_commands():
    from plugins.metrics.command import feature_net_main
    return {"feature-net": feature_net_main}
