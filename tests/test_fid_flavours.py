"""FID as the papers report it: clean-fid's legacy_tensorflow mode next to its clean mode, EDM's
precomputed reference statistics (.npz) as the reference, and the flavour of every number
(feature network, mode, reference) recorded beside it. No Inception weights exist here: a fake
file shaped like StyleGAN2-ADA's Inception TorchScript stands in (as in tests/test_metrics.py),
one that, like the real one, resizes to 299 x 299 inside ``forward(x, return_features=True)``."""

import hashlib
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

CTX = types.SimpleNamespace(device="cpu", progress=False)


# -- helpers -----------------------------------------------------------------------------------

class _Layers(nn.Module):
    """[B, 3, 299, 299] normalised images -> [B, 8, 16, 16] (2048 features)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)

    def forward(self, x: Tensor) -> Tensor:
        return torch.nn.functional.adaptive_avg_pool2d(torch.tanh(self.conv(x)), 16)


class _FakeInception(nn.Module):
    """``layers`` on images already at 299 (clean mode); ``forward(x, return_features=True)``
    on images of any size in [0, 255], resized to 299 bilinearly inside (legacy mode)."""

    def __init__(self):
        super().__init__()
        self.layers = _Layers()

    def forward(self, x: Tensor, return_features: bool = False) -> Tensor:
        x = x.to(torch.float32)
        if x.shape[2] != 299 or x.shape[3] != 299:
            x = torch.nn.functional.interpolate(x, size=(299, 299), mode="bilinear",
                                                align_corners=False)
        x = (x - 128) / 128
        return self.layers(x).reshape(x.shape[0], -1)


def write_fake_inception(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    path = folder / M.INCEPTION_FILE
    torch.jit.save(torch.jit.script(_FakeInception().eval()), str(path))
    return path


def images(n: int, channels: int = 3, size: int = 8, seed: int = 0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return 0.6 * torch.tanh(torch.randn(n, channels, size, size, generator=g))


def dataset(x: Tensor, tag: str = "ref") -> Dataset:
    return Dataset(x, None, fingerprint=hashlib.sha256(tag.encode()).hexdigest()[:32])


def write_pngs(x: Tensor, folder: Path) -> Path:
    folder.mkdir(parents=True)
    u8 = np.clip(np.round((x.numpy().astype(np.float32) + 1) * 127.5), 0, 255).astype(np.uint8)
    for i, img in enumerate(u8):
        hwc = img.transpose(1, 2, 0)
        Image.fromarray(hwc[:, :, 0] if hwc.shape[2] == 1 else hwc).save(folder / f"{i:05d}.png")
    return folder


def options(**kw) -> Section:
    return Section("evaluate.metric", dict(kw), "<test>", Path.cwd())


def factories():
    from plugins.metrics import ctmkit_metrics
    table = ctmkit_metrics()
    return table["fid"], table["kid"]


def one_line_error(fn, match: str) -> str:
    with pytest.raises(UserError, match=match) as e:
        fn()
    assert "\n" not in str(e.value), str(e.value)
    return str(e.value)


@pytest.fixture
def fake(tmp_path):
    return write_fake_inception(tmp_path / "inception")


# -- legacy_tensorflow mode is clean-fid's --------------------------------------------------

@pytest.mark.parametrize("channels", [1, 3])
def test_legacy_tensorflow_features_are_clean_fids_own(tmp_path, fake, monkeypatch, channels):
    """Our legacy_tensorflow features of in-memory images equal clean-fid's legacy_tensorflow
    features of the same images as PNGs, with clean-fid's own model set-up for that mode
    (build_feature_extractor: InceptionV3W(resize_inside=True)) and its own resizer."""
    import cleanfid.features as cf
    from cleanfid import fid as cfid
    from cleanfid.inception_torchscript import InceptionV3W
    from cleanfid.resize import build_resizer

    # clean-fid's feature_extractor() looks in /tmp and would download: point it at the fake
    monkeypatch.setattr(cf, "InceptionV3W", lambda path, download=True, resize_inside=False:
                        InceptionV3W(str(fake.parent), download=False,
                                     resize_inside=resize_inside))
    x = images(6, channels, size=12, seed=channels)
    folder = write_pngs(x, tmp_path / "pngs")

    legacy = M.inception(fake.parent, mode="legacy_tensorflow")
    assert legacy.name == "inception_v3_legacy_tf" and legacy.model.resize_inside
    ours = M.compute_features(x, legacy, batch=4)
    model = cf.build_feature_extractor("legacy_tensorflow", device=torch.device("cpu"),
                                       use_dataparallel=False)
    theirs = cfid.get_folder_features(str(folder), model, num_workers=0, batch_size=4,
                                      device=torch.device("cpu"), mode="legacy_tensorflow",
                                      verbose=False)
    assert ours.shape == (6, 2048) and np.array_equal(ours, theirs.astype(np.float64))

    # the resize is clean-fid's legacy one: none outside the network, the net's own inside
    u8 = M._to_rgb_hwc(M.to_uint8(x))
    assert all(np.array_equal(legacy.resize(img), build_resizer("legacy_tensorflow")(img))
               and legacy.resize(img).shape == (12, 12, 3) for img in u8)
    net = torch.jit.load(str(fake))
    native = torch.from_numpy(u8).permute(0, 3, 1, 2).float()           # 12 x 12, [0, 255]
    with torch.no_grad():                        # (TorchScript's executor: ~1 ulp apart)
        direct = torch.cat([net(native[:4], True), net(native[4:], True)]).numpy()
    np.testing.assert_allclose(ours, direct, rtol=1e-5, atol=1e-6)

    # clean mode is clean-fid's clean mode with the same file, and a different number
    clean = M.inception(fake.parent)
    assert clean.name == "inception_v3" and not clean.model.resize_inside
    ours_clean = M.compute_features(x, clean, batch=4)
    model = cf.build_feature_extractor("clean", device=torch.device("cpu"),
                                       use_dataparallel=False)
    theirs_clean = cfid.get_folder_features(str(folder), model, num_workers=0, batch_size=4,
                                            device=torch.device("cpu"), mode="clean",
                                            verbose=False)
    assert np.array_equal(ours_clean, theirs_clean.astype(np.float64))
    assert not np.allclose(ours_clean, ours)


def test_keys_and_reference_caches_differ_by_mode(tmp_path, fake, monkeypatch):
    fid_f, kid_f = factories()
    common = dict(inception=str(fake.parent), num=40)
    names = {mode: (fid_f(options(mode=mode, **common), CTX).name,
                    kid_f(options(mode=mode, **common), CTX).name)
             for mode in ("clean", "legacy_tensorflow")}
    assert names == {"clean": ("fid", "kid"),
                     "legacy_tensorflow": ("fid_legacy_tf", "kid_legacy_tf")}
    assert fid_f(options(**common), CTX).name == "fid"             # clean is the default
    assert M.metric_key("fid", M.inception_name("legacy_tensorflow")) == "fid_legacy_tf"
    assert M.metric_key("kid", "featnet-1a2b3c4d") == "kid_featnet-1a2b3c4d"

    calls = []
    real = M.reference_stats.__globals__["compute_features"]

    def counting(imgs, ext, *a, **k):
        calls.append(ext.name)
        return real(imgs, ext, *a, **k)
    monkeypatch.setattr(M, "compute_features", counting)
    ref, x = dataset(images(40, seed=1), "modes"), images(24, seed=2) + 0.1
    cache = tmp_path / "cache"
    out = {}
    for mode in ("clean", "legacy_tensorflow", "legacy_tensorflow"):
        out.update(kid_f(options(mode=mode, **common), CTX).compute(x, ref, cache))
    assert set(out) == {"kid", "kid_legacy_tf"} and out["kid"] != out["kid_legacy_tf"]
    fp = ref.fingerprint()[:16]
    assert sorted(p.name for p in cache.iterdir()) == [
        f"refstats-inception_v3-{fp}-40.npz", f"refstats-inception_v3_legacy_tf-{fp}-40.npz"]
    # reference features once per mode; samples once per mode (the third call: both cached)
    assert sorted(calls) == ["inception_v3"] * 2 + ["inception_v3_legacy_tf"] * 2
    with np.load(cache / f"refstats-inception_v3_legacy_tf-{fp}-40.npz") as z:
        assert str(z["extractor"]) == "inception_v3_legacy_tf"


def test_mode_option_errors(tmp_path, fake):
    fid_f, _ = factories()
    one_line_error(lambda: fid_f(options(inception=str(fake.parent), mode="legacy_pytorch"),
                                 CTX), "must be one of")
    one_line_error(lambda: fid_f(options(features="feature_net", feature_net="auto",
                                         mode="legacy_tensorflow"), CTX),
                   "Inception mode.*features = \"inception\"")
    one_line_error(lambda: M.inception(fake.parent, mode="tf"), "unknown Inception mode")


# -- EDM's reference statistics ---------------------------------------------------------------

def test_edm_npz_reference_gives_the_fid_of_the_same_stats_from_data(tmp_path, fake):
    """An EDM-style fid-refs file (np.savez(mu=..., sigma=...)) holding the statistics of the
    reference data gives exactly the FID computed against that data, without the data."""
    fid_f, kid_f = factories()
    common = dict(inception=str(fake.parent), mode="legacy_tensorflow", num=1000)
    ref, x = dataset(images(48, seed=3), "edm"), images(32, seed=4) + 0.05
    from_data = fid_f(options(**common), CTX)
    want = from_data.compute(x, ref, tmp_path / "cache")
    assert set(want) == {"fid_legacy_tf"} and want["fid_legacy_tf"] > 0

    stats = M.reference_stats(ref, M.inception(fake.parent, mode="legacy_tensorflow"), 1000,
                              tmp_path / "cache")
    npz = tmp_path / "cifar10-32x32.npz"
    np.savez(npz, mu=stats["mu"], sigma=stats["sigma"])             # what EDM's fid.py writes
    from_npz = fid_f(options(reference=str(npz), **common), CTX)
    got = from_npz.compute(x, None, tmp_path / "unused")            # no reference data needed
    assert got == want
    assert not (tmp_path / "unused").exists()

    info_data, info_npz = from_data.describe(), from_npz.describe()
    assert info_data["reference"] == {"source": "dataset", "fingerprint": ref.fingerprint(),
                                      "num": 48, "images": 48, "seed": None}
    assert info_npz["reference"] == {"source": "npz", "path": str(npz.resolve()),
                                     "sha256": hashlib.sha256(npz.read_bytes()).hexdigest()}
    for info in (info_data, info_npz):
        assert info["mode"] == "legacy_tensorflow" and info["key"] == "fid_legacy_tf"
        assert info["features"]["name"] == "inception_v3_legacy_tf"
        assert info["features"]["sha256"] == hashlib.sha256(fake.read_bytes()).hexdigest()
        json.dumps(info, allow_nan=False)

    # KID needs reference features: the .npz alone cannot give it
    msg = one_line_error(lambda: kid_f(options(reference=str(npz), **common), CTX),
                         "kid needs the reference images' features")
    assert "cifar10-32x32.npz" in msg


def _savez(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


def test_malformed_npz_references_are_one_line_user_errors(tmp_path, fake):
    fid_f, _ = factories()
    d = M.INCEPTION_DIM
    mu, sigma = np.zeros(d, np.float32), np.eye(d, dtype=np.float32)
    bad_sym = sigma.copy()
    bad_sym[0, 1] = 0.5
    nan = sigma.copy()
    nan[3, 3] = np.nan
    neg = sigma.copy()
    neg[2, 2] = -1.0
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"PK\x03\x04 not really a zip file")
    npy = tmp_path / "plain.npz"
    with open(npy, "wb") as fh:
        np.save(fh, mu)
    cases = {
        "not found": tmp_path / "missing.npz",
        "unreadable": garbage,
        "not an .npz archive": npy,
        "no 'sigma' array": _savez(tmp_path / "nosigma.npz", mu=mu),
        "no 'mu' array": _savez(tmp_path / "nomu.npz", m=mu, sigma=sigma),
        r"mu \[64\] and sigma \[64, 64\]": _savez(tmp_path / "small.npz", mu=mu[:64],
                                                   sigma=sigma[:64, :64]),
        r"sigma \[2048\]": _savez(tmp_path / "flat.npz", mu=mu, sigma=mu),
        "NaN/Inf": _savez(tmp_path / "nan.npz", mu=mu, sigma=nan),
        "not symmetric": _savez(tmp_path / "asym.npz", mu=mu, sigma=bad_sym),
        "negative diagonal": _savez(tmp_path / "neg.npz", mu=mu, sigma=neg),
        "expected floats": _savez(tmp_path / "str.npz", mu=np.array(["a"] * d), sigma=sigma),
        "unreadable ": _savez(tmp_path / "obj.npz", mu=np.array([None] * d, dtype=object),
                              sigma=sigma),
    }
    for why, path in cases.items():
        msg = one_line_error(lambda: fid_f(options(inception=str(fake.parent),
                                                   reference=str(path)), CTX), why)
        assert str(path.name) in msg, msg

    good = _savez(tmp_path / "good.npz", mu=mu, sigma=sigma)
    m = fid_f(options(inception=str(fake.parent), reference=str(good)), CTX)
    assert m.name == "fid" and m.reference["sigma"].dtype == np.float64
    # Inception statistics with any other feature network: refused
    one_line_error(lambda: fid_f(options(features="feature_net", feature_net="auto",
                                         reference=str(good)), CTX),
                   'need features = "inception"')


# -- the flavour of every number ----------------------------------------------------------------

def _tiny_feature_net(path: Path) -> Path:
    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, stride=2)

        @torch.jit.export
        def features(self, x: Tensor) -> Tensor:
            return torch.tanh(self.conv(x)).flatten(1)

        def forward(self, x: Tensor) -> Tensor:
            return self.features(x)

    torch.manual_seed(1)
    meta = {"format": "ctmkit.feature_net", "version": 1, "shape": [3, 8, 8]}
    torch.jit.save(torch.jit.script(Tiny().eval()), str(path),
                   _extra_files={"meta.json": json.dumps(meta)})
    return path


def stages_log_line(K, values: dict) -> str:
    """How core/pipeline/stages.py's evaluate logs every entry of sample_quality's result."""
    return f"evaluate: {K}-step " + "  ".join(f"{n} {x:.4g}" for n, x in values.items())


def test_info_blocks_present_and_strict_json(tmp_path, fake):
    from core.evaluation.quality import compute_metrics

    fid_f, kid_f = factories()
    net = _tiny_feature_net(tmp_path / "net.pt")
    digest = hashlib.sha256(net.read_bytes()).hexdigest()
    opts = dict(features="feature_net", feature_net=str(net), num=30, seed=5)
    metrics = [fid_f(options(**opts), CTX), kid_f(options(**opts), CTX),
               kid_f(options(inception=str(fake.parent), mode="legacy_tensorflow", num=30), CTX)]
    ref, x = dataset(images(40, seed=6), "info"), images(20, seed=7)
    out = compute_metrics(metrics, x, ref, tmp_path / "cache")
    key = f"featnet-{digest[:8]}"
    assert set(out) == {f"fid_{key}", f"kid_{key}", "kid_legacy_tf", f"fid_{key}_info",
                        f"kid_{key}_info", "kid_legacy_tf_info"}
    back = json.loads(json.dumps(out, allow_nan=False))                 # strict JSON
    assert back[f"fid_{key}"] == out[f"fid_{key}"]
    info = back[f"fid_{key}_info"]
    assert info == {"metric": "fid", "key": f"fid_{key}", "mode": "native",
                    "features": {"network": "feature_net", "name": key,
                                 "file": str(net.resolve()), "sha256": digest, "mode": "native",
                                 "resize": "none (native resolution)"},
                    "reference": {"source": "dataset", "fingerprint": ref.fingerprint(),
                                  "num": 30, "images": 40, "seed": 5}}
    tf = back["kid_legacy_tf_info"]
    assert tf["metric"] == "kid" and tf["mode"] == "legacy_tensorflow"
    assert tf["features"]["network"] == "inception"
    assert tf["features"]["file"] == str(fake.resolve())
    assert "TensorFlow" in tf["features"]["resize"]
    assert tf["features"]["sha256"] == hashlib.sha256(fake.read_bytes()).hexdigest()
    line = stages_log_line(1, out)                                       # :.4g on an info works
    assert "\n" not in line and "[inception_v3_legacy_tf legacy_tensorflow vs data" in line
    # without info: the numbers only, as before
    assert set(compute_metrics(metrics, x, ref, tmp_path / "cache", info=False)) == {
        f"fid_{key}", f"kid_{key}", "kid_legacy_tf"}


def test_sample_quality_info_for_metrics_json_not_for_distills_csv(tmp_path, monkeypatch):
    import core.export.sampling
    from core.evaluation.quality import sample_quality

    fid_f, _ = factories()
    net = _tiny_feature_net(tmp_path / "net.pt")
    metric = fid_f(options(features="feature_net", feature_net=str(net), num=30), CTX)
    ref = dataset(images(40, seed=8), "sq")

    def draw(jumper, meta, sampler, ts, num, batch, seed, device, progress=False):
        return images(num, seed=100 + len(ts)).numpy(), None
    monkeypatch.setattr(core.export.sampling, "draw", draw)
    sampler = types.SimpleNamespace(timesteps=lambda K, *a: list(range(K)))
    meta = {"t_min": 0.002, "t_max": 80.0, "rho": 7.0}
    args = (None, meta, sampler, [1, 2], 20, 10, 0, "cpu", [metric], ref, tmp_path / "cache")

    q = sample_quality(*args, info=True)                                 # the evaluate stage
    assert set(q) == {1, 2, "info"} and set(q["info"]) == {metric.name}
    assert all(set(q[K]) == {metric.name} and isinstance(q[K][metric.name], float)
               for K in (1, 2))
    quality = json.loads(json.dumps({str(k): v for k, v in q.items()}, allow_nan=False))
    assert quality["info"][metric.name]["reference"]["fingerprint"] == ref.fingerprint()
    for K, v in q.items():
        assert "\n" not in stages_log_line(K, v)

    q = sample_quality(*args, grid_name="distill_samples")              # distill: csv numbers
    assert set(q) == {1, 2}
    q = sample_quality(*args)                                            # the default: no info
    assert set(q) == {1, 2} and all(isinstance(v, float) for K in q for v in q[K].values())
