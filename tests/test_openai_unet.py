"""plugins/openai/unet.py against the openai/consistency_models fixture (random weights,
reference outputs from the original code; see tests/fixtures/README.md)."""

import json
import warnings

import numpy as np
import pytest
import torch
from torch.func import jvp, vmap

from core.base.errors import UserError
from plugins.openai.unet import (DEFAULTS, OpenAIDenoiser, build_openai_unet,
                                     check_openai_state_dict, load_openai_state_dict,
                                     load_openai_teacher)
from conftest import FIXTURES  # tests/fixtures/ (see its README)

DIR = FIXTURES / "openai"
PT, JSON, REF = DIR / "openai-unet-cond.pt", DIR / "openai-unet-cond.json", \
    DIR / "openai-unet-cond.ref.npz"



@pytest.fixture(scope="module")
def fx():
    kwargs = json.loads(JSON.read_text())["unet_kwargs"]
    ref = np.load(REF)
    return dict(kwargs=kwargs, sd=load_openai_state_dict(PT),
                x=torch.from_numpy(ref["x"]), sigma=torch.from_numpy(ref["sigma"]),
                y=torch.from_numpy(ref["y"]), D=torch.from_numpy(ref["D"]))


def _net(fx, dtype=torch.float32, student=False) -> OpenAIDenoiser:
    net = build_openai_unet(fx["kwargs"], student=student, raw=True)
    if student:
        missing, unexpected = net.load_state_dict(fx["sd"], strict=False)
        assert not unexpected and missing and all(k.startswith("s_") for k in missing)
    else:
        net.load_state_dict(fx["sd"], strict=True)
    return net.to(dtype).eval()


def _rel(a, ref) -> float:
    return ((a.double() - ref).abs().max() / ref.abs().max()).item()


def _script(net):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)      # TorchScript is deprecated in 2.14
        return torch.jit.script(net)


def test_fixture_parity_float32_and_float64(fx):
    net = _net(fx)
    with torch.no_grad():
        D = net(fx["x"], fx["sigma"], fx["y"])
        assert torch.equal(D, net(fx["x"], fx["sigma"], fx["y"]))      # eval is deterministic
        assert _rel(D, fx["D"]) < 1e-5
        D64 = _net(fx, torch.float64)(fx["x"].double(), fx["sigma"].double(), fx["y"])
    assert D64.dtype == torch.float64 and _rel(D64, fx["D"]) < 1e-4


def test_legacy_qkv_order_is_not_the_fixtures(fx):
    """consistency_models reads qkv rows as (three, heads, d); (heads, three, d) differs."""
    net = build_openai_unet({**fx["kwargs"], "qkv_order": "heads_three"}, raw=True)
    net.load_state_dict(fx["sd"])
    with torch.no_grad():
        assert _rel(net.eval()(fx["x"], fx["sigma"], fx["y"]), fx["D"]) > 1e-3


def test_scripted_matches_and_one_hot_labels(fx):
    net = _net(fx)
    sc = _script(net)
    with torch.no_grad():
        D = net(fx["x"], fx["sigma"], fx["y"])
        assert torch.equal(sc(fx["x"], fx["sigma"], fx["y"]), D)
        one_hot = torch.nn.functional.one_hot(fx["y"], 10).float()
        assert torch.equal(net(fx["x"], fx["sigma"], one_hot), D)
        assert torch.equal(sc(fx["x"], fx["sigma"], one_hot), D)
        F = sc.model_output(fx["x"], fx["sigma"], fx["y"])
        assert F.shape == D.shape


def test_student_equals_teacher_for_every_s(fx):
    teacher, student = _net(fx), _net(fx, student=True)
    sst = _script(student)
    x, sigma, y = fx["x"], fx["sigma"], fx["y"]
    with torch.no_grad():
        D = teacher(x, sigma, y)
        for s in (sigma * 0.5, torch.full_like(sigma, 0.002)):
            assert torch.equal(student(x, sigma, y, s), D)
            assert torch.equal(sst(x, sigma, y, s), D)
        assert torch.equal(student(x, sigma, y), D)
    # a trained s pathway does change the output, and only through s
    with torch.no_grad():
        student.s_time_embed[2].weight.normal_()
        assert not torch.equal(student(x, sigma, y, sigma * 0.5), D)
        assert torch.equal(student(x, sigma, y, None), D)


