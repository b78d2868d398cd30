"""Dataset plugins (plugins/datasets.py): every format round-trips a small generated file, the
common options, fingerprints, and one-line UserErrors for malformed input."""

import gzip
import pickle
import re
import types
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from core.host.config import Section
from core.data.datasets import Dataset, load
from core.base.errors import UserError

FASHION = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")


def _load(tmp_path, **data) -> Dataset:
    section = Section("data", data, "cfg.toml", tmp_path)
    return load(section, types.SimpleNamespace(base_dir=tmp_path))


def _unit(u8) -> np.ndarray:
    """What a uint8 image becomes: x / 127.5 - 1, rounded once to float32."""
    return (np.asarray(u8, np.float64) / 127.5 - 1).astype(np.float32)


def _rng(seed=0):
    return np.random.default_rng(seed)


# -- writers ----------------------------------------------------------------------------------

def _idx_bytes(arr: np.ndarray, magic: int) -> bytes:
    head = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    return head + arr.astype(np.uint8).tobytes()


def write_idx(folder: Path, images, labels=None, stem="train", gz=True):
    suffix = ".gz" if gz else ""
    pack = gzip.compress if gz else (lambda b: b)
    folder.mkdir(parents=True, exist_ok=True)
    img = folder / f"{stem}-images-idx3-ubyte{suffix}"
    img.write_bytes(pack(_idx_bytes(images, 0x803)))
    if labels is not None:
        (folder / f"{stem}-labels-idx1-ubyte{suffix}").write_bytes(
            pack(_idx_bytes(labels, 0x801)))
    return img


def write_cifar(folder: Path, per_batch=3, seed=0):
    """data_batch_1..5 and test_batch; returns {split: (data [N,3,32,32], labels)}."""
    folder.mkdir(parents=True, exist_ok=True)
    rng, out = _rng(seed), {"train": ([], []), "test": ([], [])}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, per_batch)]
        (folder / name).write_bytes(pickle.dumps({b"batch_label": name.encode(), b"data": data,
                                                  b"labels": labels}, protocol=2))
        split = out["test" if name == "test_batch" else "train"]
        split[0].append(data.reshape(-1, 3, 32, 32))
        split[1].append(labels)
    return {k: (np.concatenate(d), np.concatenate(y)) for k, (d, y) in out.items()}


def write_png(path: Path, arr: np.ndarray):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


# -- idx --------------------------------------------------------------------------------------

@pytest.mark.parametrize("gz", [True, False])
def test_idx_round_trip(tmp_path, gz):
    images = _rng().integers(0, 256, (7, 28, 28), dtype=np.uint8)
    labels = np.array([3, 1, 4, 1, 5, 9, 2], np.uint8)
    img = write_idx(tmp_path, images, labels, gz=gz)
    ds = _load(tmp_path, format="idx", path=img.name)
    assert ds.x.dtype == torch.float32 and ds.shape == (1, 28, 28) and len(ds) == 7
    assert np.array_equal(ds.x.numpy(), _unit(images)[:, None])
    assert ds.y.dtype == torch.int64 and ds.y.tolist() == labels.tolist()
    assert ds.x.min() >= -1 and ds.x.max() <= 1


def test_idx_folder_split_and_labels(tmp_path):
    train = _rng(1).integers(0, 256, (4, 5, 6), dtype=np.uint8)
    test = _rng(2).integers(0, 256, (2, 5, 6), dtype=np.uint8)
    write_idx(tmp_path / "d", train, np.arange(4, dtype=np.uint8))
    write_idx(tmp_path / "d", test, None, stem="t10k", gz=False)
    ds = _load(tmp_path, format="idx", path="d")
    assert ds.shape == (1, 5, 6) and ds.y.tolist() == [0, 1, 2, 3]
    ds = _load(tmp_path, format="idx", path="d", split="test")
    assert np.array_equal(ds.x.numpy(), _unit(test)[:, None]) and ds.y is None
    # labels given explicitly, under any name
    (tmp_path / "lab.bin").write_bytes(_idx_bytes(np.array([1, 0], np.uint8), 0x801))
    ds = _load(tmp_path, format="idx", path="d/t10k-images-idx3-ubyte", labels="lab.bin")
    assert ds.y.tolist() == [1, 0]
    with pytest.raises(UserError, match=r"\[data\] split: only applies when path is a folder"):
        _load(tmp_path, format="idx", path="d/t10k-images-idx3-ubyte", split="test")


