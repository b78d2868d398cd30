"""Bounds on what a file or a config may ask for, and errors that stay one line (issue 20,
items 3 and 4): nesting of TOML and JSON, counts, HDF5 headers, EDM pickles' object graphs
and constructor kwargs, state dicts, --set syntax, control characters, numpy / Pillow
warnings, 16-bit PNGs. Each test is fast and would fail on the code before these bounds."""

import io
import pickle
import time
import types
import warnings

import h5py
import numpy as np
import pytest
import torch
from torch import nn

from core.host import config as C
from core.base.bounds import check_state_dict, load_json
from core.host.config import Section, apply_override, load_config
from core.data.source import load_arrays, read_array_file
from core.data.datasets import load as load_dataset
from core.base.errors import UserError
from core.pipeline.ledger import Ledger

QUICK = """
[teacher]
kind = "gmm"
weights = [1.0]
means = [[0.0, 0.0]]
stds = [1.0]
"""


def _config(tmp_path, text: str):
    p = tmp_path / "config.toml"
    p.write_text(text)
    return p


def _refused_fast(fn, *match: str, seconds: float = 2.0) -> str:
    """fn() raises a one-line UserError mentioning every string of `match`, within `seconds`."""
    t0 = time.perf_counter()
    with pytest.raises(UserError) as e:
        fn()
    took = time.perf_counter() - t0
    msg = str(e.value)
    assert "\n" not in msg, msg
    for m in match:
        assert m in msg, msg
    assert took < seconds, f"took {took:.2f}s: {msg}"
    return msg


# --- TOML -----------------------------------------------------------------------------------

@pytest.mark.parametrize("body", [
    "[run]\nseed = " + "[" * 10_000 + "]" * 10_000 + "\n",          # tomllib: RecursionError
    "[run]\nseed = " + "{a = " * 3_000 + "1" + "}" * 3_000 + "\n",   # inline tables
    QUICK + "[evaluate.metric]\n" + "a." * 20_000 + "b = 1\n",      # tomllib: quadratic
], ids=["arrays", "inline-tables", "dotted-key"])
def test_deep_toml_is_refused_in_milliseconds(tmp_path, body):
    _refused_fast(lambda: load_config(_config(tmp_path, body)), "the bound is 32", seconds=1.0)


def test_moderate_nesting_and_brackets_in_strings_are_fine(tmp_path):
    text = QUICK.replace('kind = "gmm"', 'kind = "gmm"  # [[[[ a comment\n'
                         'label = "' + "[" * 100 + '"') + '\n[export]\npath = "a.b.c.pt"\n'
    cfg = load_config(_config(tmp_path, text))          # the scan skips strings and comments
    assert cfg.teacher.data["label"] == "[" * 100 and cfg.export.path.name == "a.b.c.pt"


@pytest.mark.parametrize("item,match", [
    ('export.path="jumper.pt', "unclosed quote"),
    ("export.path='jumper.pt", "unclosed quote"),
    ("sample.timesteps=[80.0, 0.002", "unclosed quote or bracket"),
    ('export.path="a\nb.pt"', "line break"),
    ("export.path=a\nb", "line break"),
    ("run.seed=" + "[" * 5000 + "]" * 5000, "the bound is 32"),
], ids=lambda v: v[:30] if isinstance(v, str) else None)
def test_set_with_unclosed_quote_or_newline_is_an_error(item, match):
    msg = _refused_fast(lambda: apply_override({}, item), match)
    assert msg.startswith("--set ")


def test_set_bare_words_stay_strings():
    raw = {}
    apply_override(raw, "export.path=jumper2.pt")
    apply_override(raw, "sample.runner= ctm_sample ")
    assert raw == {"export": {"path": "jumper2.pt"}, "sample": {"runner": "ctm_sample"}}


@pytest.mark.parametrize("item,match", [
    ("distill.iterations=1000000000", "<= 100,000,000"),
    ("teacher_train.checkpoint_every=1000000000000", "<= 100,000,000"),
    ("distill.keep_checkpoints=100000", "<= 1,000"),
    ("evaluate.steps=[1, 1000000000]", "<= 100,000"),
    ("distill.eval_steps=[1000000000]", "<= 100,000"),
    ("distill.ema=[" + ", ".join(["0.9"] * 17) + "]", "the bound is 16"),
    ("evaluate.steps=[" + ", ".join(["1"] * 1001) + "]", "the bound is 1,000"),
    ("evaluate.metrics=[" + ", ".join(['"fid"'] * 1001) + "]", "the bound is 1,000"),
], ids=lambda v: v[:40] if isinstance(v, str) else None)
def test_counts_beyond_their_bound_name_the_key(tmp_path, item, match):
    cfg = _config(tmp_path, QUICK)
    key = item.split("=")[0].split(".")[1]
    _refused_fast(lambda: load_config(cfg, [item]), key, match)


