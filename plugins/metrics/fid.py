"""Sample-quality metrics for images: FID and KID through clean-fid, with an offline fallback.

Feature extractors follow clean-fid's ``custom_feat_extractor`` contract: a callable taking a
float tensor [B, 3, H, W] with values in [0, 255] and returning features [B, F]. Each also has
a ``name`` and a ``resize`` step (uint8 HWC array -> float32 HWC array, what clean-fid calls
``fn_resize``), so that the very same object can be handed to ``cleanfid.fid.compute_fid(...,
custom_feat_extractor=ext, custom_fn_resize=ext.resize)`` and gives the same numbers there as
:func:`compute_features` gives on in-memory tensors.

* :func:`inception` -- clean-fid's InceptionV3W (the TorchScript ``inception-2015-12-05.pt``
  of StyleGAN2-ADA) in one of clean-fid's two Inception modes: ``"clean"`` (PIL bicubic resize
  to 299 x 299 outside the network) or ``"legacy_tensorflow"`` (images at their native size,
  resized to 299 x 299 inside the network by its TensorFlow-style bilinear resize -- how
  TensorFlow FID, StyleGAN2-ADA and EDM compute the FIDs that papers report). Never downloads:
  a missing file is a one-line :class:`UserError` that says where to put it.
* :func:`feature_net` -- a small classifier written by ``tools/train_feature_net.py`` (features
  from its penultimate layer, images at their native resolution). For offline machines.

Images of every path are first quantised to uint8 exactly as saving them as PNGs would
(:func:`to_uint8`: ``round((x + 1) * 127.5)`` clipped to [0, 255]), so that in-memory samples
and folders of PNGs give the same features.

Naming rule: only numbers computed with the Inception extractor in "clean" mode are called
``fid`` / ``kid``; the "legacy_tensorflow" mode's are ``fid_legacy_tf`` / ``kid_legacy_tf``
(the two modes give different numbers for the same images). Numbers from any other feature
network are reported as ``fid_<extractor name>`` / ``kid_<extractor name>`` (e.g.
``fid_featnet-1a2b3c4d``, the hex being the start of the network file's sha256) and must never
be reported as plain FID. :func:`metric_key` implements this rule; every metric goes through it.

Reference statistics come from a dataset (:func:`reference_stats`, cached per extractor -- so
per Inception mode -- dataset fingerprint and count) or, for FID with Inception features, from
a precomputed ``.npz`` with ``mu`` [2048] and ``sigma`` [2048, 2048] such as EDM's fid-refs
(:func:`load_reference_npz`). :class:`Info` describes which flavour a number is.
"""

from __future__ import annotations

import hashlib
import io
import platform
import re
import sys
import warnings
import zipfile
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from core.api import Metric  # noqa: F401  (the metric contract; re-exported)
from core.base.bounds import load_json
from core.base.errors import UserError, first_line
from core.evaluation.images import save_grid, to_uint8  # noqa: F401  (re-exported)
from core.base.io import atomic_path
from core.evaluation.quality import INCEPTION_MODES, Info  # noqa: F401  (re-exported)

INCEPTION_FILE = "inception-2015-12-05.pt"
INCEPTION_URL = ("https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/"
                 + INCEPTION_FILE)
INCEPTION_NAME = "inception_v3"
INCEPTION_DIM = 2048
FEATURE_NET_FORMAT = "ctmkit.feature_net"
INCEPTION_RESIZE = {
    "clean": "PIL bicubic to 299x299 outside the network (clean-fid mode clean)",
    "legacy_tensorflow": "TensorFlow-style bilinear to 299x299 inside the network (clean-fid "
                         "mode legacy_tensorflow)",
}


# ---------------------------------------------------------------------------------------------
# Metric interface and the naming rule
# ---------------------------------------------------------------------------------------------

def inception_name(mode: str = "clean") -> str:
    """The Inception extractor's name in `mode`: ``inception_v3`` or ``inception_v3_legacy_tf``."""
    if mode not in INCEPTION_MODES:
        raise UserError(f"unknown Inception mode {mode!r} (one of: "
                        f"{', '.join(INCEPTION_MODES)})")
    return INCEPTION_NAME + INCEPTION_MODES[mode]