def test_jvp_float64_and_float32(fx):
    """Two tangents (x and sigma together) through vmap(jvp), as coefficients estimation does."""
    y = fx["y"][:2]
    net = _net(fx, torch.float64)
    x, sigma = fx["x"][:2].double(), fx["sigma"][2:4].double()
    g = torch.Generator().manual_seed(0)
    tan_x = torch.randn((2,) + tuple(x.shape), generator=g, dtype=torch.float64)
    tan_t = torch.stack([torch.zeros_like(sigma), -sigma])
    f = lambda a, b: net(a, b, y)
    _, out = vmap(lambda a, b: jvp(f, (x, sigma), (a, b)))(tan_x, tan_t)
    eps = 1e-6
    with torch.no_grad():
        for i in range(2):
            fd = (f(x + eps * tan_x[i], sigma + eps * tan_t[i])
                  - f(x - eps * tan_x[i], sigma - eps * tan_t[i])) / (2 * eps)
            assert ((fd - out[i]).norm() / out[i].norm()).item() < 1e-6
    net32 = _net(fx)
    D, Jv = jvp(lambda a: net32(a, sigma.float(), y), (x.float(),), (tan_x[0].float(),))
    assert D.dtype == Jv.dtype == torch.float32
    assert ((Jv.double() - out[0]).norm() / out[0].norm()).item() < 1e-4
    # TorchScript's profiling executor returns wrong tangents from the second call on
    # (pytorch/pytorch#73972); without its optimisations the scripted module is right
    sc = _script(net)
    with torch.jit.optimized_execution(False):
        for _ in range(2):
            _, t_sc = jvp(lambda a: sc(a, sigma, y), (x,), (tan_x[0],))
            assert torch.allclose(t_sc, out[0], rtol=1e-10, atol=1e-10)


def test_autocast_bfloat16(fx):
    net = _net(fx)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        D = net(fx["x"], fx["sigma"], fx["y"])
    assert torch.isfinite(D).all() and _rel(D, fx["D"]) < 5e-2


def test_script_settings_build_the_same_network(fx):
    """User-facing settings (resolutions, script names) give the fixture's architecture."""
    k = fx["kwargs"]
    settings = dict(image_size=16, num_channels=32, num_res_blocks=1,
                    attention_resolutions="8", channel_mult=[1, 2], class_cond=True,
                    num_classes=10, num_heads=4, num_head_channels=16)
    for extra in ({}, {"attention_ds": [2], "attention_resolutions": []}):
        net = build_openai_unet({**settings, **extra})
        check_openai_state_dict(net, fx["sd"], "fixture")
        assert net.num_classes == 10 and net.model_channels == k["model_channels"]
    assert DEFAULTS["num_channels"] == 192 and DEFAULTS["attention_resolutions"] == [32, 16, 8]
    with pytest.raises(UserError, match="attention resolution 5"):
        build_openai_unet({**settings, "attention_resolutions": [5]})
    with pytest.raises(UserError, match="unknown setting 'bogus'"):
        build_openai_unet({**settings, "bogus": 1})
    with pytest.raises(UserError, match="unknown UNetModel argument"):
        build_openai_unet({**k, "num_channels": 3}, raw=True)


def test_state_dict_checker_names_the_key(fx, tmp_path):
    net = build_openai_unet(fx["kwargs"], raw=True)
    sd = dict(fx["sd"])
    sd["middle_block.1.qkv.weight"] = torch.zeros(192, 64, 1)
    with pytest.raises(UserError, match=r"'middle_block\.1\.qkv\.weight' has shape \[192, 64, 1\]"):
        check_openai_state_dict(net, sd, "x.pt")
    sd = {k: v for k, v in fx["sd"].items() if k != "label_emb.weight"}
    with pytest.raises(UserError, match="missing key 'label_emb.weight'"):
        check_openai_state_dict(net, sd)
    with pytest.raises(UserError, match="unexpected key 'extra'"):
        check_openai_state_dict(net, {**fx["sd"], "extra": torch.zeros(1)})
    # a whole file with a wrong shape, through load_openai_teacher
    bad = tmp_path / "bad.pt"
    torch.save({**fx["sd"], "out.2.bias": torch.zeros(4)}, bad)
    with pytest.raises(UserError, match=r"'out\.2\.bias'") as e:
        load_openai_teacher(bad, fx["kwargs"], raw=True)
    assert "\n" not in str(e.value)
    student = load_openai_teacher(PT, fx["kwargs"], student=True, raw=True)
    assert student.s_time_embed is not None and not student.training


def test_truncated_and_foreign_files(tmp_path):
    data = PT.read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(data[: len(data) // 2])
    for path in (cut, tmp_path / "absent.pt"):
        with pytest.raises(UserError) as e:
            load_openai_state_dict(path)
        assert str(path) in str(e.value) and "\n" not in str(e.value)
    foreign = tmp_path / "list.pt"
    torch.save([1, 2, 3], foreign)
    with pytest.raises(UserError, match="not a UNetModel state dict"):
        load_openai_state_dict(foreign)
    text = tmp_path / "text.pt"
    text.write_text("hello")
    with pytest.raises(UserError):
        load_openai_state_dict(text)