def test_a_path_with_a_newline_stays_one_line(tmp_path):
    missing = tmp_path / "evil\nname\r.toml"
    msg = _refused_fast(lambda: load_config(missing), "config file not found")
    assert "evil\\nname\\r.toml" in msg
    assert str(UserError("a\x1b[31mred\ttab")) == "a\\x1b[31mred\\ttab"


def test_unet_plugin_bounds(tmp_path):
    from plugins.unet import _unet
    ctx = types.SimpleNamespace(diffusion=types.SimpleNamespace(sigma_data=0.5))

    def build(**opts):
        return _unet(Section("network", opts, "c.toml", tmp_path), ctx, shape=(3, 32, 32),
                     num_classes=0, student=False)
    _refused_fast(lambda: build(num_blocks=10 ** 6), "num_blocks", "<= 64")
    _refused_fast(lambda: build(channel_mult=[1, 1000]), "channel_mult", "<= 64")
    _refused_fast(lambda: build(model_channels=4096, channel_mult=[64, 64]), "parameters",
                  "the bound is")


# --- JSON -------------------------------------------------------------------------------------

def test_deep_or_huge_json_is_refused():
    deep = "[" * 100_000 + "]" * 100_000
    _refused_fast(lambda: load_json(deep, "f", "meta.json"), "meta.json", "the bound is 32")
    _refused_fast(lambda: load_json(b'{"a": "' + b"x" * 100 + b'"}', "f", max_bytes=50),
                  "the bound is 50")
    assert load_json('{"a": ["[[[[", {"b": 1}]}', "f") == {"a": ["[[[[", {"b": 1}]}


def test_a_deep_stages_json_is_not_trusted(tmp_path):
    (tmp_path / "stages.json").write_text("[" * 100_000 + "]" * 100_000)
    assert Ledger(tmp_path).records == {}                  # was: RecursionError


def test_a_deep_edm_dataset_json_is_one_line(tmp_path):
    from PIL import Image
    root = tmp_path / "ds"
    root.mkdir()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(root / "a.png")
    (root / "dataset.json").write_text('{"labels": ' + "[" * 50 + "]" * 50 + "}")
    _refused_fast(lambda: load_dataset(Section("data", {"format": "edm", "path": str(root)},
                                               "c.toml", tmp_path),
                                       types.SimpleNamespace(base_dir=tmp_path)),
                  "dataset.json", "the bound is 32")


# --- data files ---------------------------------------------------------------------------------

def test_hdf5_header_claiming_more_than_the_file_holds(tmp_path):
    p = tmp_path / "x.h5"
    with h5py.File(p, "w") as f:
        f.create_dataset("x", shape=(10 ** 7, 2), dtype="f8")  # 160 MB claimed, nothing stored
    assert p.stat().st_size < 10_000
    _refused_fast(lambda: load_arrays(p, (2,)), "header claims", "[10000000, 2]")


def test_hdf5_non_numeric_dataset(tmp_path):
    p = tmp_path / "x.h5"
    with h5py.File(p, "w") as f:
        f["x"] = np.array([b"a", b"b"], dtype="S1")
    _refused_fast(lambda: load_arrays(p, ()), "only numeric arrays")


@pytest.mark.parametrize("exc", [OSError, KeyError, ValueError, TypeError, RuntimeError,
                                 IndexError])
def test_every_h5py_exception_type_is_one_line(tmp_path, monkeypatch, exc):
    p = tmp_path / "x.h5"
    with h5py.File(p, "w") as f:
        f["x"] = np.zeros((4, 2))

    def fail(self, *args):
        raise exc("broken\nchunk")
    monkeypatch.setattr(h5py.Dataset, "__getitem__", fail)
    _refused_fast(lambda: read_array_file(p), "unreadable data file", exc.__name__)


def test_numpy_warnings_become_the_error(tmp_path):
    np.save(tmp_path / "c.npy", np.ones((4, 2), np.complex128))   # was: ComplexWarning
    with warnings.catch_warnings(record=True) as printed:
        warnings.simplefilter("always")
        _refused_fast(lambda: load_arrays(tmp_path / "c.npy", (2,)), "finite real numbers")
        np.save(tmp_path / "big.npy", np.full((4, 2), 1e300))   # overflows float32: was inf
        _refused_fast(lambda: load_dataset(Section("data", {"format": "array",
                                                            "path": str(tmp_path / "big.npy")},
                                                   "c.toml", tmp_path),
                                           types.SimpleNamespace(base_dir=tmp_path)),
                      "do not fit float32")
    assert not printed, [str(w.message) for w in printed]        # nothing beside the line