def metric_key(kind: str, extractor_name: str) -> str:
    """``"fid"``/``"kid"`` for the Inception extractor in clean mode only, ``"fid_legacy_tf"``
    / ``"kid_legacy_tf"`` in legacy_tensorflow mode; ``"<kind>_<name>"`` otherwise."""
    for suffix in INCEPTION_MODES.values():
        if extractor_name == INCEPTION_NAME + suffix:
            return kind + suffix
    return f"{kind}_{extractor_name}"


def describe(kind: str, extractor, reference: dict) -> Info:
    """The :class:`Info` of a `kind` ("fid"/"kid") number from `extractor`'s features against
    `reference` (the ``source`` of :func:`reference_stats` / :func:`load_reference_npz`)."""
    feats = extractor.describe()
    return Info(metric=kind, key=metric_key(kind, extractor.name), features=feats,
                mode=feats.get("mode"), reference=dict(reference))


# ---------------------------------------------------------------------------------------------
# Quantisation, the way PNG files store the images
# ---------------------------------------------------------------------------------------------

def _to_rgb_hwc(u8: Tensor) -> np.ndarray:
    """uint8 [B, C, H, W] -> uint8 [B, H, W, 3] (grayscale repeated, as PIL's convert('RGB'))."""
    if u8.dim() != 4 or u8.shape[1] not in (1, 3):
        raise UserError(f"expected images [N, 1 or 3, H, W], got shape {list(u8.shape)}")
    a = u8.permute(0, 2, 3, 1).numpy()
    return np.repeat(a, 3, axis=3) if a.shape[3] == 1 else a


def _clean_fid_tensor(resized: np.ndarray) -> Tensor:
    """What clean-fid's ResizeDataset does with a resized HWC image (cleanfid/utils.py)."""
    from torchvision.transforms.functional import to_tensor

    if resized.dtype == np.uint8:
        return to_tensor(np.array(resized)) * 255
    if resized.dtype == np.float32:
        return to_tensor(resized)
    raise TypeError(f"a resize step must return uint8 or float32, got {resized.dtype}")


# ---------------------------------------------------------------------------------------------
# Feature extractors
# ---------------------------------------------------------------------------------------------

def native_resize(img: np.ndarray) -> np.ndarray:
    """The feature net's resize step: none (native resolution), only uint8 -> float32."""
    return np.asarray(img, dtype=np.float32)


class FeatureExtractor:
    """clean-fid ``custom_feat_extractor``: ``__call__`` maps [B, 3, H, W] in [0, 255] to [B, F]."""

    name: str = ""
    device: torch.device = torch.device("cpu")
    file: Optional[Path] = None
    _sha256: Optional[str] = None

    def sha256(self) -> Optional[str]:
        """SHA-256 of the network's file (computed once), or None without a file."""
        if self._sha256 is None and self.file is not None:
            from core.base.io import file_digest
            try:
                self._sha256 = file_digest(self.file)
            except OSError:
                return None
        return self._sha256

    def describe(self) -> dict:
        """The network and its input path, for :class:`Info` (JSON-serialisable)."""
        return {"name": self.name, "file": None if self.file is None else str(self.file),
                "sha256": self.sha256()}

    def resize(self, img: np.ndarray) -> np.ndarray:  # pragma: no cover - overridden
        raise NotImplementedError

    def __call__(self, x: Tensor) -> Tensor:  # pragma: no cover - overridden
        raise NotImplementedError

    def check_shape(self, shape: Sequence[int]) -> None:
        """Raise UserError when images of `shape` [C, H, W] cannot be measured."""


