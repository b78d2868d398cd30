"""The on-disk image store (core/data/datastore.py): uint8 images memory-mapped, decoded once into a
cache folder, batches read by index; and every way a store can be bad (truncated, tampered,
other settings, read-only or full cache, a changed source, two builders, kill -9 mid-build)."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from core.data import datastore
from core.host.config import Section
from core.data.datasets import Dataset, load
from core.base.errors import UserError

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_edm_dataset import _images, write_edm  # noqa: E402


def _unit(u8) -> np.ndarray:
    return (np.asarray(u8, np.float64) / 127.5 - 1).astype(np.float32)


def _load(tmp_path, cache=True, **data) -> Dataset:
    if cache:
        data.setdefault("cache_dir", "cache")
    section = Section("data", data, "cfg.toml", tmp_path)
    ds = load(section, types.SimpleNamespace(base_dir=tmp_path, progress=False))
    section.finish()
    return ds


def _zip(tmp_path, n=40, seed=0, name="d.zip"):
    images = _images(idx=range(n), seed=seed)
    write_edm(tmp_path / name, images,
              {"labels": [[k, i % 3] for i, k in enumerate(sorted(images))]})
    return np.stack([images[k] for k in sorted(images)]).transpose(0, 3, 1, 2)


def _store_dir(tmp_path) -> Path:
    (found,) = [p for p in (tmp_path / "cache").iterdir() if p.is_dir() and p.name != "digests"]
    return found


# -- values and draws ---------------------------------------------------------------------------

def test_to_unit_is_the_float64_value_rounded_once_for_every_byte():
    u8 = torch.arange(256, dtype=torch.uint8)
    assert np.array_equal(datastore.to_unit(u8).numpy(), _unit(np.arange(256)))


def test_zip_store_holds_the_images_and_keeps_the_in_memory_fingerprint(tmp_path):
    want = _zip(tmp_path)
    stored = _load(tmp_path, format="edm", path="d.zip", workers=2)
    memory = _load(tmp_path, cache=False, format="edm", path="d.zip")
    assert isinstance(stored.store.images, np.memmap)            # mapped, not loaded
    assert np.array_equal(stored.store.images, want)
    assert np.array_equal(stored.x.numpy(), _unit(want))
    assert stored.y.tolist() == [i % 3 for i in range(40)]
    assert stored.fingerprint() == memory.fingerprint()
    manifest = json.loads((_store_dir(tmp_path) / "store.json").read_text())
    assert manifest["n"] == 40 and manifest["shape"] == [3, 6, 5] and manifest["chunks"]


def test_the_second_run_reuses_the_store_without_decoding(tmp_path, monkeypatch):
    _zip(tmp_path)
    first = _load(tmp_path, format="edm", path="d.zip")
    import plugins.datasets as P
    monkeypatch.setattr(P, "_decode_rows", lambda task: pytest.fail("decoded again"))
    monkeypatch.setattr(P, "_sha256_file", lambda path: pytest.fail("hashed the zip again"))
    again = _load(tmp_path, format="edm", path="d.zip")
    assert again.fingerprint() == first.fingerprint()
    assert np.array_equal(again.store.images, first.store.images)


def test_sample_rows_reads_only_its_rows_and_matches_the_global_draws(tmp_path, monkeypatch):
    _zip(tmp_path)
    ds = _load(tmp_path, format="edm", path="d.zip", hflip=True)
    full_x, full_y = ds.sample(16, torch.Generator().manual_seed(3))
    read = []
    gather = datastore.ImageStore.gather
    monkeypatch.setattr(datastore.ImageStore, "gather",
                        lambda self, idx: read.append(len(idx)) or gather(self, idx))
    for keep in (slice(0, 8), slice(8, 16), slice(4, 8)):
        x, y = ds.sample_rows(16, torch.Generator().manual_seed(3), keep)
        assert torch.equal(x, full_x[keep]) and torch.equal(y, full_y[keep])
    assert read == [8, 8, 4]


def test_uint8_npy_is_mapped_in_place_with_the_same_fingerprint(tmp_path):
    import hashlib

    from core.data.datasets import digest
    u8 = np.random.default_rng(0).integers(0, 256, (7, 3, 4, 4), dtype=np.uint8)
    np.save(tmp_path / "x.npy", u8)
    ds = _load(tmp_path, format="array", path="x.npy", range="byte")
    assert isinstance(ds.store.images, np.memmap)
    assert np.array_equal(ds.x.numpy(), _unit(u8))
    sha = hashlib.sha256((tmp_path / "x.npy").read_bytes()).hexdigest()
    assert ds.fingerprint() == digest("array", sha, "conditional=True;layout=auto;limit=None;"
                                                    "range=byte")
    # the digest is remembered by (path, inode, size, mtime): not re-read on the next run
    assert list((tmp_path / "cache" / "digests").iterdir())
    nhwc = _load(tmp_path, format="array", path="x.npy", layout="NHWC")
    assert nhwc.shape == (4, 3, 4)


def test_center_crop_matches_dataset_tool(tmp_path):
    from PIL import Image
    rng = np.random.default_rng(1)
    wide = {f"00000/img{i:08d}.png": rng.integers(0, 256, (8, 12, 3), dtype=np.uint8)
            for i in range(3)}
    write_edm(tmp_path / "w.zip", wide)
    ds = _load(tmp_path, format="edm", path="w.zip", transform="center-crop", resolution=4)
    img = wide["00000/img00000001.png"][:, 2:10]                 # dataset_tool's crop
    want = np.asarray(Image.fromarray(img).resize((4, 4), Image.Resampling.LANCZOS))
    assert np.array_equal(ds.store.images[1], want.transpose(2, 0, 1))
    with pytest.raises(UserError, match="needs resolution"):
        _load(tmp_path, format="edm", path="w.zip", transform="center-crop")


# -- bad stores ---------------------------------------------------------------------------------

def _rebuilt(tmp_path, capsys, want, why):
    ds = _load(tmp_path, format="edm", path="d.zip")
    assert np.array_equal(ds.store.images, want)
    err = capsys.readouterr().err
    assert "rebuilding" in err and why in err, err


def test_a_truncated_store_is_rebuilt(tmp_path, capsys):
    want = _zip(tmp_path)
    _load(tmp_path, format="edm", path="d.zip")
    images = _store_dir(tmp_path) / "images.npy"
    images.write_bytes(images.read_bytes()[:-100])
    _rebuilt(tmp_path, capsys, want, "truncated")


def test_a_tampered_store_is_caught_by_its_chunk_digests(tmp_path, capsys):
    want = _zip(tmp_path)
    _load(tmp_path, format="edm", path="d.zip")
    images = _store_dir(tmp_path) / "images.npy"
    raw = bytearray(images.read_bytes())
    raw[-1] ^= 0xFF                                  # same size, new mtime: checked again
    images.write_bytes(bytes(raw))
    _rebuilt(tmp_path, capsys, want, "does not match its digest")


def test_a_store_of_other_settings_is_not_trusted(tmp_path, capsys):
    want = _zip(tmp_path)
    _load(tmp_path, format="edm", path="d.zip")
    manifest = _store_dir(tmp_path) / "store.json"
    meta = json.loads(manifest.read_text())
    meta["key"] = "edm-somebody-else"
    manifest.write_text(json.dumps(meta))
    _rebuilt(tmp_path, capsys, want, "other settings")


def test_a_changed_source_gets_a_new_store(tmp_path):
    _zip(tmp_path, seed=0)
    before = _load(tmp_path, format="edm", path="d.zip")
    time.sleep(0.01)
    want = _zip(tmp_path, seed=1)
    after = _load(tmp_path, format="edm", path="d.zip")
    assert np.array_equal(after.store.images, want)
    assert after.fingerprint() != before.fingerprint()


def test_a_read_only_cache_serves_complete_stores_and_refuses_to_build(tmp_path, monkeypatch):
    want = _zip(tmp_path)
    _load(tmp_path, format="edm", path="d.zip")
    real_open = os.open

    def read_only(path, flags, *a):           # what a read-only filesystem answers
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(30, "Read-only file system", str(path))
        return real_open(path, flags, *a)
    monkeypatch.setattr(datastore.os, "open", read_only)
    assert np.array_equal(_load(tmp_path, format="edm", path="d.zip").store.images, want)
    _zip(tmp_path, name="e.zip", seed=2)
    with pytest.raises(UserError, match="not writable"):
        _load(tmp_path, format="edm", path="e.zip")


def test_a_full_cache_is_one_error_and_leaves_no_store(tmp_path, monkeypatch):
    _zip(tmp_path)
    monkeypatch.setattr(datastore.shutil, "disk_usage",
                        lambda p: types.SimpleNamespace(free=100))
    with pytest.raises(UserError, match="not enough disk space"):
        _load(tmp_path, format="edm", path="d.zip")
    monkeypatch.undo()

    real_write = datastore._ChunkedWriter.write

    def full(self, data):
        if self.filled + len(data) > 2000:
            raise OSError(28, "No space left on device")
        real_write(self, data)
    monkeypatch.setattr(datastore._ChunkedWriter, "write", full)
    with pytest.raises(UserError, match="disk full"):
        _load(tmp_path, format="edm", path="d.zip")
    left = [p.name for p in _store_dir(tmp_path).iterdir()]
    assert left == [], left                          # no manifest, no temporaries


_BUILDER = """
import sys, time, types
sys.path.insert(0, {root!r})
import plugins.datasets as P
from core.host.config import Section
from core.data.datasets import load
slow, calls = P._decode_rows, []
def decode(task):
    calls.append(1)
    time.sleep({delay})
    return slow(task)
