"""Dataset plugins: x_0 from image folders, array files, MNIST-style IDX files, CIFAR-10 and
NVlabs/edm dataset archives.

The ``[data]`` section picks a loader with ``format``; the loader reads the rest of the
section, and a key no loader reads is reported as unknown. Relative paths resolve against the
config's folder. Images are held as uint8 [N, C, H, W] in a `core.data.datastore.ImageStore` and
read batch by batch as float32 scaled to [-1, 1]; labels as int64 [N] (0..K-1) or none.

Where the images live: a uint8 ``.npy`` (``format = "array"``) is memory-mapped in place. The
formats that must be decoded (folder, edm, idx, cifar10) are decoded once into a store in the
cache folder (``cache_dir``; default ``out_dir/datastore``), keyed by the source's cheap
fingerprint (sizes, mtimes and a digest of its index: a zip's central directory, a folder's
file list with sizes and mtimes; for idx the files' SHA-256) and the decode settings, built by
one process under a lock (``workers`` processes decode folder and edm images), and reused by
every later run, stage and rank -- see core/data/datastore.py. Loaded outside a run (no out_dir and
no cache_dir) they are decoded into memory, as uint8. ``.npz`` and ``.h5`` files are loaded into
memory as before.

Options every format reads:

=============  ========  ==================================================================
key            default   meaning
=============  ========  ==================================================================
path           required  the file or folder to read
hflip          false     flip each drawn example left-right with probability 1/2
limit          all       keep only the first N examples (N >= 1)
conditional    true      false drops the labels (an unconditional dataset)
cache_dir      out_dir/  where decoded stores go (a folder on a shared filesystem serves
               datastore every node; a read-only one serves the stores it holds)
=============  ========  ==================================================================

``format = "folder"``: PNG / JPEG images read with Pillow. ``path`` is a folder; when it holds
sub-folders, each one (in sorted name order, searched recursively) is a class and its images get
labels 0..K-1; otherwise the images directly in ``path`` are read, without labels. Entries
whose names start with "." are skipped.

=============  ========  ==================================================================
channels       3         1: convert to grayscale ("L"), 3: convert to RGB (alpha dropped)
resolution     none      resize every image to resolution x resolution (bicubic); without
                         it all images must share one size
transform      "none"    "center-crop": as EDM's dataset_tool ``--transform=center-crop``,
                         the centred square crop, then a Lanczos resize to resolution
workers        min(8,    processes that decode the images when the store is built
               cores)
=============  ========  ==================================================================

``format = "array"``: ``.npy``, ``.npz`` or ``.h5`` / ``.hdf5``. The examples are the array (or
dataset) named ``x``, ``data``, ``images`` or ``arr_0``; labels, if any, ``y`` or ``labels``.
A 2-D array [N, d] is a set of vectors; a 3-D array [N, H, W] holds grayscale images (read as
[N, 1, H, W]); a 4-D array holds images. A uint8 ``.npy`` of images (range "auto" or "byte")
is memory-mapped read-only, never loaded: every process of a machine shares it through the page
cache, and its SHA-256 is computed once per (file, size, mtime) and remembered in the cache
folder. A float ``.npy`` is memory-mapped as it is, read and converted per batch (its values are
checked once per load, a chunk at a time). ``.npz``, ``.h5`` and other integer arrays are loaded
into memory.

=============  ========  ==================================================================
layout         "auto"    "NCHW", "NHWC", or "auto": NHWC when the last axis has 1 or 3
                         entries and axis 1 does not, NCHW otherwise
range          "auto"    how stored values map to [-1, 1]. "auto": integer images must be
                         0..255 and are scaled x / 127.5 - 1, float images must already lie
                         in [-1, 1], vectors are kept as they are. "unit": values in [0, 1],
                         scaled 2x - 1. "byte": values in [0, 255], scaled x / 127.5 - 1
=============  ========  ==================================================================

``format = "idx"``: MNIST / Fashion-MNIST IDX files, gzipped or not. ``path`` is the images
file (e.g. ``train-images-idx3-ubyte.gz``) or the folder holding the files. The labels are the
file named like the images with ``images-idx3`` replaced by ``labels-idx1`` (gzipped or not);
without such a file the dataset has no labels.

=============  ========  ==================================================================
split          "train"   when ``path`` is a folder: "train" reads train-images-idx3-ubyte[.gz],
                         "test" reads t10k-images-idx3-ubyte[.gz]
labels         derived   the labels file, when it is not named as above
=============  ========  ==================================================================

``format = "cifar10"``: the CIFAR-10 "python version". ``path`` is the extracted
``cifar-10-batches-py`` folder (or the folder that holds it). Images are [N, 3, 32, 32].

=============  ========  ==================================================================
split          "train"   "train": data_batch_1 .. data_batch_5 (50000 images),
                         "test": test_batch (10000 images)
=============  ========  ==================================================================

``format = "edm"``: what NVlabs/edm's ``dataset_tool.py`` writes. ``path`` is the ``.zip``
archive (e.g. ``cifar10-32x32.zip``; read in place, never extracted) or a folder holding the same
files. The examples are its PNG / JPEG images in any sub-folder layout, in sorted name order
(``00000/img00000000.png``, ...), all of one size and either RGB or greyscale ("L"): [N, 3, H, W]
or [N, 1, H, W]. Class labels come from ``dataset.json`` at the root, ``{"labels": [["00000/
img00000000.png", 6], ...]}``, one integer per image; without that file, or with ``"labels":
null``, the dataset has no labels. Each member's size is checked before it is read (at most 256
MiB, expanding at most 200:1; only stored or deflated members), and each image's header before
it is decoded. ``resolution``, ``transform`` and ``workers`` as for ``folder`` (with
``transform = "center-crop"`` and ``resolution = 64`` a store matches what dataset_tool's
``--transform=center-crop --resolution=64x64`` writes, so it matches EDM's ``fid-refs``). The
fingerprint covers the SHA-256 of the whole archive, computed once when the store is built (of
a folder: the digest of each image's name, size and bytes, and ``dataset.json``).

The CIFAR-10 batches are Python pickles: use only files from a source you trust. They are
unpickled with a loader that resolves nothing but the numpy array constructors such a batch
needs, and refuses any other global, but pickle is not a safe format for untrusted input.

Every dataset's fingerprint is a digest of its format, the SHA-256 of the bytes it read (for a
folder: the digest of each image's relative name, size and bytes; recorded in the store, so a
later run does not re-read the source) and the settings that change the data (channels,
resolution, layout, range, split, limit, conditional); ``hflip`` is added by ``Dataset``.
Any bad input -- a missing or truncated file, a wrong magic number, a corrupt pickle or image,
mismatched label counts, values out of range, NaN -- is a one-line ``UserError`` naming the file.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import pickle
import re
import warnings
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from core.base.bounds import load_json
from core.data.source import check_array_sizes, one_line as _one_line, read_array_file
from core.data.datasets import Dataset, digest
from core.data.datastore import (ImageStore, MappedArray, Plan, cache_folder, decode_in_memory,
                            default_workers, file_digest_cached, once_per_version, open_or_build,
                            store_key)
from core.base.errors import UserError
from core.host.hookspecs import hookimpl

#: uint8 value -> its float32 image value in [-1, 1] (computed once in float64, then rounded)
_BYTE_TO_UNIT = (np.arange(256, dtype=np.float64) / 127.5 - 1.0).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Options every format reads, and the Dataset they build
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Common:
    hflip: bool
    limit: Optional[int]
    conditional: bool


def _optional_int(options, key: str, min: int, max: Optional[int] = None) -> Optional[int]:
    return options.int(key, min=min, max=max) if options.has(key) else None


def _common(options) -> Common:
    return Common(hflip=options.bool("hflip", False), limit=_optional_int(options, "limit", 1),
                  conditional=options.bool("conditional", True))


def _take(a, limit: Optional[int]):
    return a if a is None or limit is None else a[:limit]


def _described(settings: dict, common: Common) -> str:
    settings = dict(settings, limit=common.limit, conditional=common.conditional)
    return ";".join(f"{k}={settings[k]}" for k in sorted(settings))


def _dataset(fmt: str, x, y: Optional[np.ndarray], common: Common,
             hashes: list[str], settings: dict, name: str) -> Dataset:
    """The Dataset for already scaled (and limited) x (a float tensor, or an ImageStore of
    uint8 images); y is dropped unless conditional."""
    labels = torch.from_numpy(y.astype(np.int64)) if y is not None and common.conditional else None
    if isinstance(x, torch.Tensor):
        x = x.contiguous()
    return Dataset(x, labels, digest(fmt, *hashes, _described(settings, common)),
                   hflip=common.hflip, name=name)


def _stored(fmt: str, options, ctx, common: Common, source: dict, settings: dict, plan,
            name: str) -> Dataset:
    """The Dataset of a decoded format: its uint8 store in the cache folder (found by the
    source's cheap fingerprint and the settings, built from ``plan()`` on first use), or,
    with no cache folder (a dataset loaded outside a run), decoded into memory. The
    fingerprint is the source's content digests (recorded at build) and the settings."""
    cache = cache_folder(options, ctx)
    described = _described(settings, common)
    try:
        if cache is None:
            store, content = decode_in_memory(plan())
        else:
            key = store_key(fmt, source, {"settings": described})
            store, manifest = open_or_build(cache, key, plan, name,
                                            progress=getattr(ctx, "progress", True))
            content = manifest["content"]
    finally:
        _close_opened()
    labels = torch.from_numpy(np.array(store.labels, np.int64)) if store.labels is not None \
        else None
    return Dataset(store, labels, digest(fmt, *content, described), hflip=common.hflip,
                   name=name)


def _workers(options) -> int:
    return options.int("workers", default_workers(), min=1)


def _whole(task):
    """The worker of a format decoded in one piece: the task is the decoded array."""
    return task, []


def _one_piece(x: np.ndarray, y: Optional[np.ndarray], hashes: list[str],
               common: Common) -> Plan:
    """A Plan for uint8 images [N, C, H, W] already decoded (small formats: IDX, CIFAR)."""
    y = y if common.conditional else None
    return Plan(len(x), tuple(x.shape[1:]), y, _whole, [np.ascontiguousarray(x)],
                content=lambda: hashes)


# ---------------------------------------------------------------------------------------------
# Files, hashes and checks shared by the loaders
# ---------------------------------------------------------------------------------------------

def _read_bytes(path: Path, what: str = "file") -> bytes:
    from core.base.io import regular_file
    regular_file(path, what)
    try:
        return path.read_bytes()
    except OSError as e:
        raise UserError(f"{path}: cannot read {what} ({_one_line(e)})") from None


def _sha256(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _check_labels(y, n: int, path: Path) -> np.ndarray:
    """`y` as n non-negative integers, or a one-line error naming `path`."""
    try:
        y = np.asarray(y)
    except (ValueError, TypeError) as e:
        raise UserError(f"{path}: labels are not an array of integers ({_one_line(e)})") from None
    if y.ndim != 1 or y.dtype.kind not in "iu":
        raise UserError(f"{path}: labels must be a 1-D array of integers, got {y.dtype} "
                        f"{list(y.shape)}")
    if len(y) != n:
        raise UserError(f"{path}: {len(y)} labels for {n} examples")
    if n and y.min() < 0:
        raise UserError(f"{path}: labels must be >= 0, got {y.min()}")
    return y


def _bytes_to_unit(u8: np.ndarray) -> torch.Tensor:
    """uint8 images -> float32 x / 127.5 - 1 (exactly the float64 value, rounded once)."""
    return torch.from_numpy(_BYTE_TO_UNIT[u8])


def _span(x: np.ndarray) -> str:
    return f"[{x.min():g}, {x.max():g}]"


# ---------------------------------------------------------------------------------------------
# format = "folder"
# ---------------------------------------------------------------------------------------------

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def _is_image(p: Path) -> bool:
    return p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()


def _visible(root: Path, p: Path) -> bool:
    return not any(part.startswith(".") for part in p.relative_to(root).parts)


def _folder_files(root: Path) -> tuple[list[Path], Optional[list[int]]]:
    """The image files under `root` in load order, and their class labels (or None)."""
    if not root.is_dir():
        raise UserError(f"{root}: " + ("expected a folder of images, found a file"
                                       if root.exists() else "image folder not found"))
    entries = sorted(p for p in root.iterdir() if _visible(root, p))
    classes = [p for p in entries if p.is_dir()]
    images = [p for p in entries if _is_image(p)]
    if not classes:
        if not images:
            raise UserError(f"{root}: no PNG or JPEG images in this folder")
        return images, None
    if images:
        raise UserError(f"{root}: holds both images ({images[0].name}) and class sub-folders; "
                        f"move the images into a sub-folder")
    files, labels = [], []
    for k, folder in enumerate(classes):
        found = sorted(p for p in folder.rglob("*") if _is_image(p) and _visible(root, p))
        if not found:
            raise UserError(f"{folder}: class folder holds no PNG or JPEG images")
        files += found
        labels += [k] * len(found)
    return files, labels


#: Pillow's modes of 16-bit greyscale PNGs: scaled to 8 bits, not clipped by convert("L")
_16_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def _to_8_bit(im):
    """A 16-bit greyscale image as 8-bit "L", each value x -> round(x / 257) (65535 -> 255);
    other images as they are."""
    from PIL import Image

    if im.mode not in _16_BIT_MODES:
        return im
    a = np.asarray(im).astype(np.int64).clip(0, 65535)
    return Image.fromarray(((a + 128) // 257).astype(np.uint8), "L")


def _decode_image(raw: bytes, path, mode: str, resolution: Optional[int],
                  transform: str = "none") -> np.ndarray:
    """An encoded image as uint8 [H, W] or [H, W, 3] in `mode` ("L" or "RGB"). Resized to
    resolution x resolution when given: bicubic (transform "none"), or as EDM's dataset_tool
    ``--transform=center-crop``: the centred square crop, then a Lanczos resize. 16-bit
    greyscale is scaled to 8 bits; a decompression-bomb warning is the error, Pillow's other
    warnings (e.g. on palette transparency) are silenced."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(raw)) as im:
                im = _to_8_bit(im).convert(mode)
                if transform == "center-crop":
                    w, h = im.size
                    crop = min(w, h)
                    im = im.crop(((w - crop) // 2, (h - crop) // 2, (w + crop) // 2,
                                  (h + crop) // 2))
                    im = im.resize((resolution, resolution), Image.Resampling.LANCZOS)
                elif resolution is not None:
                    im = im.resize((resolution, resolution), Image.Resampling.BICUBIC)
                return np.asarray(im, dtype=np.uint8)
    except Exception as e:  # whatever Pillow raises on a bad file, the file is to blame
        raise UserError(f"{path}: unreadable image ({_one_line(e)})") from None


TRANSFORMS = ("none", "center-crop")
#: images per decode task (a worker's unit of work)
DECODE_CHUNK = 256


def _transform(options, resolution: Optional[int]) -> str:
    transform = options.str("transform", "none", choices=TRANSFORMS)
    if transform != "none" and resolution is None:
        options.fail("transform", f"{transform!r} needs resolution (the output size)")
    return transform


@dataclass(frozen=True)
class _DecodeTask:
    """A run of images of one folder or zip archive for `_decode_rows` (picklable)."""
    root: str                    # the folder (or the zip archive, with is_zip)
    is_zip: Optional[bool]       # None: a plain image folder; else an edm source
    names: tuple                 # relative names, in load order
    mode: str                    # "L" or "RGB"
    shape: tuple                 # (C, H, W) every decoded image must have
    resolution: Optional[int]
    transform: str
    first: str                   # the first image of the set (for error messages)
    hash_rows: bool              # return each image's digest (name, size, bytes)


#: the edm sources a worker process has opened: (pid, path) -> _EdmFiles
_OPENED: dict = {}


def _edm_files(root: str):
    key = (os.getpid(), root)
    if key not in _OPENED:
        _OPENED[key] = _EdmFiles(Path(root))
    return _OPENED[key]


def _decode_rows(task: _DecodeTask) -> tuple[np.ndarray, list[bytes]]:
    """Decode the task's images: uint8 [len(names), C, H, W] and, with hash_rows, the
    SHA-256 of each image's name, size and bytes. Runs in a worker process."""
    c, h, w = task.shape
    out = np.empty((len(task.names), h, w, c), np.uint8)
    digests = []
    files = _edm_files(task.root) if task.is_zip is not None else None
    for i, name in enumerate(task.names):
        if files is None:
            path = Path(task.root) / name
            raw, where = _read_bytes(path, "image"), path
        else:
            raw, where = files.read(name), files.where(name)
            if task.resolution is None:
                iw, ih, ic = _image_header(raw, where)
                if (ih, iw, ic) != (h, w, c):
                    kind = {1: "greyscale", 3: "RGB"}
                    raise UserError(f"{where}: image is {iw}x{ih} {kind[ic]} but {task.first} "
                                    f"is {w}x{h} {kind[c]}")
        if task.hash_rows:
            digests.append(hashlib.sha256(name.encode() + b"\0" + len(raw).to_bytes(8, "little")
                                          + raw).digest())
        img = _decode_image(raw, where, task.mode, task.resolution, task.transform)
        if img.shape[:2] != (h, w):
            raise UserError(f"{where}: image is {img.shape[1]}x{img.shape[0]} but "
                            f"{Path(task.first).name} is {w}x{h}; set resolution to resize "
                            f"all images")
        out[i] = img.reshape(h, w, c)
    return out.transpose(0, 3, 1, 2), digests


def _folder(options, ctx) -> Dataset:
    root = options.path("path")
    channels = options.int("channels", 3)
    if channels not in (1, 3):
        options.fail("channels", f"must be 1 or 3, got {channels}")
    resolution = _optional_int(options, "resolution", 1, 4096)   # as core.base.bounds' networks
    transform = _transform(options, resolution)
    workers = _workers(options)
    common = _common(options)

    files, labels = _folder_files(root)
    files, labels = _take(files, common.limit), _take(labels, common.limit)
    names = [p.relative_to(root).as_posix() for p in files]
    source = {"root": str(root.resolve()), "index": _folder_index(root, names)}
    mode = "L" if channels == 1 else "RGB"
    settings = dict(channels=channels, resolution=resolution,
                    **({"transform": transform} if transform != "none" else {}))

    def plan() -> Plan:
        first = _decode_image(_read_bytes(files[0], "image"), files[0], mode, resolution,
                              transform)
        shape = (channels,) + first.shape[:2]
        tasks = [_DecodeTask(str(root), None, tuple(names[i:i + DECODE_CHUNK]), mode, shape,
                             resolution, transform, names[0], True)
                 for i in range(0, len(names), DECODE_CHUNK)]
        y = None if labels is None or not common.conditional else np.asarray(labels, np.int64)
        return Plan(len(names), shape, y, _decode_rows, tasks, workers, row_digests=True)

    return _stored("folder", options, ctx, common, source, settings, plan, f"folder:{root.name}")


def _folder_index(root: Path, names: list[str]) -> str:
    """The digest of a folder's file list with each file's size and mtime: what a run checks
    instead of re-reading the images (the store records the content digest)."""
    h = hashlib.sha256()
    for name in names:
        try:
            st = (root / name).stat()
        except OSError as e:
            raise UserError(f"{root / name}: cannot read image ({_one_line(e)})") from None
        h.update(f"{name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# format = "array"
# ---------------------------------------------------------------------------------------------

def _as_images(x: np.ndarray, layout: str, path: Path) -> np.ndarray:
    """[N, d] stays; [N, H, W] -> [N, 1, H, W]; 4-D -> NCHW following `layout`."""
    if x.ndim == 2:
        return x
    if x.ndim == 3:
        return x[:, None]
    if x.ndim != 4:
        raise UserError(f"{path}: expected [N, d] vectors or [N, H, W], [N, C, H, W] or "
                        f"[N, H, W, C] images; got shape {list(x.shape)}")
    if layout == "auto":
        layout = "NHWC" if x.shape[3] in (1, 3) and x.shape[1] not in (1, 3) else "NCHW"
    return x.transpose(0, 3, 1, 2) if layout == "NHWC" else x


def _scale(x: np.ndarray, value_range: str, path: Path) -> torch.Tensor:
    """Values -> float32 per `value_range` (see the module docstring), checked first."""
    is_int = x.dtype.kind in "iu"
    if not is_int and not np.isfinite(x).all():
        raise UserError(f"{path}: data holds NaN or infinite values")
    if value_range == "auto" and x.ndim == 2:
        return torch.from_numpy(x.astype(np.float32))
    if value_range == "auto":
        value_range = "byte" if is_int else "signed"
    lo, hi, what = {"signed": (-1, 1, "float images must be in [-1, 1]"),
                    "unit": (0, 1, 'values must be in [0, 1] for range = "unit"'),
                    "byte": (0, 255, "integer images must be in 0..255" if is_int else
                             'values must be in [0, 255] for range = "byte"')}[value_range]
    if x.min() < lo or x.max() > hi:
        hint = ' (set range = "unit" for [0, 1] or "byte" for 0..255 data)' \
            if value_range == "signed" else ""
        raise UserError(f"{path}: {what}; got {_span(x)}{hint}")
    if value_range == "byte" and is_int:
        return _bytes_to_unit(x.astype(np.uint8))
    y = x.astype(np.float32)
    if value_range == "unit":
        y *= 2
        y -= 1
    elif value_range == "byte":
        y /= np.float32(127.5)
        y -= 1
    return torch.from_numpy(y)


def _array(options, ctx) -> Dataset:
    path = options.path("path")
    layout = options.str("layout", "auto", choices=("auto", "NCHW", "NHWC"))
    value_range = options.str("range", "auto", choices=("auto", "unit", "byte"))
    common = _common(options)
    cache = cache_folder(options, ctx)

    settings, name = dict(layout=layout, range=value_range), f"array:{path.name}"
    mapped = _mapped_npy(path, layout)
    if mapped is not None and mapped.dtype == np.uint8 and mapped.ndim == 4 \
            and value_range != "unit":          # uint8 images: read in place, never loaded
        store = ImageStore(_take(mapped, common.limit))
        return _dataset("array", store, None, common, [file_digest_cached(path, cache)],
                        settings, name)
    if mapped is not None and mapped.dtype.kind == "f":     # float: mapped as it is
        x = _take(mapped, common.limit)
        once_per_version(path, cache, f"values in range {value_range}, first {len(x)} rows",
                         lambda: _check_in_chunks(x, value_range, path) or True)
        per_batch = lambda b: _scale_checked(b, value_range, path).numpy()   # noqa: E731
        return _dataset("array", MappedArray(x, per_batch), None, common,
                        [file_digest_cached(path, cache)], settings, name)
    x, y = read_array_file(path, "array")
    x = np.asarray(x)
    if x.dtype.kind not in "iuf":
        raise UserError(f"{path}: data must be integers or floats, got {x.dtype}")
    if x.ndim < 1 or len(x) == 0:
        raise UserError(f"{path}: holds no examples (shape {list(x.shape)})")
    if y is not None:
        y = _check_labels(y, len(x), path)
    x, y = _as_images(_take(x, common.limit), layout, path), _take(y, common.limit)
    return _dataset("array", _scale_checked(x, value_range, path), y, common,
                    [file_digest_cached(path, cache)], settings, name)


def _scale_checked(x: np.ndarray, value_range: str, path: Path):
    """`_scale`, with a float32 overflow (inf from a float64 cast) as the error."""
    try:
        with np.errstate(over="raise", invalid="raise"):
            return _scale(x, value_range, path)
    except FloatingPointError:
        raise UserError(f"{path}: data values do not fit float32") from None


def _mapped_npy(path: Path, layout: str) -> Optional[np.ndarray]:
    """A .npy of integer or float examples memory-mapped read-only (images as [N, C, H, W]:
    a view, nothing is read), or None for other files (.npz, .h5, other dtypes, no rows)."""
    from core.base.io import regular_file

    if path.suffix.lower() != ".npy":
        return None
    regular_file(path)
    check_array_sizes(path)
    try:
        x = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as e:
        raise UserError(f"{path}: unreadable array file ({_one_line(e)})") from None
    if x.dtype.kind not in "uf" or x.ndim not in (2, 3, 4) or len(x) == 0:
        return None
    return _as_images(x, layout, path)


def _check_in_chunks(x: np.ndarray, value_range: str, path: Path, rows: int = 4096) -> None:
    """The checks of `_scale` (finite, in range) over a mapped array, `rows` at a time: memory
    stays bounded (the whole file is read once per load)."""
    for i in range(0, len(x), rows):
        _scale_checked(np.asarray(x[i:i + rows]), value_range, path)


# ---------------------------------------------------------------------------------------------
# format = "idx" (MNIST, Fashion-MNIST)
# ---------------------------------------------------------------------------------------------

IDX_IMAGES, IDX_LABELS = 0x00000803, 0x00000801
_IDX_KIND = {IDX_IMAGES: "images", IDX_LABELS: "labels"}


def _gunzip(raw: bytes, path: Path) -> bytes:
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:
        raise UserError(f"{path}: corrupt or truncated gzip data ({_one_line(e)})") from None


def _parse_idx(data: bytes, magic: int, path: Path) -> np.ndarray:
    """The uint8 array of an IDX file whose magic number must be `magic`."""
    kind = _IDX_KIND[magic]
    if len(data) < 4:
        raise UserError(f"{path}: truncated IDX file ({len(data)} bytes)")
    got = int.from_bytes(data[:4], "big")
    if got != magic:
        other = f", an IDX {_IDX_KIND[got]} file" if got in _IDX_KIND else ""
        raise UserError(f"{path}: not an IDX {kind} file (magic number 0x{got:08x}{other}; "
                        f"expected 0x{magic:08x})")
    ndim, header = magic & 0xFF, 4 + 4 * (magic & 0xFF)
    if len(data) < header:
        raise UserError(f"{path}: truncated IDX header ({len(data)} of {header} bytes)")
    dims = [int(d) for d in np.frombuffer(data, ">u4", ndim, 4)]
    size, body = int(np.prod(dims)), len(data) - header
    shape = "x".join(map(str, dims))
    if size == 0:
        raise UserError(f"{path}: IDX header describes an empty array ({shape})")
    if body != size:
        state = "truncated" if body < size else "has trailing bytes"
        raise UserError(f"{path}: {state}: the header describes {shape} = {size} bytes of "
                        f"{kind}, the file holds {body}")
    return np.frombuffer(data, np.uint8, size, header).reshape(dims)


def _read_idx(path: Path, magic: int) -> tuple[np.ndarray, str]:
    raw = _read_bytes(path, f"IDX {_IDX_KIND[magic]} file")
    return _parse_idx(_gunzip(raw, path), magic, path), _sha256(raw)


def _idx_images_path(options, path: Path, split: str) -> Path:
    if not path.is_dir():
        if options.has("split"):
            options.fail("split", "only applies when path is a folder")
        return path
    stem = "train" if split == "train" else "t10k"
    for name in (f"{stem}-images-idx3-ubyte.gz", f"{stem}-images-idx3-ubyte"):
        if (path / name).is_file():
            return path / name
    raise UserError(f"{path}: no {stem}-images-idx3-ubyte[.gz] in this folder (split = "
                    f"{split!r})")


def _derived_labels(images: Path) -> Optional[Path]:
    """images-idx3 -> labels-idx1 in the name, gzipped or not; None when no such file."""
    name = re.sub(r"images([-.])idx3", r"labels\1idx1", images.name)
    if name == images.name:
        return None
    plain = name[:-3] if name.endswith(".gz") else name
    for candidate in (name, plain, plain + ".gz"):
        if (images.parent / candidate).is_file():
            return images.parent / candidate
    return None


def _idx(options, ctx) -> Dataset:
    path = options.path("path")
    split = options.str("split", "train", choices=("train", "test"))
    labels_path = options.path("labels", None)
    common = _common(options)

    images = _idx_images_path(options, path, split)
    if common.conditional:
        labels_path = labels_path or _derived_labels(images)
    files = [images] + ([labels_path] if common.conditional and labels_path else [])
    source = {"files": [_sha256(_read_bytes(f, "IDX file")) for f in files]}   # small files

    def plan() -> Plan:
        x, x_hash = _read_idx(images, IDX_IMAGES)
        hashes, y = [x_hash], None
        if len(files) > 1:
            y, y_hash = _read_idx(labels_path, IDX_LABELS)
            if len(y) != len(x):
                raise UserError(f"{labels_path}: {len(y)} labels for the {len(x)} images of "
                                f"{images.name}")
            hashes.append(y_hash)
        x, y = _take(x, common.limit), _take(y, common.limit)
        return _one_piece(x[:, None], y, hashes, common)

    settings = dict(split=split if path.is_dir() else None)
    return _stored("idx", options, ctx, common, source, settings, plan, f"idx:{images.name}")


# ---------------------------------------------------------------------------------------------
# format = "cifar10" (python version)
# ---------------------------------------------------------------------------------------------

CIFAR_SPLITS = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}
_NUMPY_CORE = "numpy._core" if int(np.__version__.split(".")[0]) >= 2 else "numpy.core"
#: the only globals a pickled batch (a dict of bytes, lists and numpy arrays) refers to;
#: _codecs.encode is how Python 3 writes bytes into a protocol-2 pickle
_PICKLE_GLOBALS = {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
                   (_NUMPY_CORE + ".multiarray", "_reconstruct"),
                   (_NUMPY_CORE + ".multiarray", "scalar"),
                   (_NUMPY_CORE + ".numeric", "_frombuffer")}


class _Forbidden(Exception):
    pass


class _BatchUnpickler(pickle.Unpickler):
    """Resolves only numpy's array constructors; any other global is refused."""

    def find_class(self, module: str, name: str):
        resolved = re.sub(r"^numpy\.(_?core)\b", _NUMPY_CORE, module)
        if (resolved, name) not in _PICKLE_GLOBALS:
            raise _Forbidden(f"{module}.{name}")
        return super().find_class(resolved, name)


def _unpickle_batch(raw: bytes, path: Path) -> dict:
    try:
        batch = _BatchUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except _Forbidden as e:
        raise UserError(f"{path}: the pickle refers to {e}, which a CIFAR-10 batch never does; "
                        f"refusing to load it") from None
    except Exception as e:  # a corrupt pickle can fail in any way; the file is to blame
        raise UserError(f"{path}: not a readable CIFAR-10 batch ({_one_line(e)})") from None
    if not isinstance(batch, dict):
        raise UserError(f"{path}: not a CIFAR-10 batch (a pickled {type(batch).__name__}, "
                        f"expected a dict)")
    return batch


def _cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray, str]:
    raw = _read_bytes(path, "CIFAR-10 batch")
    batch = _unpickle_batch(raw, path)
    data, labels = (batch.get(k, batch.get(k.decode())) for k in (b"data", b"labels"))
    if data is None or labels is None:
        raise UserError(f"{path}: CIFAR-10 batch lacks b'data' or b'labels'")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
            or data.shape[1] != 3072:
        what = f"{data.dtype} {list(data.shape)}" if isinstance(data, np.ndarray) \
            else type(data).__name__
        raise UserError(f"{path}: b'data' must be a uint8 array [N, 3072], got {what}")
    return data.reshape(-1, 3, 32, 32), _check_labels(labels, len(data), path), _sha256(raw)


def _cifar10(options, ctx) -> Dataset:
    root = options.path("path")
    split = options.str("split", "train", choices=("train", "test"))
    common = _common(options)

    if not root.is_dir():
        raise UserError(f"{root}: " + ("expected the cifar-10-batches-py folder, found a file"
                                       if root.exists() else "CIFAR-10 folder not found"))
    if (root / "cifar-10-batches-py").is_dir():
        root = root / "cifar-10-batches-py"
    source = {"batches": [_stat_of(root / name) for name in CIFAR_SPLITS[split]]}

    def plan() -> Plan:
        xs, ys, hashes = [], [], []
        for name in CIFAR_SPLITS[split]:
            if common.limit is not None and sum(map(len, xs)) >= common.limit:
                break
            x, y, h = _cifar_batch(root / name)
            xs.append(x)
            ys.append(y)
            hashes.append(h)
        x, y = _take(np.concatenate(xs), common.limit), _take(np.concatenate(ys), common.limit)
        return _one_piece(x, y, hashes, common)

    return _stored("cifar10", options, ctx, common, source, dict(split=split), plan,
                   f"cifar10:{split}")


def _stat_of(path: Path) -> Optional[dict]:
    """A file's cheap fingerprint (size, mtime), or None when it does not exist."""
    try:
        st = path.stat()
    except OSError:
        return None
    return {"name": path.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


# ---------------------------------------------------------------------------------------------
# format = "edm" (NVlabs/edm dataset_tool.py: a zip archive or folder of images + dataset.json)
# ---------------------------------------------------------------------------------------------

EDM_LABELS = "dataset.json"
#: the most bytes one member (an image or dataset.json) may hold, and the most a compressed one
#: may expand by (dataset_tool stores its PNGs uncompressed; deflate tops out near 1030:1)
EDM_MAX_MEMBER, EDM_MAX_RATIO = 256 << 20, 200
_EDM_METHODS = {zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED}
_GREY_MODES = ("1", "L", "LA", "I", "I;16", "F")


class _EdmFiles:
    """The members of a dataset_tool archive (a .zip) or folder: their relative names (posix,
    hidden entries skipped), each one's size checked before it is read."""

    def __init__(self, path: Path):
        self.path, self.zip = path, None
        if path.is_dir():
            self.what = "folder"
            found = (p for p in path.rglob("*") if _visible(path, p) and p.is_file())
            self.sizes = {p.relative_to(path).as_posix(): None for p in found}
            return
        from core.base.io import regular_file
        regular_file(path, "dataset archive")
        self.what = "archive"
        try:
            self.zip = zipfile.ZipFile(path)
            infos = [i for i in self.zip.infolist() if not i.is_dir()]
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
            raise UserError(f"{path}: not a readable zip archive ({_one_line(e)})") from None
        self.sizes = {}
        for info in infos:
            if any(part.startswith(".") for part in info.filename.split("/")):
                continue
            if info.filename in self.sizes:
                raise UserError(f"{self.where(info.filename)}: the archive holds this member "
                                f"twice")
            self.sizes[info.filename] = info

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.zip is not None:
            self.zip.close()

    def where(self, name: str) -> str:
        return f"{self.path}:{name}" if self.zip is not None else str(self.path / name)

    def _check_size(self, name: str) -> None:
        info = self.sizes[name]
        size = (self.path / name).stat().st_size if info is None else info.file_size
        if size > EDM_MAX_MEMBER:
            raise UserError(f"{self.where(name)}: claims {size} bytes, more than the "
                            f"{EDM_MAX_MEMBER >> 20} MiB a member may hold (a zip bomb?)")
        if info is None:
            return
        if info.compress_type not in _EDM_METHODS:
            method = {zipfile.ZIP_BZIP2: "bzip2", zipfile.ZIP_LZMA: "LZMA"}.get(
                info.compress_type, f"method {info.compress_type}")
            raise UserError(f"{self.where(name)}: compressed with {method}; only stored or "
                            f"deflated members are read")
        packed = info.compress_size
        if size > max(EDM_MAX_RATIO * packed, 1 << 20):
            raise UserError(f"{self.where(name)}: claims to expand {packed} bytes to {size}, "
                            f"more than {EDM_MAX_RATIO}:1 (a zip bomb?)")
        if packed > size + size // 100 + 1024:      # deflate grows data by well under 1%
            raise UserError(f"{self.where(name)}: claims {packed} compressed bytes for {size} "
                            f"bytes of data (a corrupt or forged header)")

    def read(self, name: str, what: str = "image") -> bytes:
        """The member's bytes, its size checked first (and, in a zip, its CRC as it is read)."""
        self._check_size(name)
        if self.zip is None:
            return _read_bytes(self.path / name, what)
        info, parts = self.sizes[name], []
        try:
            with self.zip.open(info) as f:      # 1 MiB at a time: deflate output stays bounded
                while chunk := f.read(1 << 20):
                    parts.append(chunk)
        except (zipfile.BadZipFile, OSError, EOFError, RuntimeError, NotImplementedError,
                zlib.error) as e:
            raise UserError(f"{self.where(name)}: unreadable {what} in the archive "
                            f"({_one_line(e)})") from None
        raw = b"".join(parts)
        if len(raw) != info.file_size:
            raise UserError(f"{self.where(name)}: truncated member ({len(raw)} of "
                            f"{info.file_size} bytes)")
        return raw


def _image_header(raw: bytes, where: str) -> tuple[int, int, int]:
    """(width, height, channels: 1 or 3) of an encoded image, read without decoding it."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(raw)) as im:
                (w, h), mode = im.size, im.mode
    except Exception as e:  # whatever Pillow raises on a bad file, the file is to blame
        raise UserError(f"{where}: unreadable image ({_one_line(e)})") from None
    if Image.MAX_IMAGE_PIXELS and w * h > Image.MAX_IMAGE_PIXELS:
        raise UserError(f"{where}: image claims {w}x{h} pixels, more than the "
                        f"{Image.MAX_IMAGE_PIXELS} Pillow decodes (a decompression bomb?)")
    return w, h, 1 if mode in _GREY_MODES else 3


def _edm_labels(raw: bytes, where: str, images: list[str], what: str) -> Optional[np.ndarray]:
    """The int64 label of each of `images` from dataset.json's bytes, or None (no labels)."""
    meta = load_json(raw, where, "the label file")          # size and nesting bounded
    if not isinstance(meta, dict) or "labels" not in meta:
        raise UserError(f'{where}: expected {{"labels": [["<image>", <label>], ...]}} or '
                        f'{{"labels": null}}, got {_json_head(meta)}')
    entries, labels = meta["labels"], {}
    if entries is None:
        return None
    if not isinstance(entries, list):
        raise UserError(f"{where}: \"labels\" must be a list of [\"<image>\", <label>] pairs "
                        f"or null, got {_json_head(entries)}")
    for i, entry in enumerate(entries):
        if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str)):
            raise UserError(f"{where}: labels[{i}] must be [\"<image>\", <label>], got "
                            f"{_json_head(entry)}")
        name, label = entry[0].replace("\\", "/"), entry[1]
        if label is not None and (type(label) is not int or not 0 <= label < 2 ** 31):
            raise UserError(f"{where}: the label of {name} must be an integer >= 0, got "
                            f"{_json_head(label)}")
        if name in labels:
            raise UserError(f"{where}: names {name} twice")
        labels[name] = label
    known = set(images)
    missing = next((n for n in labels if n not in known), None)
    if missing is not None:
        raise UserError(f"{where}: names {missing}, an image the {what} does not hold")
    unlabelled = next((n for n in images if n not in labels), None)
    if unlabelled is not None:
        raise UserError(f"{where}: gives no label for {unlabelled}")
    values = [labels[n] for n in images]
    if all(v is None for v in values):
        return None
    null = next((n for n, v in zip(images, values) if v is None), None)
    if null is not None:
        raise UserError(f"{where}: the label of {null} is null but other images have labels")
    return np.asarray(values, np.int64)


def _json_head(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _edm(options, ctx) -> Dataset:
    path = options.path("path")
    resolution = _optional_int(options, "resolution", 1, 4096)
    transform = _transform(options, resolution)
    workers = _workers(options)
    common = _common(options)

    if not path.exists():
        raise UserError(f"{path}: dataset archive not found")
    with _EdmFiles(path) as files:
        images = sorted(n for n in files.sizes if n.lower().endswith(IMAGE_SUFFIXES))
        if not images:
            raise UserError(f"{path}: no PNG or JPEG images in this {files.what}")
        y, label_raw = None, None
        if common.conditional and EDM_LABELS in files.sizes:
            label_raw = files.read(EDM_LABELS, "label file")
            y = _edm_labels(label_raw, files.where(EDM_LABELS), images, files.what)
        images, y = _take(images, common.limit), _take(y, common.limit)
        source = {"path": str(path.resolve()), "index": _edm_index(files, images),
                  "labels": _sha256(label_raw) if label_raw is not None else None}
        is_zip = files.zip is not None

        def plan() -> Plan:
            first = files.read(images[0])
            w, h, c = _image_header(first, files.where(images[0]))
            if resolution is not None:
                h = w = resolution
            shape = (c, h, w)
            tasks = [_DecodeTask(str(path), is_zip, tuple(images[i:i + DECODE_CHUNK]),
                                 "L" if c == 1 else "RGB", shape, resolution, transform,
                                 images[0], not is_zip)
                     for i in range(0, len(images), DECODE_CHUNK)]
            if is_zip:
                content = lambda: [_sha256_file(path)]              # noqa: E731
            else:        # the folder's images (the rows' digests), then dataset.json
                content = lambda: [] if label_raw is None else [   # noqa: E731
                    _sha256(EDM_LABELS.encode() + b"\0" + len(label_raw).to_bytes(8, "little")
                            + label_raw)]
            return Plan(len(images), shape, y, _decode_rows, tasks, workers, content=content,
                        row_digests=not is_zip)

        settings = dict(source=files.what, resolution=resolution,
                        **({"transform": transform} if transform != "none" else {}))
        if resolution is None:
            del settings["resolution"]
        return _stored("edm", options, ctx, common, source, settings, plan, f"edm:{path.name}")


def _edm_index(files: "_EdmFiles", images: list[str]) -> str:
    """The digest of an edm source's index: of a zip, its size, mtime and each member's
    name, CRC-32 and sizes (the central directory); of a folder, its images' names, sizes and
    mtimes. What a run checks instead of re-reading the archive."""
    if files.zip is None:
        return _folder_index(files.path, images)
    st = files.path.stat()
    h = hashlib.sha256(f"{st.st_size}\0{st.st_mtime_ns}\n".encode())
    for info in files.zip.infolist():
        h.update(f"{info.filename}\0{info.CRC}\0{info.compress_size}\0{info.file_size}\0"
                 f"{info.header_offset}\n".encode())
    return h.hexdigest()


def _close_opened() -> None:
    """Close the edm sources `_decode_rows` opened in this process."""
    for key in [k for k in _OPENED if k[0] == os.getpid()]:
        _OPENED.pop(key).__exit__()


@hookimpl
def ctmkit_datasets():
    return {"folder": _folder, "array": _array, "idx": _idx, "cifar10": _cifar10, "edm": _edm}