class InceptionExtractor(FeatureExtractor):
    """clean-fid's InceptionV3W in one of its modes, exactly as cleanfid.features /
    cleanfid.resize set it up: "clean" -- ``build_resizer("clean")`` (PIL bicubic, uint8 HWC ->
    float32 299x299x3) outside an InceptionV3W(resize_inside=False); "legacy_tensorflow" --
    ``build_resizer("legacy_tensorflow")`` (no resize outside) and InceptionV3W(resize_inside=
    True), whose TorchScript network resizes to 299 with its TensorFlow-style bilinear filter."""

    def __init__(self, model, device, mode: str = "clean", file=None):
        from cleanfid.resize import build_resizer

        self.name = inception_name(mode)              # validates the mode
        self.model, self.device, self.mode = model, torch.device(device), mode
        inside = mode == "legacy_tensorflow"
        if getattr(model, "resize_inside", inside) != inside:
            raise ValueError(f"Inception mode {mode} needs InceptionV3W(resize_inside={inside})")
        self.resize = build_resizer(mode)
        self.file = None if file is None else Path(file).resolve()

    def describe(self) -> dict:
        return {"network": "inception", **super().describe(), "mode": self.mode,
                "resize": INCEPTION_RESIZE[self.mode]}

    def __call__(self, x: Tensor) -> Tensor:
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        with torch.no_grad():
            return self.model(x.to(self.device, torch.float32))


class FeatureNetExtractor(FeatureExtractor):
    """A TorchScript classifier's ``features`` (penultimate layer) at the native resolution."""

    def __init__(self, module, name: str, channels: int, shape: Optional[Sequence[int]],
                 device, meta: Optional[dict] = None):
        self.module, self.name, self.channels = module, name, int(channels)
        self.shape = tuple(shape) if shape is not None else None
        self.device, self.meta = torch.device(device), meta or {}
        self.resize = native_resize

    def describe(self) -> dict:
        return {"network": "feature_net", **super().describe(), "mode": "native",
                "resize": "none (native resolution)"}

    def check_shape(self, shape: Sequence[int]) -> None:
        if self.shape is not None and tuple(shape[-2:]) != tuple(self.shape[-2:]):
            raise UserError(f"feature net {self.name} was trained on {self.shape[-2]}x"
                            f"{self.shape[-1]} images; these are {shape[-2]}x{shape[-1]}")

    def __call__(self, x: Tensor) -> Tensor:
        x = x.to(self.device, torch.float32)
        if self.shape is not None and tuple(x.shape[-2:]) != tuple(self.shape[-2:]):
            raise UserError(f"feature net {self.name} takes {self.shape[-2]}x{self.shape[-1]} "
                            f"images, got {x.shape[-2]}x{x.shape[-1]} (with clean-fid, pass "
                            f"custom_fn_resize=extractor.resize: its default resizes to 299)")
        if x.shape[1] != self.channels:
            if self.channels == 1 and x.shape[1] == 3:
                if torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 1], x[:, 2]):
                    x = x[:, :1]                      # grayscale stored as RGB (PNG folders)
                else:                                 # ITU-R 601-2 luma, as PIL's convert('L')
                    w = torch.tensor([0.299, 0.587, 0.114], device=x.device)
                    x = (x * w.view(1, 3, 1, 1)).sum(1, keepdim=True)
            elif self.channels == 3 and x.shape[1] == 1:
                x = x.repeat(1, 3, 1, 1)
            else:
                raise UserError(f"feature net {self.name} takes {self.channels}-channel images, "
                                f"got {x.shape[1]}")
        with torch.no_grad():
            f = self.module.features(x / 127.5 - 1.0)  # back to the [-1, 1] it was trained on
        return f.reshape(f.shape[0], -1)


def inception_file(path=None) -> Path:
    """Where the Inception weights are looked for: `path` (the file, or the folder holding
    ``inception-2015-12-05.pt``), else clean-fid's own cache folder (/tmp; ./ on Windows)."""
    if path is None:
        path = "./" if platform.system() == "Windows" else "/tmp"   # cleanfid/features.py
    p = Path(path).expanduser()
    return p / INCEPTION_FILE if p.is_dir() else p


def inception(path=None, device="cpu", mode: str = "clean") -> InceptionExtractor:
    """clean-fid's InceptionV3W from a local file (never downloaded), in clean-fid's `mode`
    ("clean" or "legacy_tensorflow")."""
    inception_name(mode)                              # an unknown mode fails first
    file = inception_file(path)
    if not file.is_file():
        raise UserError(f"Inception weights missing: {file} not found; download {INCEPTION_URL} "
                        f"there (or anywhere and set inception = \"/path/to/{INCEPTION_FILE}\" "
                        f"in the metric's options); nothing is downloaded automatically")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)   # TorchScript is deprecated in 2.14
            model = _load_inception_v3w(file, resize_inside=mode == "legacy_tensorflow")
    except Exception as e:  # truncated or foreign file
        raise UserError(f"{file}: unreadable Inception weights ({first_line(e)})") from None
    return InceptionExtractor(model.to(device).eval(), device, mode, file)


