"""Explicit time schedules per step count for evaluations: [evaluate] schedules and [distill]
eval_schedules (validation, metrics.json, metrics.csv, the reference-ODE cache)."""

import csv
import json
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import QUICK_CONFIG, T_MAX, T_MIN
from core.host.config import load_config, parse_config, tomllib
from core.base.errors import UserError

SCHED2 = [80.0, 0.6, 0.002]
SCHED3 = [80.0, 1.0, 0.05, 0.002]


def _parse(section: str, key: str, value: str, extra: str = ""):
    raw = tomllib.loads(f"[teacher]\nkind = \"gmm\"\n{extra}\n[{section}]\n{key} = {value}\n")
    return parse_config(raw, Path("c.toml"))


@pytest.mark.parametrize("value,why", [
    ("[80.0, 0.002]", "expected a table"),
    ("{ 0 = [80.0] }", "key '0' must be a step count"),
    ("{ x = [80.0, 0.002] }", "key 'x' must be a step count"),
    ("{ 02 = [80.0, 0.6, 0.002] }", "key '02' must be a step count"),
    ("{ 2 = 0.6 }", "expected a list of 3 times"),
    ("{ 2 = [80.0, 0.002] }", "expected a list of 3 times"),
    ("{ 2 = [80.0, 0.001, 0.002] }", "strictly decreasing"),
    ("{ 2 = [80.0, 80.0, 0.002] }", "strictly decreasing"),
    ("{ 2 = [70.0, 0.6, 0.002] }", "must start at [diffusion] t_max = 80"),
    ("{ 2 = [80.0, 0.6, 0.003] }", "must end at [diffusion] t_min = 0.002"),
    ("{ 2 = [80.0, nan, 0.002] }", "must be finite"),
    ("{ 2 = [80.0, inf, 0.002] }", "must be finite"),
    ("{ 2 = [80.0, -0.5, 0.002] }", "must be > 0"),
    ("{ 2 = [80.0, \"a\", 0.002] }", "expected a number"),
])
@pytest.mark.parametrize("section,key", [("evaluate", "schedules"),
                                         ("distill", "eval_schedules")])
def test_bad_schedules_are_one_line_errors(section, key, value, why):
    with pytest.raises(UserError) as e:
        _parse(section, key, value)
    msg = str(e.value)
    assert "\n" not in msg and f"[{section}] {key}" in msg and why in msg, msg


def test_schedules_parse_against_diffusion_and_overrides(write_config):
    cfg = _parse("evaluate", "schedules", "{ 3 = [40, 1.0, 0.05, 0.01], 1 = [40.0000001, 0.01] }",
                 "[diffusion]\nt_max = 40.0\nt_min = 0.01")
    assert cfg.evaluate.schedules == {1: [40.0, 0.01], 3: [40.0, 1.0, 0.05, 0.01]}
    assert list(cfg.evaluate.schedules) == [1, 3]        # endpoints exact, sorted by K
    assert cfg.distill.eval_schedules == {} and load_config(write_config()).evaluate.schedules == {}
    cfg = load_config(write_config(), ["evaluate.schedules.2=[80, 0.6, 0.002]",
                                       "distill.eval_schedules={1 = [80.0, 0.002]}"])
    assert cfg.evaluate.schedules == {2: SCHED2}
    assert cfg.distill.eval_schedules == {1: [80.0, 0.002]}


def test_reference_cache_is_keyed_by_the_times():
    """One cache shared by a rho-grid and an explicit 2-step evaluation gives each its own
    reference solution (the same numbers as with fresh caches)."""
    from core.evaluation.evaluate import trajectory_errors
    from core.export.jumper import Jumper, TeacherAsNetwork
    from plugins.preconditionings import CTMPrecond
    from plugins.teachers.gmm import GMMTeacher

    teacher = GMMTeacher([0.5, 0.5], [[-1.0], [1.0]], [0.3, 0.5])
    j = Jumper(TeacherAsNetwork(teacher.denoiser(), 0.5), CTMPrecond(), 0.5)
    args = (j, teacher, [2], 64, 0, T_MIN, T_MAX, 7.0, torch.float64)
    cache: dict = {}
    rho = trajectory_errors(*args, reference_cache=cache)
    expl = trajectory_errors(*args, reference_cache=cache, schedules={2: SCHED2})
    assert len(cache) == 2
    assert expl == trajectory_errors(*args, schedules={2: SCHED2})
    assert rho == trajectory_errors(*args)
    assert expl[2]["schedule"] == SCHED2 and "schedule" not in rho[2]
    assert expl[2]["final_rmse"] != rho[2]["final_rmse"]


class _MeanX:
    """A stand-in sample metric: the mean of the first coordinate."""
    name = "meanx"

    def compute(self, samples, reference, cache_dir):
        return {"meanx": float(samples[:, 0].double().mean())}


@pytest.fixture
def meanx_metric(monkeypatch):
    """The metric registered as a plugin; sample grids off (the 2-D samples are no images)."""
    from core.evaluation import images
    from core.host import plugins

    monkeypatch.setattr(images, "save_grid", lambda *a, **k: None)
    from core.host.hookspecs import hookimpl

    plugin = types.SimpleNamespace(ctmkit_metrics=hookimpl(lambda: {"meanx": lambda o, c: _MeanX()}))
    plugins.manager().register(plugin, name="test:meanx")
    plugins.registry.cache_clear()
    yield
    plugins.manager().unregister(plugin)
    plugins.registry.cache_clear()


