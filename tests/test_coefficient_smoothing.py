"""``[coefficients] smooth``: an opt-in smoothing of l_t, s_t over lambda (a deviation from
Eqns. (15), (17)). Off (0) it is the identity and the store is what it always was; on, it keeps
the end values, constants (so CTM's l = 0, s = -1 stays CTM) and the paper's normalisation."""

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from conftest import QUICK_CONFIG, T_MAX, T_MIN
from core.diffusion.coefficients.numerics import smooth
from core.diffusion.coefficients.table import CoefficientTable
from core.host.config import parse_config, tomllib
from core.base.errors import UserError
from core.diffusion.schedules import log_grid
from plugins.preconditionings import AnalyticPrecond, CTMPrecond

TS = log_grid(40, T_MIN, T_MAX)           # descending t = ascending lambda
LAM = -np.log(TS)


def _noisy(seed=0):
    rng = np.random.default_rng(seed)
    l = 1 / (1 + np.exp(-(LAM - 1.0))) + 0.05 * rng.standard_normal(len(LAM))
    s = -1 + 0.8 * np.tanh(LAM / 3) + 0.2 * rng.standard_normal(len(LAM))
    return l, s


def test_zero_is_the_identity_bitwise():
    l, _ = _noisy()
    out = smooth(LAM, l, 0.0)
    assert out.tobytes() == l.tobytes() and out is not l


@pytest.mark.parametrize("width", [0.1, 0.5, 2.0])
def test_keeps_ends_constants_and_lines(width):
    l, s = _noisy()
    for y in (l, s):
        out = smooth(LAM, y, width)
        assert out[0] == y[0] and out[-1] == y[-1]
    const = np.full(len(LAM), -1.0)
    assert np.abs(smooth(LAM, const, width) - const).max() < 1e-14
    line = 0.3 * LAM - 2.0                 # uniform lambda grid: lines are kept (odd reflection;
    # up to the kernel's tail beyond one reflected range, ~exp(-(range / width)^2 / 2))
    assert np.abs(smooth(LAM, line, width) - line).max() < (1e-12 if width < 1 else 1e-6)


def test_reduces_noise():
    rng = np.random.default_rng(1)
    noise = rng.standard_normal(len(LAM))
    assert smooth(LAM, noise, 0.5)[1:-1].std() < 0.6 * noise[1:-1].std()


def test_smoothed_table_keeps_the_papers_normalisation_and_boundary_condition():
    l, s = _noisy()
    tab = CoefficientTable(t=TS, l=smooth(LAM, l, 0.5), s=smooth(LAM, s, 0.5),
                           l_stderr=np.zeros_like(l), s_stderr=np.zeros_like(s))
    assert tab.L[0] == 1.0 and tab.S[0] == 1.0 and tab.eta[0] == 0.0       # at t_max
    assert tab.l[0] == l[0] and tab.s[0] == s[0]
    assert np.all(np.diff(tab.eta) > 0)
    t = torch.tensor([80.0, 5.0, 0.3, 0.01, T_MIN], dtype=torch.float64)
    for variant in ("forward", "backward"):
        f, g = AnalyticPrecond.from_table(tab, variant)(t, t)
        assert torch.allclose(f, torch.ones_like(f), atol=1e-12)             # f(t, t) = 1
        assert torch.allclose(g, torch.zeros_like(g), atol=1e-12)            # g(t, t) = 0


def test_ctm_coefficients_stay_ctm():
    zeros, ones = np.zeros(len(TS)), np.ones(len(TS))
    tab = CoefficientTable(t=TS, l=smooth(LAM, zeros, 1.0), s=smooth(LAM, -ones, 1.0),
                           l_stderr=zeros, s_stderr=zeros)
    t = torch.tensor([80.0, 10.0, 1.0, 0.1], dtype=torch.float64)
    s = torch.tensor([10.0, 0.5, 0.01, T_MIN], dtype=torch.float64)
    f, g = AnalyticPrecond.from_table(tab, "backward")(t, s)
    fc, gc = CTMPrecond()(t, s)
    assert torch.allclose(f, fc, rtol=1e-6) and torch.allclose(g, gc, rtol=1e-6, atol=1e-9)


def _parse(value=None):
    extra = "" if value is None else f"\n[coefficients]\nsmooth = {value}\n"
    return parse_config(tomllib.loads(f"[teacher]\nkind = \"gmm\"\n{extra}"), Path("c.toml"))


def test_config_key():
    assert _parse().coefficients.smooth == 0.0
    assert _parse("0.5").coefficients.smooth == 0.5
    for bad in ("-0.1", "\"a\"", "nan"):
        with pytest.raises(UserError, match="smooth"):
            _parse(bad)


def test_stage_default_store_unchanged_and_smoothed_store_labelled(write_config, run_main):
    cfg = write_config(QUICK_CONFIG.replace('stages = ["coefficients", "export", "sample", '
                                            '"evaluate"]', 'stages = ["coefficients"]'))
    assert run_main(cfg)[0] == 0
    path = cfg.parent / "out" / "coefficients.h5"
    with h5py.File(path) as h:
        settings = json.loads(h.attrs["settings"])
        l0, s0 = h["l"][()], h["s"][()]
    assert "smooth" not in settings          # the default store is the one it always was
    rc, out, _ = run_main(cfg, "--set", "coefficients.smooth=0.5")
    assert rc == 0 and "DEVIATION" in out
    with h5py.File(path) as h:
        settings = json.loads(h.attrs["settings"])
        l1, s1 = h["l"][()], h["s"][()]
    assert settings["smooth"] == 0.5
    assert np.allclose(l1, smooth(-np.log(h5py.File(path)["t"][()]), l0, 0.5))
    assert np.allclose(s1, smooth(-np.log(h5py.File(path)["t"][()]), s0, 0.5))
    assert l1[0] == l0[0] and s1[-1] == s0[-1] and not np.array_equal(s1, s0)
