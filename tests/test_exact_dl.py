"""The exact dl/dlambda of [coefficients] dl = "jvp" (nested forward-mode JVP) against closed
forms, a quadrature reference and the finite-difference path ("fd") it replaces by default."""

import json
import math
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from torch.func import grad, jvp

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from bench_coefficients import MLPDenoiser  # noqa: E402  (the network-like teacher)
from conftest import QUICK_CONFIG, T_MAX, T_MIN, exact_single_gaussian, single_gaussian
from core.diffusion.coefficients import estimate
from core.diffusion.coefficients.estimate import N_FD, STATS, collect, finalize
from core.base.errors import UserError
from core.diffusion.schedules import log_grid
from plugins.teachers.gmm import GMMTeacher


def both(denoise, sample_x0, dim, ts, n, batch=None, seed=0):
    """(exact "jvp", finite-difference "fd") estimates from one set of statistics: the fd
    path is the jvp path's statistics without the "trdot" column."""
    stats = collect(denoise, sample_x0, ts, n, batch or n, seed, progress=False)
    assert stats.shape[-1] == len(STATS)
    return finalize(ts, stats, dim), finalize(ts, stats[..., :N_FD], dim)


def gmm_fn(teacher):
    den = teacher.denoiser()
    return lambda x, t, y: den(x, t, y)


# --- (a) single Gaussian: closed forms -------------------------------------------------------

def test_single_gaussian_exact_dl_and_s_match_the_closed_form_on_a_coarse_grid():
    teacher, sigma0 = single_gaussian(), 0.5
    ts = log_grid(12, T_MIN, T_MAX)
    jv, fd = both(gmm_fn(teacher), teacher.sample_data, teacher.dim, ts, 256)
    # l_t = t^2 / (sigma0^2 + t^2)  =>  dl/dlambda = -t dl/dt = -2 t^2 sigma0^2 / (sigma0^2 + t^2)^2
    dl_exact = -2 * ts ** 2 * sigma0 ** 2 / (sigma0 ** 2 + ts ** 2) ** 2
    s_exact = exact_single_gaussian(ts)["s"]
    # J = c I: Hutchinson and its derivative are exact per sample, so only rounding is left
    assert np.abs(jv.dl - dl_exact).max() < 1e-10
    assert np.abs(jv.s - s_exact).max() < 1e-5
    # 4th-order differences on 12 points (2 per decade) are far off; the jvp path is not
    # worse anywhere, and 100x tighter than test_coefficients' 2e-3 for fd on 120 points
    assert np.abs(fd.dl - dl_exact).max() > 1e-2
    assert np.abs(fd.s - s_exact).max() > 0.5
    assert np.all(np.abs(jv.s - s_exact) <= np.abs(fd.s - s_exact) + 1e-9)


# --- (b) a 1-D two-component mixture: quadrature reference -----------------------------------

MIX = dict(weights=[1 / 3, 2 / 3], means=[[-2.0], [1.0]], stds=[1.0, 0.5])


def quadrature_reference(teacher, ts, n_grid=20001):
    """l_t, dl/dlambda and s_t of a 1-D mixture by trapezoid quadrature over q(x_t) (no
    sampling); dl/dlambda by reverse-mode autograd through l(t), not by the code under test."""
    den = teacher.denoiser()
    w, mu, sd = teacher.weights, teacher.means[:, 0], teacher.stds
    out = {"l": [], "dl": [], "s": []}
    for t in ts:
        sig = math.sqrt(float(sd.max()) ** 2 + t * t)
        xs = torch.linspace(float(mu.min()) - 14 * sig, float(mu.max()) + 14 * sig, n_grid,
                            dtype=torch.float64)[:, None]
        one = torch.ones_like(xs)

        def q(t_):                                            # density of x_t on the grid
            var = sd ** 2 + t_ ** 2
            return (w * torch.exp(-0.5 * (xs - mu) ** 2 / var) / torch.sqrt(2 * math.pi * var)
                    ).sum(1)

        def l_of(t_):                                         # 1 - E[dD/dx] (1-D: exact trace)
            dD = jvp(lambda a: den(a, t_ * one[:, 0]), (xs,), (one,))[1][:, 0]
            p = q(t_)
            return 1 - (p * dD).sum() / p.sum()

        tt = torch.tensor(t, dtype=torch.float64)
        l, dl = l_of(tt).item(), -t * grad(l_of)(tt).item()
        tv = tt * one[:, 0]
        D = den(xs, tv)
        _, Ddot = jvp(den, (xs, tv), (D - xs, -tv))
        g = D - (1 - l) * xs
        dg = Ddot + dl * xs - (1 - l) * (D - xs)                  # Eqn. (27)
        p = q(tt)[:, None]
        out["l"].append(l)
        out["dl"].append(dl)
        out["s"].append(((p * g * dg).sum() / (p * g * g).sum()).item())   # Eqn. (17)
    return {k: np.array(v) for k, v in out.items()}


