"""Whole-file digests of exported jumpers (core/base/integrity.py) and the meta.json rules shared by
the Python loader and ctm_sample.

* A TorchScript jumper is sealed by ``extra/archive_sha256``, the digest of every other record:
  a flipped bit or an edit anywhere in its code, ``data.pkl``, tensors or ``meta.json`` is
  refused before TorchScript reads it, by ``core.export.jumper.load`` and by ``ctm_sample``.
* A ``.pt2`` package is checked against its sidecar ``<name>.pt2.sha256`` (the compiled-package
  cases are in tests/test_aoti.py, which compiles once per session).
* ``tests/fixtures/meta_cases.json``: one table of meta.json edits with the expected verdict,
  run here against both loaders (the ctm_sample half needs the binary: ``slow``).
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import struct
import sys
import tempfile
import warnings
import zipfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from core.export.aoti import load_aoti  # noqa: E402
from core.base.errors import UserError  # noqa: E402
from core.base.integrity import (ARCHIVE_DIGEST_FILE, archive_digest, check_sidecar,  # noqa: E402
                            seal_archive, sidecar_path, write_sidecar)
from core.export.jumper import Jumper, export, load, payload_digest, script  # noqa: E402
from plugins.preconditionings import CTMPrecond  # noqa: E402
from test_cpp_sampler import SIGMA_DATA, MLPNet, meta_for, run  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:.*TorchScript.*:FutureWarning")

CASES = json.loads((ROOT / "tests" / "fixtures" / "meta_cases.json").read_text())["cases"]


# --- helpers ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def scripted():
    """(scripted jumper of shape [2], its meta.json dict as export writes it)."""
    torch.manual_seed(0)
    P = CTMPrecond()
    module = script(Jumper(MLPNet([2]), P, SIGMA_DATA))
    return module, {**meta_for(P, [2]), "payload_sha256": payload_digest(module)}


def jit_bytes(module, meta_text: str) -> bytes:
    """torch.jit.save of `module` with meta.json = `meta_text`, not sealed."""
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(module, buf, _extra_files={"meta.json": meta_text})
    return buf.getvalue()


def edited_meta_text(meta: dict, set_: dict[str, str], drop: list[str]) -> str:
    """meta.json text: `meta` with the values of `set_` replaced by the JSON texts given (new
    keys appended) and the keys in `drop` left out."""
    items = {k: json.dumps(v) for k, v in meta.items() if k not in drop}
    items.update(set_)
    return "{" + ", ".join(f"{json.dumps(k)}: {v}" for k, v in items.items()) + "}"


def record_spans(data: bytes) -> dict[str, tuple[int, int]]:
    """zip member name -> (offset, size) of its stored (possibly deflated) bytes in `data`."""
    spans = {}
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        for info in zf.infolist():
            n, e = struct.unpack("<HH", data[info.header_offset + 26:info.header_offset + 30])
            spans[info.filename] = (info.header_offset + 30 + n + e, info.compress_size)
    return spans


def rewrite_record(data: bytes, suffix: str, edit) -> bytes:
    """A valid zip (CRCs right) with the record ending in `suffix` replaced by edit(bytes): an
    edit made on purpose, not a transmission error; the digest record is left as it was."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as zin, zipfile.ZipFile(out, "w") as zout:
        for info in zin.infolist():
            content = zin.read(info)
            zout.writestr(info, edit(content) if info.filename.endswith(suffix) else content)
    return out.getvalue()


def one_line_error(path: Path, expect: str = "") -> str:
    with pytest.raises(UserError) as info:
        load(path)
    message = str(info.value)
    assert "\n" not in message and message.startswith(str(path)), message
    assert expect in message, message
    return message


def output(module) -> torch.Tensor:
    x = torch.linspace(-1, 1, 6).reshape(3, 2)
    with torch.no_grad():
        return module(x, torch.full([3], 2.0, dtype=torch.float64),
                      torch.full([3], 0.5, dtype=torch.float64), None)


