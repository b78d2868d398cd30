"""Crash-safe, deterministic, checked file writing and reading.

* Every output is serialised in memory first, written to a temporary name with Python's own
  checked I/O (a full disk is an ``OSError``, never an abort inside a C++ library), fsynced and
  renamed into place: a crash or kill -9 leaves the old file (or none), never half of one.
* Temporaries are named ``.<final name>.ctmkit-<pid>-<start time>-<random>.tmp``: ctmkit's, and
  naming the process that writes them (its PID and start time, so a reused PID is told
  apart). The start-up sweep removes only those whose writer is dead, only in the folders the
  run writes, never in their sub-folders; the unnamed ``.<final name>.<random>.tmp`` of
  earlier versions only in out_dirs and their checkpoint folders, which are ctmkit's alone.
* Bytes are deterministic: the same content gives the same file (``torch.save`` into a buffer,
  not onto a temporary *name*, which torch would write into the archive).
* Every ``.pt`` file ctmkit writes carries ``sha256``, a digest of its content (tensors with their
  dtypes and shapes, and all metadata; :func:`content_digest`), checked by :func:`load_torch`:
  torch itself does not check its archives' CRCs, so a flipped bit would otherwise load.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np

from core.base.errors import UserError, first_line

#: the key under which a ctmkit .pt file stores the digest of the rest of its content
DIGEST_KEY = "sha256"
#: the file ctmkit writes into every folder that is its own (an out_dir, a datastore cache):
#: this folder is ctmkit's (core.pipeline.ownership)
MARKER = ".ctmkit"
#: temporaries are named ``.<final name>.ctmkit-<run id>-<random>.tmp`` beside the final file,
#: the run id being the writer's PID and its process start time (see `run_id`)
_TMP_SUFFIX = ".tmp"
_TMP_TAG = "ctmkit"
#: a temporary of this version: the writer's PID, its start time (clock ticks since boot;
#: 0 where /proc is missing), mkstemp's random part
_TMP_NAME = re.compile(r"\.(?P<name>.+)\.ctmkit-(?P<pid>[0-9]+)-(?P<start>[0-9]+)"
                       r"-[A-Za-z0-9_]+\.tmp")
#: a temporary of ctmkit before run ids (``.<final name>.<mkstemp's 8 random characters>.tmp``)
_OLD_TMP_NAME = re.compile(r"\.(?P<name>.+)\.[a-z0-9_]{6,8}\.tmp")


def _start_time(pid: int) -> int | None:
    """The start time of process `pid` (clock ticks since boot, /proc/PID/stat field 22): with
    the PID it names one process, also after the PID is reused. None if there is no such
    process; 0 where /proc is missing."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        if Path("/proc/self/stat").exists():
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return 0
    except OSError:
        return None
    return int(stat.rpartition(")")[2].split()[19])


def run_id(pid: int | None = None) -> str:
    """``<pid>-<start time>``: names the process that writes a temporary."""
    pid = os.getpid() if pid is None else pid
    return f"{pid}-{_start_time(pid) or 0}"


def is_temporary(name: str) -> bool:
    """Whether a file name is one of ctmkit's temporaries (of this or an earlier version)."""
    return bool(_TMP_NAME.fullmatch(name) or _OLD_TMP_NAME.fullmatch(name))


def is_stale_temporary(name: str) -> bool:
    """A temporary of this version (file or folder) whose writer is no longer running."""
    return bool(_TMP_NAME.fullmatch(name)) and _writer_is_dead(name)


def _writer_is_dead(name: str) -> bool:
    """For a temporary of this version: its writer is no longer running (its PID is free or
    belongs to a process started at another time)."""
    m = _TMP_NAME.fullmatch(name)
    started = _start_time(int(m["pid"]))
    return started is None or (started != 0 and int(m["start"]) != 0
                               and started != int(m["start"]))


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success fsync it and rename it onto `path`.

    A crash (or kill -9) before the rename leaves `path` untouched; the temporary file is
    removed on any exception (a kill -9 leaves it: `remove_stale_temporaries` sweeps those).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{_TMP_TAG}-{run_id()}-", suffix=_TMP_SUFFIX,
                               dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    umask = os.umask(0)
    os.umask(umask)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~umask)         # mkstemp creates 0600; outputs get the usual mode
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        with contextlib.suppress(OSError):  # make the rename itself durable
            dir_fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Atomically replace `path` by `data` (checked writes: ENOSPC / EROFS raise OSError)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()


def remove_stale_temporaries(folders, owned=()) -> list[Path]:
    """Delete the temporaries that killed ctmkit runs left in `folders` (not in their
    sub-folders): files named as `atomic_path` names them whose writer is dead. In the `owned`
    folders (out_dirs and their checkpoint folders, ctmkit's alone) also those of earlier
    versions, which carry no writer. Nothing else is touched: not a live run's temporary, not
    another program's file, not a sub-folder. Call it only while holding the run lock."""
    removed = []
    owned = {Path(f) for f in owned}
    for folder in dict.fromkeys(Path(f) for f in [*folders, *owned]):
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for e in entries:
            if not e.is_file(follow_symlinks=False):
                continue
            stale = (_writer_is_dead(e.name) if _TMP_NAME.fullmatch(e.name) else
                     folder in owned and bool(_OLD_TMP_NAME.fullmatch(e.name)))
            if stale:
                with contextlib.suppress(OSError):
                    os.unlink(e.path)
                    removed.append(Path(e.path))
    return removed


def save_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, array)
    write_bytes(path, buf.getvalue())


def save_json(path: str | os.PathLike, obj) -> None:
    """Strict JSON (NaN / Inf are refused: they are not JSON)."""
    write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n")
                .encode())