def test_mixture_s_at_t_min_is_minus_two_and_matches_quadrature():
    teacher = GMMTeacher(**MIX)
    ts = log_grid(10, T_MIN, T_MAX)
    ref = quadrature_reference(teacher, ts)
    assert abs(ref["s"][-1] + 2) < 1e-3                   # s -> -2 as t -> 0 (g ~ t^2 h(x_0))
    jv, fd = both(gmm_fn(teacher), teacher.sample_data, 1, ts, 4096)
    assert ts[-1] == T_MIN
    assert abs(jv.s[-1] + 2) < 0.01                        # measured: -2.00001
    # the whole curve within Monte-Carlo error of the quadrature (delta-method stderr)
    assert np.all(np.abs(jv.s - ref["s"]) < 5 * jv.s_stderr + 1e-3), (jv.s, ref["s"])
    assert np.all(np.abs(jv.l - ref["l"]) < 5 * jv.l_stderr + 1e-6)
    stats = collect(gmm_fn(teacher), teacher.sample_data, ts, 4096, 4096, 0, progress=False)
    dl_i = -stats[..., STATS.index("trdot")]                # d = 1
    dl_se = dl_i.std(1, ddof=1) / math.sqrt(dl_i.shape[1])
    assert np.all(np.abs(jv.dl - ref["dl"]) < 5 * dl_se + 1e-9)
    # finite differences on the same 10 points (~2 per decade): s at t_min is off by orders
    # of magnitude (measured ~1e3), the symptom
    assert abs(fd.s[-1] + 2) > 1.0


def test_exact_path_standard_error_is_calibrated_on_the_mixture():
    """Spread of s over independent seeds against the reported s_stderr (which takes in the
    noise of l_t and dl/dlambda: at small t it cancels, s ~ -2 with almost no noise)."""
    teacher = GMMTeacher(**MIX)
    ts = np.array([5.0, 0.3, T_MIN])
    runs = [both(gmm_fn(teacher), teacher.sample_data, 1, ts, 256, seed=s)[0] for s in range(12)]
    spread = np.std([r.s for r in runs], axis=0, ddof=1)
    se = np.mean([r.s_stderr for r in runs], axis=0)
    assert np.all(spread < 2.5 * se) and np.all(se < 2.5 * spread), (spread, se)


# --- (c) a network teacher: no grid dependence -----------------------------------------------

