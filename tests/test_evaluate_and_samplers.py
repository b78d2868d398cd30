"""Metrics, samplers, solvers and the tools that reproduce the paper's figures."""

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import T_MAX, T_MIN, single_gaussian
from core.evaluation.evaluate import distribution_distance, sliced_w1, trajectory_errors, w1_1d
from core.export.jumper import Jumper, TeacherAsNetwork
from core.diffusion.schedules import rho_grid
from plugins.preconditionings import AnalyticPrecond, CTMPrecond
from plugins.samplers import CMSampler, CTMSampler
from plugins.solvers import EulerSolver, HeunSolver
from plugins.teachers.gmm import GMMTeacher

ROOT = Path(__file__).resolve().parents[1]


def test_w1_exact_values():
    assert w1_1d(np.zeros(10), np.ones(10)) == pytest.approx(1.0)
    assert w1_1d(np.array([0.0, 1.0]), np.array([0.0, 0.0, 1.0, 1.0])) == pytest.approx(0.0)
    assert w1_1d(np.array([0.0, 2.0]), np.array([1.0])) == pytest.approx(1.0)
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4000, 3))
    # a shift by c along e_1: sliced W1 = c * E|u_1| over unit directions in 3-D = c / 2
    assert sliced_w1(a, a + [2.0, 0, 0], 2000) == pytest.approx(1.0, rel=0.05)
    assert distribution_distance(a[:, :1], a[:, :1] + 1)[0] == "w1"


def test_rho_grid_endpoints_and_order():
    ts = rho_grid(5, T_MIN, T_MAX, 7.0)
    assert ts[0] == T_MAX and ts[-1] == T_MIN and all(a > b for a, b in zip(ts, ts[1:]))


@pytest.mark.parametrize("solver,order", [(EulerSolver(), 1), (HeunSolver(), 2)])
def test_solvers_converge_at_their_order(solver, order):
    teacher = single_gaussian()
    D = teacher.denoiser()
    x = torch.randn(50, 3, dtype=torch.float64) * 5
    exact = teacher.means[0] + math.sqrt((0.25 + 0.1 ** 2) / (0.25 + 25)) * (x - teacher.means[0])
    errs = []
    for n in (40, 80):
        ts = np.exp(np.linspace(math.log(5.0), math.log(0.1), n + 1)).tolist()
        errs.append((solver.solve(lambda y, t: D(y, t), x, ts) - exact).abs().max().item())
    assert math.log2(errs[0] / errs[1]) == pytest.approx(order, abs=0.25)


def test_heun_skips_correction_on_a_step_to_zero():
    D = lambda x, t: torch.zeros_like(x)
    x = torch.ones(3, 1, dtype=torch.float64)
    # Euler step to t = 0 of dx/dt = x / t from t = 1: x -> 0; a correction would divide by 0
    assert torch.equal(HeunSolver().solve(D, x, [1.0, 0.0]), torch.zeros_like(x))


def test_ctm_sampler_with_gamma_one_is_cm_multistep():
    teacher = GMMTeacher([0.5, 0.5], [[-1.0], [1.0]], [0.3, 0.3])
    j = Jumper(TeacherAsNetwork(teacher.denoiser(), 0.5), CTMPrecond(), 0.5)
    ts = rho_grid(3, T_MIN, T_MAX, 7.0)
    x = torch.randn(20, 1, dtype=torch.float64) * T_MAX
    a = CTMSampler(gamma=1.0).sample(j, x, ts, torch.Generator().manual_seed(4))
    b = CMSampler().sample(j, x, ts, torch.Generator().manual_seed(4))
    assert torch.allclose(a, b, atol=1e-12)
    traj = []
    CTMSampler(0.0).sample(j, x, ts, torch.Generator(), trajectory=traj)
    assert len(traj) == 3


def test_analytic_forward_tracks_teacher_better_than_ctm_on_mixtures(mixture_table):
    """The paper's Fig. 7 claim, on its 1-D mixture: teacher-initialised jumpers, few steps."""
    teacher = GMMTeacher([1 / 3, 2 / 3], [[-2.0], [1.0]], [1.0, 0.5])
    net = TeacherAsNetwork(teacher.denoiser(), 0.5)
    cache = {}
    err = {name: trajectory_errors(Jumper(net, p, 0.5), teacher, [1, 2, 3], 500, 0, T_MIN, T_MAX,
                                   7.0, torch.float64, reference_cache=cache)
           for name, p in [("ctm", CTMPrecond()),
                           ("fwd", AnalyticPrecond.from_table(mixture_table, "forward"))]}
    for K in (1, 2, 3):
        assert err["fwd"][K]["final_rmse"] < 0.7 * err["ctm"][K]["final_rmse"]


def test_trajectory_alignment_tool_quick(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "trajectory_alignment.py"),
                        "--quick", "--num", "300", "--out", str(tmp_path)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "trajectory_alignment.png").stat().st_size > 10_000
    rows = {l.split()[0]: l.split() for l in r.stdout.splitlines() if l and l[0].isalpha()}
    assert float(rows["analytic-forward"][3]) < float(rows["ctm"][3])   # K=2 final error


def test_plot_coefficients_tool(tmp_path, gaussian_table):
    from core.diffusion.coefficients import store
    store.write(tmp_path / "c.h5", gaussian_table, grid="log", n_samples=4096,
                teacher_fingerprint="fp", settings={})
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "plot_coefficients.py"),
                        str(tmp_path / "c.h5")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "c_preconditionings.png").stat().st_size > 10_000
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "plot_coefficients.py"),
                        str(tmp_path / "missing.h5")], capture_output=True, text=True)
    assert r.returncode == 2 and "not found" in r.stderr