# -- cifar10 ----------------------------------------------------------------------------------

def test_cifar10_round_trip(tmp_path):
    want = write_cifar(tmp_path / "cifar-10-batches-py")
    for split, n in (("train", 15), ("test", 3)):
        ds = _load(tmp_path, format="cifar10", path="cifar-10-batches-py", split=split)
        data, labels = want[split]
        assert ds.shape == (3, 32, 32) and len(ds) == n
        assert np.array_equal(ds.x.numpy(), _unit(data))
        assert ds.y.tolist() == labels.tolist()
    # the parent folder works too; limit reads only the batches it needs
    ds = _load(tmp_path, format="cifar10", path=".", limit=4)
    assert np.array_equal(ds.x.numpy(), _unit(want["train"][0][:4]))


def test_cifar10_python2_pickle_names(tmp_path):
    """The real batches name numpy.core.multiarray (numpy 1 / Python 2 pickles)."""
    data = _rng().integers(0, 256, (2, 3072), dtype=np.uint8)
    raw = pickle.dumps({b"data": data, b"labels": [7, 8]}, protocol=2)
    raw = raw.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")
    assert b"numpy.core.multiarray" in raw
    (tmp_path / "test_batch").write_bytes(raw)
    ds = _load(tmp_path, format="cifar10", path=".", split="test")
    assert np.array_equal(ds.x.numpy(), _unit(data.reshape(2, 3, 32, 32)))
    assert ds.y.tolist() == [7, 8]


# -- folder -----------------------------------------------------------------------------------

def test_folder_flat_rgb_and_gray(tmp_path):
    imgs = [_rng(i).integers(0, 256, (6, 5, 3), dtype=np.uint8) for i in range(3)]
    for i, a in enumerate(imgs):
        write_png(tmp_path / "im" / f"{i}.png", a)
    (tmp_path / "im" / "notes.txt").write_text("not an image")
    ds = _load(tmp_path, format="folder", path="im")
    assert ds.y is None and ds.shape == (3, 6, 5)
    assert np.array_equal(ds.x.numpy(), _unit(np.stack(imgs)).transpose(0, 3, 1, 2))
    ds = _load(tmp_path, format="folder", path="im", channels=1)
    gray = [np.asarray(Image.fromarray(a).convert("L")) for a in imgs]
    assert ds.shape == (1, 6, 5)
    assert np.array_equal(ds.x.numpy(), _unit(np.stack(gray))[:, None])


def test_folder_classes_resolution_and_jpeg(tmp_path):
    sizes = {"cat": [(10, 8), (7, 7)], "ant": [(5, 9)]}      # ant sorts first -> label 0
    arrays = {}
    for cls, shapes in sizes.items():
        for i, (h, w) in enumerate(shapes):
            arrays[cls, i] = _rng(h * w).integers(0, 256, (h, w, 3), dtype=np.uint8)
            write_png(tmp_path / "c" / cls / f"{i}.png", arrays[cls, i])
    Image.fromarray(arrays["ant", 0]).save(tmp_path / "c" / "ant" / "z.jpg")
    ds = _load(tmp_path, format="folder", path="c", resolution=4)
    assert ds.shape == (3, 4, 4) and ds.y.tolist() == [0, 0, 1, 1] and ds.num_classes == 2
    want = np.asarray(Image.fromarray(arrays["cat", 1]).resize((4, 4), Image.Resampling.BICUBIC))
    assert np.array_equal(ds.x[3].numpy(), _unit(want).transpose(2, 0, 1))


# -- array ------------------------------------------------------------------------------------

