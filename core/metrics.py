"""Sample-quality metrics for images: FID and KID through clean-fid, with an offline fallback.

Feature extractors follow clean-fid's ``custom_feat_extractor`` contract: a callable taking a
float tensor [B, 3, H, W] with values in [0, 255] and returning features [B, F]. Each also has
a ``name`` and a ``resize`` step (uint8 HWC array -> float32 HWC array, what clean-fid calls
``fn_resize``), so that the very same object can be handed to ``cleanfid.fid.compute_fid(...,
custom_feat_extractor=ext, custom_fn_resize=ext.resize)`` and gives the same numbers there as
:func:`compute_features` gives on in-memory tensors.

* :func:`inception` -- clean-fid's InceptionV3W (the TorchScript ``inception-2015-12-05.pt``
  of StyleGAN2-ADA), images through clean-fid's "clean" resize to 299 x 299. Never downloads:
  a missing file is a one-line :class:`UserError` that says where to put it.
* :func:`feature_net` -- a small classifier written by ``tools/train_feature_net.py`` (features
  from its penultimate layer, images at their native resolution). For offline machines.

Images of every path are first quantised to uint8 exactly as saving them as PNGs would
(:func:`to_uint8`: ``round((x + 1) * 127.5)`` clipped to [0, 255]), so that in-memory samples
and folders of PNGs give the same features.

Naming rule: only numbers computed with the Inception extractor are called ``fid`` / ``kid``
(they are comparable with published FIDs). Numbers from any other feature network are
reported as ``fid_<extractor name>`` / ``kid_<extractor name>`` (e.g. ``fid_featnet-1a2b3c4d``,
the hex being the start of the network file's sha256) and must never be reported as plain FID.
:func:`metric_key` implements this rule; every metric goes through it.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
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

from core.errors import UserError
from core.io import atomic_path

INCEPTION_FILE = "inception-2015-12-05.pt"
INCEPTION_URL = ("https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/"
                 + INCEPTION_FILE)
INCEPTION_NAME = "inception_v3"
FEATURE_NET_FORMAT = "ctmkit.feature_net"


# ---------------------------------------------------------------------------------------------
# Metric interface and the naming rule
# ---------------------------------------------------------------------------------------------

class Metric:
    """A sample-quality metric (what a ``ctmkit_metrics`` factory returns).

    ``compute(samples, reference_dataset, cache_dir)`` gets the generated images (float
    [N, C, H, W] in [-1, 1]), the reference :class:`core.datasets.Dataset` and a folder for
    cached reference statistics, and returns ``{key: value}``.
    """

    name: str = "metric"

    def compute(self, samples, reference_dataset, cache_dir) -> dict[str, float]:
        raise NotImplementedError


def metric_key(kind: str, extractor_name: str) -> str:
    """``"fid"``/``"kid"`` for the Inception extractor only; ``"<kind>_<name>"`` otherwise."""
    return kind if extractor_name == INCEPTION_NAME else f"{kind}_{extractor_name}"


# ---------------------------------------------------------------------------------------------
# Quantisation, the way PNG files store the images
# ---------------------------------------------------------------------------------------------

def to_uint8(images) -> Tensor:
    """[-1, 1] images (tensor or array) -> uint8 tensor: round((x + 1) * 127.5) clipped.

    Computed in float32 (the datasets' dtype); torch.round and numpy.round both round half to
    even, so ``np.clip(np.round((x + 1) * 127.5), 0, 255).astype(np.uint8)`` on the same
    float32 array gives identical bytes.
    """
    x = torch.as_tensor(np.asarray(images) if not isinstance(images, Tensor) else images)
    x = x.detach().to("cpu", torch.float32)
    return ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


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

    def resize(self, img: np.ndarray) -> np.ndarray:  # pragma: no cover - overridden
        raise NotImplementedError

    def __call__(self, x: Tensor) -> Tensor:  # pragma: no cover - overridden
        raise NotImplementedError

    def check_shape(self, shape: Sequence[int]) -> None:
        """Raise UserError when images of `shape` [C, H, W] cannot be measured."""


class InceptionExtractor(FeatureExtractor):
    """clean-fid's InceptionV3W in "clean" mode: PIL bicubic resize to 299 outside the net."""

    def __init__(self, model, device):
        from cleanfid.resize import build_resizer

        self.model, self.device = model, torch.device(device)
        self.name = INCEPTION_NAME
        self.resize = build_resizer("clean")          # uint8 HWC -> float32 299x299x3

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


def inception(path=None, device="cpu") -> InceptionExtractor:
    """clean-fid's InceptionV3W from a local file (never downloaded)."""
    file = inception_file(path)
    if not file.is_file():
        raise UserError(f"Inception weights missing: {file} not found; download {INCEPTION_URL} "
                        f"there (or anywhere and set inception = \"/path/to/{INCEPTION_FILE}\" "
                        f"in the metric's options); nothing is downloaded automatically")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)   # TorchScript is deprecated in 2.14
            model = _load_inception_v3w(file)
    except Exception as e:  # truncated or foreign file
        raise UserError(f"{file}: unreadable Inception weights ({_first_line(e)})") from None
    return InceptionExtractor(model.to(device).eval(), device)