# --- content digests -----------------------------------------------------------------------

def content_digest(obj) -> str:
    """SHA-256 of a nested structure of dicts / lists / tuples / str / numbers / None / tensors
    / numpy arrays: tensors by dtype, shape and raw bytes; dicts in insertion order. Equal
    content gives an equal digest whatever file (or torch version) it came from."""
    import torch

    h = hashlib.sha256()

    def tag(t: str, payload: bytes = b"") -> None:
        h.update(t.encode() + len(payload).to_bytes(8, "little") + payload)

    def walk(o) -> None:
        if isinstance(o, torch.Tensor):
            t = o.detach().cpu().contiguous()
            tag("T", f"{t.dtype}|{list(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(o, np.ndarray):
            a = np.ascontiguousarray(o)
            tag("A", f"{a.dtype.str}|{list(a.shape)}".encode())
            h.update(a.tobytes())
        elif isinstance(o, dict):
            tag("D", str(len(o)).encode())
            for k, v in o.items():
                walk(k)
                walk(v)
        elif isinstance(o, (list, tuple)):
            tag("L" if isinstance(o, list) else "U", str(len(o)).encode())
            for v in o:
                walk(v)
        elif isinstance(o, str):
            tag("S", o.encode())
        elif o is None or isinstance(o, (bool, int, float, np.generic)):
            tag("V", f"{type(o).__name__}:{o!r}".encode())
        elif isinstance(o, torch.dtype):
            tag("Y", str(o).encode())
        else:
            raise TypeError(f"content_digest: cannot digest {type(o).__name__}")

    walk(obj)
    return h.hexdigest()


def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def regular_file(path: str | os.PathLike, what: str = "data file") -> Path:
    """`path` if it is a regular file (not a folder, device or FIFO: /dev/zero would be read
    until memory runs out); a one-line UserError otherwise."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: {what} not found")
    if path.is_dir():
        raise UserError(f"{path}: expected a {what}, found a folder")
    if not path.is_file():
        raise UserError(f"{path}: {what} is not a regular file")
    return path


# --- torch files ---------------------------------------------------------------------------

def torch_bytes(obj) -> bytes:
    """``torch.save`` into memory: deterministic bytes for equal content."""
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def save_torch(path: str | os.PathLike, obj: dict) -> str:
    """Write a ctmkit .pt file: `obj` plus ``sha256`` (its content digest); returns the digest."""
    body = {k: v for k, v in obj.items() if k != DIGEST_KEY}
    digest = content_digest(body)
    write_bytes(path, torch_bytes({**body, DIGEST_KEY: digest}))
    return digest


def torch_load(path: str | os.PathLike, what: str, mmap: bool = False):
    """torch.load(weights_only=True) of a regular file, with a one-line UserError for missing,
    truncated or foreign files (no digest check: for files ctmkit did not write). `mmap`: the
    tensors stay in the file, mapped (a reader of the metadata alone reads little of it)."""
    import torch

    path = regular_file(path, what)
    import warnings
    try:
        with warnings.catch_warnings():   # torch warns before refusing a TorchScript archive
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # truncated zip, pickle rejected by weights_only, ...
        raise UserError(f"{path}: unreadable {what} ({first_line(e)})") from None


def load_torch(path: str | os.PathLike, what: str, fmt: str | None = None,
               keys: dict | None = None) -> dict:
    """Read a ctmkit .pt file: a dict whose ``format`` is `fmt`, whose ``sha256`` matches its
    content, and which has each of `keys` ({name: type or tuple of types}). One line otherwise.
    Returns the dict, ``sha256`` included (the file's content fingerprint)."""
    return check_torch(torch_load(path, what), path, what, fmt, keys)


def check_torch(obj, path: str | os.PathLike, what: str, fmt: str | None = None,
                keys: dict | None = None) -> dict:
    """`load_torch`'s checks of an object `torch_load` read from `path` (for a reader that must
    look at the object before it knows which format to expect)."""
    if not isinstance(obj, dict) or (fmt is not None and obj.get("format") != fmt):
        raise UserError(f"{path}: not a ctmkit {what}")
    stored = obj.get(DIGEST_KEY)
    if not isinstance(stored, str):
        raise UserError(f"{path}: {what} carries no content checksum (written by an older "
                        f"ctmkit?); rerun the stage that writes it")
    body = {k: v for k, v in obj.items() if k != DIGEST_KEY}
    try:
        actual = content_digest(body)
    except TypeError:
        raise UserError(f"{path}: {what} holds objects ctmkit does not write") from None
    if actual != stored:
        raise UserError(f"{path}: {what} is corrupt (SHA-256 of its content does not match "
                        f"the one stored in it)")
    for k, types in (keys or {}).items():
        if not isinstance(body.get(k), types):
            raise UserError(f"{path}: {what} lacks {k!r} or it has the wrong type")
    return obj


def jit_load(path, what: str, device: str = "cpu", extra_files: dict | None = None,
             where: str | os.PathLike | None = None):
    """torch.jit.load with one-line errors for missing, truncated or foreign files. `path` may
    also be a binary file object (bytes already read and checked, core/export/jumper.py: load); `where`
    then names it in messages."""
    import warnings

    import torch

    if isinstance(path, io.IOBase):
        source, path = path, where if where is not None else what
    else:
        source = str(regular_file(path, f"{what} file"))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)   # TorchScript is deprecated in 2.14
            return torch.jit.load(source, map_location=device,
                                  _extra_files=extra_files if extra_files is not None else {})
    except Exception as e:  # torch raises RuntimeError/ValueError/... for bad archives
        raise UserError(f"{path}: not a loadable TorchScript {what} ({first_line(e, 160)})"
                        ) from None
