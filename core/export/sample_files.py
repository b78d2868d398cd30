"""Samples in the formats that papers' evaluators read, beside ctmkit's own ``samples.npy``.

* ``samples.npz`` -- what openai/guided-diffusion's ``evaluations/evaluator.py`` and sony/ctm's
  ``fid_npzs.py`` read: ``arr_0`` uint8 [N, H, W, C] (and ``arr_1`` int64 labels when the model
  is class-conditional), converted as ADM and CTM convert a sample before saving it:
  ``((x + 1) * 127.5).clamp(0, 255).to(uint8)`` (the cast truncates).
* ``samples/`` -- one PNG per sample for NVlabs/edm's ``fid.py``, in EDM ``generate.py``'s layout
  (``samples/000000/000000.png`` ... one sub-folder per 1,000 images), converted as EDM converts:
  ``(x * 127.5 + 128).clip(0, 255).to(uint8)``. Note the two conversions differ (ADM adds 127.5,
  EDM 128): each file is written as *its* evaluator's own code would have written it.

Both are written atomically: the ``.npz`` through a temporary file, the folder built beside
its final name and renamed into place, so a kill leaves the old output or none, never half.
A ``samples/`` folder that exists is replaced only if ctmkit wrote it (its marker file
``.ctmkit-samples`` is there); anything else at that path is the user's and is refused.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from core.base.errors import UserError
from core.base.io import is_stale_temporary, run_id, write_bytes

#: the extra formats ``[sample] formats`` may name (``samples.npy`` is always written)
FORMATS = ("npz", "png")
#: a ctmkit-written PNG folder holds this (empty) file; EDM's fid.py skips non-image files
PNG_MARKER = ".ctmkit-samples"
#: images per sub-folder, as EDM's generate.py writes them
PNG_SHARD = 1000


def _check_images(x: np.ndarray, what: str) -> None:
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise UserError(f"[sample] formats = [{what!r}] needs images [N, 1 or 3, H, W]; these "
                        f"samples have shape {list(x.shape)}")


def adm_uint8(x: np.ndarray) -> np.ndarray:
    """[-1, 1] float NCHW -> uint8 NHWC as ADM / CTM save samples:
    ``((x + 1) * 127.5).clamp(0, 255).to(torch.uint8)``, the cast truncating toward zero."""
    u = np.clip((x.astype(np.float32) + 1) * np.float32(127.5), 0, 255)
    return u.astype(np.uint8).transpose(0, 2, 3, 1)


def edm_uint8(x: np.ndarray) -> np.ndarray:
    """[-1, 1] float NCHW -> uint8 NHWC as EDM's generate.py saves images:
    ``(images * 127.5 + 128).clip(0, 255).to(torch.uint8)``."""
    u = np.clip(x.astype(np.float32) * np.float32(127.5) + np.float32(128), 0, 255)
    return u.astype(np.uint8).transpose(0, 2, 3, 1)


def save_npz(path: Path, x: np.ndarray, labels: np.ndarray | None) -> Path:
    """``arr_0`` uint8 [N, H, W, C] (+ ``arr_1`` labels), as ``np.savez(path, arr, labels)``
    in ADM's and CTM's samplers."""
    _check_images(x, "npz")
    arrays = [adm_uint8(x)] + ([np.asarray(labels, dtype=np.int64)] if labels is not None else [])
    buf = io.BytesIO()
    np.savez(buf, *arrays)
    write_bytes(path, buf.getvalue())
    return path


def png_relpath(i: int) -> str:
    """EDM generate.py's name for image `i` (its seed): ``{i - i % 1000:06d}/{i:06d}.png``."""
    return f"{i - i % PNG_SHARD:06d}/{i:06d}.png"


def save_png_folder(folder: Path, x: np.ndarray) -> Path:
    """One PNG per sample under `folder`, EDM's layout, replacing a folder ctmkit wrote."""
    from PIL import Image

    _check_images(x, "png")
    folder = Path(folder)
    if folder.is_symlink() or (folder.exists() and not (folder / PNG_MARKER).is_file()):
        raise UserError(f"{str(folder)!r}: exists and was not written by ctmkit's sample stage; "
                        f"move it away or choose another out_dir")
    u8 = edm_uint8(x)
    folder.parent.mkdir(parents=True, exist_ok=True)
    for e in os.scandir(folder.parent):      # a killed run's half-written folder of PNGs
        if e.is_dir(follow_symlinks=False) and e.name.startswith(f".{folder.name}.ctmkit-") \
                and is_stale_temporary(e.name):
            shutil.rmtree(e.path, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.ctmkit-{run_id()}-", suffix=".tmp",
                                dir=folder.parent))
    old = None
    try:
        (tmp / PNG_MARKER).write_bytes(b"")
        for i, img in enumerate(u8):
            p = tmp / png_relpath(i)
            p.parent.mkdir(exist_ok=True)
            pil = Image.fromarray(img[:, :, 0], "L") if img.shape[2] == 1 else \
                Image.fromarray(img, "RGB")
            pil.save(p, format="PNG")
        if folder.exists():                       # ours (checked above): swap it out, then in
            old = folder.with_name(tmp.name[:-len(".tmp")] + "_old.tmp")
            os.replace(folder, old)
        os.replace(tmp, folder)
    finally:
        with contextlib.suppress(OSError):
            shutil.rmtree(tmp)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return folder


def png_files(folder: Path) -> list[Path]:
    """The files of a ctmkit-written PNG folder (its marker included), for the stage ledger."""
    folder = Path(folder)
    if folder.is_symlink() or not (folder / PNG_MARKER).is_file():
        return []
    return sorted(p for p in folder.rglob("*") if p.is_file())
