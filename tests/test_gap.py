"""``ctmkit gap``: the consistency gap ||D_theta* - D_phi|| per jump and over the training grid
(core/gap.py), its closed-form check on a single Gaussian, gap.json's schema and bad input."""

import json
import math
import warnings

import pytest
import torch

from conftest import QUICK_CONFIG, T_MAX, T_MIN, single_gaussian, table_for
from core import gap
from core.diffusion.edm import edm_scalings
from core.diffusion.schedules import rho_grid

GMM = ('kind = "gmm"\nweights = [0.3, 0.7]\nmeans = [[-2.0, 0.0], [1.0, 1.0]]\n'
       'stds = [1.0, 0.5]')
PRECOND = 'name = "analytic"\nvariant = "forward"'
FAST = QUICK_CONFIG.replace("n_timesteps = 40\nn_samples = 512", "n_timesteps = 20\nn_samples = 256"
                            ) + "[gap]\nnum = 64\n[distill]\nN = 8\n"


def _gaps(teacher, preconds: dict, steps=(1, 2, 3, 5), num=128, N=18) -> dict:
    """core.gap.measure for each preconditioning, float64, on the rho grid of [diffusion]."""
    grid = rho_grid(N, T_MIN, T_MAX, 7.0)
    schedules = {K: rho_grid(K, T_MIN, T_MAX, 7.0) for K in steps}
    times = sorted({*grid, *(t for ts in schedules.values() for t in ts)}, reverse=True)
    x_T, labels = gap.fixed_noise(teacher, num, 0, T_MAX)
    states = gap.teacher_states(teacher, x_T, labels, times, {}, "k")
    den = gap.teacher_denoised(teacher, states, labels, torch.float64, "cpu")
    return {k: gap.measure(p, k, 0.5, states, den, grid, schedules) for k, p in preconds.items()}


def test_single_gaussian_forward_analytic_gap_vanishes():
    """On N(mu, sigma0^2 I) the teacher ODE is linear and Analytic-Precond's forward variant
    (Eqn. 14) follows it exactly: its gap is under 1% of CTM's (the coefficients being
    estimates), on the training grid and on every jump."""
    from plugins.preconditionings import AnalyticPrecond, CTMPrecond

    teacher = single_gaussian()
    table = table_for(teacher, n_timesteps=40, n_samples=256)
    r = _gaps(teacher, {"ctm": CTMPrecond(), "fwd": AnalyticPrecond.from_table(table, "forward")})
    ctm, fwd = r["ctm"], r["fwd"]
    assert ctm["train_grid"]["gap_rms"] > 0.05           # CTM's is far from zero here
    assert fwd["train_grid"]["gap_rms"] < 0.01 * ctm["train_grid"]["gap_rms"]
    assert fwd["train_grid"]["jump_rms"] < 0.01 * ctm["train_grid"]["jump_rms"]
    for K in ("1", "2", "3", "5"):
        worst_ctm = max(j["gap_rms"] for j in ctm["schedules"][K])
        assert all(j["gap_rms"] < 0.01 * worst_ctm for j in fwd["schedules"][K]), K


def test_ctm_pair_weights_are_the_ctm_loss_draw():
    from plugins.losses import CTMLoss

    N, B = 6, 200_000
    d = CTMLoss(17).draw(torch.Generator().manual_seed(0), torch.zeros(B, 1), N)
    weights = gap.ctm_pair_weights(N)
    assert math.isclose(sum(weights.values()), 1.0)
    counts = {}
    for n, m in zip(d["n"].tolist(), d["m"].tolist()):
        counts[(n, m)] = counts.get((n, m), 0) + 1
    assert set(counts) == set(weights)
    assert max(abs(counts[k] / B - w) for k, w in weights.items()) < 0.005