def _load_inception_v3w(file: Path, resize_inside: bool = False):
    from cleanfid.inception_torchscript import InceptionV3W

    if file.name == INCEPTION_FILE:
        return InceptionV3W(str(file.parent), download=False, resize_inside=resize_inside)

    class _Named(InceptionV3W):  # the same wrapper for a file saved under another name
        def __init__(self, f):
            torch.nn.Module.__init__(self)
            self.base = torch.jit.load(str(f), map_location="cpu").eval()
            self.layers = self.base.layers
            self.resize_inside = resize_inside
    return _Named(file)


def feature_net(path, device="cpu") -> FeatureNetExtractor:
    """A TorchScript classifier with an exported ``features`` method (see
    tools/train_feature_net.py); named ``featnet-<first 8 hex of the file's sha256>``."""
    if path is None:
        raise UserError("feature_net: no file given (write one with tools/train_feature_net.py)")
    file = Path(path).expanduser()
    if not file.is_file():
        raise UserError(f"{file}: feature net not found (write one with "
                        f"tools/train_feature_net.py)")
    data = file.read_bytes()
    extra = {"meta.json": ""}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)   # TorchScript is deprecated in 2.14
            module = torch.jit.load(io.BytesIO(data), map_location=device, _extra_files=extra)
    except Exception as e:
        raise UserError(f"{file}: unreadable feature net ({first_line(e)})") from None
    meta = None
    if extra["meta.json"]:
        meta = load_json(extra["meta.json"], f"{file}: feature net", "meta.json")
        if not isinstance(meta, dict) or meta.get("format") != FEATURE_NET_FORMAT:
            raise UserError(f"{file}: meta.json format is not {FEATURE_NET_FORMAT!r}")
        if meta.get("version") != 1:
            raise UserError(f"{file}: unsupported feature net version {meta.get('version')!r}")
    if not hasattr(module, "features"):
        raise UserError(f"{file}: the TorchScript module has no exported `features` method")
    shape = meta.get("shape") if meta else None
    channels = shape[0] if shape else getattr(module, "in_channels", None)
    if channels not in (1, 3):
        raise UserError(f"{file}: cannot tell the feature net's input channels (no meta.json "
                        f"shape, no in_channels attribute)")
    module.eval()
    digest = hashlib.sha256(data).hexdigest()
    ext = FeatureNetExtractor(module, "featnet-" + digest[:8], channels, shape, device, meta)
    ext.file, ext._sha256 = file.resolve(), digest
    return ext


# ---------------------------------------------------------------------------------------------
# Features and statistics
# ---------------------------------------------------------------------------------------------

def compute_features(images, extractor, batch: int = 100, progress: bool = False) -> np.ndarray:
    """Features [N, F] (float64) of [-1, 1] images [N, C, H, W] (tensor or array).

    Per batch: uint8 quantisation (:func:`to_uint8`), grayscale -> RGB, the extractor's
    ``resize`` per image and clean-fid's tensor conversion -- the path clean-fid takes for a
    folder of PNGs of the same images.
    """
    from tqdm.auto import tqdm

    n = len(images)
    if n == 0:
        raise UserError("no images to compute features of")
    extractor.check_shape(tuple(images.shape[1:]))
    out = []
    with tqdm(total=n, desc=f"features ({extractor.name})", unit="img", disable=not progress,
              leave=False) as bar:
        for i in range(0, n, batch):
            hwc = _to_rgb_hwc(to_uint8(images[i:i + batch]))
            x = torch.stack([_clean_fid_tensor(extractor.resize(img)) for img in hwc])
            f = extractor(x)
            out.append(f.detach().cpu().numpy().astype(np.float64))
            bar.update(len(hwc))
    return np.concatenate(out)


