"""The LPIPS distance of the CTM / CM losses (plugins/losses.py: LPIPS)."""

import pytest
import torch

from core.base.errors import UserError
from plugins.losses import LPIPS


@pytest.fixture(scope="module")
def lp():
    return LPIPS("alex", random_backbone=True)


def test_lpips_is_a_per_sample_distance_with_gradients(lp):
    g = torch.Generator().manual_seed(0)
    a = torch.rand(3, 1, 16, 16, generator=g) * 2 - 1          # grey images, [-1, 1]
    b = a.clone()
    b[1] += 0.3 * torch.randn(1, 16, 16, generator=g)
    b[2] = -a[2]
    a.requires_grad_(True)
    d = lp(a, b)
    assert d.shape == (3,)
    assert d[0].item() == pytest.approx(0.0, abs=1e-7)        # identical images
    assert d[1].item() > 0 and d[2].item() > d[1].item()      # grows with the difference
    d.sum().backward()
    assert a.grad is not None and a.grad[1].abs().sum() > 0
    assert all(not p.requires_grad for p in lp.parameters())  # the distance is not trained


def test_lpips_upsamples_to_224(lp, monkeypatch):
    seen = []
    real = lp.model.forward
    monkeypatch.setattr(lp.model, "forward", lambda a, b: (seen.append(a.shape), real(a, b))[1])
    lp(torch.zeros(2, 3, 8, 8), torch.zeros(2, 3, 8, 8))
    assert seen == [torch.Size([2, 3, 224, 224])]


def test_lpips_needs_images(lp):
    with pytest.raises(UserError, match="image data"):
        lp(torch.zeros(4, 2), torch.zeros(4, 2))


def test_missing_backbone_weights_is_one_clear_line(tmp_path):
    with pytest.raises(UserError) as e:
        LPIPS("vgg", weights=tmp_path / "nothing.pth")
    msg = str(e.value)
    assert "\n" not in msg and "vgg16-397923af.pth" in msg and "lpips_weights" in msg
    assert "https://download.pytorch.org/models/" in msg


def test_backbone_weights_load_from_a_torchvision_file(tmp_path):
    import torchvision
    torch.manual_seed(3)
    tv = torchvision.models.alexnet()
    f = tmp_path / "alexnet-owt-7be5be79.pth"
    torch.save(tv.state_dict(), f)
    lp = LPIPS("alex", weights=f)
    convs = [m for m in lp.model.net.modules() if isinstance(m, torch.nn.Conv2d)]
    tv_convs = [m for m in tv.features if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == len(tv_convs) == 5
    for a, b in zip(convs, tv_convs):
        assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    bad = tmp_path / "bad.pth"
    torch.save({"features.0.weight": torch.zeros(1)}, bad)
    with pytest.raises(UserError, match="not torchvision's alex weights"):
        LPIPS("alex", weights=bad)