def test_array_layouts_and_files(tmp_path):
    u8 = _rng().integers(0, 256, (4, 3, 5, 6), dtype=np.uint8)
    y = np.array([0, 2, 1, 2])
    np.save(tmp_path / "nchw.npy", u8)
    np.savez(tmp_path / "nhwc.npz", images=u8.transpose(0, 2, 3, 1), labels=y)
    with h5py.File(tmp_path / "f.h5", "w") as f:
        f["data"], f["y"] = _unit(u8), y
    want = _unit(u8)
    for name, extra in (("nchw.npy", {}), ("nhwc.npz", {}), ("f.h5", {}),
                        ("nhwc.npz", {"layout": "NHWC"})):
        ds = _load(tmp_path, format="array", path=name, **extra)
        assert ds.x.dtype == torch.float32 and np.array_equal(ds.x.numpy(), want), name
        assert (ds.y is None) == (name == "nchw.npy")
    # forcing NCHW on NHWC data keeps the axes as they are
    ds = _load(tmp_path, format="array", path="nhwc.npz", layout="NCHW")
    assert ds.shape == (5, 6, 3)


def test_array_gray_vectors_and_ranges(tmp_path):
    gray = _rng().integers(0, 256, (3, 4, 4), dtype=np.uint8)
    np.save(tmp_path / "g.npy", gray)
    assert np.array_equal(_load(tmp_path, format="array", path="g.npy").x.numpy(),
                          _unit(gray)[:, None])
    vec = _rng().normal(size=(5, 2)) * 10
    np.save(tmp_path / "v.npy", vec)
    ds = _load(tmp_path, format="array", path="v.npy")
    assert ds.shape == (2,) and not ds.is_image
    assert np.array_equal(ds.x.numpy(), vec.astype(np.float32))
    unit = _rng().random((2, 1, 3, 3)).astype(np.float32)
    np.save(tmp_path / "u.npy", unit)
    ds = _load(tmp_path, format="array", path="u.npy", range="unit")
    assert np.array_equal(ds.x.numpy(), unit * 2 - 1)
    byte = (unit * 255).astype(np.float32)
    np.save(tmp_path / "b.npy", byte)
    ds = _load(tmp_path, format="array", path="b.npy", range="byte")
    assert np.array_equal(ds.x.numpy(), byte / np.float32(127.5) - np.float32(1))


# -- common options, fingerprints, the load() helper -------------------------------------------

def test_limit_conditional_and_fingerprint(tmp_path):
    images = _rng().integers(0, 256, (6, 4, 4), dtype=np.uint8)
    img = write_idx(tmp_path, images, np.arange(6, dtype=np.uint8))
    full = _load(tmp_path, format="idx", path=img.name)
    ds = _load(tmp_path, format="idx", path=img.name, limit=4)
    assert len(ds) == 4 and torch.equal(ds.x, full.x[:4]) and ds.y.tolist() == [0, 1, 2, 3]
    assert len(_load(tmp_path, format="idx", path=img.name, limit=100)) == 6
    ds = _load(tmp_path, format="idx", path=img.name, conditional=False)
    assert ds.y is None and ds.num_classes == 0
    prints = {_load(tmp_path, format="idx", path=img.name, **kw).fingerprint()
              for kw in ({}, {"limit": 4}, {"conditional": False}, {"hflip": True})}
    assert len(prints) == 4
    assert _load(tmp_path, format="idx", path=img.name).fingerprint() == full.fingerprint()
    images[0, 0, 0] ^= 1
    write_idx(tmp_path, images, np.arange(6, dtype=np.uint8))
    assert _load(tmp_path, format="idx", path=img.name).fingerprint() != full.fingerprint()


