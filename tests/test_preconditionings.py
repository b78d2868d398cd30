"""Table 1's preconditionings: boundary conditions, identities, the jumper, TorchScript export."""

import math

import numpy as np
import pytest
import torch

from conftest import T_MAX, T_MIN
from core.diffusion.coefficients.table import CoefficientTable
from core.export.jumper import Jumper, TeacherAsNetwork, script
from core.diffusion.schedules import log_grid
from plugins.preconditionings import AnalyticPrecond, BCMPrecond, CMPrecond, CTMPrecond
from plugins.teachers.gmm import GMMTeacher

SD = 0.5


def all_preconds(table):
    return {"cm": CMPrecond(SD), "bcm": BCMPrecond(SD), "ctm": CTMPrecond(),
            "analytic-forward": AnalyticPrecond.from_table(table, "forward"),
            "analytic-backward": AnalyticPrecond.from_table(table, "backward")}


def times(n=300, seed=0):
    g = np.random.default_rng(seed)
    return torch.from_numpy(np.exp(g.uniform(math.log(T_MIN), math.log(T_MAX), n)))


@pytest.mark.parametrize("name", ["cm", "bcm", "ctm", "analytic-forward", "analytic-backward"])
def test_boundary_condition(name, mixture_table):
    p = all_preconds(mixture_table)[name]
    t = times()
    f, g = p(t, t)
    assert torch.allclose(f, torch.ones_like(f), atol=1e-12)
    assert torch.allclose(g, torch.zeros_like(g), atol=1e-12)
    # and the jumper built on it returns x for s = t whatever the network outputs
    net = TeacherAsNetwork(GMMTeacher([1.0], [[0.0]], [1.0]).denoiser(), SD)
    x = torch.randn(300, 1, dtype=torch.float64)
    assert torch.allclose(Jumper(net, p, SD)(x, t, t), x, atol=1e-10)


def test_ctm_bcm_cm_formulas():
    t, s = torch.tensor([2.0, 0.5]), torch.tensor([0.5, 0.002])
    f, g = CTMPrecond()(t, s)
    assert torch.allclose(f, (s / t).double()) and torch.allclose(g, (1 - s / t).double())
    f, g = CMPrecond(SD)(t, s)
    t64, s64 = t.double(), s.double()
    assert torch.allclose(f, SD ** 2 / (SD ** 2 + (t64 - s64) ** 2))                 # Eqn. (4)
    assert torch.allclose(g, SD * (t64 - s64) / torch.sqrt(SD ** 2 + t64 ** 2))
    f, g = BCMPrecond(SD)(t, s)
    assert torch.allclose(f, (SD ** 2 + t64 * s64) / (SD ** 2 + t64 ** 2))


@pytest.mark.parametrize("variant", ["forward", "backward"])
def test_analytic_degenerates_to_ctm_at_l0_sminus1(variant):
    """Section 3.2: l_t = 0, s_t = -1 gives CTM's f = s/t, g = 1 - s/t (both variants)."""
    ts = log_grid(50, T_MIN, T_MAX)
    z = np.zeros(50)
    table = CoefficientTable(t=ts, l=z, s=z - 1, l_stderr=z, s_stderr=z)
    p = AnalyticPrecond.from_table(table, variant)
    t = times(500)
    s = t * torch.from_numpy(np.random.default_rng(1).uniform(0, 1, 500)).clamp(min=T_MIN / t)
    s = torch.maximum(s, torch.full_like(s, T_MIN))
    f, g = p(t, s)
    fc, gc = CTMPrecond()(t, s)
    assert torch.allclose(f, fc, atol=1e-7) and torch.allclose(g, gc, atol=1e-7)


def test_backward_is_the_inverse_of_the_forward_step(mixture_table):
    """Table 1's backward coefficients: f = 1 / f_hat(s, t), g = -g_hat(s, t) / f_hat(s, t)."""
    fwd = AnalyticPrecond.from_table(mixture_table, "forward")
    bwd = AnalyticPrecond.from_table(mixture_table, "backward")
    t, s = times(200, 1), times(200, 2)
    fh, gh = fwd(s, t)
    f, g = bwd(t, s)
    assert torch.allclose(f, 1 / fh, rtol=1e-10) and torch.allclose(g, -gh / fh, rtol=1e-10)