@pytest.fixture(scope="module")
def exported(scripted, tmp_path_factory) -> Path:
    module, meta = scripted
    path = tmp_path_factory.mktemp("sealed") / "jumper.pt"
    export(Jumper(MLPNet([2]), CTMPrecond(), SIGMA_DATA), path,
           {k: v for k, v in meta.items() if k != "payload_sha256"})
    return path


# --- the TorchScript archive digest ----------------------------------------------------------

def test_export_seals_every_record(exported):
    data = exported.read_bytes()
    with zipfile.ZipFile(exported) as zf:
        names = [n.split("/", 1)[1] for n in zf.namelist()]
        stored = zf.read(f"{zf.namelist()[0].split('/')[0]}/extra/{ARCHIVE_DIGEST_FILE}")
    assert f"extra/{ARCHIVE_DIGEST_FILE}" in names and "data.pkl" in names
    assert any(n.startswith("code/") for n in names) and "extra/meta.json" in names
    assert stored.decode() == archive_digest(data)
    # the digest by its definition: "name\n size\n bytes" of every other record, in name order
    h = hashlib.sha256()
    with zipfile.ZipFile(exported) as zf:
        for info in sorted(zf.infolist(), key=lambda i: i.filename.split("/", 1)[1].encode()):
            name = info.filename.split("/", 1)[1]
            if name != f"extra/{ARCHIVE_DIGEST_FILE}":
                h.update(f"{name}\n{info.file_size}\n".encode() + zf.read(info))
    assert h.hexdigest() == stored.decode()
    module, meta = load(exported)
    assert meta["shape"] == [2]