P._decode_rows = decode
section = Section("data", dict(format="edm", path="d.zip", cache_dir="cache", workers=1),
                  "cfg.toml", __import__("pathlib").Path({tmp!r}))
ds = load(section, types.SimpleNamespace(base_dir=section.base_dir, progress=False))
print("built", len(ds), ds.fingerprint(), flush=True)
print("decoded", len(calls), flush=True)
"""


def _builder(tmp_path, delay):
    code = _BUILDER.format(root=str(ROOT), delay=delay, tmp=str(tmp_path))
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)))


def test_two_builders_of_one_store_build_it_once(tmp_path):
    _zip(tmp_path, n=600)                            # 3 decode tasks of 256
    a = _builder(tmp_path, 0.5)
    time.sleep(0.3)
    b = _builder(tmp_path, 0.5)
    (out_a, err_a), (out_b, err_b) = a.communicate(timeout=120), b.communicate(timeout=120)
    assert a.returncode == b.returncode == 0, err_a + err_b
    assert out_a.splitlines()[0] == out_b.splitlines()[0] and out_a.startswith("built 600")
    # one decoded the 3 tasks; the other waited on the lock and reused its store
    assert sorted([out_a.splitlines()[1], out_b.splitlines()[1]]) == ["decoded 0", "decoded 3"]
    assert "waiting for it" in err_a + err_b


def test_kill_9_mid_build_leaves_nothing_a_later_run_trusts(tmp_path):
    want = _zip(tmp_path, n=600)
    p = _builder(tmp_path, 5.0)
    deadline = time.time() + 60
    while not list((tmp_path / "cache").glob("*/.images.npy.*.tmp")):
        assert time.time() < deadline and p.poll() is None
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.communicate()
    store = _store_dir(tmp_path)
    assert not (store / "store.json").exists()
    ds = _load(tmp_path, format="edm", path="d.zip")
    assert np.array_equal(ds.store.images, want)
    assert sorted(q.name for q in store.iterdir()) == ["images.npy", "labels.npy",
                                                       "store.json", "verified.json"]


def test_a_bad_cache_dir_is_one_error_line_from_the_cli(tmp_path):
    _zip(tmp_path)
    (tmp_path / "afile").write_text("x")
    cfg = tmp_path / "c.toml"
    cfg.write_text(textwrap.dedent("""
        [run]
        out_dir = "out"
        stages = ["coefficients"]
        [teacher]
        kind = "gmm"
        weights = [1.0]
        means = [[0.0, 0.0]]
        stds = [1.0]
        [data]
        format = "edm"
        path = "d.zip"
        cache_dir = "afile/below"
    """))
    r = subprocess.run([sys.executable, "-m", "core.run", str(cfg), "--no-progress"],
                       capture_output=True, text=True, cwd=tmp_path,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=120)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "afile" in lines[0]


def _edm_config(tmp_path, extra=""):
    zeros = ", ".join(["0.0"] * 90)
    cfg = tmp_path / "c.toml"
    cfg.write_text(textwrap.dedent(f"""
        [run]
        out_dir = "out"
        stages = ["coefficients"]
        [teacher]
        kind = "gmm"
        weights = [1.0]
        means = [[{zeros}]]
        stds = [0.5]
        shape = [3, 6, 5]
        [coefficients]
        grid = "log"
        n_timesteps = 8
        n_samples = 64
        batch = 32
        [data]
        format = "edm"
        path = "d.zip"
    """) + extra)
    return cfg


def test_dry_run_writes_no_store_and_a_run_builds_it_in_out_dir(tmp_path, run_main):
    _zip(tmp_path)
    cfg = _edm_config(tmp_path)
    rc, out, err = run_main(cfg, "--dry-run")
    assert rc == 0 and not (tmp_path / "out").exists(), err
    rc, out, err = run_main(cfg)
    assert rc == 0, err
    assert len(list((tmp_path / "out" / "datastore").glob("edm-*/store.json"))) == 1
    assert (tmp_path / "out" / "coefficients.h5").is_file()


def test_prefetch_hands_over_the_same_draws_and_generator_state(tmp_path):
    from core.train.distill import Prefetch
    from core.train.loop import iteration_generator

    _zip(tmp_path)
    ds = _load(tmp_path, format="edm", path="d.zip", hflip=True)
    ahead = Prefetch(ds.sample_rows, 5, 12, slice(6, 12), pin=False, ahead=True)
    for it in (0, 1, 2, 7, 8):               # in order, then a jump (a resume)
        gen, x, y = ahead.get(it)
        want_gen = iteration_generator(5, it)
        want_x, want_y = ds.sample_rows(12, want_gen, slice(6, 12))
        assert torch.equal(x, want_x) and torch.equal(y, want_y)
        assert torch.equal(torch.rand(4, generator=gen), torch.rand(4, generator=want_gen))
    ahead.close()


def test_float_npy_is_mapped_as_it_is_and_checked(tmp_path):
    from core.data.datastore import MappedArray
    unit = np.random.default_rng(2).random((9, 1, 3, 3)).astype(np.float32)
    np.save(tmp_path / "u.npy", unit)
    ds = _load(tmp_path, format="array", path="u.npy", range="unit")
    assert isinstance(ds.data, MappedArray) and isinstance(ds.data.array, np.memmap)
    assert np.array_equal(ds.x.numpy(), unit * 2 - 1)
    idx = torch.tensor([4, 0, 4])
    assert np.array_equal(ds.rows(idx).numpy(), (unit * 2 - 1)[[4, 0, 4]])
    bad = unit.copy()
    bad[7, 0, 1, 1] = np.nan
    np.save(tmp_path / "nan.npy", bad)
    with pytest.raises(UserError, match="NaN or infinite"):
        _load(tmp_path, format="array", path="nan.npy", range="unit")


def test_float_npy_values_are_checked_once_per_version_of_the_file(tmp_path, monkeypatch):
    import plugins.datasets as P
    unit = np.random.default_rng(3).random((9, 1, 3, 3)).astype(np.float32)
    np.save(tmp_path / "u.npy", unit)
    calls = []
    check = P._check_in_chunks
    monkeypatch.setattr(P, "_check_in_chunks", lambda *a, **k: calls.append(1) or check(*a, **k))
    cache = str(tmp_path / "cache")
    for _ in range(2):
        _load(tmp_path, format="array", path="u.npy", range="unit", cache_dir=cache)
    assert len(calls) == 1                       # the second run trusts the first's check
    bad = unit.copy()
    bad[0, 0, 0, 0] = np.inf                     # a new version of the file is checked again
    np.save(tmp_path / "u.npy", bad)
    with pytest.raises(UserError, match="NaN or infinite"):
        _load(tmp_path, format="array", path="u.npy", range="unit", cache_dir=cache)