def test_gap_on_the_quickstart_config(write_config, run_main, tmp_path):
    rc, out, err = run_main("gap", write_config(FAST))
    assert rc == 0, err
    assert "analytic-forward" in out and "grid N=8" in out
    result = json.loads((tmp_path / "out" / "gap.json").read_text())
    assert list(result) == ["analytic-forward"]
    r = result["analytic-forward"]
    assert r["train_grid"]["N"] == 8 and len(r["train_grid"]["pairs"]) == 8 * 9 // 2
    assert r["train_grid"]["gap_rms"] > 0 and math.isfinite(r["train_grid"]["jump_rms"])
    assert sorted(r["schedules"]) == ["1", "2"]        # [evaluate] steps
    jumps = r["schedules"]["2"]
    assert [j["t"] for j in jumps] == [80.0, jumps[1]["t"]] and jumps[-1]["s"] == 0.002
    for j in jumps:
        assert set(j) >= {"t", "s", "gap_rms", "jump_rms"}
        assert j["jump_rms"] == pytest.approx(abs(j["g"]) * j["gap_rms"], rel=1e-9)
    assert (tmp_path / "out" / "gap.png").stat().st_size > 1000
    assert (tmp_path / "out" / "coefficients.h5").is_file()  # run first, as the stage would


def test_gap_of_every_run_precond_and_cm_through_its_denoiser(write_config, run_main, tmp_path):
    """[run] preconds: one entry per label; CM mixes F, so its gap is c_out (F* - F_phi) while
    its jump error is g (F_phi - F*)."""
    cfg = FAST.replace(f"[precond]\n{PRECOND}\n", "").replace(
        'seed = 0\n[teacher]', 'seed = 0\npreconds = [{name = "ctm"}, {name = "cm"}, '
        '{name = "analytic", variant = "backward"}]\n[teacher]', 1)
    cfg = cfg.replace("[gap]\n", "[gap]\nsteps = [3]\nschedules = { 2 = [80.0, 0.5, 0.002] }\n")
    rc, out, err = run_main("gap", write_config(cfg))
    assert rc == 0, err
    result = json.loads((tmp_path / "out" / "gap.json").read_text())
    assert sorted(result) == ["analytic-backward", "cm", "ctm"]
    assert sorted(result["ctm"]["schedules"]) == ["2", "3"]
    assert [j["s"] for j in result["ctm"]["schedules"]["2"]] == [0.5, 0.002]
    assert result["cm"]["jumps_denoiser"] is False
    for j in result["cm"]["schedules"]["3"]:
        _, c_out = edm_scalings(torch.tensor(j["t"]), 0.5)
        assert j["jump_rms"] == pytest.approx(abs(j["g"]) / float(c_out) * j["gap_rms"],
                                              rel=1e-6)
    assert result["ctm"]["train_grid"]["gap_rms"] != result["cm"]["train_grid"]["gap_rms"]


def test_out_and_set_flags(write_config, run_main, tmp_path):
    cfg = write_config(FAST.replace(PRECOND, 'name = "ctm"'))
    rc, out, err = run_main("gap", cfg, "--out", tmp_path / "elsewhere", "--set", "gap.steps=[3]",
                            "--set", "evaluate.schedules={}")
    assert rc == 0, err
    result = json.loads((tmp_path / "elsewhere" / "gap.json").read_text())
    assert list(result["ctm"]["schedules"]) == ["3"] and not (tmp_path / "out").exists()


def _one_error_line(rc, err, tmp_path, *needles):
    assert rc == 2 and err.count("\n") == 1 and err.startswith("error: "), err
    assert "Traceback" not in err
    for n in needles:
        assert n in err, err
    assert (tmp_path / "out" / "gap.json").read_text() == "old\n"    # left as it was


@pytest.fixture
def old_gap(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "gap.json").write_text("old\n")


class _BadG(torch.nn.Module):
    """g(t, s) = 0 (or NaN) on the pairs that end at s < 1."""

    def __init__(self, value: float):
        super().__init__()
        self.name, self.variant, self.jumps_denoiser, self.value = "bad_g", "", True, value

    def forward(self, t, s):
        t, s = t.double(), s.double()
        g = torch.where(s < 1.0, torch.full_like(s, self.value), 1.0 - s / t)
        return s / t, g