def _png(array, **kw) -> bytes:
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(array, **kw).save(buf, "PNG")
    return buf.getvalue()


def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    from plugins.datasets import _decode_image
    x = np.array([[0, 128, 129, 257, 32896, 65535, 65280, 1000]], np.uint16)
    want = np.array([[0, 0, 1, 1, 128, 255, 254, 4]], np.uint8)         # round(x / 257)
    assert np.array_equal(_decode_image(_png(x), tmp_path / "a.png", "L", None), want)
    rgb = _decode_image(_png(x), tmp_path / "a.png", "RGB", None)
    assert all(np.array_equal(rgb[..., c], want) for c in range(3))


def test_pillow_decompression_bomb_warning_is_the_error(tmp_path, monkeypatch):
    from PIL import Image
    root = tmp_path / "imgs"
    root.mkdir()
    (root / "a.png").write_bytes(_png(np.zeros((8, 8, 3), np.uint8)))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 40)      # 64 pixels: warns (< 2x: no error)
    with warnings.catch_warnings(record=True) as printed:
        warnings.simplefilter("always")
        _refused_fast(lambda: load_dataset(Section("data", {"format": "folder",
                                                            "path": str(root)}, "c.toml",
                                                   tmp_path),
                                           types.SimpleNamespace(base_dir=tmp_path)),
                      "a.png", "decompression bomb")
    assert not printed, [str(w.message) for w in printed]


# --- EDM pickles ----------------------------------------------------------------------------------

def edm_pickle(state: dict, class_name: str = "training.networks.EDMPrecond") -> bytes:
    """An EDM snapshot {ema: persistent object(class_name, state)} written opcode by opcode
    (no fake modules needed): the persistent object's meta dict pickled with protocol 4, its
    frame header dropped, inside _reconstruct_persistent_obj(meta)."""
    inner = pickle.dumps(dict(type="class", version=6, class_name=class_name, state=state),
                         protocol=4)
    assert inner[2:3] == b"\x95" and len(inner) < 65536          # one frame
    return (b"\x80\x04}\x8c\x03ema" + b"ctorch_utils.persistence\n_reconstruct_persistent_obj\n"
            + inner[11:-1] + b"\x85Rs.")


def _state(**init_kwargs) -> dict:
    return dict(_init_kwargs={"img_resolution": 8, "img_channels": 1, **init_kwargs},
                _parameters={}, _buffers={}, _modules={})


def test_billion_laughs_init_kwargs_are_refused_in_milliseconds(tmp_path):
    from plugins.edm.unpickle import load_edm_snapshot
    bomb = []
    for _ in range(40):
        bomb = [bomb, bomb]                        # 2^40 lists when walked, 41 in the file
    p = tmp_path / "bomb.pkl"
    p.write_bytes(edm_pickle(_state(augment_dim=bomb)))
    assert p.stat().st_size < 2000
    _refused_fast(lambda: load_edm_snapshot(p), "bomb.pkl", "billion laughs",
                  "the bound is 1,000,000", seconds=0.5)


def test_deep_submodule_dag_is_refused_in_milliseconds(tmp_path):
    from plugins.edm.unpickle import load_edm_snapshot
    m = nn.Module()
    for _ in range(40):
        parent = nn.Module()
        parent.a, parent.b = m, m                  # each level doubles a recursive walk
        m = parent
    state = _state()
    state["_modules"] = {"model": m}
    p = tmp_path / "dag.pkl"
    p.write_bytes(edm_pickle(state))
    _refused_fast(lambda: load_edm_snapshot(p), "dag.pkl", "the bound is", seconds=0.5)


def test_deeply_nested_init_kwargs_are_refused(tmp_path):
    from plugins.edm.unpickle import load_edm_snapshot
    deep = 1
    for _ in range(300):                           # 300 levels (the pickler itself recurses)
        deep = [deep]
    p = tmp_path / "deep.pkl"
    p.write_bytes(edm_pickle(_state(augment_dim=deep)))
    _refused_fast(lambda: load_edm_snapshot(p), "nest more than 100 levels")


