"""The `unet` network plugin (plugins/unet.py): shapes, the student's zero-initialised s pathway,
TorchScript, forward-mode derivatives in float64, the factory and its errors, class labels."""

import types

import pytest
import torch
from torch.func import jvp, vmap

from core.host import plugins
from core.host.config import Section
from core.base.errors import UserError
from core.train.students import _zero_last_linear
from plugins.unet import UNet

TINY = dict(model_channels=8, channel_mult=[1, 2], num_blocks=1)
CTX = types.SimpleNamespace(diffusion=types.SimpleNamespace(sigma_data=0.5))


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny convolutions gain nothing from intra-op threads, and on a machine whose cores are
    busy each parallel region can wait milliseconds for a second thread (seen: 1.6 s instead of
    8 ms per forward); restored after each test."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _inputs(shape, B=3, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((B,) + tuple(shape), generator=g).to(dtype)
    t = torch.exp(torch.randn(B, generator=g) * 1.2 - 1.2).to(dtype)
    return x, t


@pytest.mark.parametrize("shape,num_classes", [((1, 28, 28), 0), ((1, 28, 28), 10),
                                               ((3, 32, 32), 0), ((3, 32, 32), 10)])
def test_output_shape(shape, num_classes):
    torch.manual_seed(0)
    net = UNet(shape, model_channels=8, channel_mult=[1, 2, 2], num_blocks=1,
               num_classes=num_classes)
    x, t = _inputs(shape)
    labels = torch.tensor([0, 1, 2]) if num_classes else None
    with torch.no_grad():
        assert net(x, t, None, labels).shape == x.shape
        assert net(x, t[:1]).shape == x.shape              # t broadcast from [1]
        assert net(x, torch.tensor(0.3)).shape == x.shape  # and from a scalar


def test_student_equals_teacher_at_init_and_s_pathway_is_live():
    torch.manual_seed(0)
    teacher = UNet((1, 28, 28), num_classes=3, **TINY).eval()
    torch.manual_seed(1)
    student = UNet((1, 28, 28), num_classes=3, student=True, **TINY).eval()
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    assert not unexpected and missing and all(k.startswith("s_") for k in missing)
    x, t = _inputs((1, 28, 28))
    labels = torch.tensor([2, 0, 1])
    with torch.no_grad():
        ref = teacher(x, t, None, labels)
        for seed in range(4):
            s = t * torch.rand(3, generator=torch.Generator().manual_seed(seed))
            assert torch.equal(student(x, t, s, labels), ref)
        assert torch.equal(student(x, t, None, labels), ref)
        torch.nn.init.normal_(student.s_map[2].weight, std=0.5)
        a = student(x, t, t * 0.5, labels)
        b = student(x, t, t * 0.1, labels)
    assert (a - b).abs().max() > 1e-4 and (a - ref).abs().max() > 1e-4


def test_torchscript_round_trip(tmp_path):
    torch.manual_seed(0)
    net = UNet((1, 28, 28), num_classes=3, student=True, **TINY).eval()
    torch.nn.init.normal_(net.s_map[2].weight, std=0.1)
    torch.jit.save(torch.jit.script(net), str(tmp_path / "unet.pt"))
    loaded = torch.jit.load(str(tmp_path / "unet.pt"))
    x, t = _inputs((1, 28, 28))
    labels = torch.tensor([0, 1, 2])
    with torch.no_grad():
        for s, lab in [(t * 0.5, labels), (t * 0.2, None), (None, labels)]:
            assert torch.equal(loaded(x, t, s, lab), net(x, t, s, lab))


@pytest.mark.parametrize("kw", [dict(), dict(embedding="fourier", scale_shift=False,
                                             resample="avgpool", num_heads=2)])
