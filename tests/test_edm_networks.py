"""NVlabs EDM snapshots: the safe unpickler and ctmkit's own EDM networks.

Five random-weight pickles written by NVlabs/edm's code (tests/fixtures/edm, see its README)
must load without running their embedded ``module_src``, rebuild into plugins.edm's modules with
strict weight loading, and reproduce the reference outputs computed by NVlabs' code.
"""

import builtins
import os
import pickle
import sys
import types

import numpy as np
import pytest
import torch

from core.base.errors import UserError
from plugins.edm.precond import build_precond, labels_to_onehot, load_edm_network
from plugins.edm.unpickle import EasyDict, PersistentStub, edm_network_spec, load_edm_snapshot
from conftest import FIXTURES  # tests/fixtures/ (see its README)

EDM_DIR = FIXTURES / "edm"
NAMES = ["edm-ddpmpp-cond-aug", "edm-ncsnpp-uncond", "edm-adm-cond", "vp-ddpmpp-uncond",
         "ve-ncsnpp-uncond"]
CLASSES = {"edm-ddpmpp-cond-aug": ("EDMPrecond", "SongUNet"),
           "edm-ncsnpp-uncond": ("EDMPrecond", "SongUNet"),
           "edm-adm-cond": ("EDMPrecond", "DhariwalUNet"),
           "vp-ddpmpp-uncond": ("VPPrecond", "SongUNet"),
           "ve-ncsnpp-uncond": ("VEPrecond", "SongUNet")}

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")    # torch.jit.script


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """These nets are tiny: one intra-op thread is as fast and immune to a busy second core."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def snapshots():
    return {n: load_edm_snapshot(EDM_DIR / f"{n}.pkl") for n in NAMES}


def _ref(name, dtype=torch.float32):
    r = np.load(EDM_DIR / f"{name}.ref.npz")
    labels = torch.tensor(r["class_labels"], dtype=dtype)
    return (torch.tensor(r["x"], dtype=dtype), torch.tensor(r["sigma"], dtype=dtype),
            labels if labels.shape[1] else None, r["D"])


def _rel(out, ref):
    out = out.detach().double().numpy()
    return float(np.abs(out - ref).max() / np.abs(ref).max())


# -- parity with NVlabs' outputs -----------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_rebuilt_network_matches_reference(snapshots, name):
    spec = edm_network_spec(snapshots[name])
    assert (spec.class_name, spec.init_kwargs["model_type"]) == CLASSES[name]
    assert any(k.startswith("model.enc.16x16_conv.") for k in spec.state_dict)
    net = load_edm_network(snapshots[name])                       # strict load inside
    net.load_state_dict(spec.state_dict, strict=True)
    assert not net.training
    x, sigma, labels, D = _ref(name)
    with torch.no_grad():
        out = net(x, sigma, labels)
        assert out.dtype == torch.float32
        assert _rel(out, D) < 1e-5
        net64 = load_edm_network(snapshots[name]).double()
        x64, s64, l64, _ = _ref(name, torch.float64)
        out64 = net64(x64, s64, l64)
        assert out64.dtype == torch.float64
        assert _rel(out64, D) < 1e-4
        scripted = torch.jit.script(net)
        assert torch.allclose(scripted(x, sigma, labels), out, rtol=0, atol=1e-6)
        assert torch.equal(net(x, sigma, labels), out)              # eval mode: deterministic


@pytest.mark.parametrize("name", NAMES)
def test_student_with_teacher_weights_equals_teacher(snapshots, name):
    teacher = load_edm_network(snapshots[name])
    student = build_precond(*_spec_args(snapshots[name]), student=True)
    missing, unexpected = student.load_state_dict(edm_network_spec(snapshots[name]).state_dict,
                                                  strict=False)
    assert not unexpected and missing
    assert all(k.split(".")[1].startswith("s_") for k in missing), missing
    student.eval()
    x, sigma, labels, _ = _ref(name)
    with torch.no_grad():
        ref = teacher(x, sigma, labels)
        for s in (0.01, 3.0):
            assert torch.equal(student(x, sigma, labels, torch.full_like(sigma, s)), ref)
        assert torch.equal(student(x, sigma, labels), ref)
        # the s pathway is live: once its last layer is non-zero, the output depends on s
        torch.nn.init.normal_(student.model.s_map_layer1.weight, std=0.5)
        a = student(x, sigma, labels, torch.full_like(sigma, 0.01))
        b = student(x, sigma, labels, torch.full_like(sigma, 3.0))
        assert not torch.allclose(a, b)


def _spec_args(snap):
    spec = edm_network_spec(snap)
    return spec.class_name, spec.init_kwargs


def test_loader_helper_builds_student(snapshots):
    student = load_edm_network(snapshots["vp-ddpmpp-uncond"], student=True)
    teacher = load_edm_network(snapshots["vp-ddpmpp-uncond"])
    x, sigma, labels, _ = _ref("vp-ddpmpp-uncond")
    with torch.no_grad():
        assert torch.equal(torch.jit.script(student)(x, sigma, labels, sigma / 2),
                           teacher(x, sigma, labels))


def test_integer_labels_and_scalar_sigma(snapshots):
    net = load_edm_network(snapshots["edm-adm-cond"])
    x, sigma, onehot, _ = _ref("edm-adm-cond")
    idx = onehot.argmax(dim=1)
    assert torch.equal(labels_to_onehot(idx, 10, 6, torch.float32), onehot)
    with torch.no_grad():
        ref = net(x, sigma, onehot)
        assert torch.equal(net(x, sigma, idx), ref)
        assert torch.equal(torch.jit.script(net)(x, sigma, idx), ref)
        one = net(x, sigma[2:3], onehot)                         # a [1] sigma broadcasts
        assert torch.allclose(one[2], ref[2], atol=1e-6)


def test_jvp_vmap_and_autocast(snapshots):
    net = load_edm_network(snapshots["edm-ddpmpp-cond-aug"]).double()
    x, sigma, labels, _ = _ref("edm-ddpmpp-cond-aug", torch.float64)
    x, sigma, labels = x[:2], sigma[:2], labels[:2]

    def f(z):
        return net(z, sigma, labels)

    v = torch.randn_like(x)
    with torch.no_grad():
        _, jv = torch.func.jvp(f, (x,), (v,))
        h = 1e-6
        fd = (f(x + h * v) - f(x - h * v)) / (2 * h)
        assert float((jv - fd).abs().max() / fd.abs().max()) < 1e-6
        probes = torch.randn(2, *x.shape, dtype=torch.float64)
        _, jvs = torch.func.vmap(lambda u: torch.func.jvp(f, (x,), (u,)))(probes)
        assert torch.allclose(jvs[1], torch.func.jvp(f, (x,), (probes[1],))[1], atol=1e-10)

    net32 = load_edm_network(snapshots["edm-ddpmpp-cond-aug"])
    x32 = x.float()
    with torch.no_grad():
        ref = net32(x32, sigma.float(), labels.float())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = net32(x32, sigma.float(), labels.float())
    assert torch.isfinite(low).all()
    assert float((low.float() - ref).abs().max() / ref.abs().max()) < 0.05


# -- safety and bad input ------------------------------------------------------------------------

class _RunsSystem:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _RunsExec:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return builtins.exec, (f"open({str(self.marker)!r}, 'w').close()",)


@pytest.mark.parametrize("payload, global_name", [(_RunsSystem, "system"), (_RunsExec, "exec")])
def test_code_running_pickles_are_refused(tmp_path, payload, global_name):
    marker = tmp_path / "marker"
    path = tmp_path / "edm-x.pkl"
    path.write_bytes(pickle.dumps({"ema": payload(marker)}))
    with pytest.raises(UserError) as e:
        load_edm_snapshot(path)
    msg = str(e.value)
    assert "\n" not in msg and "edm-x.pkl" in msg and global_name in msg and "refuses" in msg
    assert not marker.exists()


def test_module_src_is_never_executed(snapshots, tmp_path, monkeypatch):
    stub = snapshots["edm-ddpmpp-cond-aug"]["ema"]
    assert isinstance(stub, PersistentStub) and stub.class_name == "EDMPrecond"
    calls = []

    def refuse(*args, **kwargs):
        calls.append(args)
        raise AssertionError("exec/compile called while loading")

    monkeypatch.setattr(builtins, "exec", refuse)
    monkeypatch.setattr(builtins, "compile", refuse)
    load_edm_snapshot(EDM_DIR / "edm-ncsnpp-uncond.pkl")
    monkeypatch.undo()
    assert not calls

    # a persistent object whose module_src would write a marker, with EasyDict meta
    marker = tmp_path / "marker"
    util, persistence = types.ModuleType("dnnlib.util"), types.ModuleType("torch_utils.persistence")

    class FakeEasyDict(dict):
        pass

    FakeEasyDict.__module__, FakeEasyDict.__qualname__ = "dnnlib.util", "EasyDict"
    util.EasyDict = FakeEasyDict

    def _reconstruct_persistent_obj(meta):
        raise AssertionError("never called while pickling")

    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    persistence._reconstruct_persistent_obj = _reconstruct_persistent_obj

    class Net:
        def __reduce__(self):
            meta = FakeEasyDict(type="class", version=6, class_name="training.networks.VEPrecond",
                                module_src=f"open({str(marker)!r}, 'w').close()",
                                state=dict(_init_kwargs=dict(img_resolution=16, img_channels=3),
                                           _parameters={}, _buffers={}, _modules={}))
            return _reconstruct_persistent_obj, (meta,)

    for name, mod in [("dnnlib", types.ModuleType("dnnlib")), ("dnnlib.util", util),
                      ("torch_utils", types.ModuleType("torch_utils")),
                      ("torch_utils.persistence", persistence)]:
        monkeypatch.setitem(sys.modules, name, mod)
    path = tmp_path / "fake.pkl"
    path.write_bytes(pickle.dumps(dict(ema=Net(), dataset_kwargs=FakeEasyDict(a=1))))
    monkeypatch.undo()
    snap = load_edm_snapshot(path)
    assert type(snap["dataset_kwargs"]) is EasyDict and snap["dataset_kwargs"].a == 1
    spec = edm_network_spec(snap)
    assert spec.class_name == "VEPrecond" and spec.state_dict == {}
    assert not marker.exists()
    with pytest.raises(UserError, match="do not fit"):                   # no weights in it
        load_edm_network(snap)


def test_bad_files_are_one_line_user_errors(tmp_path, snapshots):
    data = (EDM_DIR / "edm-adm-cond.pkl").read_bytes()
    cases = {"truncated.pkl": data[: len(data) // 2], "short.pkl": data[:40],
             "foreign.pkl": pickle.dumps({"foo": 1}), "text.pkl": b"hello, not a pickle\n",
             "empty.pkl": b""}
    for name, blob in cases.items():
        path = tmp_path / name
        path.write_bytes(blob)
        with pytest.raises(UserError) as e:
            load_edm_snapshot(path)
        assert "\n" not in str(e.value) and name in str(e.value), str(e.value)
    with pytest.raises(UserError, match="missing.pkl"):
        load_edm_snapshot(tmp_path / "missing.pkl")


def test_unknown_network_class_is_named(snapshots):
    snap = dict(snapshots["edm-adm-cond"])
    stub = snap["ema"]
    odd = PersistentStub(dict(class_name="training.networks.iDDPMPrecond", state=stub.state))
    snap["ema"] = odd
    with pytest.raises(UserError, match="iDDPMPrecond"):
        edm_network_spec(snap)
    with pytest.raises(UserError, match="iDDPMPrecond"):
        build_precond("iDDPMPrecond", {"img_resolution": 16, "img_channels": 3})
    with pytest.raises(UserError, match="DiT"):
        build_precond("EDMPrecond", {"img_resolution": 16, "img_channels": 3, "model_type": "DiT"})
    with pytest.raises(UserError, match="bogus"):
        build_precond("EDMPrecond", {"img_resolution": 16, "img_channels": 3,
                                     "model_type": "SongUNet", "bogus": 1})