EVAL_CONFIG = QUICK_CONFIG.replace(
    'stages = ["coefficients", "export", "sample", "evaluate"]',
    'stages = ["coefficients", "export", "evaluate"]').replace(
    "[teacher]", '[data]\npath = "x0.npy"\n[teacher]') + 'metrics = ["meanx"]\nsample_num = 400\n'


def test_evaluate_names_the_schedule_and_keeps_rho_grid_steps(write_config, run_main, tmp_path,
                                                              meanx_metric):
    np.save(tmp_path / "x0.npy", np.random.default_rng(0).normal(size=(500, 2)).astype("f4"))
    cfg = write_config(EVAL_CONFIG)
    rc, out, err = run_main(cfg)
    assert rc == 0, err
    base = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert "schedules" not in base["quality"]
    assert all("schedule" not in v for v in base["trajectory_error"].values())

    write_config(EVAL_CONFIG + "schedules = { 2 = [80.0, 0.6, 0.002], "
                               "3 = [80.0, 1.0, 0.05, 0.002] }\n")
    rc, out, err = run_main(cfg, "--stages", "evaluate")
    assert rc == 0, err
    assert "(schedule [80.0, 0.6, 0.002])" in out
    text = (tmp_path / "out" / "metrics.json").read_text()
    m = json.loads(text, parse_constant=lambda c: pytest.fail(f"not strict JSON: {c}"))
    te, q = m["trajectory_error"], m["quality"]
    assert list(te) == ["1", "2", "3"] and set(q) == {"1", "2", "3", "schedules"}
    assert te["2"]["schedule"] == SCHED2 and te["3"]["schedule"] == SCHED3
    assert q["schedules"] == {"2": SCHED2, "3": SCHED3}
    assert all(isinstance(v, float) for k in "123" for v in q[k].values())
    # the explicit 2-step schedule is not the rho grid's (t_1 ~ 2.5)
    assert te["2"]["final_rmse"] != pytest.approx(base["trajectory_error"]["2"]["final_rmse"],
                                                  rel=1e-3)
    assert q["2"]["meanx"] != pytest.approx(base["quality"]["2"]["meanx"], rel=1e-4)
    # the rho-grid step count is unchanged by schedules for other K
    assert te["1"] == base["trajectory_error"]["1"] and q["1"] == base["quality"]["1"]


def test_schedule_outside_the_jumper_range_is_an_error(write_config, run_main):
    cfg = write_config(QUICK_CONFIG.replace('"sample", "evaluate"', '"evaluate"'))
    assert run_main(cfg, "--stages", "coefficients,export")[0] == 0
    rc, out, err = run_main(cfg, "--stages", "evaluate", "--set", "diffusion.t_max=40",
                            "--set", "evaluate.schedules={1 = [40.0, 0.002]}")
    assert rc == 2 and err.count("\n") == 1 and "[evaluate] schedules" in err, err


DISTILL_CONFIG = """
[run]
out_dir = "out"
stages = ["distill"]
[teacher]
kind = "gmm"
weights = [0.5, 0.5]
means = [[-1.0], [1.0]]
stds = [0.3, 0.5]
[network]
width = 16
depth = 1
emb_dim = 8
[precond]
name = "ctm"
[distill]
iterations = 4
batch_size = 16
checkpoint_every = 4
log_every = 2
eval_every = 2
eval_num = 64
N = 6
max_ode_steps = 2
"""


def _csv(path):
    with open(path) as fh:
        return list(csv.DictReader(fh))


def test_distill_logs_the_eval_schedule(write_config, run_main, tmp_path, meanx_metric):
    np.save(tmp_path / "x0.npy", np.random.default_rng(0).normal(size=(300, 1)).astype("f4"))
    config = DISTILL_CONFIG.replace("[teacher]", '[data]\npath = "x0.npy"\n[evaluate]\n'
                                    'metrics = ["meanx"]\n[teacher]') + \
        'eval = ["trajectory", "meanx"]\n'
    cfg = write_config(config + "eval_steps = [1, 2]\n")
    rc, out, err = run_main(cfg)
    assert rc == 0, err
    base = [r for r in _csv(tmp_path / "out" / "metrics.csv") if r["traj_err_1"]]

    cfg = write_config(config.replace('"out"', '"out2"') + "eval_steps = [1]\n"
                       "eval_schedules = { 2 = [80.0, 0.6, 0.002] }\n")
    rc, out, err = run_main(cfg)
    assert rc == 0, err
    assert "2-step evaluations on the schedule [80.0, 0.6, 0.002]" in out
    rows = [r for r in _csv(tmp_path / "out2" / "metrics.csv") if r["traj_err_1"]]
    assert [r["iteration"] for r in rows] == ["0", "2", "4"]
    for col in ("traj_err", "meanx"):        # rho-grid K unchanged; explicit K differs
        assert [r[f"{col}_1"] for r in rows] == [r[f"{col}_1"] for r in base]
        assert all(np.isfinite(float(r[f"{col}_2"])) for r in rows)
        assert rows[0][f"{col}_2"] != base[0][f"{col}_2"]      # iteration 0: the same student