@pytest.mark.parametrize("kwargs,match", [
    (dict(label_dim=-3), "label_dim = -3 is beyond the bound [0, 100,000]"),
    (dict(img_resolution=10 ** 9), "img_resolution = 1000000000 is beyond the bound"),
    (dict(use_fp16="yes"), "use_fp16 = 'yes' must be true or false"),
    (dict(sigma_data=float("nan")), "sigma_data = nan must be a finite number"),
    (dict(model_type="SongUNet", model_channels=4096, channel_mult=[64, 64, 64]),
     "parameters; the bound is"),
    (dict(model_type="SongUNet", num_blocks=10 ** 6), "num_blocks = 1000000 is beyond"),
    (dict(model_type="SongUNet", channel_mult=list(range(1, 40))), "at most 16 numbers"),
])
def test_edm_constructor_kwargs_are_bounded(tmp_path, kwargs, match):
    from plugins.edm.unpickle import edm_network_spec, load_edm_snapshot
    from plugins.edm.precond import build_from_spec
    p = tmp_path / "net.pkl"
    p.write_bytes(edm_pickle(_state(**kwargs)))
    spec = edm_network_spec(load_edm_snapshot(p))
    _refused_fast(lambda: build_from_spec(spec), match)


@pytest.mark.parametrize("settings,match", [
    (dict(num_res_blocks=10 ** 6), "num_res_blocks = 1000000 is beyond"),
    (dict(num_channels=4096, channel_mult="64,64,64"), "parameters; the bound is"),
    (dict(image_size=10 ** 6, channel_mult="1"), "image_size = 1000000 is beyond"),
    (dict(dropout=2.0), "dropout = 2.0 is beyond the bound [0.0, 1.0]"),
])
def test_openai_settings_are_bounded(settings, match):
    from plugins.openai.unet import build_openai_unet
    base = dict(image_size=8, num_channels=8, num_res_blocks=1, channel_mult="1",
                attention_resolutions="", class_cond=False)
    _refused_fast(lambda: build_openai_unet({**base, **settings}), "openai unet", match)


# --- state dicts ----------------------------------------------------------------------------------

def _bad_tensors():
    w = torch.zeros(2, 2)
    return {"int": w.long(), "complex": w.to(torch.complex64), "sparse": w.to_sparse(),
            "meta": torch.empty(2, 2, device="meta"), "bool": w.bool()}


@pytest.mark.parametrize("kind", ["int", "complex", "sparse", "meta", "bool"])
def test_state_dict_of_the_wrong_kind_is_refused_by_name(kind):
    from core.train.loop import restore
    net = nn.Linear(2, 2)
    state = {"modules": {"student": {"weight": _bad_tensors()[kind], "bias": torch.zeros(2)}},
             "optimizer": torch.optim.SGD(net.parameters(), lr=0.1).state_dict()}
    before = net.weight.detach().clone()
    msg = _refused_fast(lambda: restore(state, {"student": net},
                                        torch.optim.SGD(net.parameters(), lr=0.1), "ck.pt"),
                        "ck.pt", "weight")
    assert kind in msg or (kind == "bool" and "bool" in msg)
    assert torch.equal(net.weight, before)                        # nothing was loaded


def test_edm_and_openai_state_dicts_are_checked_by_name():
    from plugins.openai.unet import check_openai_state_dict
    from plugins.edm.precond import load_state
    net = nn.Sequential(nn.Linear(2, 2))
    sd = {"0.weight": torch.zeros(2, 2, dtype=torch.int32), "0.bias": torch.zeros(2)}
    _refused_fast(lambda: load_state(net, sd, "edm.pkl"), "edm.pkl", "0.weight", "int32")
    _refused_fast(lambda: check_openai_state_dict(net, sd, "sd.pt"), "sd.pt", "0.weight")
    check_state_dict({"n": torch.tensor(3)}, "x", {"n": torch.tensor(0)})  # int where int: ok


def test_config_bounds_are_in_the_reference():
    ks = {k.name: k for k in C.keys(C.DistillCfg)}
    assert ks["iterations"].max == C.MAX_ITERATIONS and ks["ema"].length == 16


@pytest.mark.parametrize("shape,match", [
    ([100_000, 100_000, 100_000], "the bound is 268,435,456"),
    ([1] * 9, "holds 9 entries; the bound is 8"),
])
def test_sample_shapes_are_bounded(tmp_path, shape, match):
    from core.data.source import DataSource
    from plugins.teachers.torchscript import TorchScriptTeacher
    _refused_fast(lambda: DataSource(Section("data", {"path": "x.npy", "shape": shape},
                                             "c.toml", tmp_path)), "[data] shape", match)
    _refused_fast(lambda: TorchScriptTeacher.from_options(
        Section("teacher", {"path": "t.pt", "shape": shape}, "c.toml", tmp_path),
        types.SimpleNamespace(device="cpu")), "[teacher] shape", match)