@pytest.mark.parametrize("value,shown", [(0.0, "g(t, s) = 0"), (math.nan, "g(t, s) = nan")])
def test_g_zero_or_not_finite_on_a_pair_is_one_error_line(value, shown, monkeypatch,
                                                          write_config, run_main, tmp_path,
                                                          old_gap):
    from core.host import plugins

    monkeypatch.setitem(plugins.registry()["precond"], "bad_g", plugins.Plugin(
        "precond", "bad_g", lambda o, c: _BadG(value), "test"))
    rc, _, err = run_main("gap", write_config(FAST.replace(PRECOND, 'name = "bad_g"')))
    _one_error_line(rc, err, tmp_path, "preconditioning 'bad_g'", shown)


def test_teacher_returning_nan_is_one_error_line(write_config, run_main, tmp_path, old_gap):
    from core.export.jumper import script

    class NaNTeacher(torch.nn.Module):
        def forward(self, x, t):
            return x * float("nan")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        script(NaNTeacher()).save(str(tmp_path / "nan.pt"))
    cfg = FAST.replace(GMM, 'kind = "torchscript"\npath = "nan.pt"\nshape = [2]').replace(
        PRECOND, 'name = "ctm"')
    rc, _, err = run_main("gap", write_config(cfg))
    _one_error_line(rc, err, tmp_path, "NaN/Inf")


@pytest.mark.parametrize("schedule,why", [("[100.0, 1.0, 0.002]", "must start at"),
                                          ("[80.0, 1.0, 0.001]", "must end at")])
def test_schedule_outside_the_time_range_is_one_error_line(schedule, why, write_config,
                                                           run_main, tmp_path, old_gap):
    cfg = FAST.replace("[gap]\n", f"[gap]\nschedules = {{ 2 = {schedule} }}\n")
    rc, _, err = run_main("gap", write_config(cfg))
    _one_error_line(rc, err, tmp_path, "[gap] schedules", why)


def test_gap_help_and_a_bad_flag(capsys):
    from core.run import main

    with pytest.raises(SystemExit) as e:
        main(["gap", "--help"])
    assert e.value.code == 0 and "ctmkit gap" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["gap", "c.toml", "--bogus"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1


IMAGE_CONFIG = """
[run]
out_dir = "out"
stages = ["teacher", "coefficients"]
preconds = [{name = "ctm"}, {name = "analytic", variant = "backward"}]
[data]
format = "array"
path = "images.npz"
[network]
name = "unet"
model_channels = 8
channel_mult = [1, 2]
num_blocks = 1
attn_resolutions = [4]
[teacher]
kind = "network"
[teacher_train]
iterations = 20
batch_size = 16
lr = 2e-3
[coefficients]
n_timesteps = 6
n_samples = 16
batch = 8
[distill]
N = 4
[evaluate]
steps = [1, 2]
num = 8
"""


@pytest.mark.slow
def test_gap_on_a_class_conditional_image_teacher(write_config, run_main, tmp_path):
    """A network teacher (a UNet on 8x8 labelled images): float32 denoiser, labels drawn."""
    from test_image_pipeline import make_images

    make_images(tmp_path / "images.npz")
    cfg = write_config(IMAGE_CONFIG)
    rc, _, err = run_main(cfg)
    assert rc == 0, err
    rc, out, err = run_main("gap", cfg)
    assert rc == 0, err
    result = json.loads((tmp_path / "out" / "gap.json").read_text())
    assert sorted(result) == ["analytic-backward", "ctm"]
    for r in result.values():
        assert r["dtype"] == "float32" and r["num"] == 8
        assert len(r["train_grid"]["pairs"]) == 10 and r["train_grid"]["gap_rms"] > 0
        assert [len(r["schedules"][K]) for K in ("1", "2")] == [1, 2]