def test_network_teacher_s_does_not_depend_on_the_grid():
    torch.manual_seed(0)
    dim = 4
    net = MLPDenoiser(dim, 32, depth=3).double().eval().requires_grad_(False)
    f = lambda x, t, y: net(x, t)
    sampler = lambda n, g: (0.5 * torch.randn((n, dim), generator=g, dtype=torch.float64), None)
    coarse = log_grid(10, T_MIN, T_MAX)
    # nested log grids (9 -> 18 -> 36 -> 72 intervals): all hold the 10 coarse times
    est = {}
    for n in (10, 19, 37, 73):
        ts = log_grid(n, T_MIN, T_MAX)
        idx = np.searchsorted(-ts, -coarse)
        np.testing.assert_allclose(ts[idx], coarse, rtol=1e-12)
        jv, fd = both(f, sampler, dim, ts, 256)
        est[n] = (jv.s[idx], fd.s[idx], jv.s_stderr[idx])
    # jvp: each t on its own with common random numbers -> the same numbers on every grid
    for n in (19, 37, 73):
        assert np.abs(est[n][0] - est[10][0]).max() < 1e-9
    # fd (documenting it): the stencil reaches across the grid, so s changes with the grid --
    # measured 1.5 off at t_max and 0.3 at t_min on 10 points, ~0.01 on 19, converging to the
    # jvp values as the grid is refined (4th order: within ~3e-4 on 73 points)
    assert np.abs(est[10][1] - est[10][0]).max() > 0.2
    assert np.abs(est[19][1] - est[10][0]).max() > 1e-3
    assert np.abs(est[73][1] - est[10][0]).max() < 2e-3
    assert np.all(np.abs(est[73][1] - est[10][0]) < np.abs(est[10][1] - est[10][0]) + 1e-12)


# --- plumbing: the config key, the store, errors ---------------------------------------------

def test_dl_key_is_in_the_store_settings_and_recomputes(write_config, run_main, tmp_path):
    base = QUICK_CONFIG.replace('stages = ["coefficients", "export", "sample", "evaluate"]',
                                'stages = ["coefficients"]').replace("n_timesteps = 40",
                                                                     "n_timesteps = 12")
    cfg = write_config(base)
    rc, out, err = run_main(cfg)
    assert rc == 0, err
    h5 = tmp_path / "out" / "coefficients.h5"
    with h5py.File(h5) as h:
        assert json.loads(h.attrs["settings"])["dl"] == "jvp"      # the default
        s_jvp = h["s"][()]
    write_config(base.replace('grid = "log"', 'grid = "log"\ndl = "jvp"'))
    rc, out, err = run_main(cfg)
    assert rc == 0 and "reusing" in out                              # same as the default
    write_config(base.replace('grid = "log"', 'grid = "log"\ndl = "fd"'))
    rc, out, err = run_main(cfg)
    assert rc == 0 and "reusing" not in out, err
    with h5py.File(h5) as h:
        assert json.loads(h.attrs["settings"])["dl"] == "fd"
        assert np.abs(h["s"][()] - s_jvp).max() > 1e-3               # 12 points: fd differs
    write_config(base.replace('grid = "log"', 'grid = "log"\ndl = "exact"'))
    rc, out, err = run_main(cfg)
    assert rc == 2 and "dl" in err and "jvp, fd" in err


def test_fd_path_statistics_are_unchanged_and_jvp_adds_one_column():
    teacher = GMMTeacher([0.4, 0.6], [[-1.0, 0.5], [1.0, 0.0]], [0.3, 0.8])
    ts = log_grid(6, T_MIN, T_MAX)
    a = collect(gmm_fn(teacher), teacher.sample_data, ts, 100, 64, 1, progress=False)
    b = collect(gmm_fn(teacher), teacher.sample_data, ts, 100, 64, 1, progress=False, dl="fd")
    assert a.shape == (6, 100, len(STATS)) and b.shape == (6, 100, N_FD)
    np.testing.assert_allclose(a[..., :N_FD], b, rtol=1e-12, atol=1e-300)
    with pytest.raises(ValueError, match="dl must be one of"):
        collect(gmm_fn(teacher), teacher.sample_data, ts, 10, 10, 1, progress=False, dl="x")