def test_bit_flip_in_any_record_is_refused(exported, tmp_path):
    data = exported.read_bytes()
    spans = record_spans(data)
    assert len(spans) > 10
    for name, (offset, size) in spans.items():
        flipped = bytearray(data)
        flipped[offset + size // 2] ^= 0x04
        path = tmp_path / "flipped.pt"
        path.write_bytes(bytes(flipped))
        message = one_line_error(path)
        assert "corrupt or altered" in message or "not a loadable" in message, (name, message)


@pytest.mark.parametrize("suffix,edit", [
    # a constant of the module (sigma_data = 0.5, a pickled float in data.pkl) -> 0.75
    ("data.pkl", lambda b: b.replace(struct.pack(">d", 0.5), struct.pack(">d", 0.75), 1)),
    # the TorchScript code of the jumper: one call (a product becomes a quotient)
    ("code/__torch__/core/export/jumper.py", lambda b: b.replace(b"torch.mul(", b"torch.div(", 1)),
    # meta.json: the time range the sampler uses
    ("extra/meta.json", lambda b: b.replace(b'"t_max": 80.0', b'"t_max": 40.0', 1)),
])
def test_edited_record_is_refused(exported, tmp_path, suffix, edit):
    """Edits that keep the zip valid: before the whole-archive digest, the first and the last
    were accepted (payload_sha256 covers the tensors only) and the samples moved."""
    data = exported.read_bytes()
    with zipfile.ZipFile(exported) as zf:
        (name,) = [n for n in zf.namelist() if n.endswith(suffix)]
        assert edit(zf.read(name)) != zf.read(name)
    path = tmp_path / "edited.pt"
    path.write_bytes(rewrite_record(data, suffix, edit))
    one_line_error(path, f"jumper is corrupt or altered (SHA-256 of its records does not match "
                         f"{ARCHIVE_DIGEST_FILE})")


def test_random_bit_flips_never_load_something_else(exported, tmp_path):
    """Anywhere in the file: refused with one line, or (a byte no loader reads: zip padding, a
    local header's copy of a name) loaded with exactly the original function."""
    data = exported.read_bytes()
    expected = output(load(exported)[0])
    rng = random.Random(0)
    refused = 0
    for _ in range(60):
        flipped = bytearray(data)
        flipped[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        path = tmp_path / "flipped.pt"
        path.write_bytes(bytes(flipped))
        try:
            module, _ = load(path)
        except UserError as e:
            assert "\n" not in str(e)
            refused += 1
            continue
        torch.testing.assert_close(output(module), expected, rtol=0, atol=0)
    assert refused > 45


def test_archive_without_digest_needs_reexport(scripted, tmp_path):
    module, meta = scripted
    path = tmp_path / "old.pt"
    path.write_bytes(jit_bytes(module, json.dumps(meta)))     # what ctmkit wrote before
    one_line_error(path, "has no whole-archive digest")
    assert "re-export" in one_line_error(path)
    path.write_bytes(seal_archive(path.read_bytes()))
    load(path)


def test_foreign_torchscript_is_not_a_jumper(tmp_path):
    path = tmp_path / "linear.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(path))
    one_line_error(path, "not a ctmkit jumper (no meta.json inside)")


def test_zip_bomb_is_refused_before_inflating(exported, tmp_path):
    data = exported.read_bytes()
    top = zipfile.ZipFile(io.BytesIO(data)).namelist()[0].split("/")[0]
    out = io.BytesIO(data)
    with zipfile.ZipFile(out, "a", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(f"{top}/extra/bomb", bytes(64 << 20))           # 64 MiB of zeros
    path = tmp_path / "bomb.pt"
    path.write_bytes(out.getvalue())
    assert path.stat().st_size < (1 << 20)
    one_line_error(path, "more than 64 x the file's")


def test_duplicate_record_is_refused(exported, tmp_path):
    data = exported.read_bytes()
    top = zipfile.ZipFile(io.BytesIO(data)).namelist()[0].split("/")[0]
    out = io.BytesIO(data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)                # "Duplicate name"
        with zipfile.ZipFile(out, "a") as zf:
            zf.writestr(f"{top}/extra/meta.json", b'{"format": "ctmkit.jumper"}')
    path = tmp_path / "dup.pt"
    path.write_bytes(out.getvalue())
    one_line_error(path, "a record name appears twice")


# --- .pt2 sidecars (no compilation: the digest is checked before the package is read) -------

def test_sidecar_is_sha256sum_format(tmp_path):
    path = tmp_path / "jumper.pt2"
    path.write_bytes(b"package bytes")
    side = write_sidecar(path, path.read_bytes())
    assert side == sidecar_path(path) == tmp_path / "jumper.pt2.sha256"
    assert side.read_text() == f"{hashlib.sha256(b'package bytes').hexdigest()}  jumper.pt2\n"
    check_sidecar(path, path.read_bytes())


@pytest.mark.parametrize("sidecar,expect", [
    (None, "no digest file jumper.pt2.sha256 beside it"),
    ("0" * 64 + "  jumper.pt2\n", "jumper is corrupt or altered (its SHA-256 does not match "
                                  "jumper.pt2.sha256)"),
    ("not a digest\n", "not a SHA-256 digest file"),
    ("", "not a SHA-256 digest file"),
    ("a" * 5000, "not a SHA-256 digest file"),
])
def test_pt2_without_matching_sidecar_is_refused_before_reading(tmp_path, monkeypatch,
                                                               sidecar, expect):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    path = tmp_path / "jumper.pt2"
    path.write_bytes(b"PK\x03\x04 anything: never opened")
    if sidecar is not None:
        sidecar_path(path).write_text(sidecar)
    with pytest.raises(UserError) as info:
        load_aoti(path)
    assert "\n" not in str(info.value) and expect in str(info.value)
    if sidecar is None:
        assert "re-export" in str(info.value)
    assert not [p for p in (tmp_path / "tmp").iterdir() if "aoti" in p.name]


def test_sidecar_that_is_a_fifo_is_refused_not_waited_for(tmp_path):
    import os
    path = tmp_path / "jumper.pt2"
    path.write_bytes(b"package bytes")
    os.mkfifo(sidecar_path(path))
    with pytest.raises(UserError, match="the digest file is not a regular file"):
        check_sidecar(path, path.read_bytes())


def test_failed_pt2_load_leaves_no_temporary_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    path = tmp_path / "jumper.pt2"
    path.write_bytes(b"not a zip")
    write_sidecar(path, path.read_bytes())
    with pytest.raises(UserError, match="not a loadable AOTInductor package"):
        load_aoti(path)
    left = [p.name for p in (tmp_path / "tmp").iterdir()]
    # torchinductor_<user>: torch's compile cache, created on importing the package loader
    assert not [n for n in left if not n.startswith("torchinductor_")], left


# --- the shared meta.json table -------------------------------------------------------------

def sealed_case(scripted, case: dict, folder: Path) -> Path:
    module, meta = scripted
    path = folder / f"{case['name']}.pt"
    path.write_bytes(seal_archive(jit_bytes(module, edited_meta_text(meta, case["set"],
                                                                     case["drop"]))))
    return path


def test_meta_table_covers_both_verdicts():
    names = [c["name"] for c in CASES]
    assert len(names) == len(set(names)) and len(names) >= 40
    assert sum(c["accept"] for c in CASES) >= 5 and sum(not c["accept"] for c in CASES) >= 30


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_meta_case_python(scripted, tmp_path, case):
    path = sealed_case(scripted, case, tmp_path)
    if case["accept"]:
        module, meta = load(path)
        assert meta["shape"] == [2]
    else:
        one_line_error(path)


@pytest.fixture(scope="module")
def case_files(scripted, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("meta_cases")
    return {c["name"]: sealed_case(scripted, c, folder) for c in CASES}


@pytest.mark.slow
def test_meta_cases_ctm_sample(binary, case_files, tmp_path):
    """The same table through ctm_sample: the same verdict for every case."""
    disagree = []
    for case in CASES:
        out = tmp_path / f"{case['name']}.npy"
        proc = run(binary, "--model", case_files[case["name"]], "--out", out, "--num", "3",
                   "--quiet", check=False)
        lines = proc.stderr.splitlines()
        if case["accept"]:
            ok = proc.returncode == 0 and out.is_file() and not lines
        else:
            ok = (proc.returncode == 2 and len(lines) == 1 and not out.exists()
                  and lines[0].startswith(f"ctm_sample: error: {case_files[case['name']]}: "))
        if not ok:
            disagree.append(f"{case['name']}: rc={proc.returncode} {proc.stderr.strip()[:200]}")
    assert not disagree, "\n".join(disagree)


@pytest.mark.slow
def test_ctm_sample_refuses_flips_and_edits(binary, exported, tmp_path):
    data = exported.read_bytes()
    variants = {}
    for name, (offset, size) in record_spans(data).items():
        flipped = bytearray(data)
        flipped[offset + size // 2] ^= 0x04
        variants["flip " + name] = bytes(flipped)
    variants["data.pkl constant"] = rewrite_record(
        data, "data.pkl", lambda b: b.replace(struct.pack(">d", 0.5), struct.pack(">d", 0.75), 1))
    variants["meta.json t_max"] = rewrite_record(
        data, "extra/meta.json", lambda b: b.replace(b'"t_max": 80.0', b'"t_max": 40.0', 1))
    variants["no digest"] = rewrite_record(data, "archive_sha256", lambda b: b"")
    problems = []
    for what, content in variants.items():
        path = tmp_path / "model.pt"
        path.write_bytes(content)
        out = tmp_path / "out.npy"
        proc = run(binary, "--model", path, "--out", out, "--num", "2", "--quiet", check=False)
        lines = proc.stderr.splitlines()
        if not (proc.returncode == 2 and len(lines) == 1 and not out.exists()
                and lines[0].startswith("ctm_sample: error: ")):
            problems.append(f"{what}: rc={proc.returncode} {proc.stderr[:200]}")
    assert not problems, "\n".join(problems)
    proc = run(binary, "--model", exported, "--out", tmp_path / "ok.npy", "--num", "2",
               "--quiet")
    assert proc.returncode == 0


@pytest.mark.slow
def test_ctm_sample_wants_reexport_of_unsealed_archive(binary, scripted, tmp_path):
    module, meta = scripted
    path = tmp_path / "old.pt"
    path.write_bytes(jit_bytes(module, json.dumps(meta)))
    proc = run(binary, "--model", path, "--out", tmp_path / "o.npy", check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "no whole-archive digest" in proc.stderr and "re-export" in proc.stderr