def test_jvp_float64_matches_finite_differences(kw):
    """Two tangents (x and t together) through vmap(jvp), as core/diffusion/coefficients/estimate.py does."""
    torch.manual_seed(0)
    net = UNet((1, 14, 14), attn_resolutions=[14, 7], **TINY, **kw).double().eval()
    x, t = _inputs((1, 14, 14), B=2, dtype=torch.float64)
    g = torch.Generator().manual_seed(3)
    tan_x = torch.randn((2,) + tuple(x.shape), generator=g, dtype=torch.float64)
    tan_t = torch.stack([torch.zeros_like(t), -t])
    _, out = vmap(lambda a, b: jvp(net, (x, t), (a, b)))(tan_x, tan_t)
    eps = 1e-6
    with torch.no_grad():
        for i in range(2):
            fd = (net(x + eps * tan_x[i], t + eps * tan_t[i])
                  - net(x - eps * tan_x[i], t - eps * tan_t[i])) / (2 * eps)
            assert ((fd - out[i]).norm() / out[i].norm()).item() < 1e-5


def test_factory_options_and_errors(tmp_path):
    plugin = plugins.get("network", "unet")
    sec = Section("network", {"model_channels": 8, "channel_mult": [1, 2], "num_blocks": 1,
                              "attn_resolutions": [14], "embedding": "fourier"},
                  "cfg.toml", tmp_path)
    net = plugin.factory(sec, CTX, shape=(1, 28, 28), num_classes=0, student=True)
    sec.finish()
    assert isinstance(net, UNet) and net.s_map is not None and net.sigma_data == 0.5
    assert net(*_inputs((1, 28, 28))).shape == (3, 1, 28, 28)

    sec = Section("network", {"attn_resolutions": []}, "cfg.toml", tmp_path)
    net = plugin.factory(sec, CTX, shape=(1, 28, 28), num_classes=0, student=False)
    sec.finish()
    assert not any(m.attn is not None for m in net.enc if hasattr(m, "attn"))

    def fails(data, shape=(1, 28, 28)):
        with pytest.raises(UserError) as e:
            plugin.factory(Section("network", data, "cfg.toml", tmp_path), CTX, shape=shape,
                           num_classes=0, student=False)
        assert "\n" not in str(e.value)
        return str(e.value)

    msg = fails({}, shape=(2,))
    assert msg.startswith("cfg.toml: [network] name:") and "(C, H, W)" in msg and "(2,)" in msg
    assert "no level has resolution 16 (levels: 28, 14, 7)" in fails({"attn_resolutions": [16]})
    assert "[network] num_heads" in fails({"num_heads": 3})
    assert "[network] embedding" in fails({"embedding": "learned"})


def test_class_labels_change_the_output():
    torch.manual_seed(0)
    net = UNet((1, 28, 28), num_classes=4, **TINY).eval()
    x, t = _inputs((1, 28, 28), B=2)
    with torch.no_grad():
        a = net(x, t, None, torch.tensor([0, 0]))
        b = net(x, t, None, torch.tensor([3, 1]))
        c = net(x, t, None, None)
    assert (a - b).abs().amax(dim=(1, 2, 3)).min() > 1e-4 and (a - c).abs().max() > 1e-4


def test_residual_student_is_zero_after_zeroing_the_last_linear():
    """core.train.students zeroes a residual network's last nn.Linear: for the unet that is the output
    conv (held by out.proj), so R_theta(x, t, s) = 0 at init."""
    torch.manual_seed(0)
    net = UNet((3, 32, 32), num_classes=2, student=True, **TINY)
    _zero_last_linear(net)
    x, t = _inputs((3, 32, 32))
    with torch.no_grad():
        assert torch.equal(net(x, t, t * 0.5, torch.tensor([0, 1, 1])), torch.zeros_like(x))


def test_float32_float64_and_determinism():
    torch.manual_seed(0)
    net = UNet((1, 28, 28), **TINY).eval()
    x, t = _inputs((1, 28, 28))
    with torch.no_grad():
        a32, b32 = net(x, t), net(x, t)
        a64 = net.double()(x.double(), t.double())
    assert torch.equal(a32, b32) and a64.dtype == torch.float64
    assert (a64 - a32.double()).abs().max() < 1e-4