def _load_inception_v3w(file: Path):
    from cleanfid.inception_torchscript import InceptionV3W

    if file.name == INCEPTION_FILE:
        return InceptionV3W(str(file.parent), download=False, resize_inside=False)

    class _Named(InceptionV3W):  # the same wrapper for a file saved under another name
        def __init__(self, f):
            torch.nn.Module.__init__(self)
            self.base = torch.jit.load(str(f), map_location="cpu").eval()
            self.layers = self.base.layers
            self.resize_inside = False
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
        raise UserError(f"{file}: unreadable feature net ({_first_line(e)})") from None
    meta = None
    if extra["meta.json"]:
        try:
            meta = json.loads(extra["meta.json"])
        except ValueError:
            raise UserError(f"{file}: feature net has an unreadable meta.json") from None
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
    name = "featnet-" + hashlib.sha256(data).hexdigest()[:8]
    return FeatureNetExtractor(module, name, channels, shape, device, meta)


def _first_line(e: Exception) -> str:
    s = str(e).strip()
    return s.splitlines()[0][:120] if s else e.__class__.__name__


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
    """``{"mu", "sigma", "feats"}`` of ``min(num, len(dataset))`` reference images, cached.

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
    path = Path(cache_dir) / _cache_name(extractor.name, fp, n)
    if path.exists():
        try:
            # our own handle: np.load leaks the one it opens when the file is not an archive
            with open(path, "rb") as fh, np.load(fh, allow_pickle=False) as z:
                ok = (str(z["extractor"]) == extractor.name and str(z["fingerprint"]) == fp
                      and int(z["num"]) == n and (n == len(dataset) or int(z["seed"]) == seed))
                if ok:
                    feats = z["feats"].astype(np.float64)
                    ref = {"mu": z["mu"], "sigma": z["sigma"], "feats": feats}
                    f = feats.shape[1] if feats.ndim == 2 else -1
                    if (feats.shape[0] == n and ref["mu"].shape == (f,)
                            and ref["sigma"].shape == (f, f)):
                        return ref
                why = "made for other settings"
        except (OSError, ValueError, KeyError, TypeError, AttributeError, EOFError,
                zipfile.BadZipFile) as e:
            why = f"unreadable: {_first_line(e)}"
        print(f"reference statistics {path} {why}; recomputing", file=sys.stderr)

    if n < len(dataset):
        g = torch.Generator().manual_seed(int(seed))
        idx = torch.randperm(len(dataset), generator=g)[:n].sort().values
        images = dataset.x[idx]
    else:
        images = dataset.x
    feats = compute_features(images, extractor, batch=batch, progress=progress)
    mu, sigma = _stats(feats)
    f32 = feats.astype(np.float32)
    stored = f32 if np.array_equal(f32, feats) else feats      # lossless either way
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:   # a file object: np.savez would append ".npz" to a name
            np.savez(fh, mu=mu, sigma=sigma, feats=stored, extractor=np.array(extractor.name),
                     fingerprint=np.array(fp), num=np.array(n), seed=np.array(int(seed)))
    return {"mu": mu, "sigma": sigma, "feats": feats}


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


# ---------------------------------------------------------------------------------------------
# Sample grids
# ---------------------------------------------------------------------------------------------

def save_grid(images, path, nrow: Optional[int] = None, labels: Optional[Sequence] = None,
              padding: int = 2) -> Path:
    """A PNG grid of [-1, 1] images [N, C, H, W] (``nrow`` per row, default ~sqrt(N)), written
    atomically. Images under 64 pixels a side are upscaled x2 (nearest) so 28x28 is legible;
    ``labels`` (one per image) are written into each tile's top-left corner."""
    from PIL import Image, ImageDraw
    from torchvision.utils import make_grid

    u8 = to_uint8(images)
    if u8.dim() != 4 or u8.shape[1] not in (1, 3) or len(u8) == 0:
        raise UserError(f"save_grid: expected images [N, 1 or 3, H, W], got {list(u8.shape)}")
    n, _, h, w = u8.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    grid = make_grid(u8, nrow=nrow, padding=padding, pad_value=255)
    img = Image.fromarray(grid.permute(1, 2, 0).contiguous().numpy())
    scale = 2 if max(h, w) < 64 else 1
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    if labels is not None:
        draw = ImageDraw.Draw(img)
        for i, lab in enumerate(list(labels)[:n]):
            r, c = divmod(i, nrow)
            x0, y0 = (c * (w + padding) + padding) * scale, (r * (h + padding) + padding) * scale
            text = str(lab.item() if hasattr(lab, "item") else lab)
            box = draw.textbbox((x0 + 1, y0), text)
            draw.rectangle(box, fill=(0, 0, 0))
            draw.text((x0 + 1, y0), text, fill=(255, 255, 0))
    path = Path(path)
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
    return path
