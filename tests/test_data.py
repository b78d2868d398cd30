"""Data arrays for [data] / [coefficients] data: .npy, .npz and HDF5, and bad files."""

import h5py
import numpy as np
import pytest
import torch

from core.host.config import Section
from core.data.source import DataSource, load_arrays
from core.base.errors import UserError


def test_formats_round_trip(tmp_path):
    x = np.random.default_rng(0).normal(size=(50, 3)).astype(np.float32)
    y = np.arange(50) % 4
    np.save(tmp_path / "a.npy", x)
    np.savez(tmp_path / "b.npz", x=x, y=y)
    with h5py.File(tmp_path / "c.h5", "w") as h:
        h["x"], h["labels"] = x, y
    for name, has_y in (("a.npy", False), ("b.npz", True), ("c.h5", True)):
        xs, ys = load_arrays(tmp_path / name, (3,))
        assert torch.allclose(xs, torch.from_numpy(x).double())
        assert (ys is not None) == has_y
        if has_y:
            assert torch.equal(ys, torch.from_numpy(y))


@pytest.mark.parametrize("content,msg", [
    (b"not numpy", "unreadable data file"),
    (None, "data file not found"),
])
def test_bad_files(tmp_path, content, msg):
    p = tmp_path / "x.npy"
    if content is not None:
        p.write_bytes(content)
    with pytest.raises(UserError, match=msg):
        load_arrays(p, (3,))


def test_wrong_shape_nan_and_labels(tmp_path):
    np.save(tmp_path / "s.npy", np.zeros((5, 4)))
    with pytest.raises(UserError, match="expected \\[N, 3\\]"):
        load_arrays(tmp_path / "s.npy", (3,))
    np.save(tmp_path / "n.npy", np.full((5, 3), np.nan))
    with pytest.raises(UserError, match="finite"):
        load_arrays(tmp_path / "n.npy", (3,))
    np.savez(tmp_path / "l.npz", x=np.zeros((5, 3)), y=np.zeros(4, dtype=int))
    with pytest.raises(UserError, match="labels must be 5 integers"):
        load_arrays(tmp_path / "l.npz", (3,))


def test_data_section_file_and_gmm(tmp_path):
    x = np.random.default_rng(1).normal(size=(20, 2))
    np.save(tmp_path / "x.npy", x)
    src = DataSource(Section("data", {"path": "x.npy"}, "c.toml", tmp_path))
    a, _ = src.sample(8, torch.Generator().manual_seed(0))
    assert a.shape == (8, 2) and src.shape == (2,)
    g = DataSource(Section("data", {"gmm": {"weights": [1.0], "means": [[0.0, 0.0]],
                                            "stds": [1.0]}}, "c.toml", tmp_path))
    assert g.sample(4, torch.Generator())[0].shape == (4, 2)
    with pytest.raises(UserError, match="exactly one of"):
        DataSource(Section("data", {}, "c.toml", tmp_path))
