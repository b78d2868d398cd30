"""Analytic-Precond coefficients against closed forms, and the HDF5 store."""

import math

import h5py
import numpy as np
import pytest
import torch

from conftest import T_MAX, T_MIN, exact_single_gaussian, single_gaussian, table_for
from core.diffusion.coefficients import store
from core.diffusion.coefficients.estimate import collect
from core.diffusion.coefficients.numerics import derivative
from core.diffusion.coefficients.table import CoefficientTable
from core.base.errors import UserError
from core.export.jumper import Jumper, TeacherAsNetwork
from core.diffusion.schedules import coefficient_grid, log_grid
from plugins.preconditionings import AnalyticPrecond, CTMPrecond
from plugins.teachers.gmm import GMMTeacher


def test_single_gaussian_tables_match_closed_form(gaussian_table):
    tab = gaussian_table
    ex = exact_single_gaussian(tab.t)
    assert np.abs(tab.l - ex["l"]).max() < 1e-10            # Hutchinson is exact for J = cI
    assert np.abs(tab.s - ex["s"]).max() < 2e-3
    assert np.abs(tab.L / ex["L"] - 1).max() < 1e-5
    assert np.abs(tab.S / ex["S"] - 1).max() < 2e-3
    assert tab.L[0] == 1.0 and tab.S[0] == 1.0 and tab.eta[0] == 0.0
    assert np.all(np.diff(tab.eta) > 0)                     # eta increases with lambda


def test_interpolation_matches_closed_form_between_grid_points(gaussian_table):
    t = np.exp(np.random.default_rng(0).uniform(math.log(T_MIN), math.log(T_MAX), 200))
    got, ex = gaussian_table.at(t), exact_single_gaussian(t)
    assert np.abs(got["l"] - ex["l"]).max() < 1e-5
    assert np.abs(got["L"] / ex["L"] - 1).max() < 1e-5
    assert np.abs(got["S"] / ex["S"] - 1).max() < 2e-3


@pytest.mark.parametrize("t", [T_MIN * 0.99, T_MAX * 1.01, float("nan")])
def test_interpolation_outside_range_is_an_error(gaussian_table, t):
    with pytest.raises(UserError, match="outside the coefficient table"):
        gaussian_table.at([1.0, t])


def _exact_solution(x, t, s, mu, sigma0=0.5):
    return mu + math.sqrt((sigma0 ** 2 + s ** 2) / (sigma0 ** 2 + t ** 2)) * (x - mu)


