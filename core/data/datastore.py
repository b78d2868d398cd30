"""The on-disk image store: uint8 images decoded once, memory-mapped read-only by every process.

A store is one folder ``<cache_dir>/<key>/``:

* ``images.npy``  -- uint8 [N, C, H, W], a plain .npy that ``np.load(mmap_mode="r")`` maps: all
  processes of a machine share one copy through the page cache, and a process's own
  (anonymous) memory does not grow with N;
* ``labels.npy``  -- int64 [N], when the dataset has labels;
* ``store.json``  -- the manifest, written last: the key, the settings, the content digests
  of the source (the dataset's fingerprint), and a SHA-256 per chunk of ``images.npy``;
* ``verified.json`` -- (inode, size, mtime) of the ``images.npy`` whose chunks were checked.

`open_or_build` finds or builds a store under an exclusive ``fcntl`` lock on
``<cache_dir>/<key>.lock`` (one builder per store; the others wait, then reuse its result; the
kernel drops the lock of a killed builder). Every file is written to a temporary name and renamed
into place (`core.base.io.atomic_path`), the manifest last, so a kill -9 mid-build leaves no manifest
and the next run rebuilds. A store is trusted when its manifest matches the key and the file
sizes match the shape; its chunk digests are checked once per (inode, size, mtime) of
``images.npy`` -- by the builder as it writes, else by the first run that opens it -- so no rank
re-reads a 15 GB store on every run. A store that fails its check is rebuilt (one line says why).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from core.base.errors import UserError

#: bumped when the layout of a store changes (older stores are then rebuilt)
STORE_VERSION = 1
#: the bytes of images.npy one chunk digest covers
CHUNK_BYTES = 64 << 20
IMAGES, LABELS, MANIFEST, STAMP = "images.npy", "labels.npy", "store.json", "verified.json"


def to_device(t: Tensor, device) -> Tensor:
    """A host tensor on `device`. On CUDA through pinned memory and asynchronously: a copy from
    pageable memory waits until the GPU has drained its queue, a sync per copy."""
    if str(device).startswith("cuda") and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def to_unit(u8: Tensor) -> Tensor:
    """uint8 images -> float32 x / 127.5 - 1 on u8's device. (2x - 255) / 255 in float32 is
    one correctly rounded division of an exact integer: bit for bit the float64 value rounded
    once (checked for all 256 values in the tests)."""
    return u8.to(torch.float32).mul_(2).sub_(255).div_(255)     # one float allocation


class ImageStore:
    """uint8 images [N, C, H, W] (a read-only memory map, or an in-memory array) and their
    int64 labels [N] (or None). `gather` copies only the rows asked for."""

    def __init__(self, images: np.ndarray, labels: Optional[np.ndarray] = None,
                 path: Optional[Path] = None):
        if images.dtype != np.uint8 or images.ndim != 4:
            raise ValueError(f"an ImageStore holds uint8 [N, C, H, W], got {images.dtype} "
                             f"{list(images.shape)}")
        self.images, self.labels, self.path = images, labels, path

    def __len__(self) -> int:
        return len(self.images)

    @property
    def shape(self) -> tuple:
        return tuple(self.images.shape[1:])

    def gather(self, idx) -> Tensor:
        """The uint8 rows `idx` (a 1-D index tensor or array) as a new [len(idx), C, H, W]
        tensor: only these rows are read (from the page cache, for a memory map)."""
        idx = np.asarray(idx.cpu() if isinstance(idx, Tensor) else idx, dtype=np.int64)
        return torch.from_numpy(np.ascontiguousarray(np.take(self.images, idx, axis=0)))

    def head(self, n: int) -> "ImageStore":
        """The first n images (a view: nothing is copied)."""
        return ImageStore(self.images[:n], None if self.labels is None else self.labels[:n],
                          self.path)


class MappedArray:
    """A float (or integer) array [N, ...] read by index, each batch converted to float32 by
    `convert` (numpy array -> float32 numpy array): a float .npy memory-mapped as it is."""

    def __init__(self, array: np.ndarray, convert: Callable[[np.ndarray], np.ndarray]):
        self.array, self.convert = array, convert

    def __len__(self) -> int:
        return len(self.array)

    @property
    def shape(self) -> tuple:
        return tuple(self.array.shape)

    def __getitem__(self, idx) -> Tensor:
        idx = np.asarray(idx.cpu() if isinstance(idx, Tensor) else idx, dtype=np.int64)
        return torch.from_numpy(np.ascontiguousarray(
            self.convert(np.take(self.array, idx, axis=0))))


# ---------------------------------------------------------------------------------------------
# Building a store
# ---------------------------------------------------------------------------------------------

@dataclass
class Plan:
    """How to decode a source into a store: `n` images of `shape` (C, H, W), decoded by
    ``worker(task)`` -> (uint8 [rows, C, H, W], [digest bytes per row]) for each task in
    `tasks` (in order; `worker` is a module-level function, run in `workers` processes).
    The content digests (the dataset's fingerprint) are the digest of the rows' digests when
    `row_digests`, followed by what `content()` returns (run in a thread while the workers
    decode, e.g. the SHA-256 of a whole zip)."""
    n: int
    shape: tuple
    labels: Optional[np.ndarray]
    worker: Callable
    tasks: Sequence
    workers: int = 1
    content: Optional[Callable[[], list[str]]] = None
    settings: dict = field(default_factory=dict)
    row_digests: bool = False


def default_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def open_or_build(cache_dir: Path, key: str, plan: Callable[[], Plan], what: str,
                  progress: bool = True) -> tuple[ImageStore, dict]:
    """The store `key` under `cache_dir` and its manifest: reused when it is complete and
    checks out, else built from ``plan()`` (called only then), one builder at a time."""
    cache_dir = Path(cache_dir)
    folder = cache_dir / key
    with _store_lock(cache_dir, key, what) as writable:
        found, why = _trusted(folder, key, progress)
        if found is not None:
            return found
        if not writable:
            raise UserError(f"{cache_dir}: the data store for {what} is {why} and this cache "
                            f"folder is not writable; set [data] cache_dir to a writable folder")
        if why != "missing":
            print(f"[ctmkit] datastore: {folder} is {why}; rebuilding it", file=sys.stderr)
        return _build(folder, key, plan(), what, progress)


@contextlib.contextmanager
def _store_lock(cache_dir: Path, key: str, what: str):
    """Hold the exclusive lock of store `key`; yields whether the cache folder is writable (a
    read-only one can still serve complete stores, unlocked)."""
    try:
        make_cache_folder(cache_dir)
        fd = os.open(cache_dir / f"{key}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        if e.errno not in (errno.EACCES, errno.EROFS, errno.EPERM) or not cache_dir.is_dir():
            raise UserError(f"{cache_dir}: cannot use this data cache folder for {what} "
                            f"({e.strerror or e})") from None
        yield False
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"[ctmkit] datastore: another process is building or checking "
                  f"{cache_dir / key}; waiting for it", file=sys.stderr)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield True
    finally:
        os.close(fd)           # closing the descriptor drops the lock


def make_cache_folder(cache_dir: Path) -> None:
    """Create the cache folder, marked as ctmkit's (core.base.io.MARKER): the default one
    lies in out_dir, which is checked for files ctmkit did not write, and the data are opened
    (the store built) before that check, ahead of the process group."""
    from core.base.io import MARKER

    cache_dir.mkdir(parents=True, exist_ok=True)
    marker = cache_dir / MARKER
    if not marker.exists():
        with contextlib.suppress(OSError):
            marker.touch()


def _stat_key(path: Path) -> dict:
    st = path.stat()
    return {"inode": st.st_ino, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _npy_header(n: int, shape: tuple) -> bytes:
    import io

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "|u1", "fortran_order": False,
                                               "shape": (n,) + tuple(shape)})
    return buf.getvalue()


def _trusted(folder: Path, key: str, progress: bool):
    """((store, manifest), "") when the store in `folder` is complete and checks out, else
    (None, why not)."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except FileNotFoundError:
        return None, "missing"
    except (OSError, ValueError) as e:
        return None, f"unreadable ({e.__class__.__name__})"
    try:
        if manifest.get("version") != STORE_VERSION or manifest.get("key") != key:
            return None, "made by another version or for other settings"
        n, shape = int(manifest["n"]), tuple(manifest["shape"])
        header = len(_npy_header(n, shape))
        want = header + n * int(np.prod(shape))
        size = (folder / IMAGES).stat().st_size
        if size != want:
            return None, f"truncated or damaged ({IMAGES} holds {size} bytes, not {want})"
        if not _verified(folder, manifest, progress):
            return None, "damaged (a chunk of images.npy does not match its digest)"
        images = np.load(folder / IMAGES, mmap_mode="r", allow_pickle=False)
        labels = None
        if manifest["labels"]:
            labels = np.load(folder / LABELS, allow_pickle=False)
            if hashlib.sha256(labels.tobytes()).hexdigest() != manifest["labels"] \
                    or labels.shape != (n,):
                return None, "damaged (labels.npy does not match its digest)"
        if images.shape != (n,) + shape or images.dtype != np.uint8:
            return None, "damaged (images.npy has another shape)"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return None, f"unreadable ({e.__class__.__name__})"
    return (ImageStore(images, labels, folder), manifest), ""


def _verified(folder: Path, manifest: dict, progress: bool) -> bool:
    """Whether images.npy matches the manifest's chunk digests: free when verified.json
    records this very file (inode, size, mtime), else checked once and recorded."""
    from core.base.io import save_json

    images = folder / IMAGES
    stamp = _stat_key(images)
    with contextlib.suppress(OSError, ValueError):
        if json.loads((folder / STAMP).read_text()) == dict(stamp, key=manifest["key"]):
            return True
    from tqdm.auto import tqdm

    with open(images, "rb") as fh, tqdm(total=stamp["size"], desc="check data store",
                                        unit="B", unit_scale=True, disable=not progress,
                                        leave=False) as bar:
        for want in manifest["chunks"]:
            block = fh.read(manifest["chunk_bytes"])
            bar.update(len(block))
            if hashlib.sha256(block).hexdigest() != want:
                return False
        if fh.read(1):
            return False
    with contextlib.suppress(OSError):      # a read-only cache: checked again next time
        save_json(folder / STAMP, dict(stamp, key=manifest["key"]))
    return True


class _ChunkedWriter:
    """Appends bytes to an open file, keeping a SHA-256 per `CHUNK_BYTES` of the file."""

    def __init__(self, fh):
        self.fh, self.chunks, self.h, self.filled = fh, [], hashlib.sha256(), 0

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while len(view):
            take = min(len(view), CHUNK_BYTES - self.filled)
            self.fh.write(view[:take])
            self.h.update(view[:take])
            self.filled += take
            view = view[take:]
            if self.filled == CHUNK_BYTES:
                self._close_chunk()

    def _close_chunk(self) -> None:
        self.chunks.append(self.h.hexdigest())
        self.h, self.filled = hashlib.sha256(), 0

    def finish(self) -> list[str]:
        if self.filled:
            self._close_chunk()
        return self.chunks


def _decoded(plan: Plan):
    """Yield each task's result in order: in `plan.workers` processes, at most 2 tasks per
    worker in flight (memory stays bounded), or in this process for one worker."""
    if plan.workers <= 1 or len(plan.tasks) <= 1:
        for task in plan.tasks:
            yield plan.worker(task)
        return
    import multiprocessing as mp

    pool = ProcessPoolExecutor(plan.workers, mp_context=mp.get_context("fork"))
    try:
        tasks = iter(plan.tasks)
        pending = [pool.submit(plan.worker, t) for _, t in zip(range(2 * plan.workers), tasks)]
        while pending:
            result = pending.pop(0).result()
            nxt = next(tasks, None)
            if nxt is not None:
                pending.append(pool.submit(plan.worker, nxt))
            yield result
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _in_background(fn: Optional[Callable]):
    """Run fn() in a thread (hashing a large file while the workers decode); returns a
    function that waits for its result (None without fn) and re-raises its exception."""
    import threading

    if fn is None:
        return lambda: None
    box: dict = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as e:  # handed to the caller of the returned function
            box["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()

    def result():
        thread.join()
        if "error" in box:
            raise box["error"]
        return box["value"]
    return result


def _check_room(folder: Path, need: int) -> None:
    free = shutil.disk_usage(folder).free
    if free < need:
        raise UserError(f"{folder}: not enough disk space for the data store ({need / 1e9:.2f} "
                        f"GB needed, {free / 1e9:.2f} GB free); free some or set [data] "
                        f"cache_dir to a larger folder")


def _build(folder: Path, key: str, plan: Plan, what: str, progress: bool):
    """Decode `plan` into `folder` (temporaries renamed into place, the manifest last)."""
    from tqdm.auto import tqdm

    from core.base.io import atomic_path, remove_stale_temporaries, save_json, save_npy

    row = int(np.prod(plan.shape))
    header = _npy_header(plan.n, plan.shape)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            (folder / MANIFEST).unlink()            # from here on the old store is not trusted
        remove_stale_temporaries([], owned=[folder])   # a killed builder's (we hold the lock)
        _check_room(folder, len(header) + plan.n * row)
        row_digests, rows = hashlib.sha256(), 0
        with atomic_path(folder / IMAGES) as tmp, open(tmp, "wb") as fh, \
                tqdm(total=plan.n, desc=f"data store ({what})", unit="img",
                     disable=not progress) as bar:
            out = _ChunkedWriter(fh)
            out.write(header)
            content = _in_background(plan.content)
            for images, digests in _decoded(plan):
                if images.dtype != np.uint8 or tuple(images.shape[1:]) != tuple(plan.shape):
                    raise UserError(f"{what}: decoded images of shape {list(images.shape[1:])}"
                                    f", expected {list(plan.shape)}")
                out.write(np.ascontiguousarray(images).tobytes())
                for d in digests:
                    row_digests.update(d)
                rows += len(images)
                bar.update(len(images))
            if rows != plan.n:
                raise UserError(f"{what}: decoded {rows} images, expected {plan.n}")
            fh.flush()
            chunks = out.finish()
        content = ([row_digests.hexdigest()] if plan.row_digests else []) + (content() or [])
        labels = None
        if plan.labels is not None:
            labels = np.ascontiguousarray(plan.labels, np.int64)
            save_npy(folder / LABELS, labels)
        manifest = {"version": STORE_VERSION, "key": key, "n": plan.n, "shape": list(plan.shape),
                    "settings": plan.settings, "content": content, "chunk_bytes": CHUNK_BYTES,
                    "chunks": chunks, "labels": None if labels is None else
                    hashlib.sha256(labels.tobytes()).hexdigest()}
        save_json(folder / MANIFEST, manifest)
        save_json(folder / STAMP, dict(_stat_key(folder / IMAGES), key=key))
    except OSError as e:
        full = e.errno == errno.ENOSPC
        raise UserError(f"{folder}: cannot write the data store for {what} ("
                        f"{'disk full' if full else e.strerror or e}); nothing half-written "
                        f"is kept") from None
    images = np.load(folder / IMAGES, mmap_mode="r", allow_pickle=False)
    return ImageStore(images, labels, folder), manifest


def decode_in_memory(plan: Plan) -> tuple[ImageStore, list[str]]:
    """`plan` decoded into memory, in this process (a dataset loaded outside a run, with no
    cache folder): the store and the content digests `open_or_build`'s manifest would hold."""
    images = np.empty((plan.n,) + tuple(plan.shape), np.uint8)
    row_digests, rows = hashlib.sha256(), 0
    for part, digests in (plan.worker(t) for t in plan.tasks):
        images[rows:rows + len(part)] = part
        rows += len(part)
        for d in digests:
            row_digests.update(d)
    extra = plan.content() if plan.content is not None else []
    content = ([row_digests.hexdigest()] if plan.row_digests else []) + (extra or [])
    return ImageStore(images, plan.labels), content


def store_key(kind: str, source: dict, settings: dict) -> str:
    """The folder name of a store: the format, the source's cheap fingerprint (sizes, mtimes,
    the digest of its index) and the decode settings."""
    text = json.dumps({"kind": kind, "source": source, "settings": settings,
                       "version": STORE_VERSION}, sort_keys=True)
    return f"{kind}-{hashlib.sha256(text.encode()).hexdigest()[:24]}"


def cache_folder(options, ctx) -> Optional[Path]:
    """Where stores go: ``[data] cache_dir`` (relative to the config), else
    ``out_dir/datastore``; None when neither is known (a dataset loaded outside a run: it is
    decoded into memory)."""
    if options.has("cache_dir"):
        return options.path("cache_dir")
    out_dir = getattr(ctx, "out_dir", None)
    return Path(out_dir) / "datastore" if out_dir is not None else None


def once_per_version(path: Path, cache_dir: Optional[Path], what: str, compute):
    """``compute()`` (a JSON value) remembered in `cache_dir` by `what` and the file's (path,
    inode, size, mtime): what reads a whole large file (its digest, its value check) is done
    once per version of the file, not on every run by every rank. No cache: computed."""
    from core.base.io import save_json

    stat = dict(_stat_key(path), path=str(Path(path).resolve()), what=what)
    memo = None
    if cache_dir is not None:
        name = hashlib.sha256(json.dumps(stat, sort_keys=True).encode()).hexdigest()[:24]
        memo = Path(cache_dir) / "digests" / f"{name}.json"
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            found = json.loads(memo.read_text())
            if found["stat"] == stat:
                return found["value"]
    value = compute()
    if memo is not None:
        with contextlib.suppress(OSError):
            make_cache_folder(Path(cache_dir))
            save_json(memo, {"stat": stat, "value": value})
    return value


def file_digest_cached(path: Path, cache_dir: Optional[Path]) -> str:
    """The SHA-256 of a file's bytes, once per version of the file (`once_per_version`)."""
    from core.base.io import file_digest

    return once_per_version(path, cache_dir, "sha256", lambda: file_digest(path))
