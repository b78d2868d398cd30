"""One zero-initialised s pathway (core/train/s_pathway.py) serves the five built-in networks, with
the parameter names each always had: a student saved before it existed loads unchanged.

tests/fixtures/old_students.pt was written by ``python tests/students_fixture.py
tests/fixtures/old_students.pt`` at commit facc7b5 (before core/train/s_pathway.py): for a tiny
student of each network, the digest of its freshly initialised state dict (seed 0), its state
dict's names, its s pathway's tensors after a perturbation (so the pathway is not zero) and the
output on fixed inputs."""

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
import students_fixture as fx  # noqa: E402

OLD = torch.load(ROOT / "tests" / "fixtures" / "old_students.pt", weights_only=True)
NETS = fx.build()


def test_every_network_is_in_the_fixture():
    assert set(OLD) == set(NETS)


@pytest.mark.parametrize("name", sorted(NETS))
def test_a_student_saved_before_loads_unchanged(name):
    make, inputs = NETS[name]
    torch.manual_seed(0)
    net = make()
    old = OLD[name]
    assert list(net.state_dict()) == old["keys"]                  # the same names, in order
    assert fx.digest(net.state_dict()) == old["fresh"]            # the same initialisation
    sd = dict(net.state_dict(), **old["s_pathway"])
    net.load_state_dict(sd, strict=True)
    # the same function; to float rounding, since convolution sums depend on the thread count
    torch.testing.assert_close(fx.run(name, net, inputs), old["output"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(NETS))
def test_the_pathway_is_zero_at_initialisation(name):
    """A fresh student gives the same output for every s (and for no s)."""
    make, inputs = NETS[name]
    torch.manual_seed(0)
    net = make()
    args = list(inputs(torch.Generator().manual_seed(7)))
    with torch.no_grad():
        a = net(*args)
        i = 2 if name in ("mlp", "unet") else -1                 # where s goes
        args[i] = args[i] * 0.5
        b = net(*args)
    assert torch.equal(a, b)


@pytest.mark.parametrize("name", sorted(NETS))
def test_the_student_still_scripts(name):
    """The exported jumper is TorchScript: the shared pathway code scripts in every network."""
    make, inputs = NETS[name]
    torch.manual_seed(0)
    net = make()
    net.load_state_dict(dict(net.state_dict(), **OLD[name]["s_pathway"]), strict=True)
    scripted = torch.jit.script(net)
    assert torch.allclose(fx.run(name, scripted, inputs), OLD[name]["output"], rtol=1e-5,
                          atol=1e-6)