def test_hflip_flips_about_half_deterministically(tmp_path):
    img = np.arange(12, dtype=np.uint8).reshape(1, 3, 4) * 20      # no left-right symmetry
    np.save(tmp_path / "one.npy", img)
    ds = _load(tmp_path, format="array", path="one.npy", hflip=True)
    assert ds.hflip and ds.fingerprint().endswith(":hflip")
    a, _ = ds.sample(2000, torch.Generator().manual_seed(0))
    b, _ = ds.sample(2000, torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    flipped = (a == ds.x[0].flip(-1)).flatten(1).all(1)
    assert (flipped | (a == ds.x[0]).flatten(1).all(1)).all()
    assert 900 < int(flipped.sum()) < 1100
    a, _ = _load(tmp_path, format="array", path="one.npy").sample(50, torch.Generator())
    assert (a == ds.x[0]).all()


def test_load_rejects_unknown_keys_and_formats(tmp_path):
    np.save(tmp_path / "v.npy", np.zeros((2, 3)))
    with pytest.raises(UserError, match=r"\[data\] unknown key 'channels'"):
        _load(tmp_path, format="array", path="v.npy", channels=1)
    with pytest.raises(UserError, match=r"\[data\] format: unknown dataset 'tiff'.*idx"):
        _load(tmp_path, format="tiff", path="v.npy")
    with pytest.raises(UserError, match=r"\[data\] format: is required"):
        _load(tmp_path, path="v.npy")
    with pytest.raises(UserError, match=r"\[data\] channels: must be 1 or 3"):
        _load(tmp_path, format="folder", path=".", channels=4)
    with pytest.raises(UserError, match=r"\[data\] limit: must be >= 1"):
        _load(tmp_path, format="array", path="v.npy", limit=0)


# -- malformed input: one line, naming the file -----------------------------------------------

def _truncated_idx(d):
    raw = _idx_bytes(np.zeros((3, 4, 4), np.uint8), 0x803)
    (d / "x-images-idx3-ubyte").write_bytes(raw[:-5])
    return dict(format="idx", path="x-images-idx3-ubyte"), "x-images-idx3-ubyte", "truncated"


def _truncated_gzip(d):
    raw = gzip.compress(_idx_bytes(np.zeros((3, 4, 4), np.uint8), 0x803))
    (d / "x.gz").write_bytes(raw[:-10])
    return dict(format="idx", path="x.gz"), "x.gz", "corrupt or truncated gzip"


def _bad_magic(d):
    (d / "x.idx").write_bytes(_idx_bytes(np.zeros(5, np.uint8), 0x801))
    return dict(format="idx", path="x.idx"), "x.idx", "not an IDX images file.*labels file"


def _wrong_label_count(d):
    write_idx(d, np.zeros((3, 4, 4), np.uint8), np.zeros(2, np.uint8))
    return (dict(format="idx", path="train-images-idx3-ubyte.gz"),
            "train-labels-idx1-ubyte.gz", "2 labels for the 3 images")


def _missing_idx(d):
    return dict(format="idx", path="nope.gz"), "nope.gz", "not found"


def _corrupt_pickle(d):
    (d / "test_batch").write_bytes(pickle.dumps({b"data": 1})[:-4])
    return dict(format="cifar10", path=".", split="test"), "test_batch", "not a readable CIFAR"


def _malicious_pickle(d):
    (d / "test_batch").write_bytes(pickle.dumps(types.SimpleNamespace(a=1)))
    return (dict(format="cifar10", path=".", split="test"), "test_batch",
            "refers to types.SimpleNamespace.*refusing")


def _cifar_wrong_shape(d):
    (d / "test_batch").write_bytes(pickle.dumps({b"data": np.zeros((2, 100), np.uint8),
                                                 b"labels": [0, 1]}))
    return dict(format="cifar10", path=".", split="test"), "test_batch", r"uint8 array \[N, 3072\]"


def _cifar_label_count(d):
    (d / "test_batch").write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8),
                                                 b"labels": [0]}))
    return dict(format="cifar10", path=".", split="test"), "test_batch", "1 labels for 2"


def _cifar_missing_batch(d):
    write_cifar(d, per_batch=1)
    (d / "data_batch_3").unlink()
    return dict(format="cifar10", path="."), "data_batch_3", "not found"


