"""Whole-file digests of the jumpers ctmkit exports (docs/design.md, "Exported jumper";
docs/reliability.md): every byte that a loader reads is covered, and checked before the file is used.

* **TorchScript archive** (``.pt``, a zip written by ``torch.jit.save``): the record
  ``<top>/extra/archive_sha256`` holds :func:`archive_digest` of every *other* record (its code,
  ``constants.pkl``, ``data.pkl``, the tensor data, ``extra/meta.json``, version records), in
  name order. It is an ordinary TorchScript extra file, added after ``torch.jit.save`` by
  :func:`seal_archive`. ``ctm_sample`` computes the same digest (cpp_runtime/integrity.cpp).
* **AOTInductor package** (``.pt2``): the SHA-256 of the whole file, in a sidecar
  ``<name>.pt2.sha256`` beside it in ``sha256sum`` format (``<hex>  <name>``), so that
  ``sha256sum -c jumper.pt2.sha256`` checks it too. The digest cannot live inside the bytes it
  covers; a package moved without its sidecar is refused ("re-export").

The archive digest, version 1, is SHA-256 over, for each record name ``n`` (relative to the
archive's top folder) in byte order, ``n \\n len(data) \\n data``. An archive whose records do
not share one top folder, holds a name twice, or claims more uncompressed bytes than
:data:`MAX_EXPANSION` times its size is refused without being digested.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import stat
import zipfile
import zlib
from pathlib import Path

from core.base.errors import UserError
from core.base.io import write_bytes

#: the TorchScript extra file (record ``<top>/extra/<name>``) holding the archive digest
ARCHIVE_DIGEST_FILE = "archive_sha256"
ARCHIVE_DIGEST_RECORD = "extra/" + ARCHIVE_DIGEST_FILE
#: a sidecar's suffix: ``jumper.pt2`` -> ``jumper.pt2.sha256``
SIDECAR_SUFFIX = ".sha256"
#: the most uncompressed bytes an archive may claim, per byte of file (TorchScript deflates
#: its code files about 3:1; deflate's own limit is about 1000:1)
MAX_EXPANSION = 64
#: a sidecar is one line; anything longer is not one
_MAX_SIDECAR_BYTES = 4096
_HEX64 = re.compile(r"[0-9a-f]{64}")
_READ_CHUNK = 1 << 20
#: what zipfile raises for damaged records (zlib.error: a flipped bit in a deflated one)
_ZIP_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, ValueError, OSError,
               EOFError, NotImplementedError, RuntimeError, UnicodeDecodeError)


def _records(zf: zipfile.ZipFile, where: str, size: int) -> dict[str, zipfile.ZipInfo]:
    """The archive's records by name relative to its top folder; UserError for an archive no
    torch.jit.save writes (several top folders, a name twice, a zip bomb)."""
    infos = zf.infolist()
    tops = {info.filename.split("/", 1)[0] for info in infos}
    if len(tops) != 1 or any("/" not in info.filename for info in infos):
        raise UserError(f"{where}: not a TorchScript archive (its records are not all in one "
                        f"top folder)")
    records = {info.filename.split("/", 1)[1]: info for info in infos}
    if len(records) != len(infos):
        raise UserError(f"{where}: jumper is corrupt or altered (a record name appears twice)")
    claimed = sum(info.file_size for info in infos)
    if claimed > MAX_EXPANSION * size + _READ_CHUNK:
        raise UserError(f"{where}: jumper is corrupt or altered (its records claim {claimed} "
                        f"bytes, more than {MAX_EXPANSION} x the file's {size})")
    return records


def _digest_records(zf: zipfile.ZipFile, records: dict[str, zipfile.ZipInfo]) -> str:
    h = hashlib.sha256()
    for name in sorted(records, key=lambda n: n.encode()):
        if name == ARCHIVE_DIGEST_RECORD:
            continue
        info = records[name]
        h.update(f"{name}\n{info.file_size}\n".encode())
        with zf.open(info) as fh:                # zipfile checks sizes and CRC-32 as it reads
            while chunk := fh.read(_READ_CHUNK):
                h.update(chunk)
    return h.hexdigest()


def _open_zip(data: bytes, where: str) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(io.BytesIO(data))
    except _ZIP_ERRORS as e:
        raise UserError(f"{where}: not a loadable TorchScript jumper ({e})") from None


def archive_digest(data: bytes, where: str = "archive") -> str:
    """The version-1 digest of the TorchScript archive `data` (every record but the digest's
    own); UserError for a file that is not a zip or whose records do not read back."""
    with _open_zip(data, where) as zf:
        records = _records(zf, where, len(data))
        try:
            return _digest_records(zf, records)
        except _ZIP_ERRORS as e:
            raise UserError(f"{where}: jumper is corrupt or altered ({e})") from None


def seal_archive(data: bytes) -> bytes:
    """`data` (bytes of ``torch.jit.save``) with the record ``extra/archive_sha256`` appended
    (an old one is dropped first): the archive a loader accepts. The other records keep their
    bytes and offsets (torch aligns tensor data to 64 bytes)."""
    with zipfile.ZipFile(io.BytesIO(data)) as src:
        top = src.infolist()[0].filename.split("/", 1)[0]
        record = f"{top}/{ARCHIVE_DIGEST_RECORD}"
        if record in src.namelist():
            rebuilt = io.BytesIO()
            with zipfile.ZipFile(rebuilt, "w") as dst:
                for info in src.infolist():
                    if info.filename != record:
                        dst.writestr(info, src.read(info))
            data = rebuilt.getvalue()
    digest = archive_digest(data)
    out = io.BytesIO(data)
    with zipfile.ZipFile(out, "a") as dst:
        dst.writestr(zipfile.ZipInfo(record, (1980, 1, 1, 0, 0, 0)), digest)
    return out.getvalue()


def check_archive(data: bytes, where: str) -> None:
    """UserError unless the TorchScript archive `data` carries a digest record that matches its
    other records ("re-export" for archives written before ctmkit sealed them)."""
    with _open_zip(data, where) as zf:
        records = _records(zf, where, len(data))
        info = records.get(ARCHIVE_DIGEST_RECORD)
        if info is None and "extra/meta.json" not in records:
            raise UserError(f"{where}: not a ctmkit jumper (no meta.json inside)")
        if info is None:
            raise UserError(f"{where}: the jumper has no whole-archive digest "
                            f"({ARCHIVE_DIGEST_FILE}; exported by an older ctmkit?); re-export "
                            f"it (stage 'export')")
        try:
            stored = zf.read(info).decode("ascii", "replace") if info.file_size == 64 else ""
            actual = _digest_records(zf, records)
        except _ZIP_ERRORS as e:
            raise UserError(f"{where}: jumper is corrupt or altered ({e})") from None
    if not _HEX64.fullmatch(stored) or stored != actual:
        raise UserError(f"{where}: jumper is corrupt or altered (SHA-256 of its records does not "
                        f"match {ARCHIVE_DIGEST_FILE})")


# --- .pt2 sidecars -------------------------------------------------------------------------------

def sidecar_path(path: str | os.PathLike) -> Path:
    """``jumper.pt2`` -> ``jumper.pt2.sha256``."""
    path = Path(path)
    return path.with_name(path.name + SIDECAR_SUFFIX)


def write_sidecar(path: str | os.PathLike, data: bytes) -> Path:
    """Atomically write the ``sha256sum``-format sidecar of the file `path` whose bytes are
    `data`; returns the sidecar's path."""
    side = sidecar_path(path)
    write_bytes(side, f"{hashlib.sha256(data).hexdigest()}  {Path(path).name}\n".encode())
    return side