def _stats(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.mean(feats, axis=0), np.cov(feats, rowvar=False)


def _cache_name(extractor_name: str, fingerprint: str, num: int) -> str:
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", f"{extractor_name}-{fingerprint[:16]}-{num}")
    return f"refstats-{safe}.npz"


def reference_stats(dataset, extractor, num: int, cache_dir, seed: int = 0, batch: int = 100,
                    progress: bool = False) -> dict:
    """``{"mu", "sigma", "feats", "source"}`` of ``min(num, len(dataset))`` reference images,
    cached; ``source`` (for :class:`Info`) names the dataset's fingerprint, the number of
    images and the subset's seed (None when all images are used).

    The images are a seeded subset without replacement (all of them when ``num`` covers the
    dataset; never flipped). The cache is
    ``cache_dir/refstats-<extractor.name>-<fingerprint[:16]>-<n>.npz``, written atomically and
    reused when it holds the same extractor, dataset, count and seed; an unreadable or
    mismatching file is recomputed and replaced.
    """
    if num < 2:
        raise UserError(f"reference statistics need at least 2 images, got num = {num}")
    n = min(int(num), len(dataset))
    if n < 2:
        raise UserError(f"the reference dataset has {len(dataset)} image(s); need at least 2")
    fp = dataset.fingerprint()
    source = {"source": "dataset", "fingerprint": fp, "num": n, "images": len(dataset),
              "seed": None if n == len(dataset) else int(seed)}
    path = Path(cache_dir) / _cache_name(extractor.name, fp, n)
    if path.exists():
        try:
            # our own handle: np.load leaks the one it opens when the file is not an archive
            with open(path, "rb") as fh, np.load(fh, allow_pickle=False) as z:
                ok = (str(z["extractor"]) == extractor.name and str(z["fingerprint"]) == fp
                      and int(z["num"]) == n and (n == len(dataset) or int(z["seed"]) == seed))
                if ok:
                    feats = z["feats"].astype(np.float64)
                    ref = {"mu": z["mu"], "sigma": z["sigma"], "feats": feats,
                           "source": source}
                    f = feats.shape[1] if feats.ndim == 2 else -1
                    if (feats.shape[0] == n and ref["mu"].shape == (f,)
                            and ref["sigma"].shape == (f, f)):
                        return ref
                why = "made for other settings"
        except (OSError, ValueError, KeyError, TypeError, AttributeError, EOFError,
                zipfile.BadZipFile) as e:
            why = f"unreadable: {first_line(e)}"
        print(f"reference statistics {path} {why}; recomputing", file=sys.stderr)

    if n < len(dataset):
        g = torch.Generator().manual_seed(int(seed))
        idx = torch.randperm(len(dataset), generator=g)[:n].sort().values
        images = dataset.view(idx)                 # read batch by batch, never all at once
    else:
        images = dataset.view()
    feats = compute_features(images, extractor, batch=batch, progress=progress)
    mu, sigma = _stats(feats)
    f32 = feats.astype(np.float32)
    stored = f32 if np.array_equal(f32, feats) else feats      # lossless either way
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:   # a file object: np.savez would append ".npz" to a name
            np.savez(fh, mu=mu, sigma=sigma, feats=stored, extractor=np.array(extractor.name),
                     fingerprint=np.array(fp), num=np.array(n), seed=np.array(int(seed)))
    return {"mu": mu, "sigma": sigma, "feats": feats, "source": source}


def load_reference_npz(path, dim: int = INCEPTION_DIM) -> dict:
    """``{"mu", "sigma", "source"}`` from a precomputed statistics file such as EDM's fid-refs
    (``np.savez(f, mu=[dim], sigma=[dim, dim])``): finite, sigma symmetric with a non-negative
    diagonal. ``source`` names the file and its sha256. Anything else: a one-line UserError."""
    from core.base.io import file_digest

    file = Path(path).expanduser()
    if not file.is_file():
        raise UserError(f"reference statistics {file}: not found")
    try:
        with open(file, "rb") as fh:
            z = np.load(fh, allow_pickle=False)
            if not isinstance(z, np.lib.npyio.NpzFile):
                raise UserError(f"reference statistics {file}: not an .npz archive (a .npy?); "
                                f"expected mu and sigma as in EDM's fid-refs files")
            with z:
                names = list(z.files)
                mu = z["mu"] if "mu" in names else None
                sigma = z["sigma"] if "sigma" in names else None
    except UserError:
        raise
    except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile) as e:
        raise UserError(f"reference statistics {file}: unreadable ({first_line(e)})") from None
    for name, a in (("mu", mu), ("sigma", sigma)):
        if a is None:
            raise UserError(f"reference statistics {file}: no {name!r} array (has "
                            f"{', '.join(names) or 'nothing'}; expected mu and sigma)")
    for name, a in (("mu", mu), ("sigma", sigma)):
        if not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)):
            raise UserError(f"reference statistics {file}: {name} has dtype {a.dtype}, "
                            f"expected floats")
    if mu.shape != (dim,) or sigma.shape != (dim, dim):
        raise UserError(f"reference statistics {file}: mu {list(mu.shape)} and sigma "
                        f"{list(sigma.shape)}; Inception statistics are mu [{dim}] and sigma "
                        f"[{dim}, {dim}]")
    mu, sigma = mu.astype(np.float64), sigma.astype(np.float64)
    if not (np.all(np.isfinite(mu)) and np.all(np.isfinite(sigma))):
        raise UserError(f"reference statistics {file}: mu or sigma holds NaN/Inf")
    scale = max(float(np.abs(sigma).max()), 1e-30)
    asym = float(np.abs(sigma - sigma.T).max())
    if asym > 1e-6 * scale:
        raise UserError(f"reference statistics {file}: sigma is not symmetric (max |sigma - "
                        f"sigma^T| = {asym:.3g}); not a covariance matrix")
    if np.any(np.diag(sigma) < 0):
        raise UserError(f"reference statistics {file}: sigma has a negative diagonal; not a "
                        f"covariance matrix")
    source = {"source": "npz", "path": str(file.resolve()), "sha256": file_digest(file)}
    return {"mu": mu, "sigma": sigma, "source": source}


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2):
    ||mu1 - mu2||^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^(1/2)).

    tr((S1 S2)^(1/2)) = tr((R S2 R)^(1/2)) with R = S1^(1/2), and R S2 R is symmetric positive
    semi-definite: two symmetric eigendecompositions, no complex sqrtm, exact for singular
    covariances too (fewer samples than features), and independent of SciPy's sqrtm API
    (clean-fid's frechet_distance calls sqrtm(disp=False), which SciPy 1.18 removed)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (len(mu1), len(mu1)):
        raise UserError(f"FID: statistics of different dimensions ({mu1.shape}, {s1.shape} vs "
                        f"{mu2.shape}, {s2.shape})")
    s1, s2 = (s1 + s1.T) / 2, (s2 + s2.T) / 2
    w, v = np.linalg.eigh(s1)
    root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T                     # S1^(1/2)
    m = root @ s2 @ root
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


def fid(feats: np.ndarray, ref: dict) -> float:
    """Frechet distance between N(mean, cov) of `feats` and the reference's (mu, sigma)."""
    feats = np.asarray(feats, dtype=np.float64)
    if feats.ndim != 2 or feats.shape[0] < 2:
        raise UserError(f"FID needs at least 2 samples, got {feats.shape[0] if feats.ndim else 0}")
    if not np.all(np.isfinite(feats)):
        raise UserError("FID: the features of the samples hold NaN/Inf")
    mu, sigma = _stats(feats)
    return frechet_distance(mu, sigma, ref["mu"], ref["sigma"])


def kid(feats: np.ndarray, ref_feats: np.ndarray, seed: int = 0, num_subsets: int = 100,
        max_subset_size: int = 1000) -> float:
    """Kernel Inception Distance via cleanfid.fid.kernel_distance, with subsets drawn from a
    seeded NumPy global state that is restored afterwards (clean-fid draws its subsets from
    ``np.random`` directly)."""
    from cleanfid.fid import kernel_distance

    feats, ref_feats = np.asarray(feats), np.asarray(ref_feats)
    if min(len(feats), len(ref_feats), max_subset_size) < 2:
        raise UserError("KID needs at least 2 samples and 2 reference images")
    state = np.random.get_state()
    try:
        np.random.seed(int(seed) % 2 ** 32)
        return float(kernel_distance(ref_feats, feats, num_subsets=num_subsets,
                                     max_subset_size=max_subset_size))
    finally:
        np.random.set_state(state)
