"""The C++ sampler ``ctm_sample`` (cpp_runtime/): parity with core.export.sampling.draw, output files,
and one-line errors.

The binary is built once per session by tools/build_cpp.py (incremental in build/): the
``binary`` fixture of conftest.py.
"""

from __future__ import annotations

import io
import json
import math
import os
import struct
import subprocess
import sys
import warnings
import zlib
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
import torch
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from core.base.integrity import seal_archive  # noqa: E402
from core.export.jumper import Jumper, TeacherAsNetwork, export, load, make_meta  # noqa: E402
from core.export.sampling import draw  # noqa: E402
from plugins.preconditionings import AnalyticPrecond, CTMPrecond  # noqa: E402
from plugins.samplers import CTMSampler  # noqa: E402
from plugins.teachers.gmm import GMMTeacher  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:.*TorchScript.*:FutureWarning")]

T_MIN, T_MAX, RHO, SIGMA_DATA = 0.002, 80.0, 7.0, 0.5


# --- the binary --------------------------------------------------------------------------------

def run(binary: Path, *args, check: bool = True, env: dict | None = None
        ) -> subprocess.CompletedProcess:
    """ctm_sample with `args`; `env`: variables to set on top of this process's."""
    proc = subprocess.run([str(binary), *map(str, args)], capture_output=True, text=True,
                          timeout=120, env={**os.environ, **env} if env else None)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


# --- jumpers -------------------------------------------------------------------------------

def gmm_teacher() -> GMMTeacher:
    return GMMTeacher([0.3, 0.7], [[-2.0, 0.0], [1.0, 1.0]], [1.0, 0.5])


class MLPNet(nn.Module):
    """F(x, t, s[, class_labels]): a small MLP on [x, log t, log s (, label embedding)]."""

    def __init__(self, shape: list[int], width: int = 64, num_classes: int = 0):
        super().__init__()
        self.shape = shape
        self.dim = int(math.prod(shape))
        self.num_classes = num_classes
        self.embed = nn.Embedding(max(num_classes, 1), width)
        self.inp = nn.Linear(self.dim + 2, width)
        self.hidden = nn.Linear(width, width)
        self.out = nn.Linear(width, self.dim)

    def forward(self, x: Tensor, t: Tensor, s: Tensor,
                class_labels: Optional[Tensor] = None) -> Tensor:
        B = x.shape[0]
        feats = torch.cat([x.reshape(B, self.dim), torch.log(t).reshape(B, 1) / 4,
                           torch.log(s).reshape(B, 1) / 4], dim=1)
        h = self.inp(feats)
        if class_labels is not None:
            h = h + self.embed(class_labels)
        h = self.hidden(torch.nn.functional.silu(h))
        return self.out(torch.nn.functional.silu(h)).reshape(x.shape)


