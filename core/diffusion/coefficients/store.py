"""The HDF5 coefficient store (docs/design.md, "Coefficient store").

Root attrs: format = "ctmkit.coefficients", version = 1, t_min, t_max, n_samples, grid,
teacher_fingerprint, created (+ `settings`, a JSON string of everything that determines the
numbers, used to decide reuse; `payload_sha256`, the content digest of every dataset and every
other attribute, checked on load). Float64 datasets of equal length, ascending lambda:
t, lambda, l, s, L, S, eta, l_stderr, s_stderr (+ s_guarded, uint8).
"""

from __future__ import annotations

import datetime as _dt
import io
import json
import warnings
from pathlib import Path

import h5py
import numpy as np

from core import __version__
from core.diffusion.coefficients.table import CoefficientTable
from core.data.source import READ_ERRORS, check_h5_dataset
from core.base.errors import UserError, first_line
from core.base.io import content_digest, write_bytes

FORMAT, VERSION = "ctmkit.coefficients", 1
DATASETS = ("t", "lambda", "l", "s", "L", "S", "eta", "l_stderr", "s_stderr")
MAX_TIMES = 1_000_000        # far beyond any grid; bounds what a foreign file can allocate


_UNDIGESTED = ("created", "payload_sha256")


def payload_digest(attrs: dict, arrays: dict) -> str:
    """The store's content digest: every attribute but `created` and itself, every dataset."""
    def plain(v):
        v = v.decode() if isinstance(v, bytes) else v
        return v.item() if isinstance(v, np.generic) else v
    return content_digest({"attrs": {k: plain(attrs[k]) for k in sorted(attrs)
                                     if k not in _UNDIGESTED},
                           "data": {k: np.asarray(arrays[k]) for k in sorted(arrays)}})


def write(path: str | Path, table: CoefficientTable, *, grid: str, n_samples: int,
          teacher_fingerprint: str, settings: dict) -> None:
    """Build the file in memory, then write it atomically with checked I/O."""
    attrs = {"format": FORMAT, "version": VERSION,
             "t_min": float(table.t_min), "t_max": float(table.t_max),
             "n_samples": int(n_samples), "grid": grid,
             "teacher_fingerprint": teacher_fingerprint,
             "settings": json.dumps(settings, sort_keys=True), "ctmkit_version": __version__}
    arrays = {"t": table.t, "lambda": table.lam, "l": table.l, "s": table.s,
              "L": table.L, "S": table.S, "eta": table.eta,
              "l_stderr": table.l_stderr, "s_stderr": table.s_stderr}
    arrays = {k: np.asarray(v, dtype=np.float64) for k, v in arrays.items()}
    guarded = table.s_guarded if table.s_guarded is not None else np.zeros(len(table.t))
    arrays["s_guarded"] = np.asarray(guarded, dtype=np.uint8)
    buf = io.BytesIO()
    with h5py.File(buf, "w") as h:
        h.attrs.update({**attrs, "payload_sha256": payload_digest(attrs, arrays),
                        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(
                            timespec="seconds")})
        for name in (*DATASETS, "s_guarded"):
            h.create_dataset(name, data=arrays[name], track_times=False)
    write_bytes(path, buf.getvalue())


def _attr(h, name, path):
    if name not in h.attrs:
        raise UserError(f"{path}: not a ctmkit coefficient file (attribute {name!r} missing)")
    v = h.attrs[name]
    return v.decode() if isinstance(v, bytes) else v


def load(path: str | Path) -> CoefficientTable:
    """Read and validate a store; any problem is a one-line `UserError`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: coefficient file not found (run the 'coefficients' stage)")
    try:
        with warnings.catch_warnings(), h5py.File(path, "r") as h:
            warnings.simplefilter("error")
            if _attr(h, "format", path) != FORMAT:
                raise UserError(f"{path}: not a ctmkit coefficient file "
                                f"(format {_attr(h, 'format', path)!r})")
            version = int(_attr(h, "version", path))
            if version != VERSION:
                raise UserError(f"{path}: coefficient file version {version} is not supported "
                                f"(this ctmkit reads version {VERSION})")
            attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in h.attrs.items()}
            data, raw = {}, {}
            for name in (*DATASETS, "s_guarded"):
                if name not in h:
                    raise UserError(f"{path}: dataset {name!r} missing")
                if not isinstance(h[name], h5py.Dataset) or h[name].ndim != 1 \
                        or h[name].shape[0] > MAX_TIMES:
                    raise UserError(f"{path}: dataset {name!r} is not a 1-D array of at most "
                                    f"{MAX_TIMES} entries")
                check_h5_dataset(h[name], f"{path}:{name}", path.stat().st_size)
                raw[name] = h[name][()]
                if name in DATASETS:
                    data[name] = np.asarray(raw[name], dtype=np.float64)
            guarded = np.asarray(raw["s_guarded"], bool)
    except UserError:
        raise
    except READ_ERRORS as e:               # every h5py exception type, numpy's warnings
        raise UserError(f"{path}: unreadable coefficient file ({e.__class__.__name__}: "
                        f"{first_line(e, None, 'corrupt')})") from None
    n = len(data["t"])
    for name, arr in data.items():
        if arr.ndim != 1 or len(arr) != n:
            raise UserError(f"{path}: dataset {name!r} has shape {arr.shape}, expected ({n},)")
    for name in ("t", "lambda", "l", "s", "L", "S", "eta"):
        if not np.all(np.isfinite(data[name])):
            raise UserError(f"{path}: dataset {name!r} holds NaN or Inf")
    t = data["t"]
    if n < 3 or np.any(t <= 0) or np.any(np.diff(t) >= 0):
        raise UserError(f"{path}: 't' must hold >= 3 positive, strictly decreasing times")
    if not np.allclose(data["lambda"], -np.log(t), rtol=1e-12, atol=1e-12):
        raise UserError(f"{path}: 'lambda' is not -log(t)")
    table = CoefficientTable(t=t, l=data["l"], s=data["s"], l_stderr=data["l_stderr"],
                             s_stderr=data["s_stderr"], attrs=attrs, s_guarded=guarded)
    for name, mine in (("L", table.L), ("S", table.S), ("eta", table.eta)):
        if not np.allclose(data[name], mine, rtol=1e-6, atol=1e-12):
            raise UserError(f"{path}: dataset {name!r} is inconsistent with l and s")
    # last, so that the checks above name what is wrong with a foreign or damaged file
    if "payload_sha256" not in attrs:
        raise UserError(f"{path}: coefficient file carries no payload_sha256 (written by "
                        f"an older ctmkit?); rerun the 'coefficients' stage")
    if attrs["payload_sha256"] != payload_digest(attrs, raw):
        raise UserError(f"{path}: coefficient file is corrupt (SHA-256 of its content "
                        f"does not match its payload_sha256)")
    return table


def reusable(path: str | Path, teacher_fingerprint: str, settings: dict) -> bool:
    """True when `path` is a valid store computed for this teacher with these settings."""
    path = Path(path)
    if not path.is_file():
        return False
    try:
        with h5py.File(path, "r") as h:
            same = (h.attrs.get("format") == FORMAT
                    and int(h.attrs.get("version", -1)) == VERSION
                    and h.attrs.get("teacher_fingerprint") == teacher_fingerprint
                    and json.loads(h.attrs.get("settings", "null")) == json.loads(
                        json.dumps(settings, sort_keys=True)))
    except READ_ERRORS + (RecursionError,):
        return False
    if not same:
        return False
    try:
        load(path)
    except UserError:
        return False
    return True
