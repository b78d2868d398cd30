"""AOTInductor (.pt2) jumpers: core.export.aoti.export_aoti / load_aoti against the eager jumper, and
the C++ ``ctm_sample`` on the .pt2 against core.export.sampling.draw; one-line errors for bad files.

AOTInductor compiles C++ (seconds per model on CPU), so every model is exported once per
session (the ``packages`` fixture); the broken and foreign packages are made by rewriting the
metadata of a compiled one, without compiling again.
"""

from __future__ import annotations

import json
import os
import stat
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from core.export.aoti import export_aoti, load_aoti  # noqa: E402
from core.base.dtypes import DTYPES  # noqa: E402
from core.base.errors import UserError  # noqa: E402
from core.base.integrity import sidecar_path, write_sidecar  # noqa: E402
from core.export.jumper import Jumper, TeacherAsNetwork, export  # noqa: E402
from core.export.sampling import draw  # noqa: E402
from plugins.preconditionings import CTMPrecond  # noqa: E402
from plugins.samplers import CTMSampler  # noqa: E402
from test_cpp_sampler import (SIGMA_DATA, MLPNet, gmm_teacher,  # noqa: E402,F401
                              meta_for, parity_jumpers, run)

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:.*TorchScript.*:FutureWarning")]


# --- the packages (compiled once per session) ------------------------------------------------

@pytest.fixture(scope="session")
def packages(tmp_path_factory) -> dict[str, tuple[Path, nn.Module]]:
    """name -> (.pt2 path, eager jumper)."""
    d = tmp_path_factory.mktemp("aoti")
    T = gmm_teacher()
    out = {}

    def save(name, jumper, meta):
        path = d / f"{name}.pt2"
        export_aoti(jumper, path, meta)
        out[name] = (path, jumper.eval())

    for name, jumper, meta in parity_jumpers(T):
        save(name, jumper, meta)
    return out