def _unreadable_png(d):
    write_png(d / "im" / "a.png", np.zeros((4, 4, 3), np.uint8))
    (d / "im" / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    return dict(format="folder", path="im"), "b.png", "unreadable image"


def _truncated_png(d):
    write_png(d / "im" / "a.png", _rng().integers(0, 256, (64, 64, 3), dtype=np.uint8))
    raw = (d / "im" / "a.png").read_bytes()
    (d / "im" / "a.png").write_bytes(raw[: len(raw) // 2])
    return dict(format="folder", path="im"), "a.png", "unreadable image"


def _mixed_sizes(d):
    write_png(d / "im" / "a.png", np.zeros((4, 4, 3), np.uint8))
    write_png(d / "im" / "b.png", np.zeros((4, 5, 3), np.uint8))
    return dict(format="folder", path="im"), "b.png", "is 5x4 but a.png is 4x4; set resolution"


def _empty_folder(d):
    (d / "im").mkdir()
    return dict(format="folder", path="im"), "im", "no PNG or JPEG images"


def _empty_class(d):
    write_png(d / "im" / "a" / "0.png", np.zeros((4, 4, 3), np.uint8))
    (d / "im" / "b").mkdir()
    return dict(format="folder", path="im"), "b", "class folder holds no PNG"


def _float_out_of_range(d):
    x = np.full((2, 3, 4, 4), 0.5, np.float32)
    x[1] = 1.5
    np.save(d / "x.npy", x)
    return (dict(format="array", path="x.npy"), "x.npy",
            r"float images must be in \[-1, 1\]; got \[0.5, 1.5\]")


def _unit_out_of_range(d):
    np.save(d / "x.npy", np.full((2, 1, 4, 4), -0.5, np.float32))
    return dict(format="array", path="x.npy", range="unit"), "x.npy", r"must be in \[0, 1\]"


def _int_out_of_range(d):
    np.save(d / "x.npy", np.full((2, 1, 4, 4), 300, np.int16))
    return dict(format="array", path="x.npy"), "x.npy", r"integer images must be in 0..255"


def _nan(d):
    x = np.zeros((2, 3), np.float32)
    x[1, 2] = np.nan
    np.save(d / "x.npy", x)
    return dict(format="array", path="x.npy"), "x.npy", "NaN or infinite"


def _array_label_count(d):
    np.savez(d / "x.npz", x=np.zeros((3, 2)), y=np.zeros(4, np.int64))
    return dict(format="array", path="x.npz"), "x.npz", "4 labels for 3 examples"


def _npz_without_x(d):
    np.savez(d / "x.npz", z=np.zeros((3, 2)))
    return dict(format="array", path="x.npz"), "x.npz", "no array named x"


def _corrupt_h5(d):
    (d / "x.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 40)
    return dict(format="array", path="x.h5"), "x.h5", "unreadable array file"


def _one_d_array(d):
    np.save(d / "x.npy", np.zeros(5))
    return dict(format="array", path="x.npy"), "x.npy", r"got shape \[5\]"


MALFORMED = [_truncated_idx, _truncated_gzip, _bad_magic, _wrong_label_count, _missing_idx,
             _corrupt_pickle, _malicious_pickle, _cifar_wrong_shape, _cifar_label_count,
             _cifar_missing_batch, _unreadable_png, _truncated_png, _mixed_sizes, _empty_folder,
             _empty_class, _float_out_of_range, _unit_out_of_range, _int_out_of_range, _nan,
             _array_label_count, _npz_without_x, _corrupt_h5, _one_d_array]


@pytest.mark.parametrize("make", MALFORMED, ids=lambda f: f.__name__.strip("_"))
def test_malformed_input_is_one_line_naming_the_file(tmp_path, make):
    data, file_name, why = make(tmp_path)
    with pytest.raises(UserError) as err:
        _load(tmp_path, **data)
    msg = str(err.value)
    assert "\n" not in msg and file_name in msg, msg
    assert re.search(why, msg), msg


# -- the real Fashion-MNIST, when the machine has it ------------------------------------------

@pytest.mark.skipif(not FASHION.is_file(), reason=f"{FASHION} not present")
def test_fashion_mnist():
    ds = _load(FASHION.parent, format="idx", path=str(FASHION))
    assert len(ds) == 60000 and ds.shape == (1, 28, 28) and ds.num_classes == 10
    assert sorted(torch.unique(ds.y).tolist()) == list(range(10))
    assert ds.x.min() == -1 and ds.x.max() == 1 and ds.x.dtype == torch.float32
