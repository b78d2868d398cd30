"""Samples in the formats papers' evaluators read: ADM's ``samples.npz`` and EDM's PNG folder
(issue: CTM's whole recipe, item 4), byte-checked against hand-computed images."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from core.export import sample_files as sf
from core.base.errors import UserError
from core.evaluation.quality import paper_names

#: values on both sides of each rounding edge; ADM: (x + 1) * 127.5, EDM: x * 127.5 + 128
X = np.array([-1.3, -1.0, -0.999, 0.0, 0.01, 0.5, 1.0, 1.2], dtype=np.float32)
ADM = [0, 0, 0, 127, 128, 191, 255, 255]          # 127.5 -> 127, 128.775 -> 128, 191.25 -> 191
EDM = [0, 0, 0, 128, 129, 191, 255, 255]          # 0.5 -> 0, 129.275 -> 129, 191.75 -> 191


def images(n=5, c=3, h=2, w=3, seed=0):
    return np.random.default_rng(seed).uniform(-1.1, 1.1, (n, c, h, w)).astype(np.float32)


def test_conversions_equal_hand_computed_values():
    x = X.reshape(1, 1, 1, -1)
    assert sf.adm_uint8(x).reshape(-1).tolist() == ADM
    assert sf.edm_uint8(x).reshape(-1).tolist() == EDM


def test_conversions_equal_the_evaluators_own_torch_expressions():
    x = torch.from_numpy(images(64, seed=1))
    adm = ((x + 1) * 127.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)   # ADM / CTM
    edm = (x * 127.5 + 128).clip(0, 255).to(torch.uint8).permute(0, 2, 3, 1)    # EDM
    assert np.array_equal(sf.adm_uint8(x.numpy()), adm.numpy())
    assert np.array_equal(sf.edm_uint8(x.numpy()), edm.numpy())


def test_npz_is_what_adm_evaluator_reads(tmp_path):
    x = images()
    x[0, :, 0, 0] = [-1.0, 0.01, 1.0]           # pixel (0, 0) of image 0: one value per channel
    labels = np.array([3, 1, 4, 1, 5])
    sf.save_npz(tmp_path / "s.npz", x, labels)
    with np.load(tmp_path / "s.npz") as f:       # evaluator.py: np.load(path)["arr_0"]
        assert sorted(f.files) == ["arr_0", "arr_1"]
        a, y = f["arr_0"], f["arr_1"]
    assert a.dtype == np.uint8 and a.shape == (5, 2, 3, 3)           # N, H, W, C
    assert a[0, 0, 0].tolist() == [0, 128, 255]
    assert np.array_equal(a, sf.adm_uint8(x)) and y.tolist() == [3, 1, 4, 1, 5]
    sf.save_npz(tmp_path / "u.npz", x, None)
    with np.load(tmp_path / "u.npz") as f:
        assert f.files == ["arr_0"]


def test_png_folder_is_edm_generate_layout(tmp_path):
    x = images(1001, c=1, h=2, w=3, seed=2)
    x[1000, 0] = [[-1.0, 0.0, 0.01], [0.5, 1.0, 1.2]]
    out = sf.save_png_folder(tmp_path / "samples", x)
    pngs = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert len(pngs) == 1001 and pngs[0] == "000000/000000.png"
    assert pngs[999] == "000000/000999.png" and pngs[1000] == "001000/001000.png"
    img = Image.open(out / "001000" / "001000.png")
    assert img.mode == "L" and img.size == (3, 2)
    assert np.asarray(img).tolist() == [[0, 128, 129], [191, 255, 255]]
    for i in (0, 517):
        assert np.array_equal(np.asarray(Image.open(out / sf.png_relpath(i))),
                              sf.edm_uint8(x[i:i + 1])[0, :, :, 0])


def test_png_folder_rgb_and_replacing_only_its_own_folder(tmp_path):
    x = images(3, c=3)
    out = sf.save_png_folder(tmp_path / "samples", x)
    img = Image.open(out / "000000" / "000002.png")
    assert img.mode == "RGB" and np.array_equal(np.asarray(img), sf.edm_uint8(x)[2])
    sf.save_png_folder(tmp_path / "samples", x[:2])              # ctmkit's own: replaced whole
    assert len(list(out.rglob("*.png"))) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["samples"]   # no temporaries left
    dead = tmp_path / ".samples.ctmkit-999999999-1-abc.tmp"       # a killed writer's folder
    (dead / "000000").mkdir(parents=True)
    live = tmp_path / f".samples.ctmkit-{os.getpid()}-0-abc.tmp"   # a live writer's: kept
    live.mkdir()
    sf.save_png_folder(tmp_path / "samples", x)
    assert not dead.exists() and live.is_dir()
    live.rmdir()
    user = tmp_path / "mine"
    user.mkdir()
    (user / "photo.png").write_bytes(b"keep")
    with pytest.raises(UserError, match="not written by ctmkit"):
        sf.save_png_folder(user, x)
    assert (user / "photo.png").read_bytes() == b"keep"
    (tmp_path / "file").write_bytes(b"keep")
    with pytest.raises(UserError, match="not written by ctmkit"):
        sf.save_png_folder(tmp_path / "file", x)
    with pytest.raises(UserError, match="needs images"):
        sf.save_npz(tmp_path / "v.npz", np.zeros((4, 2), np.float32), None)


IMAGE_GMM = """
[run]
out_dir = "out"
stages = ["coefficients", "export", "sample"]
[teacher]
kind = "gmm"
weights = [0.5, 0.5]
means = [[-0.5, 0.0, 0.5, 0.2, 0.1, -0.3], [0.4, 0.3, -0.2, 0.0, -0.6, 0.5]]
stds = [0.2, 0.3]
shape = [1, 2, 3]
[precond]
name = "analytic"
variant = "forward"
[coefficients]
n_timesteps = 12
n_samples = 64
batch = 64
[sample]
steps = 2
num = 7
batch = 7
formats = ["npz", "png"]
"""


def test_sample_stage_writes_both_formats_and_reruns_when_one_is_gone(write_config,
                                                                     run_main, tmp_path):
    cfg = write_config(IMAGE_GMM)
    rc, _, err = run_main(cfg)
    assert rc == 0, err
    out = tmp_path / "out"
    x = np.load(out / "samples.npy")
    with np.load(out / "samples.npz") as f:
        assert np.array_equal(f["arr_0"], sf.adm_uint8(x))
    assert np.array_equal(np.asarray(Image.open(out / "samples" / "000000" / "000006.png")),
                          sf.edm_uint8(x[6:])[0, :, :, 0])
    rc, log, err = run_main(cfg)
    assert rc == 0 and "stage sample: up to date" in log, err
    (out / "samples" / "000000" / "000003.png").unlink()
    rc, log, err = run_main(cfg)
    assert rc == 0 and "stage sample: up to date" not in log, err
    assert (out / "samples" / "000000" / "000003.png").is_file()


def test_image_formats_on_vector_samples_are_one_error_line(write_config, run_main):
    from conftest import QUICK_CONFIG
    cfg = write_config(QUICK_CONFIG.replace('[sample]\n', '[sample]\nformats = ["npz"]\n'))
    rc, _, err = run_main(cfg)
    assert rc == 2 and err.strip().splitlines()[-1].startswith("error: ")
    assert "image formats" in err and "Traceback" not in err


def test_unknown_format_is_refused(write_config, run_main):
    cfg = write_config(IMAGE_GMM.replace('["npz", "png"]', '["jpeg"]'))
    rc, _, err = run_main(cfg, "--dry-run")
    assert rc == 2 and "jpeg" in err


def test_fid50k_is_named_as_papers_name_it():
    info = {"reference": {"source": "npz", "path": "/refs/cifar10-32x32.npz"}}
    values = {"fid_legacy_tf": 2.5}
    named = paper_names(values, 50_000, info)
    assert named == {"fid50k_legacy_tf": 2.5,
                     "fid50k_legacy_tf_reference": "cifar10-32x32.npz"}
    assert f"{named['fid50k_legacy_tf_reference']:.4g}" == "cifar10-32x32.npz"  # log lines
    assert json.loads(json.dumps(named)) == named
    assert paper_names(values, 49_999, info) == {}
    assert paper_names({"fid_featnet": 1.0}, 50_000, info) == {}     # not Inception: no FID