def test_trdot_is_the_lambda_derivative_of_the_hutchinson_term():
    """Per sample: v^T d(J v)/dlambda at fixed x_0, eps, v against a central difference of
    v^T J(x_0 + t eps, t) v in lambda = -log t (float64, a network with SiLU: the nested JVP
    needs grad mode on, see estimate._jvps_nested)."""
    torch.manual_seed(1)
    net = MLPDenoiser(3, 16, depth=3).double().eval()               # parameters left requiring grad
    f = lambda x, t, y: net(x, t)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(8, 3, generator=g, dtype=torch.float64), torch.randn(
        8, 3, generator=g, dtype=torch.float64)
    v = (torch.randint(0, 2, (8, 3), generator=g) * 2 - 1).double()
    h = 1e-4
    with torch.no_grad():
        for t in (0.01, 0.7, 20.0):
            row = estimate.per_sample_stats(f, x0, eps, v, t, None)
            tr = lambda t_: estimate.per_sample_stats(f, x0, eps, v, t_, None, dl="fd")[:, 0]
            fd = (tr(t * math.exp(-h)) - tr(t * math.exp(h))) / (2 * h)
            k = STATS.index("trdot")
            assert torch.allclose(row[:, k], fd, rtol=1e-6, atol=1e-9 * fd.abs().max())
            assert not row[:, k].requires_grad


def test_a_teacher_without_nested_jvp_support_gets_a_user_error(monkeypatch):
    teacher = GMMTeacher([1.0], [[0.5]], [0.5])

    def unsupported(*a, **k):
        raise NotImplementedError("Trying to use forward AD with aten::foo that does not "
                                  "support it")
    monkeypatch.setattr(estimate, "_jvps_nested", unsupported)
    with pytest.raises(UserError, match='dl = "fd"'):
        collect(gmm_fn(teacher), teacher.sample_data, [1.0], 8, 8, 0, progress=False)
    # fd still works; and a teacher that fails first-order JVPs too keeps its own error
    collect(gmm_fn(teacher), teacher.sample_data, [1.0], 8, 8, 0, progress=False, dl="fd")
    monkeypatch.setattr(estimate, "_jvps_sequential", unsupported)
    monkeypatch.setattr(estimate, "_jvps_batched", unsupported)
    with pytest.raises(NotImplementedError, match="aten::foo"):
        collect(gmm_fn(teacher), teacher.sample_data, [1.0], 8, 8, 0, progress=False)


# --- speed paths (issue #13): several time steps per call, compiled first-order JVPs ----------

def _labelled_mlp(dim=3, classes=4):
    """An MLP teacher whose output depends on the class label (so mixing up rows shows)."""
    torch.manual_seed(2)
    net = MLPDenoiser(dim, 16, depth=2).double().eval().requires_grad_(False)
    shift = torch.linspace(-0.5, 0.5, classes, dtype=torch.float64)

    def f(x, t, y):
        return net(x.double(), t.double()).to(x.dtype) + shift[y][:, None].to(x.dtype) * t[:, None]

    def sample(n, gen):
        return torch.randn(n, dim, generator=gen), torch.randint(0, classes, (n,), generator=gen)
    return f, sample


@pytest.mark.parametrize("dl", ["jvp", "fd"])
def test_times_per_call_gives_the_same_statistics(dl):
    """times_per_call = k stacks the batch at k time steps into one teacher call: the same
    per-sample statistics (k not dividing the grid, a short last batch, labels)."""
    f, sample = _labelled_mlp()
    ts = log_grid(7, T_MIN, T_MAX)
    ref = collect(f, sample, ts, 50, 32, 3, progress=False, dl=dl)
    for k in (3, 7, 100):
        got = collect(f, sample, ts, 50, 32, 3, progress=False, dl=dl, times_per_call=k)
        np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-14)
    assert np.abs(ref).min(axis=(0, 1)).max() > 0           # every column was filled


@pytest.mark.slow
@pytest.mark.parametrize("dl", ["jvp", "fd"])
def test_compiled_first_order_jvps_give_the_same_statistics(dl):
    """[coefficients] compile: torch.compile'd first-order JVPs (CPU here) give the eager
    statistics to float rounding, in float32 and float64."""
    f, sample = _labelled_mlp()
    ts = log_grid(4, T_MIN, T_MAX)
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-4)):
        ref = collect(f, sample, ts, 40, 16, 3, progress=False, dl=dl, dtype=dtype)
        got = collect(f, sample, ts, 40, 16, 3, progress=False, dl=dl, dtype=dtype,
                      compile=True, times_per_call=2)
        np.testing.assert_allclose(got, ref, rtol=tol, atol=tol * np.abs(ref).max())
