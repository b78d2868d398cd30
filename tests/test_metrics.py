"""FID / KID through clean-fid (plugins/metrics/fid.py, plugins/metrics/__init__.py) and the offline feature net
(tools/train_feature_net.py). No Inception weights exist here: a tiny random TorchScript
feature net stands in, and a fake InceptionV3W-shaped file checks the Inception wiring."""

import hashlib
import importlib
import json
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import Tensor, nn

from plugins.metrics import fid as M
from core.host.config import Section
from core.data.datasets import Dataset
from core.base.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
DISP = "ignore:.*disp.*:DeprecationWarning"    # clean-fid's sqrtm(disp=False) on SciPy >= 1.16


def cleanfid_fd_works() -> bool:
    """clean-fid 0.1.35's frechet_distance calls sqrtm(disp=False); SciPy 1.18 removed disp."""
    import inspect

    from scipy import linalg
    return "disp" in inspect.signature(linalg.sqrtm).parameters


@pytest.fixture
def cleanfid_sqrtm(monkeypatch):
    """clean-fid's own Frechet distance on any SciPy: where sqrtm has no ``disp`` (SciPy 1.18),
    clean-fid's ``sqrtm(A, disp=False)`` gets what that call returned before, ``(sqrtm(A),
    error estimate)``, so the comparisons below run clean-fid's formula instead of skipping."""
    if cleanfid_fd_works():
        return
    import types

    from cleanfid import fid as cfid
    from scipy import linalg

    def sqrtm(a, disp=True):
        root = linalg.sqrtm(a)
        return (root, float(np.linalg.norm(root @ root - a, "fro") / np.linalg.norm(a, "fro"))
                ) if disp is False else root
    monkeypatch.setattr(cfid, "linalg", types.SimpleNamespace(sqrtm=sqrtm))


class TinyNet(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, 8, 3, stride=2)
        self.lin = nn.Linear(8 * 3 * 3, 16)

    @torch.jit.export
    def features(self, x: Tensor) -> Tensor:
        return torch.tanh(self.lin(torch.tanh(self.conv(x)).flatten(1)))

    def forward(self, x: Tensor) -> Tensor:
        return self.features(x)