def test_forward_analytic_jump_reproduces_exact_ode_solution(gaussian_table):
    teacher = single_gaussian()
    mu = teacher.means[0]
    x = torch.randn(2000, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x = x * T_MAX
    exact = _exact_solution(x, T_MAX, T_MIN, mu)
    rel = lambda y: ((y - exact).norm(dim=1) / exact.norm(dim=1)).max().item()
    net = TeacherAsNetwork(teacher.denoiser(torch.float64), 0.5)
    fwd = Jumper(net, AnalyticPrecond.from_table(gaussian_table, "forward"), 0.5)
    ctm = Jumper(net, CTMPrecond(), 0.5)
    t, s = torch.tensor(T_MAX), torch.tensor(T_MIN)
    assert rel(fwd(x, t, s)) < 1e-3                          # "well under 1%"
    assert rel(ctm(x, t, s)) > 0.3                           # CTM's Euler jump is far off
    # intermediate jumps too (any t > s inside the range)
    for t_, s_ in [(80.0, 1.0), (5.0, 0.01), (0.7, 0.3)]:
        ex = _exact_solution(x, T_MAX, s_, mu)
        y = fwd(_exact_solution(x, T_MAX, t_, mu), torch.tensor(t_), torch.tensor(s_))
        assert ((y - ex).norm(dim=1) / ex.norm(dim=1)).max() < 1e-3


def test_reference_solver_matches_exact_solution():
    teacher = single_gaussian()
    x = torch.randn(100, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 80
    times = [10.0, 0.5, T_MIN]
    got = teacher.reference_solve(x, T_MAX, times)
    for ti, y in zip(times, got):
        assert torch.allclose(y, _exact_solution(x, T_MAX, ti, teacher.means[0]), atol=1e-7)


def test_zero_mean_gaussian_guards_s_where_g_vanishes():
    teacher = GMMTeacher([1.0], [[0.0, 0.0]], [0.7])   # g = D - (1 - l) x = 0 identically
    tab = table_for(teacher, 20, 256, 256)
    assert tab.s_guarded.all()
    assert np.all(tab.s == -1.0) and np.all(np.isfinite(tab.S))


def test_hutchinson_trace_matches_exact_jacobian_trace_on_mixture():
    teacher = GMMTeacher([0.5, 0.5], [[-1.0, 0.5, 0.0], [1.0, 0.0, 2.0]], [0.3, 0.8])
    den = teacher.denoiser()
    ts = np.array([3.0, 0.9, 0.2])
    n = 20000
    stats = collect(lambda x, t, y: den(x, t, y), teacher.sample_data, ts, n, 5000, 3,
                    progress=False)
    # exact E[tr J] from the same samples
    for i, t in enumerate(ts):
        exact = []
        for b in range(4):
            from core.diffusion.coefficients.estimate import batch_generator
            g = batch_generator(3, b)
            x0, _ = teacher.sample_data(5000, g)
            eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
            x = x0 + t * eps
            J = torch.func.vmap(torch.func.jacfwd(
                lambda xi: den(xi[None], torch.tensor([t], dtype=torch.float64))[0]))(x)
            exact.append(torch.diagonal(J, dim1=1, dim2=2).sum(1))
        exact = torch.cat(exact).mean().item()
        est = stats[i, :, 0].mean()
        se = stats[i, :, 0].std() / math.sqrt(n)
        assert abs(est - exact) < 4 * se + 1e-9


def test_ode_derivative_jvp_matches_finite_difference():
    """dD/dlambda along the PF-ODE (Eqn. 27's ingredient) against a central difference."""
    teacher = GMMTeacher([0.4, 0.6], [[-1.0, 0.5], [1.0, 0.0]], [0.3, 0.8])
    den = teacher.denoiser()
    x0 = torch.tensor([[0.3, -0.2]], dtype=torch.float64)
    t = 0.7
    from core.diffusion.coefficients.estimate import per_sample_stats, STATS
    eps = torch.zeros_like(x0)
    v = torch.ones_like(x0)
    stats = per_sample_stats(lambda x, tt, y: den(x, tt, y), x0, eps, v, t, None)[0]
    # dx/dlambda = D - x, t(lambda) = e^{-lambda}: integrate the ODE a tiny step both ways
    h = 1e-5
    D = lambda x, tt: den(x, torch.tensor([tt], dtype=torch.float64))
    xp = x0 + h * (D(x0, t) - x0)
    xm = x0 - h * (D(x0, t) - x0)
    Ddot_fd = (D(xp, t * math.exp(-h)) - D(xm, t * math.exp(h))) / (2 * h)
    Dv = D(x0, t)
    assert stats[STATS.index("DDdot")].item() == pytest.approx((Dv * Ddot_fd).sum().item(),
                                                               rel=1e-6)


def test_sharded_batches_give_identical_statistics():
    teacher = GMMTeacher([0.3, 0.7], [[-2.0, 0.0], [1.0, 1.0]], [1.0, 0.5])
    den = teacher.denoiser()
    f = lambda x, t, y: den(x, t, y)
    ts = log_grid(6, T_MIN, T_MAX)
    full = collect(f, teacher.sample_data, ts, 300, 64, 5, progress=False)
    parts = sum(collect(f, teacher.sample_data, ts, 300, 64, 5, batches=[r, r + 2, 4][:2 if r
                        else 3], progress=False) for r in (0, 1))
    np.testing.assert_array_equal(full, parts)


def test_fourth_order_derivative_on_irregular_grid():
    x = np.sort(np.random.default_rng(0).uniform(0, 3, 40))
    assert np.abs(derivative(x, np.sin(x)) - np.cos(x)).max() < 5e-3
    assert np.abs(derivative(x, x ** 4) - 4 * x ** 3).max() < 1e-8


def test_edm_grid_estimation(gaussian_table):
    teacher = single_gaussian()
    den = teacher.denoiser()
    from core.diffusion.coefficients.estimate import estimate_table
    ts = coefficient_grid("edm", 160, T_MIN, T_MAX, 7.0)   # the paper uses 160 for edm
    assert ts[0] == T_MAX and ts[-1] == T_MIN and np.all(np.diff(ts) < 0)
    tab = estimate_table(lambda x, t, y: den(x, t, y), teacher.sample_data, 3, ts, 256, 256, 0,
                         {}, progress=False)
    ex = exact_single_gaussian(tab.t)
    assert np.abs(tab.L / ex["L"] - 1).max() < 1e-4
    assert np.abs(tab.S / ex["S"] - 1).max() < 1e-2


# --- the HDF5 store --------------------------------------------------------------------------

def _write(path, table, settings=None):
    store.write(path, table, grid="log", n_samples=4096, teacher_fingerprint="fp",
                settings=settings or {"a": 1})


def test_store_round_trip_and_schema(tmp_path, gaussian_table):
    p = tmp_path / "c.h5"
    _write(p, gaussian_table)
    with h5py.File(p) as h:
        assert h.attrs["format"] == "ctmkit.coefficients" and h.attrs["version"] == 1
        for k in ("t_min", "t_max", "n_samples", "grid", "teacher_fingerprint", "created"):
            assert k in h.attrs
        for k in store.DATASETS:
            assert h[k].dtype == np.float64 and h[k].shape == (120,)
        assert np.all(np.diff(h["lambda"][()]) > 0)
    back = store.load(p)
    for k in ("t", "l", "s", "L", "S", "eta", "l_stderr", "s_stderr"):
        np.testing.assert_array_equal(getattr(back, k), getattr(gaussian_table, k))
    assert store.reusable(p, "fp", {"a": 1})
    assert not store.reusable(p, "other", {"a": 1})
    assert not store.reusable(p, "fp", {"a": 2})


def test_store_rejects_truncated_foreign_and_inconsistent_files(tmp_path, gaussian_table):
    p = tmp_path / "c.h5"
    _write(p, gaussian_table)
    data = p.read_bytes()
    (tmp_path / "trunc.h5").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.h5").write_text("hello")
    with h5py.File(tmp_path / "foreign.h5", "w") as h:
        h.create_dataset("x", data=[1.0])
    bad = tmp_path / "bad.h5"
    _write(bad, gaussian_table)
    with h5py.File(bad, "r+") as h:
        h["eta"][5] = 123.0
    nan = tmp_path / "nan.h5"
    _write(nan, gaussian_table)
    with h5py.File(nan, "r+") as h:
        h["s"][3] = np.nan
    for name, msg in [("trunc.h5", "unreadable"), ("text.h5", "unreadable"),
                      ("foreign.h5", "not a ctmkit coefficient file"),
                      ("bad.h5", "inconsistent"), ("nan.h5", "NaN"), ("missing.h5", "not found")]:
        with pytest.raises(UserError, match=msg):
            store.load(tmp_path / name)
        assert not store.reusable(tmp_path / name, "fp", {"a": 1})


def test_a_float32_teacher_gives_the_float64_coefficients_to_rounding():
    """[coefficients] dtype = "float32": same draws, inner products in float64, so the
    estimates differ from the float64 ones by float32 rounding only -- also at t_min, where
    ||g||^2 is a small difference of large products."""
    from core.diffusion.coefficients.estimate import finalize

    teacher = GMMTeacher([0.4, 0.6], [[-1.0, 0.5, 0.0], [1.0, 0.0, 0.5]], [0.3, 0.6])
    ts = log_grid(12, T_MIN, T_MAX)
    out = {}
    for dtype in (torch.float64, torch.float32):
        den = teacher.denoiser(dtype)
        stats = collect(lambda x, t, y: den(x, t, y), teacher.sample_data, ts, 256, 128, 0,
                        progress=False, dtype=dtype)
        out[dtype] = finalize(ts, stats, teacher.dim)
    a, b = out[torch.float64], out[torch.float32]
    assert np.abs(a.l - b.l).max() < 1e-4
    assert np.all(np.abs(a.s - b.s) <= 1e-3 * np.maximum(1.0, np.abs(a.s)))
    assert np.abs(a.s - b.s).max() > 0            # float32 really ran