def check_sidecar(path: str | os.PathLike, data: bytes) -> None:
    """UserError unless the sidecar of `path` exists and names the SHA-256 of `data` (the bytes
    read from `path`, which are then the ones used)."""
    side = sidecar_path(path)
    try:
        if not stat.S_ISREG(os.stat(side).st_mode):     # a FIFO would block the open
            raise UserError(f"{side}: the digest file is not a regular file")
        with open(side, "rb") as fh:
            text = fh.read(_MAX_SIDECAR_BYTES + 1)
    except FileNotFoundError:
        raise UserError(f"{path}: no digest file {side.name} beside it (exported by an older "
                        f"ctmkit, or moved without it?); re-export it (stage 'export')") from None
    except OSError as e:
        raise UserError(f"{side}: cannot read the digest file ({e.strerror or e})") from None
    fields = text.decode("ascii", "replace").split()
    if len(text) > _MAX_SIDECAR_BYTES or not fields or not _HEX64.fullmatch(fields[0]):
        raise UserError(f"{side}: not a SHA-256 digest file ('<64 hex digits>  <name>')")
    if fields[0] != hashlib.sha256(data).hexdigest():
        raise UserError(f"{path}: jumper is corrupt or altered (its SHA-256 does not match "
                        f"{side.name})")