def write_tiny_net(path: Path, channels: int = 1, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    meta = {"format": "ctmkit.feature_net", "version": 1, "shape": [channels, 8, 8],
            "feature_dim": 16, "num_classes": 0}
    torch.jit.save(torch.jit.script(TinyNet(channels).eval()), str(path),
                   _extra_files={"meta.json": json.dumps(meta)})
    return path


def images(n: int, channels: int = 1, size: int = 8, seed: int = 0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return 0.5 * torch.tanh(torch.randn(n, channels, size, size, generator=g))


def dataset(x: Tensor, tag: str = "ref") -> Dataset:
    return Dataset(x, None, fingerprint=hashlib.sha256(tag.encode()).hexdigest()[:32])


def png_quantise(x: Tensor) -> np.ndarray:
    """What a PNG writer does, written independently of plugins.metrics.fid.to_uint8."""
    a = x.numpy().astype(np.float32)
    return np.clip(np.round((a + 1) * 127.5), 0, 255).astype(np.uint8)


def write_pngs(x: Tensor, folder: Path) -> Path:
    folder.mkdir(parents=True)
    for i, img in enumerate(png_quantise(x)):
        hwc = img.transpose(1, 2, 0)
        Image.fromarray(hwc[:, :, 0] if hwc.shape[2] == 1 else hwc).save(folder / f"{i:05d}.png")
    return folder


@pytest.fixture
def net(tmp_path):
    return M.feature_net(write_tiny_net(tmp_path / "tiny.pt"))


# -- FID ---------------------------------------------------------------------------------------

def test_fid_zero_on_itself_and_grows_with_shift(net, tmp_path):
    x = images(96)
    ref = M.reference_stats(dataset(x), net, 1000, tmp_path / "cache")
    assert M.fid(M.compute_features(x, net), ref) == pytest.approx(0.0, abs=1e-6)
    fids = [M.fid(M.compute_features(x + s, net), ref) for s in (0.1, 0.25, 0.45)]
    assert 0 < fids[0] < fids[1] < fids[2], fids


@pytest.mark.filterwarnings(DISP)
@pytest.mark.parametrize("channels", [1, 3])
def test_fid_matches_clean_fid_on_png_folders(tmp_path, channels, cleanfid_sqrtm):
    from cleanfid import fid as cfid

    ext = M.feature_net(write_tiny_net(tmp_path / "net.pt", channels))
    x_gen, x_ref = images(40, channels, seed=1) + 0.1, images(48, channels, seed=2)
    assert np.array_equal(M.to_uint8(x_gen).numpy(), png_quantise(x_gen))
    d1, d2 = write_pngs(x_gen, tmp_path / "gen"), write_pngs(x_ref, tmp_path / "ref")

    ours_feats = M.compute_features(x_gen, ext, batch=16)
    theirs_feats = cfid.get_folder_features(str(d1), ext, num_workers=0, batch_size=16,
                                            device=torch.device("cpu"), mode="clean",
                                            custom_fn_resize=ext.resize, verbose=False)
    assert np.array_equal(ours_feats, theirs_feats.astype(np.float64))
    with pytest.raises(UserError, match="custom_fn_resize"):   # clean-fid's default: 299x299
        cfid.get_folder_features(str(d1), ext, num_workers=0, batch_size=4,
                                 device=torch.device("cpu"), mode="clean", verbose=False)

    # clean-fid averages the float32 features in float32, we in float64: ~1e-7 apart
    ours = M.fid(ours_feats, M.reference_stats(dataset(x_ref), ext, 1000, tmp_path / "c"))
    assert ours > 0
    theirs = cfid.compute_fid(str(d1), str(d2), mode="clean", custom_feat_extractor=ext,
                              custom_fn_resize=ext.resize, num_workers=0, batch_size=16,
                              device=torch.device("cpu"), verbose=False)
    assert ours == pytest.approx(theirs, rel=1e-6)


def write_fake_inception(path: Path) -> Path:
    """A file shaped like StyleGAN2-ADA's Inception TorchScript: ``layers`` -> 2048 features."""
    class Layers(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 1)

        def forward(self, x: Tensor) -> Tensor:
            return torch.nn.functional.adaptive_avg_pool2d(self.conv(x), 16)

    class Fake(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = Layers()

        def forward(self, x: Tensor, return_features: bool = False) -> Tensor:
            return self.layers(x).reshape(x.shape[0], -1)

    torch.manual_seed(0)
    torch.jit.save(torch.jit.script(Fake()), str(path))
    return path


def test_inception_wiring_matches_clean_fid_folder_features(tmp_path):
    from cleanfid import fid as cfid

    write_fake_inception(tmp_path / M.INCEPTION_FILE)
    ext = M.inception(tmp_path)                   # the folder holding the file
    assert ext.name == "inception_v3" and M.metric_key("fid", ext.name) == "fid"
    x = images(6, 1, size=12)
    folder = write_pngs(x, tmp_path / "pngs")
    ours = M.compute_features(x, ext, batch=4)
    theirs = cfid.get_folder_features(str(folder), ext, num_workers=0, batch_size=4,
                                      device=torch.device("cpu"), mode="clean", verbose=False)
    assert ours.shape == (6, 2048) and np.array_equal(ours, theirs.astype(np.float64))
    other = tmp_path / "other-name.pt"            # a file saved under another name works too
    other.write_bytes((tmp_path / M.INCEPTION_FILE).read_bytes())
    assert np.array_equal(M.compute_features(x, M.inception(other), batch=4), ours)


def test_missing_inception_is_one_line_with_the_url(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError) as e:
        M.inception(empty)
    msg = str(e.value)
    assert "\n" not in msg and M.INCEPTION_URL in msg and 'inception = "' in msg
    assert str(empty / M.INCEPTION_FILE) in msg
    with pytest.raises(UserError, match="Inception weights missing"):
        M.inception(tmp_path / "nope.pt")


# -- KID ---------------------------------------------------------------------------------------

def test_kid_deterministic_for_a_seed_and_leaves_numpy_state_alone():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(80, 16)), rng.normal(size=(90, 16)) + 0.2
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    k1 = M.kid(a, b, seed=5, max_subset_size=32)
    assert np.array_equal(np.random.get_state()[1], before)
    assert M.kid(a, b, seed=5, max_subset_size=32) == k1
    assert M.kid(a, b, seed=6, max_subset_size=32) != k1
    assert M.kid(a, b, seed=5) > M.kid(a, a + 0.0, seed=5)


# -- reference statistics cache ----------------------------------------------------------------

def test_reference_stats_cached_and_corrupt_cache_recomputed(net, tmp_path, monkeypatch, capsys):
    calls = []
    real = M.compute_features

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)
    monkeypatch.setattr(M, "compute_features", counting)
    ds = dataset(images(50), "cache-test")
    cache = tmp_path / "cache"
    r1 = M.reference_stats(ds, net, 40, cache, seed=3)
    path = cache / f"refstats-{net.name}-{ds.fingerprint()[:16]}-40.npz"
    assert path.is_file() and [p.name for p in cache.iterdir()] == [path.name]
    r2 = M.reference_stats(ds, net, 40, cache, seed=3)
    assert len(calls) == 1
    for k in ("mu", "sigma", "feats"):
        assert np.array_equal(r1[k], r2[k])
    assert r1["feats"].shape == (40, 16) and r1["feats"].dtype == np.float64

    raw = path.read_bytes()
    for bad in (raw[: len(raw) // 2], b"not an npz"):
        path.write_bytes(bad)
        r3 = M.reference_stats(ds, net, 40, cache, seed=3)
        assert np.array_equal(r3["sigma"], r1["sigma"])
    assert len(calls) == 3 and "recomputing" in capsys.readouterr().err
    M.reference_stats(ds, net, 40, cache, seed=3)
    assert len(calls) == 3                        # the rewritten file is good again


# -- plugins and the naming rule ---------------------------------------------------------------

def options(**kw) -> Section:
    return Section("metric", dict(kw), "<test>", Path.cwd())


CTX = types.SimpleNamespace(device="cpu", progress=False)


def test_feature_net_metrics_are_never_called_fid(tmp_path):
    from core.host import plugins

    file = write_tiny_net(tmp_path / "n.pt")
    table = plugins.registry()["metric"]
    assert {"fid", "kid"} <= set(table)
    opts = dict(features="feature_net", feature_net=str(file), num=64)
    fid_m = table["fid"].factory(options(**opts), CTX)
    kid_m = table["kid"].factory(options(**opts), CTX)
    assert isinstance(fid_m, M.Metric) and isinstance(kid_m, M.Metric)
    name = "featnet-" + hashlib.sha256(file.read_bytes()).hexdigest()[:8]
    ref = dataset(images(64, seed=4), "plugin")
    out = {**fid_m.compute(images(32, seed=5), ref, tmp_path / "c"),
           **kid_m.compute(images(32, seed=5), ref, tmp_path / "c")}
    assert set(out) == {f"fid_{name}", f"kid_{name}"}
    assert "fid" not in out and "kid" not in out
    assert all(np.isfinite(v) for v in out.values())
    assert M.metric_key("fid", name) == f"fid_{name}"


def test_metric_options_errors(tmp_path):
    from plugins.metrics import ctmkit_metrics

    factory = ctmkit_metrics()["fid"]
    with pytest.raises(UserError, match="feature_net.*required"):
        factory(options(features="feature_net"), CTX)
    with pytest.raises(UserError, match="must be one of"):
        factory(options(features="clip"), CTX)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError) as e:
        factory(options(inception=str(empty)), CTX)
    assert "\n" not in str(e.value) and M.INCEPTION_URL in str(e.value)


# -- sample grid -------------------------------------------------------------------------------

def test_save_grid_pixel_size(tmp_path):
    p = M.save_grid(images(5, 1, size=28), tmp_path / "g.png", nrow=3, labels=[0, 1, 2, 3, 4])
    with Image.open(p) as im:
        assert im.format == "PNG" and im.size == (2 * (3 * 30 + 2), 2 * (2 * 30 + 2))
    p = M.save_grid(images(2, 3, size=64), tmp_path / "h.png")
    with Image.open(p) as im:
        assert im.size == (2 * 66 + 2, 68) and im.mode == "RGB"


# -- tools/train_feature_net.py ----------------------------------------------------------------

def test_train_feature_net_writes_a_loadable_file(tmp_path, monkeypatch, capsys):
    import core.data.datasets

    monkeypatch.syspath_prepend(str(ROOT / "tools"))
    tool = importlib.import_module("train_feature_net")
    if not hasattr(core.data.datasets, "load"):       # until the dataset loaders exist
        def load(section, ctx):
            z = np.load(section.path("path"))
            x = torch.from_numpy(z["x"]).float()[:, None] / 127.5 - 1
            return Dataset(x, torch.from_numpy(z["y"]).long(), "fallback")
        monkeypatch.setattr(core.data.datasets, "load", load, raising=False)

    g = np.random.default_rng(0)
    y = np.arange(120) % 2
    x = g.integers(0, 60, size=(120, 8, 8))
    x[y == 0, :, :4] += 180                       # class 0 bright on the left, 1 on the right
    x[y == 1, :, 4:] += 180
    np.savez(tmp_path / "toy.npz", x=x.astype(np.uint8), y=y)
    out = tmp_path / "fn.pt"
    rc = tool.main(["--data", str(tmp_path / "toy.npz"), "--format", "array", "--out", str(out),
                    "--epochs", "1", "--batch", "16", "--no-progress"])
    assert rc == 0 and "test accuracy" in capsys.readouterr().out
    ext = M.feature_net(out)
    assert ext.meta["format"] == "ctmkit.feature_net" and ext.meta["version"] == 1
    assert ext.meta["shape"] == [1, 8, 8] and ext.meta["num_classes"] == 2
    assert ext.meta["feature_dim"] == 128 and 0 <= ext.meta["test_accuracy"] <= 1
    assert ext.name.startswith("featnet-") and ext.channels == 1
    assert M.compute_features(torch.from_numpy(x[:4] / 127.5 - 1).float()[:, None],
                              ext).shape == (4, 128)

    rc = tool.main(["--data", str(tmp_path / "missing.npz"), "--format", "array",
                    "--out", str(tmp_path / "x.pt"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1
    assert not (tmp_path / "x.pt").exists()


# --- the Frechet distance itself (ours: no scipy.linalg.sqrtm) --------------------------------

def test_frechet_distance_closed_form_diagonal():
    """Commuting (diagonal) covariances: FD = |mu1 - mu2|^2 + sum (sqrt a - sqrt b)^2, also when
    one covariance is singular (fewer samples than features)."""
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    a, b = rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
    a[:2] = 0.0
    want = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert M.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(want, rel=1e-12)
    assert M.frechet_distance(mu1, np.diag(b), mu1, np.diag(b)) == pytest.approx(0, abs=1e-12)


def test_frechet_distance_closed_form_rotated():
    """FD is invariant under a common rotation of both Gaussians."""
    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.normal(size=(5, 5)))
    a, b = rng.uniform(0.1, 2, 5), rng.uniform(0.1, 2, 5)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    want = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = M.frechet_distance(q @ mu1, q @ np.diag(a) @ q.T, q @ mu2, q @ np.diag(b) @ q.T)
    assert got == pytest.approx(want, rel=1e-10)


def test_frechet_distance_matches_clean_fid(cleanfid_sqrtm):
    import warnings

    from cleanfid.fid import frechet_distance as theirs
    rng = np.random.default_rng(2)
    f1, f2 = rng.normal(size=(300, 20)), rng.normal(size=(250, 20)) * 1.3 + 0.2
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    m1, m2 = f1.mean(0), f2.mean(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        want = theirs(m1, s1, m2, s2)
    assert M.frechet_distance(m1, s1, m2, s2) == pytest.approx(want, rel=1e-9)


def test_fid_needs_no_scipy_sqrtm(monkeypatch):
    """FID works on a SciPy without sqrtm(disp=...): here, without any sqrtm at all."""
    from scipy import linalg

    def gone(*a, **k):
        raise TypeError("sqrtm() got an unexpected keyword argument 'disp'")
    monkeypatch.setattr(linalg, "sqrtm", gone)
    rng = np.random.default_rng(3)
    feats, ref = rng.normal(size=(40, 64)), rng.normal(size=(50, 64))   # singular covariances
    value = M.fid(feats, {"mu": ref.mean(0), "sigma": np.cov(ref, rowvar=False)})
    assert np.isfinite(value) and value > 0
    with pytest.raises(UserError, match="NaN"):
        M.fid(np.full((4, 64), np.nan), {"mu": ref.mean(0), "sigma": np.cov(ref, rowvar=False)})