def with_metadata(src: Path, dst: Path, **changes) -> Path:
    """A copy of the package `src` whose AOTInductor metadata has `changes` applied (a value of
    None removes the key)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for item in zin.infolist():
            data = zin.read(item)
            if item.filename.endswith("_metadata.json"):
                md = json.loads(data)
                for key, value in changes.items():
                    if value is None:
                        md.pop(key, None)
                    else:
                        md[key] = value
                data = json.dumps(md).encode()
            zout.writestr(item, data)
    write_sidecar(dst, dst.read_bytes())     # an altered package with a matching digest file
    return dst


DROP = object()


def meta_text(path: Path, **changes) -> str:
    """meta.json of the package `path` with `changes` applied (DROP removes a key)."""
    _, meta = load_aoti(path)
    meta.update(changes)
    return json.dumps({k: v for k, v in meta.items() if v is not DROP})


@pytest.fixture(scope="session")
def bad_packages(packages, tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("aoti_bad")
    good = packages["gmm_ctm"][0]
    data = good.read_bytes()
    out = {"truncated": d / "truncated.pt2", "garbage": d / "garbage.pt2",
           "torchscript": d / "torchscript.pt2"}
    out["truncated"].write_bytes(data[: len(data) // 2])
    out["garbage"].write_text("this is not an AOTInductor package\n")
    P = CTMPrecond()
    T = gmm_teacher()
    export(Jumper(TeacherAsNetwork(T.denoiser(torch.float32), SIGMA_DATA), P, SIGMA_DATA),
           out["torchscript"], meta_for(P, T.shape))   # a TorchScript archive named .pt2
    out["as_pt"] = d / "package_as.pt"                 # a package named .pt
    out["as_pt"].write_bytes(data)
    for name in ("truncated", "garbage", "torchscript"):   # matching digests: the loader's
        write_sidecar(out[name], out[name].read_bytes())   # own checks are under test
    for name, changes in {
        "no_meta": {"meta.json": None},
        "meta_json": {"meta.json": '{"format": '},
        "meta_missing": {"meta.json": meta_text(good, rho=DROP)},
        "meta_format": {"meta.json": meta_text(good, format="something.else")},
        "meta_t_order": {"meta.json": meta_text(good, t_min=90.0)},
        "meta_classes": {"meta.json": meta_text(good, num_classes=3)},
        "no_inputs": {"ctmkit.inputs": None},
    }.items():
        out[name] = with_metadata(good, d / f"{name}.pt2", **changes)
    # an Analytic jumper whose meta.json claims a t_min below its coefficient table: the
    # table's range check (an assert op in the compiled graph) fires during sampling
    analytic = packages["gmm_analytic"][0]
    out["analytic_wide"] = with_metadata(analytic, d / "analytic_wide.pt2",
                                         **{"meta.json": meta_text(analytic, t_min=1e-4)})
    return out


# --- Python: .pt2 vs eager -------------------------------------------------------------------

@pytest.mark.parametrize("name", ["gmm_ctm", "gmm_ctm64", "gmm_analytic", "mlp", "mlp_cond"])
def test_pt2_matches_eager(packages, name):
    path, eager = packages[name]
    loaded, meta = load_aoti(path)
    assert meta["format"] == "ctmkit.jumper" and meta["precond"] == eager.precond.name
    dtype = DTYPES[meta["dtype"]]
    gen = torch.Generator().manual_seed(0)
    for b in (1, 2, 7):      # the batch dimension is dynamic, 1 included
        x = torch.randn([b] + meta["shape"], generator=gen, dtype=dtype) * 5
        t = torch.full((b,), 20.0, dtype=dtype)
        s = torch.full((b,), 0.05, dtype=dtype)
        labels = torch.arange(b) % 3 if meta["num_classes"] else None
        with torch.no_grad():
            want = eager(x, t, s, labels)
            got = loaded(x, t, s, labels)
        assert got.shape == want.shape and got.dtype == want.dtype
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


def test_pt2_labels_reach_network(packages):
    path, _ = packages["mlp_cond"]
    loaded, _ = load_aoti(path)
    x, t, s = torch.randn(2, 1, 3, 5), torch.full((2,), 3.0), torch.full((2,), 1.0)
    a = loaded(x, t, s, torch.tensor([0, 0]))
    b = loaded(x, t, s, torch.tensor([1, 1]))
    assert not torch.allclose(a, b)
    with pytest.raises(ValueError, match="needs class_labels"):
        loaded(x, t, s)


def test_pt2_analytic_range_check(packages, bad_packages):
    loaded, _ = load_aoti(packages["gmm_analytic"][0])
    x = torch.randn(3, 2)
    with pytest.raises(RuntimeError, match="outside the coefficient table"):
        loaded(x, torch.full((3,), 80.0), torch.full((3,), 1e-4))


def test_python_draw_with_pt2(packages):
    path, eager = packages["mlp"]
    loaded, meta = load_aoti(path)
    sampler = CTMSampler(0.5)
    ts = sampler.timesteps(3, meta["t_min"], meta["t_max"], meta["rho"])
    a, _ = draw(eager, meta, sampler, ts, 9, 4, 3, progress=False)
    b, _ = draw(loaded, meta, sampler, ts, 9, 4, 3, progress=False)
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5 * max(1.0, float(np.abs(a).max())))


def test_export_is_atomic_and_checked(packages, tmp_path):
    path, _ = packages["gmm_ctm"]
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask

    class DataDependent(nn.Module):     # not exportable: a Python branch on tensor values
        def forward(self, x: Tensor, t: Tensor, s: Tensor, class_labels=None) -> Tensor:
            return x if bool(x.sum() > 0) else -x

    target = tmp_path / "bad.pt2"
    target.write_bytes(b"previous")
    P = CTMPrecond()
    with pytest.raises(Exception):
        export_aoti(Jumper(DataDependent(), P, SIGMA_DATA), target, meta_for(P, [2]))
    assert target.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.pt2"]
    with pytest.raises(UserError, match="meta.json lacks rho"):
        export_aoti(Jumper(DataDependent(), P, SIGMA_DATA), target,
                    {k: v for k, v in meta_for(P, [2]).items() if k != "rho"})
    with pytest.raises(UserError, match="must be named"):
        export_aoti(Jumper(MLPNet([2]), P, SIGMA_DATA), tmp_path / "jumper.pt", meta_for(P, [2]))
    with pytest.raises(TypeError, match="eager jumper"):
        export_aoti(torch.jit.script(Jumper(MLPNet([2]), P, SIGMA_DATA)), target,
                    meta_for(P, [2]))


@pytest.mark.parametrize("name,expect", [
    ("missing", "jumper file not found"),
    ("truncated", "not a loadable AOTInductor package"),
    ("garbage", "not a loadable AOTInductor package"),
    ("torchscript", "not a loadable AOTInductor package"),
    ("no_meta", "not a ctmkit jumper (no meta.json inside)"),
    ("meta_json", "meta.json is not valid JSON"),
    ("meta_missing", "meta.json lacks rho"),
    ("meta_format", "not a ctmkit jumper (meta.json format is 'something.else')"),
    ("meta_t_order", "meta.json is inconsistent"),
    ("meta_classes", "num_classes = 3 but the package takes (x,t,s)"),
    ("no_inputs", "package takes (unknown inputs)"),
])
def test_load_aoti_errors(bad_packages, tmp_path, name, expect):
    path = bad_packages.get(name, tmp_path / "missing.pt2")
    with pytest.raises(UserError) as info:
        load_aoti(path)
    message = str(info.value)
    assert "\n" not in message and message.startswith(str(path)) and expect in message


def test_load_aoti_device_mismatch(packages):
    with pytest.raises(UserError, match="compiled for cpu, not for cuda"):
        load_aoti(packages["gmm_ctm"][0], "cuda")


# --- ctm_sample on .pt2 vs core.export.sampling.draw ------------------------------------------------

def python_samples(jumper, meta, *, steps=2, num=10, batch=4, seed=0, gamma=0.0,
                   timesteps=None, class_label=None):
    sampler = CTMSampler(gamma)
    ts = timesteps or sampler.timesteps(steps, meta["t_min"], meta["t_max"], meta["rho"])
    return draw(jumper, meta, sampler, ts, num, batch, seed, "cpu", class_label,
                progress=False)


def cpp_samples(binary, model: Path, out: Path, *, steps=2, num=10, batch=4, seed=0,
                gamma=0.0, timesteps=None, class_label=None, extra=()):
    args = ["--model", model, "--out", out, "--num", num, "--batch", batch, "--seed", seed,
            "--gamma", gamma, *extra]
    args += ["--timesteps", ",".join(repr(t) for t in timesteps)] if timesteps else \
        ["--steps", steps]
    if class_label is not None:
        args += ["--class-label", class_label]
    proc = run(binary, *args)
    x = np.load(out)
    labels_path = out.with_name(out.stem + ".labels.npy")
    return x, (np.load(labels_path) if labels_path.exists() else None), proc


def assert_parity(binary, packages, name, tmp_path, **kw):
    """ctm_sample on the .pt2 against draw() with the same .pt2 loaded in Python (the same
    compiled kernels) and against draw() with the eager jumper (float rounding)."""
    path, eager = packages[name]
    loaded, meta = load_aoti(path)
    x_cpp, y_cpp, _ = cpp_samples(binary, path, tmp_path / "samples.npy", **kw)
    for jumper, rtol in ((loaded, 1e-6), (eager, 1e-5)):
        x_py, y_py = python_samples(jumper, meta, **kw)
        assert x_cpp.dtype == np.float32 and x_cpp.shape == x_py.shape
        scale = max(1.0, float(np.abs(x_py).max()))
        np.testing.assert_allclose(x_cpp, x_py, rtol=rtol, atol=rtol * scale)
        if y_py is None:
            assert y_cpp is None
        else:
            np.testing.assert_array_equal(y_cpp, y_py)
    return x_cpp, y_cpp


def test_cpp_parity_gmm_ctm(binary, packages, tmp_path):
    # num=9, batch=4: the last batch has one sample
    x, _ = assert_parity(binary, packages, "gmm_ctm", tmp_path, steps=3, num=9, batch=4, seed=1)
    assert x.shape == (9, 2) and np.isfinite(x).all()


def test_cpp_parity_gmm_float64(binary, packages, tmp_path):
    assert_parity(binary, packages, "gmm_ctm64", tmp_path, steps=2, num=6, batch=6, seed=3)


def test_cpp_parity_gmm_analytic_forward(binary, packages, tmp_path):
    assert_parity(binary, packages, "gmm_analytic", tmp_path, steps=2, num=8, batch=3, seed=2)
    assert_parity(binary, packages, "gmm_analytic", tmp_path, num=5, batch=4, seed=2,
                  gamma=0.7, timesteps=[80.0, 3.0, 0.2, 0.002])


def test_cpp_parity_network(binary, packages, tmp_path):
    assert_parity(binary, packages, "mlp", tmp_path, steps=4, num=13, batch=5, seed=7)
    assert_parity(binary, packages, "mlp", tmp_path, steps=3, num=7, batch=4, seed=5,
                  gamma=0.5)


def test_cpp_parity_conditional(binary, packages, tmp_path):
    _, y = assert_parity(binary, packages, "mlp_cond", tmp_path, steps=2, num=11, batch=4,
                         seed=4)
    assert y.shape == (11,) and set(y.tolist()) <= {0, 1, 2} and len(set(y.tolist())) > 1
    _, y = assert_parity(binary, packages, "mlp_cond", tmp_path, steps=2, num=6, batch=4,
                         seed=4, class_label=2, gamma=0.3)
    assert (y == 2).all()
    assert (tmp_path / "samples.png").is_file()


def test_cpp_warmup_does_not_change_samples(binary, packages, tmp_path):
    path, _ = packages["mlp"]
    a, _, proc = cpp_samples(binary, path, tmp_path / "a.npy", num=7, batch=3,
                             extra=("--warmup", "0", "--timing", "--quiet"))
    b, _, _ = cpp_samples(binary, path, tmp_path / "b.npy", num=7, batch=3,
                          extra=("--warmup", "3"))
    np.testing.assert_array_equal(a, b)
    line = proc.stderr.strip()
    assert line.startswith("ctm_sample: timing: load=") and "backend=aoti" in line


# --- ctm_sample errors -----------------------------------------------------------------------

def assert_error(binary, tmp_path, *args, expect: str, env=None):
    out = tmp_path / "out.npy"
    proc = run(binary, "--out", out, *args, check=False, env=env)
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("ctm_sample: error: "), proc.stderr
    assert expect in lines[0], lines[0]
    assert not list(tmp_path.iterdir())
    return lines[0]


@pytest.mark.parametrize("name,expect", [
    ("missing", "jumper file not found"),
    ("truncated", "not a loadable AOTInductor package"),
    ("garbage", "not a loadable AOTInductor package"),
    ("torchscript", "not a loadable AOTInductor package"),
    ("as_pt", "not a ctmkit jumper (no meta.json inside)"),
    ("no_meta", "not a ctmkit jumper (no meta.json inside)"),
    ("meta_json", "meta.json is not valid JSON"),
    ("meta_missing", "meta.json lacks rho"),
    ("meta_format", "not a ctmkit jumper (meta.json format is 'something.else')"),
    ("meta_t_order", "meta.json is inconsistent (0 < t_min < t_max is required)"),
    ("meta_classes", "num_classes = 3 but the package takes no class_labels"),
    ("no_inputs", "the package's inputs are (unknown)"),
])
def test_cpp_bad_packages(binary, bad_packages, tmp_path, name, expect):
    path = bad_packages.get(name, tmp_path.parent / "missing.pt2")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    line = assert_error(binary, out_dir, "--model", path, expect=expect)
    assert str(path) in line


def test_cpp_jumper_failure_is_one_line(binary, bad_packages, tmp_path):
    """The compiled graph's assert fires mid-sampling; the model library's own "Error: ..."
    line on stderr is held back, the message comes out once."""
    line = assert_error(binary, tmp_path, "--model", bad_packages["analytic_wide"],
                        "--timesteps", "80,1,0.0001", "--num", "4", "--warmup", "0",
                        expect="the jumper failed: ")
    assert "outside the coefficient table range" in line


# --- the whole-package digest (sidecar) and temporary folders --------------------------------

def flipped_library(src: Path, dst: Path) -> Path:
    """A copy of the package `src` with one bit flipped in its shared library (the sidecar is
    not copied: the digest file is the original's)."""
    data = bytearray(src.read_bytes())
    with zipfile.ZipFile(src) as zf:
        (info,) = [i for i in zf.infolist() if i.filename.endswith(".so")]
    offset = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    data[offset + info.compress_size // 3] ^= 0x20
    dst.write_bytes(bytes(data))
    sidecar_path(dst).write_bytes(sidecar_path(src).read_bytes())
    return dst


def without_library(src: Path, dst: Path) -> Path:
    """The package `src` without its shared library, with a matching sidecar: the digest
    passes, extraction and loading fail."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for item in zin.infolist():
            if not item.filename.endswith(".so"):
                zout.writestr(item, zin.read(item))
    write_sidecar(dst, dst.read_bytes())
    return dst


def aoti_folders(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if "aoti" in p.name)


def test_pt2_has_a_sidecar(packages):
    path, _ = packages["gmm_ctm"]
    import hashlib
    assert sidecar_path(path).read_text() == \
        f"{hashlib.sha256(path.read_bytes()).hexdigest()}  {path.name}\n"


def test_flipped_library_is_refused_before_loading(binary, packages, tmp_path, monkeypatch):
    """Before the sidecar, a flipped bit in the library reached dlopen (ctm_sample: SIGSEGV or
    SIGABRT)."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    bad = flipped_library(packages["mlp"][0], tmp_path / "flipped.pt2")
    with pytest.raises(UserError, match="jumper is corrupt or altered .its SHA-256 does not "
                                        "match flipped.pt2.sha256"):
        load_aoti(bad)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    assert_error(binary, out_dir, "--model", bad, expect="jumper is corrupt or altered",
                 env={"TMPDIR": str(tmp)})
    assert aoti_folders(tmp) == []


def test_pt2_without_sidecar_needs_reexport(binary, packages, tmp_path):
    path = tmp_path / "moved.pt2"
    path.write_bytes(packages["gmm_ctm"][0].read_bytes())
    with pytest.raises(UserError, match="no digest file moved.pt2.sha256 beside it"):
        load_aoti(path)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    line = assert_error(binary, out_dir, "--model", path, expect="re-export")
    assert "moved.pt2.sha256" in line


def test_failed_loads_leave_no_temporary_folders(binary, packages, tmp_path, monkeypatch):
    """AOTInductor extracts into $TMPDIR/aotinductor_* and kept that folder when loading
    failed; Python and ctm_sample now load from a private folder, removed whatever happens."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    monkeypatch.setenv("TMPDIR", str(tmp))
    bad = without_library(packages["mlp"][0], tmp_path / "nolib.pt2")
    with pytest.raises(UserError, match="not a loadable AOTInductor package"):
        load_aoti(bad)
    assert aoti_folders(tmp) == []
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    assert_error(binary, out_dir, "--model", bad, expect="not a loadable AOTInductor",
                 env={"TMPDIR": str(tmp)})
    assert aoti_folders(tmp) == []
    # and a good load: the folder lives as long as the jumper
    jumper, _ = load_aoti(packages["mlp"][0])
    assert len(aoti_folders(tmp)) == 1
    del jumper
    import gc
    gc.collect()
    assert aoti_folders(tmp) == []
    run(binary, "--model", packages["mlp"][0], "--out", out_dir / "x.npy", "--num", "2",
        env={"TMPDIR": str(tmp)})
    assert aoti_folders(tmp) == []