def test_bcm_equals_ctm_at_teacher_initialisation():
    """With F = (D - c_skip x) / c_out, BCM's f x + g F reduces to s/t x + (1 - s/t) D."""
    teacher = GMMTeacher([0.3, 0.7], [[-2.0, 0.0], [1.0, 1.0]], [1.0, 0.5])
    net = TeacherAsNetwork(teacher.denoiser(), SD)
    x = torch.randn(64, 2, dtype=torch.float64) * 3
    t, s = times(64), times(64, 3)
    s = torch.minimum(s, t)
    a, b = Jumper(net, BCMPrecond(SD), SD)(x, t, s), Jumper(net, CTMPrecond(), SD)(x, t, s)
    assert torch.allclose(a, b, atol=1e-9)


def test_teacher_initialised_jumper_denoises_like_the_teacher(mixture_table):
    """D_theta(x, t, s) = D_phi(x, t): the consistency function of a tiny jump is an Euler step."""
    teacher = GMMTeacher([1 / 3, 2 / 3], [[-2.0], [1.0]], [1.0, 0.5])
    D = teacher.denoiser()
    j = Jumper(TeacherAsNetwork(D, SD), CTMPrecond(), SD)
    x = torch.randn(32, 1, dtype=torch.float64)
    t = torch.full((32,), 0.8, dtype=torch.float64)
    s = t * (1 - 1e-6)
    slope = (j(x, t, s) - x) / (s - t)[:, None]
    assert torch.allclose(slope, (x - D(x, t)) / t[:, None], rtol=1e-6)


def test_scripted_jumper_matches_eager_and_rejects_out_of_range(mixture_table):
    teacher = GMMTeacher([1 / 3, 2 / 3], [[-2.0], [1.0]], [1.0, 0.5])
    eager = Jumper(TeacherAsNetwork(teacher.denoiser(torch.float32), SD),
                   AnalyticPrecond.from_table(mixture_table, "backward"), SD)
    sj = script(eager)
    x = torch.randn(16, 1) * 80
    t, s = torch.full((16,), 80.0), torch.full((16,), 0.3)
    assert torch.equal(sj(x, t, s), eager(x, t, s))
    assert torch.equal(sj(x, torch.tensor(80.0), torch.tensor(0.3)), eager(x, t, s))
    with pytest.raises(Exception, match="outside the coefficient table"):
        sj(x, t, torch.full((16,), 1e-4))


def test_range_check_can_be_turned_off_for_checked_grid_times(mixture_table):
    """check_range (core.api.Preconditioning): on by default (out-of-range and NaN times
    raise, eager and scripted); off, the lookup does no host read-back and gives the same
    coefficients for in-range times. The distill stage turns it off for its steps and back on
    around evaluations (core.train.distill._range_checks)."""
    from core.train.distill import _range_checks
    p = AnalyticPrecond.from_table(mixture_table, "backward")
    t, s = times(50), times(50, seed=1)
    ref = p(t, s)
    for bad in (1e-4, float("nan")):
        with pytest.raises(RuntimeError, match="outside the coefficient table"):
            p(t, torch.full((50,), bad, dtype=torch.float64))
    with _range_checks(p, False):
        assert p.check_range is False
        got = p(t, s)
        p(t, torch.full((50,), 1e-4, dtype=torch.float64))          # no check: no raise
    assert p.check_range is True
    assert all(torch.equal(a, b) for a, b in zip(got, ref))
    p.check_range = False
    with _range_checks(p, True):
        with pytest.raises(RuntimeError, match="outside the coefficient table"):
            p(t, torch.full((50,), 1e-4, dtype=torch.float64))
    assert p.check_range is False
    with _range_checks(CTMPrecond(), False):                        # no such attribute: no-op
        pass
    assert not hasattr(CTMPrecond(), "check_range")
    sp = torch.jit.script(AnalyticPrecond.from_table(mixture_table, "backward"))
    with pytest.raises(Exception, match="outside the coefficient table"):
        sp(t, torch.full((50,), 1e-4, dtype=torch.float64))