class FailingNet(nn.Module):
    """Raises on its 5th call: an error in the middle of sampling."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x: Tensor, t: Tensor, s: Tensor,
                class_labels: Optional[Tensor] = None) -> Tensor:
        self.calls += 1
        if self.calls >= 5:
            raise RuntimeError("deliberate failure in the network")
        return torch.zeros_like(x)


class NaNNet(nn.Module):
    def forward(self, x: Tensor, t: Tensor, s: Tensor,
                class_labels: Optional[Tensor] = None) -> Tensor:
        return x * float("nan")


def meta_for(precond, shape, num_classes=0, dtype="float32", **extra) -> dict:
    return make_meta(precond, sigma_data=SIGMA_DATA, t_min=T_MIN, t_max=T_MAX, rho=RHO,
                     shape=list(shape), num_classes=num_classes, dtype=dtype, **extra)


def parity_jumpers(T) -> list[tuple[str, nn.Module, dict]]:
    """(name, eager jumper, meta) of the models every parity test runs: the teacher-initialised
    GMM jumper with CTM (float32, float64) and Analytic (forward) preconditioning, and real
    MLP networks, unconditional and class-conditional."""
    from core.diffusion.coefficients.estimate import estimate_table
    from core.diffusion.schedules import log_grid

    P = CTMPrecond()
    den = T.denoiser()
    table = estimate_table(lambda x, t, c: den(x, t, c), T.sample_data, T.dim,
                           log_grid(40, T_MIN, T_MAX), 256, 256, 0, {}, progress=False)
    PA = AnalyticPrecond.from_table(table, "forward")
    gmm = lambda dtype, p: Jumper(TeacherAsNetwork(T.denoiser(dtype), SIGMA_DATA), p, SIGMA_DATA)
    out = [("gmm_ctm", gmm(torch.float32, P), meta_for(P, T.shape)),
           ("gmm_ctm64", gmm(torch.float64, P), meta_for(P, T.shape, dtype="float64")),
           ("gmm_analytic", gmm(torch.float32, PA), meta_for(PA, T.shape))]
    torch.manual_seed(0)
    out.append(("mlp", Jumper(MLPNet([3, 4, 4]), P, SIGMA_DATA), meta_for(P, [3, 4, 4])))
    out.append(("mlp_cond", Jumper(MLPNet([1, 3, 5], num_classes=3), P, SIGMA_DATA),
                meta_for(P, [1, 3, 5], num_classes=3)))
    return out


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("jumpers")
    T = gmm_teacher()
    out = {}

    def save(name, jumper, meta):
        out[name] = d / f"{name}.pt"
        export(jumper, out[name], meta)

    for name, jumper, meta in parity_jumpers(T):
        save(name, jumper, meta)
    P = CTMPrecond()
    save("failing", Jumper(FailingNet(), P, SIGMA_DATA), meta_for(P, [2]))
    save("failing_img", Jumper(FailingNet(), P, SIGMA_DATA), meta_for(P, [1, 2, 2]))
    save("nan", Jumper(NaNNet(), P, SIGMA_DATA), meta_for(P, [2]))

    # foreign / broken files
    good = out["gmm_ctm"].read_bytes()
    (d / "truncated.pt").write_bytes(good[: len(good) // 2])
    (d / "garbage.pt").write_text("this is not a TorchScript archive\n")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(torch.jit.script(MLPNet([2])), str(d / "no_meta.pt"))
    out["truncated"], out["garbage"], out["no_meta"] = (d / "truncated.pt", d / "garbage.pt",
                                                        d / "no_meta.pt")
    bad_metas = {
        "meta_t_order": dict(meta_for(P, T.shape), t_min=90.0),
        "meta_format": dict(meta_for(P, T.shape), format="something.else"),
        "meta_missing": {k: v for k, v in meta_for(P, T.shape).items() if k != "rho"},
        "meta_shape": dict(meta_for(P, T.shape), shape=[2, 0]),
        "meta_version": dict(meta_for(P, T.shape), version=2),
        "meta_classes": dict(meta_for(P, T.shape), num_classes=-1),
    }
    jumper = Jumper(TeacherAsNetwork(T.denoiser(torch.float32), SIGMA_DATA), P, SIGMA_DATA)
    scripted = torch.jit.script(jumper.eval())

    def save_sealed(path, meta_text):   # a bad meta.json under a valid whole-archive digest
        buf = io.BytesIO()
        torch.jit.save(scripted, buf, _extra_files={"meta.json": meta_text})
        path.write_bytes(seal_archive(buf.getvalue()))

    for name, meta in bad_metas.items():
        out[name] = d / f"{name}.pt"
        save_sealed(out[name], json.dumps(meta))
    out["meta_json"] = d / "meta_json.pt"
    save_sealed(out["meta_json"], '{"format": ')
    return out


# --- parity with core.export.sampling.draw ----------------------------------------------------------

def python_samples(model: Path, *, steps=2, num=10, batch=4, seed=0, gamma=0.0,
                   timesteps=None, class_label=None):
    jumper, meta = load(model)
    sampler = CTMSampler(gamma)
    ts = timesteps or sampler.timesteps(steps, meta["t_min"], meta["t_max"], meta["rho"])
    return draw(jumper, meta, sampler, ts, num, batch, seed, "cpu", class_label,
                progress=False)


def cpp_samples(binary, model: Path, out: Path, *, steps=2, num=10, batch=4, seed=0,
                gamma=0.0, timesteps=None, class_label=None):
    args = ["--model", model, "--out", out, "--num", num, "--batch", batch, "--seed", seed,
            "--gamma", gamma]
    args += ["--timesteps", ",".join(repr(t) for t in timesteps)] if timesteps else \
        ["--steps", steps]
    if class_label is not None:
        args += ["--class-label", class_label]
    run(binary, *args)
    x = np.load(out)
    labels_path = out.with_name(out.stem + ".labels.npy")
    return x, (np.load(labels_path) if labels_path.exists() else None)


def assert_parity(binary, model, tmp_path, **kw):
    x_py, y_py = python_samples(model, **kw)
    x_cpp, y_cpp = cpp_samples(binary, model, tmp_path / "samples.npy", **kw)
    assert x_cpp.dtype == np.float32 and x_cpp.shape == x_py.shape
    scale = max(1.0, float(np.abs(x_py).max()))
    np.testing.assert_allclose(x_cpp, x_py, rtol=1e-5, atol=1e-5 * scale)
    if y_py is None:
        assert y_cpp is None
    else:
        assert y_cpp is not None and y_cpp.dtype == np.int64
        np.testing.assert_array_equal(y_cpp, y_py)
    return x_cpp, y_cpp


def test_parity_gmm_ctm(binary, models, tmp_path):
    x, _ = assert_parity(binary, models["gmm_ctm"], tmp_path, steps=3, num=10, batch=4, seed=1)
    assert x.shape == (10, 2) and np.isfinite(x).all()


def test_parity_gmm_float64(binary, models, tmp_path):
    assert_parity(binary, models["gmm_ctm64"], tmp_path, steps=2, num=6, batch=6, seed=3)


def test_parity_gmm_analytic_forward(binary, models, tmp_path):
    assert_parity(binary, models["gmm_analytic"], tmp_path, steps=2, num=8, batch=3, seed=2)


def test_parity_network(binary, models, tmp_path):
    assert_parity(binary, models["mlp"], tmp_path, steps=4, num=13, batch=5, seed=7)


def test_parity_gamma(binary, models, tmp_path):
    assert_parity(binary, models["mlp"], tmp_path, steps=3, num=7, batch=4, seed=5, gamma=0.5)
    assert_parity(binary, models["gmm_ctm"], tmp_path, steps=4, num=5, batch=2, seed=5,
                  gamma=1.0)


def test_parity_explicit_timesteps(binary, models, tmp_path):
    assert_parity(binary, models["gmm_ctm"], tmp_path, num=9, batch=4, seed=11,
                  timesteps=[80.0, 5.0, 0.7, 0.05, 0.002])
    assert_parity(binary, models["mlp"], tmp_path, num=4, batch=4, seed=11,
                  timesteps=[40.0, 1.0, 0.01])
    # gamma-sampling clips its landing time at the grid's last time, not at meta's t_min
    assert_parity(binary, models["gmm_ctm"], tmp_path, num=6, batch=4, seed=12, gamma=0.999,
                  timesteps=[80.0, 2.0, 0.3, 0.1])


def test_parity_conditional_random_labels(binary, models, tmp_path):
    _, y = assert_parity(binary, models["mlp_cond"], tmp_path, steps=2, num=11, batch=4,
                         seed=4)
    assert y.shape == (11,) and set(y.tolist()) <= {0, 1, 2} and len(set(y.tolist())) > 1


def test_parity_conditional_fixed_label(binary, models, tmp_path):
    _, y = assert_parity(binary, models["mlp_cond"], tmp_path, steps=2, num=6, batch=4,
                         seed=4, class_label=2, gamma=0.3)
    assert (y == 2).all()


def test_labels_change_samples(binary, models, tmp_path):
    """The labels reach the network: different labels, different samples."""
    a, _ = cpp_samples(binary, models["mlp_cond"], tmp_path / "a.npy", num=4, class_label=0)
    b, _ = cpp_samples(binary, models["mlp_cond"], tmp_path / "b.npy", num=4, class_label=1)
    assert not np.allclose(a, b)


# --- output files ----------------------------------------------------------------------------

def test_npy_header_matches_numpy(binary, models, tmp_path):
    out = tmp_path / "s.npy"
    x, _ = cpp_samples(binary, models["mlp"], out, num=3, batch=2)
    import io
    ref = io.BytesIO()
    np.save(ref, np.zeros_like(x))
    raw = out.read_bytes()
    header_len = raw.index(b"\n") + 1
    assert raw[:header_len] == ref.getvalue()[:header_len]
    assert header_len % 64 == 0 and raw.startswith(b"\x93NUMPY\x01\x00")
    assert len(raw) == header_len + x.size * 4
    assert not list(tmp_path.glob(".*.tmp"))


def read_png(path: Path) -> tuple[int, int, int, np.ndarray]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        assert crc == zlib.crc32(kind + body), kind
        chunks.append((kind, body))
        pos += 12 + length
    assert [k for k, _ in chunks][0] == b"IHDR" and chunks[-1][0] == b"IEND"
    w, h, depth, color, comp, filt, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    assert (depth, comp, filt, interlace) == (8, 0, 0, 0) and color in (0, 2)
    channels = 1 if color == 0 else 3
    raw = zlib.decompress(b"".join(b for k, b in chunks if k == b"IDAT"))
    rows = np.frombuffer(raw, np.uint8).reshape(h, 1 + w * channels)
    assert (rows[:, 0] == 0).all()   # filter type None
    return w, h, channels, rows[:, 1:].reshape(h, w, channels)


@pytest.mark.parametrize("model,channels", [("mlp", 3), ("mlp_cond", 1)])
def test_png_grid(binary, models, tmp_path, model, channels):
    out = tmp_path / "grid.npy"
    x, _ = cpp_samples(binary, models[model], out, num=5, batch=5)
    w, h, c, img = read_png(tmp_path / "grid.png")
    C, H, W = x.shape[1:]
    pad = 2
    assert c == channels == C and (w, h) == (3 * (W + pad) + pad, 2 * (H + pad) + pad)
    expect = np.clip(np.round((x.astype(np.float64) + 1) * 127.5), 0, 255).astype(np.uint8)
    for k in range(5):
        gy, gx = pad + (k // 3) * (H + pad), pad + (k % 3) * (W + pad)
        tile = img[gy:gy + H, gx:gx + W, :]
        np.testing.assert_array_equal(tile, expect[k].transpose(1, 2, 0))


def test_no_png_for_vectors(binary, models, tmp_path):
    cpp_samples(binary, models["gmm_ctm"], tmp_path / "v.npy", num=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.npy"]


def test_help(binary):
    proc = run(binary, "--help")
    assert proc.returncode == 0 and "usage: ctm_sample" in proc.stdout and not proc.stderr


def test_cpp_unit_tests(binary):
    proc = subprocess.run([str(binary.parent / "ctm_runtime_tests")], capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_timing_flag(binary, models, tmp_path):
    proc = run(binary, "--model", models["gmm_ctm"], "--out", tmp_path / "t.npy", "--num", 4,
               "--timing", "--quiet")
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ctm_sample: timing: load=")
    assert " warmup=" in lines[0] and " sample=" in lines[0] and "backend=torchscript" in lines[0]


def test_warmup_does_not_change_samples(binary, models, tmp_path):
    """The warm-up jumps draw no random numbers: the same samples with and without them."""
    args = ["--model", models["mlp"], "--num", 7, "--batch", 3, "--steps", 3, "--gamma", 0.5]
    run(binary, *args, "--out", tmp_path / "a.npy", "--warmup", 0)
    run(binary, *args, "--out", tmp_path / "b.npy", "--warmup", 3)
    run(binary, *args, "--out", tmp_path / "c.npy")
    a = np.load(tmp_path / "a.npy")
    np.testing.assert_array_equal(a, np.load(tmp_path / "b.npy"))
    np.testing.assert_array_equal(a, np.load(tmp_path / "c.npy"))


# --- --format npz | png: the files papers' evaluators read (core/export/sample_files.py) -----------

def _cpp(binary, model, out, fmt, *, num, batch=7, seed=3, steps=2):
    run(binary, "--model", model, "--out", out, "--format", fmt, "--num", num, "--batch", batch,
        "--seed", seed, "--steps", steps)


@pytest.mark.parametrize("model", ["mlp", "mlp_cond"])
def test_npz_is_what_python_sample_files_writes(binary, models, tmp_path, model):
    """arr_0 (uint8 NHWC, ADM's conversion) and arr_1 (labels) of --format npz equal
    core/sample_files.save_npz of the same samples byte for byte, as stored zip members that
    numpy reads; against Python's own draw they agree but where float rounding meets a pixel
    boundary."""
    import zipfile

    from core.export.sample_files import adm_uint8, save_npz

    x, y = cpp_samples(binary, models[model], tmp_path / "s.npy", num=23, batch=7, seed=3)
    _cpp(binary, models[model], tmp_path / "s.npz", "npz", num=23)
    got = np.load(tmp_path / "s.npz")
    save_npz(tmp_path / "py.npz", x, y)
    ref = np.load(tmp_path / "py.npz")
    assert got.files == ref.files == (["arr_0"] if y is None else ["arr_0", "arr_1"])
    assert got["arr_0"].dtype == np.uint8 and got["arr_0"].shape == ref["arr_0"].shape
    assert got["arr_0"].tobytes() == ref["arr_0"].tobytes()
    u8 = got["arr_0"]
    assert 0.2 < float(((u8 > 0) & (u8 < 255)).mean())       # not just clamped pixels
    if y is not None:
        assert got["arr_1"].dtype == np.int64 and (got["arr_1"] == y).all()
    with zipfile.ZipFile(tmp_path / "s.npz") as z:
        assert z.testzip() is None
        assert all(i.compress_type == zipfile.ZIP_STORED for i in z.infolist())
    x_py, y_py = python_samples(models[model], num=23, batch=7, seed=3)
    diff = np.abs(adm_uint8(x_py).astype(int) - u8.astype(int))
    assert diff.max() <= 1 and (diff == 0).mean() > 0.99
    assert sorted(p.name for p in tmp_path.iterdir()) == \
        sorted(["s.npy", "s.npz", "s.png", "py.npz"] + (["s.labels.npy"] if y is not None
                                                          else []))


def test_npz_zip64_records_read_by_numpy(binary, tmp_path):
    """ZIP64 records (written where a member passes 4 GiB; forced here by the unit-test
    binary) are read by numpy / zipfile as the plain archive is."""
    from core.export.sample_files import adm_uint8

    subprocess.run([str(binary.parent / "ctm_runtime_tests"), "--write-npz", str(tmp_path)],
                   check=True)
    x = np.arange(5 * 24, dtype=np.float32).reshape(5, 3, 2, 4) / np.float32(60) - 1
    for name in ("plain.npz", "zip64.npz"):
        z = np.load(tmp_path / name)
        assert z["arr_0"].tobytes() == adm_uint8(x).tobytes()
        assert z["arr_1"].tolist() == [0, 1, 2, 0, 1]
    assert (tmp_path / "zip64.npz").stat().st_size > (tmp_path / "plain.npz").stat().st_size


def _png_pixels(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        a = np.asarray(im)
    return a[:, :, None] if a.ndim == 2 else a


@pytest.mark.parametrize("model", ["mlp", "mlp_cond"])
def test_png_folder_is_what_python_sample_files_writes(binary, models, tmp_path, model):
    """--format png: EDM's layout (shards of 1,000) with the marker; every PNG decodes to the
    pixels of core/sample_files.save_png_folder for the same samples (EDM's conversion)."""
    from core.export.sample_files import PNG_MARKER, edm_uint8, png_relpath, save_png_folder

    num = 1003 if model == "mlp" else 12
    x, _ = cpp_samples(binary, models[model], tmp_path / "s.npy", num=num, batch=250, seed=3)
    _cpp(binary, models[model], tmp_path / "pngs", "png", num=num, batch=250)
    save_png_folder(tmp_path / "py", x)
    out = tmp_path / "pngs"
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert files == sorted([PNG_MARKER] + [png_relpath(i) for i in range(num)])
    expect = edm_uint8(x)
    for i in range(num):
        a = _png_pixels(out / png_relpath(i))
        assert a.tobytes() == _png_pixels(tmp_path / "py" / png_relpath(i)).tobytes()
        assert a.tobytes() == expect[i].tobytes(), i
    if num > 1000:
        assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["000000", "001000"]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    # ctm_sample's own folder (or ctmkit's) is replaced; nothing else is left behind
    _cpp(binary, models[model], out, "png", num=2, seed=4)
    assert sorted(p.name for p in out.rglob("*.png")) == ["000000.png", "000001.png"]
    _cpp(binary, models[model], tmp_path / "py", "png", num=1)
    assert len(list((tmp_path / "py").rglob("*.png"))) == 1
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_png_out_with_a_trailing_slash(binary, models, tmp_path):
    _cpp(binary, models["mlp"], f"{tmp_path / 'pngs'}/", "png", num=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pngs"]
    assert (tmp_path / "pngs" / "000000" / "000001.png").is_file()


def test_png_stale_temporary_of_a_dead_run_is_swept(binary, models, tmp_path):
    dead = tmp_path / ".pngs.ctmkit-999999999-1-abcdefgh.tmp"
    dead.mkdir()
    (dead / "000000").mkdir()
    _cpp(binary, models["mlp"], tmp_path / "pngs", "png", num=1)
    assert not dead.exists() and (tmp_path / "pngs" / "000000" / "000000.png").is_file()


def _format_error(binary, tmp_path, *args, expect: str):
    proc = run(binary, *args, check=False)
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("ctm_sample: error: ") and expect in lines[0], lines[0]
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]
    return lines[0]


def test_bad_format_or_out_is_one_error_line(binary, models, tmp_path):
    m = models["mlp"]
    _format_error(binary, tmp_path, "--model", m, "--out", tmp_path / "a", "--format", "jpeg",
                  expect="--format: expected npy, npz or png, got 'jpeg'")
    for fmt in ("npz", "png"):
        _format_error(binary, tmp_path, "--model", models["gmm_ctm"], "--out",
                      tmp_path / f"v.{fmt}", "--format", fmt,
                      expect=f"--format {fmt}: an image format; this model makes samples of "
                             f"shape [2]")
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine\n")
    _format_error(binary, tmp_path, "--model", m, "--out", foreign, "--format", "png",
                  expect="was not written by ctm_sample or ctmkit")
    assert [p.name for p in foreign.iterdir()] == ["keep.txt"]
    (tmp_path / "file").write_text("x\n")
    _format_error(binary, tmp_path, "--model", m, "--out", tmp_path / "file", "--format", "png",
                  expect="exists and is not a folder")
    (tmp_path / "link").symlink_to(foreign)
    _format_error(binary, tmp_path, "--model", m, "--out", tmp_path / "link", "--format", "png",
                  expect="is not a folder")
    _format_error(binary, tmp_path, "--model", m, "--out", foreign, "--format", "npz",
                  expect="is a directory, not a regular file")
    _format_error(binary, tmp_path, "--model", m, "--out", tmp_path / "no" / "p", "--format",
                  "png", expect="does not exist")
    # a folder of ours that holds the model: replacing it would delete the model
    ours = tmp_path / "ours"
    ours.mkdir()
    (ours / ".ctmkit-samples").write_bytes(b"")
    inside = ours / "model.pt"
    inside.write_bytes(m.read_bytes())
    _format_error(binary, tmp_path, "--model", inside, "--out", ours, "--format", "png",
                  expect="holds the model file")
    assert inside.is_file()


@pytest.mark.parametrize("fmt", ["npz", "png"])
def test_failure_mid_sampling_leaves_no_npz_or_png(binary, models, tmp_path, fmt):
    out = tmp_path / f"out.{fmt}"
    _format_error(binary, tmp_path, "--model", models["failing_img"], "--out", out, "--format",
                  fmt, "--steps", "1", "--num", "10", "--batch", "2",
                  expect="deliberate failure in the network")
    assert not out.exists() and sorted(tmp_path.iterdir()) == []


# --- errors ------------------------------------------------------------------------------------

def assert_error(binary, tmp_path, *args, expect: str, out_name="out.npy"):
    out = tmp_path / out_name
    proc = run(binary, "--out", out, *args, check=False)
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("ctm_sample: error: "), proc.stderr
    assert expect in lines[0], lines[0]
    assert not out.exists()
    assert not out.with_name(out.stem + ".labels.npy").exists()
    assert not out.with_name(out.stem + ".png").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    return lines[0]


@pytest.mark.parametrize("model,expect", [
    ("missing", "jumper file not found"),
    ("truncated", "not a loadable TorchScript jumper"),
    ("garbage", "not a loadable TorchScript jumper"),
    ("no_meta", "not a ctmkit jumper (no meta.json inside)"),
    ("meta_t_order", "meta.json is inconsistent (0 < t_min < t_max is required)"),
    ("meta_format", "not a ctmkit jumper (meta.json format is 'something.else')"),
    ("meta_missing", "meta.json lacks rho"),
    ("meta_shape", "shape must be a non-empty list of positive integers"),
    ("meta_version", "jumper format version 2 is not supported"),
    ("meta_classes", "num_classes must be an integer in 0.."),
    ("meta_json", "meta.json is not valid JSON"),
])
def test_bad_model_files(binary, models, tmp_path, model, expect):
    path = models.get(model, tmp_path / "does_not_exist.pt")
    line = assert_error(binary, tmp_path, "--model", path, expect=expect)
    assert str(path) in line


@pytest.mark.parametrize("args,expect", [
    (["--frobnicate", "3"], "unknown flag '--frobnicate'"),
    (["--steps", "two"], "--steps: expected an integer >= 1, got 'two'"),
    (["--steps", "0"], "--steps: expected an integer >= 1, got '0'"),
    (["--num", "0"], "--num: expected an integer >= 1"),
    (["--batch", "1.5"], "--batch: expected an integer >= 1"),
    (["--seed", "abc"], "--seed"),
    (["--gamma", "1.5"], "--gamma: expected a number in [0, 1], got '1.5'"),
    (["--gamma", "-0.1"], "--gamma: expected a number in [0, 1]"),
    (["--timesteps", "1,5,0.002"], "--timesteps: times must be strictly decreasing"),
    (["--timesteps", "90,1,0.002"], "must lie in the model's [t_min, t_max]"),
    (["--timesteps", "80"], "at least two times"),
    (["--class-label", "0"], "the model is unconditional"),
    (["--device", "tpu"], "--device: expected cpu, cuda or cuda:N, got 'tpu'"),
    (["--steps"], "--steps needs a value"),
    (["--warmup", "-1"], "--warmup: expected an integer >= 0, got '-1'"),
    (["--steps", "10001"], "--steps: at most 10000, got '10001'"),
    (["--num", "2147483648"], "--num: at most 2147483647, got '2147483648'"),
    (["--batch", "1048577"], "--batch: at most 1048576, got '1048577'"),
    (["--threads", "1025"], "--threads: at most 1024, got '1025'"),
    (["--warmup", "101"], "--warmup: at most 100, got '101'"),
    (["--timesteps", ",".join(str(80 - k * 1e-3) for k in range(10002))],
     "--timesteps: at most 10001 times"),
])
def test_bad_flags(binary, models, tmp_path, args, expect):
    assert_error(binary, tmp_path, "--model", models["gmm_ctm"], *args, expect=expect)


@pytest.mark.parametrize("label,expect", [("3", "expected 0 <= C < 3, got 3"),
                                          ("-1", "--class-label: expected an integer >= 0")])
def test_bad_class_label(binary, models, tmp_path, label, expect):
    assert_error(binary, tmp_path, "--model", models["mlp_cond"], "--class-label", label,
                 expect=expect)


def test_missing_model_flag(binary, tmp_path):
    assert_error(binary, tmp_path, "--num", "3", expect="--model is required")


def test_output_directory_missing(binary, models, tmp_path):
    assert_error(binary, tmp_path, "--model", models["gmm_ctm"], out_name="nope/out.npy",
                 expect="does not exist")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is present")
def test_cuda_without_gpu(binary, models, tmp_path):
    assert_error(binary, tmp_path, "--model", models["gmm_ctm"], "--device", "cuda",
                 expect="--device cuda: no CUDA GPU is available")


def test_failure_mid_sampling_leaves_nothing(binary, models, tmp_path):
    # steps=1, batch=2: calls 1-2 are the warm-up, calls 3-4 the first two batches (streamed
    # to the temporary file), call 5 raises
    assert_error(binary, tmp_path, "--model", models["failing"], "--steps", "1", "--num", "10",
                 "--batch", "2", expect="deliberate failure in the network")


def test_nan_samples_are_not_written(binary, models, tmp_path):
    assert_error(binary, tmp_path, "--model", models["nan"], "--num", "4",
                 expect="the jumper produced NaN/Inf")


def special_file(kind: str, path: Path) -> Path:
    import socket
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "socket":
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(path))
        sock.close()
    elif kind == "directory":
        path.mkdir()
    elif kind == "symlink":
        (path.parent / "target.npy").write_bytes(b"target")
        path.symlink_to(path.parent / "target.npy")
    return path


@pytest.mark.parametrize("kind,expect", [
    ("fifo", "is a FIFO, not a regular file"), ("socket", "is a socket, not a regular file"),
    ("directory", "is a directory, not a regular file"),
    ("symlink", "is a symbolic link, not a regular file"),
])
def test_out_must_be_a_regular_file(binary, models, tmp_path, kind, expect):
    """ctm_sample renamed its output over any non-directory path (a FIFO, a socket, a device
    such as /dev/null became a regular file, and the run exited 0)."""
    out = special_file(kind, tmp_path / "out.npy")
    proc = run(binary, "--model", models["gmm_ctm"], "--out", out, "--num", "2", check=False)
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and expect in lines[0], proc.stderr
    assert not os.path.isfile(out) or kind == "symlink"
    assert kind != "symlink" or (out.is_symlink() and out.read_bytes() == b"target")


def test_out_may_not_be_a_device(binary, models):
    before = os.stat("/dev/null")
    proc = run(binary, "--model", models["gmm_ctm"], "--out", "/dev/null", "--num", "2",
               check=False)
    assert proc.returncode == 2 and "/dev/null: is a character device" in proc.stderr
    after = os.stat("/dev/null")
    assert (after.st_ino, after.st_rdev) == (before.st_ino, before.st_rdev)


def test_out_may_not_be_the_model(binary, models, tmp_path):
    model = tmp_path / "model.pt"
    model.write_bytes(models["gmm_ctm"].read_bytes())
    (tmp_path / "hard.npy").hardlink_to(model)
    (tmp_path / "soft.npy").symlink_to(model)
    for out in (model, tmp_path / "." / "model.pt", tmp_path / "hard.npy"):
        proc = run(binary, "--model", model, "--out", out, "--num", "2", check=False)
        assert proc.returncode == 2 and "is the model file" in proc.stderr, (out, proc.stderr)
    assert model.read_bytes() == models["gmm_ctm"].read_bytes()
    # an image model named like the PNG grid of --out
    image = tmp_path / "samples.png"
    image.write_bytes(models["mlp"].read_bytes())
    proc = run(binary, "--model", image, "--out", tmp_path / "samples.npy", "--num", "2",
               check=False)
    assert proc.returncode == 2 and "--out's .png " in proc.stderr and "is the model file" \
        in proc.stderr, proc.stderr
    assert image.read_bytes() == models["mlp"].read_bytes()
    assert not (tmp_path / "samples.npy").exists()


def test_error_keeps_existing_output(binary, models, tmp_path):
    out = tmp_path / "keep.npy"
    out.write_bytes(b"previous run")
    proc = run(binary, "--model", models["nan"], "--out", out, "--num", "2", check=False)
    assert proc.returncode == 2 and out.read_bytes() == b"previous run"


# --- build configuration ---------------------------------------------------------------------

def test_configure_without_cuda_toolkit(tmp_path):
    """CMake configures against the (CUDA) torch wheel with no nvcc on PATH and no CUDA_HOME,
    locating torch through CMAKE_PREFIX_PATH and detecting the C++ ABI from libc10.so."""
    import os
    import shutil
    import torch.utils
    cmake = shutil.which("cmake")
    if cmake is None:
        pytest.skip("cmake not on PATH")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("CUDA") and k not in ("CUDACXX", "PATH")}
    env["PATH"] = os.pathsep.join(p for p in ("/usr/bin", "/bin", str(Path(cmake).parent)))
    assert shutil.which("nvcc", path=env["PATH"]) is None
    proc = subprocess.run([cmake, "-S", str(ROOT), "-B", str(tmp_path / "b"),
                           f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    has_cuda = (Path(torch.__file__).parent / "lib" / "libtorch_cuda.so").exists()
    abi = int(torch.compiled_with_cxx11_abi())
    assert (f"CUDA backend: {'ON' if has_cuda else 'OFF'}, _GLIBCXX_USE_CXX11_ABI={abi}"
            in proc.stdout)
    assert "nvcc" not in (tmp_path / "b" / "CMakeCache.txt").read_text()
