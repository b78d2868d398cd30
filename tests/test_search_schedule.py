"""``ctmkit search-schedule`` (core/search_schedule.py): the golden-section search against a
closed-form minimiser and a dense scan of the same objective, coordinate descent for K = 3,
parity with the evaluation's trajectory error, determinism, the command and its bad input."""

import json
import math
import tomllib
import warnings

import numpy as np
import pytest
import torch

from conftest import QUICK_CONFIG, T_MAX, T_MIN, single_gaussian
from core import search_schedule as ss
from core.export.jumper import Jumper, TeacherAsNetwork
from core.diffusion.schedules import rho_grid
from plugins.teachers.gmm import GMMTeacher

PRECOND = 'name = "analytic"\nvariant = "forward"'
GMM = ('kind = "gmm"\nweights = [0.3, 0.7]\nmeans = [[-2.0, 0.0], [1.0, 1.0]]\n'
       'stds = [1.0, 0.5]')
FAST = QUICK_CONFIG.replace("n_timesteps = 40\nn_samples = 512", "n_timesteps = 20\nn_samples = 256"
                            ) + "[search]\nnum = 32\niterations = 8\nrounds = 1\n"
CTM_FAST = FAST.replace(PRECOND, 'name = "ctm"')


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tests run many tiny tensor operations (the reference ODE: ~1,000 RK4 steps on
    [64, 2]): one intra-op thread, which on a busy machine is 10-50x faster than two."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def ctm_jumper(teacher):
    """The teacher-initialised CTM jumper (s/t) x + (1 - s/t) D_phi (Eqn. 6), float64."""
    from plugins.preconditionings import CTMPrecond

    return Jumper(TeacherAsNetwork(teacher.denoiser(torch.float64), 0.5), CTMPrecond(), 0.5)


def test_golden_section_on_a_function_with_a_known_minimum():
    calls = []

    def f(u):
        calls.append(u)
        return (u - 0.3) ** 2 + 1.0

    u, v = ss.golden_section(f, -2.0, 4.0, 40, 1e-9)
    assert abs(u - 0.3) < 1e-6 and v == pytest.approx(1.0, abs=1e-12)
    assert all(-2.0 < c < 4.0 for c in calls)            # interior points only
    assert len(calls) <= 42                              # one evaluation per step
    u, _ = ss.golden_section(lambda u: abs(u - 3.9), -2.0, 4.0, 60, 1e-9)   # V-shaped, at an edge
    assert abs(u - 3.9) < 1e-6


def _closed_form_minimiser(T, tm, s0):
    """argmin over m of |r(T, m) r(m, tm) - r*| on a refined dense grid of log m, where
    x_s - mu = r(t, s) (x_t - mu) is the CTM jump with the exact Gaussian denoiser and r* =
    sqrt((tm^2 + s0^2) / (T^2 + s0^2)) the exact flow."""
    r = lambda t, s: s / t + (1 - s / t) * s0 ** 2 / (t ** 2 + s0 ** 2)  # noqa: E731
    exact = math.sqrt((tm ** 2 + s0 ** 2) / (T ** 2 + s0 ** 2))
    lo, hi = math.log(tm), math.log(T)
    for k in range(2):
        u = np.linspace(lo, hi, 2001)[1:-1]
        m = np.exp(u)
        d = np.abs(r(T, m) * r(m, tm) - exact)
        i = int(d.argmin())
        if k == 0:                                                # unimodal
            assert np.all(np.diff(d[:i + 1]) < 0) and np.all(np.diff(d[i:]) > 0)
        lo, hi = u[max(i - 2, 0)], u[min(i + 2, len(u) - 1)]
    return float(m[i])


def test_two_step_middle_time_of_a_single_gaussian_is_the_closed_form_one():
    """On N(mu, s0^2 I) the teacher-initialised CTM jump scales x - mu by r(t, s) =
    s/t + (1 - s/t) s0^2 / (t^2 + s0^2), the ODE by sqrt((s^2 + s0^2) / (t^2 + s0^2)): the
    2-step final error is |r(T, m) r(m, t_min) - r*| RMS(x_T - mu), minimised where the
    closed form says, whatever the noise."""
    s0 = 0.5
    teacher = single_gaussian(sigma0=s0)
    fn = ss.trajectory_objective(ctm_jumper(teacher), teacher, 16, 0, T_MIN, T_MAX,
                                 torch.float64)
    res = ss.search(ss.Objective("traj", fn), 2, T_MIN, T_MAX, 7.0, T_MIN, T_MAX, 40, 1e-7, 1)
    m_star = _closed_form_minimiser(T_MAX, T_MIN, s0)
    assert abs(math.log(res["schedule"][1]) - math.log(m_star)) < 1e-4
    assert res["schedule"][0] == T_MAX and res["schedule"][2] == T_MIN
    assert res["value"] < fn(rho_grid(2, T_MIN, T_MAX, 7.0))


def _mixture():
    return GMMTeacher([0.3, 0.7], [[-2.0, 0.0], [1.0, 1.0]], [1.0, 0.5])


@pytest.fixture(scope="module")
def mixture_objective():
    """The final trajectory error of the quickstart mixture's teacher-initialised CTM jumper
    (64 draws, seed 3; the teacher ODE solved once for the tests of this file)."""
    teacher = _mixture()
    return ss.trajectory_objective(ctm_jumper(teacher), teacher, 64, 3, T_MIN, T_MAX,
                                   torch.float64)


def test_search_agrees_with_a_dense_scan_of_the_same_objective(mixture_objective):
    """The quickstart's 2-D mixture, teacher-initialised CTM jumper: the objective over a
    dense grid of middle times is unimodal (checked), and the search lands within one grid
    cell of the scan's minimum with a value no worse than the scan's."""
    fn = mixture_objective
    lo, hi = 0.01, 20.0
    u = np.linspace(math.log(lo), math.log(hi), 301)[1:-1]
    values = np.array([fn([T_MAX, math.exp(x), T_MIN]) for x in u])
    i = int(values.argmin())
    assert 0 < i < len(u) - 1
    assert np.all(np.diff(values[:i + 1]) < 0) and np.all(np.diff(values[i:]) > 0)
    obj = ss.Objective("traj", fn)
    res = ss.search(obj, 2, T_MIN, T_MAX, 7.0, lo, hi, 30, 1e-6, 1)
    assert abs(math.log(res["schedule"][1]) - u[i]) < u[1] - u[0]
    assert res["value"] <= values[i] + 1e-12
    assert all(lo < e["schedule"][1] < hi for e in obj.evaluated)


def test_three_steps_coordinate_descent_never_raises_the_objective(mixture_objective):
    fn = mixture_objective
    obj = ss.Objective("traj", fn)
    res = ss.search(obj, 3, T_MIN, T_MAX, 7.0, T_MIN, T_MAX, 12, 1e-4, 3)
    assert res["start"]["schedule"] == rho_grid(3, T_MIN, T_MAX, 7.0)
    assert len(res["steps"]) == 2 * 3                    # 2 middle times x 3 rounds
    prev = res["start"]["value"]
    for step in res["steps"]:
        assert step["before"] == prev and step["after"] <= step["before"]
        prev = step["after"]
    assert res["value"] == prev < res["start"]["value"]  # it improves on the rho grid here
    ts = res["schedule"]
    assert ts[0] == T_MAX > ts[1] > ts[2] > ts[3] == T_MIN
    assert res["value"] == fn(ts) == min(e["value"] for e in obj.evaluated)
    for e in obj.evaluated:                              # each time between its neighbours
        assert all(a > b for a, b in zip(e["schedule"], e["schedule"][1:]))


def test_the_objective_is_the_evaluations_final_rmse():
    from core.evaluation.evaluate import trajectory_errors

    teacher = _mixture()
    jumper = ctm_jumper(teacher)
    t_min, t_max = 0.01, 10.0           # a shorter ODE than [diffusion]'s: a faster test
    sched = [t_max, 0.9, t_min]
    fn = ss.trajectory_objective(jumper, teacher, 50, 11, t_min, t_max, torch.float64)
    ref = trajectory_errors(jumper, teacher, [], 50, 11, t_min, t_max, 7.0, torch.float64,
                            schedules={2: sched})
    assert fn(sched) == pytest.approx(ref[2]["final_rmse"], rel=1e-9)


def test_at_edge():
    assert ss.at_edge([80.0, 0.002005, 0.002], 0.002, 80.0)
    assert ss.at_edge([80.0, 79.5, 1.0, 0.002], 0.002, 80.0)
    assert not ss.at_edge([80.0, 1.3, 0.002], 0.002, 80.0)
    assert ss.at_edge([80.0, 1.0, 0.002], 1.0, 10.0)


def test_schedules_line_is_valid_evaluate_schedules():
    line = ss.schedules_line({3: [T_MAX, 3.123456789, 0.4, T_MIN], 2: [T_MAX, 0.8, T_MIN]})
    assert line == "schedules = { 2 = [80.0, 0.8, 0.002], 3 = [80.0, 3.12346, 0.4, 0.002] }"
    assert tomllib.loads(line)["schedules"]["3"][1] == 3.12346


def _search(run_main, cfg, *extra):
    rc, out, err = run_main("search-schedule", cfg, *extra)
    assert rc == 0, err
    return out


def test_search_schedule_on_the_quickstart_config(write_config, run_main, tmp_path):
    """The command: the teacher-initialised analytic-forward jumper (its store made first),
    K = 2 and 3; the printed schedules are valid [evaluate] schedules; the json's best is the
    best it evaluated; the run is deterministic."""
    cfg = write_config(FAST)
    out = _search(run_main, cfg)
    result = json.loads((tmp_path / "out" / "search_schedule.json").read_text())
    assert list(result) == ["analytic-forward"]
    r = result["analytic-forward"]
    assert r["jumper"] == "teacher-initialised" and r["objective"] == "trajectory"
    assert r["dtype"] == "float64" and r["num"] == 32
    assert sorted(r["schedules"]) == ["2", "3"]
    for K, e in r["schedules"].items():
        assert e["best"]["value"] == min(p["value"] for p in e["evaluated"])
        assert e["best"]["value"] <= e["rho_grid"]["value"]
        assert len(e["best"]["schedule"]) == int(K) + 1 and e["best"]["at_edge"] is False
    line = next(ln for ln in out.splitlines() if "[evaluate] schedules = " in ln)
    toml = line.split("[evaluate] ", 1)[1]
    rc, _, err = run_main(write_config(FAST + "", "again.toml"), "--dry-run",
                          "--set", f"evaluate.{toml.replace(' = ', '=', 1)}")
    assert rc == 0, err
    assert (tmp_path / "out" / "search_schedule.png").stat().st_size > 1000
    # deterministic: the same results again (the store is reused)
    first = (tmp_path / "out" / "search_schedule.json").read_bytes()
    _search(run_main, cfg)
    assert (tmp_path / "out" / "search_schedule.json").read_bytes() == first


def test_search_of_one_label_of_a_comparison_and_flags(write_config, run_main, tmp_path):
    cfg = FAST.replace(f"[precond]\n{PRECOND}\n", "").replace(
        'seed = 0\n[teacher]', 'seed = 0\npreconds = [{name = "ctm"}, {name = "cm"}]\n'
        '[teacher]', 1)
    path = write_config(cfg)
    _search(run_main, path, "--out", tmp_path / "elsewhere", "--set", "search.steps=[2]",
            "--set", 'search.label="cm"', "--set", "search.range=[0.05, 5.0]")
    result = json.loads((tmp_path / "elsewhere" / "search_schedule.json").read_text())
    assert list(result) == ["cm"] and list(result["cm"]["schedules"]) == ["2"]
    e = result["cm"]["schedules"]["2"]
    assert all(0.05 < p["schedule"][1] < 5.0 for p in e["evaluated"] if p["moved"] == 1)
    assert e["best"]["value"] == min(p["value"] for p in e["evaluated"])
    assert not (tmp_path / "out").exists()
    _search(run_main, path, "--set", "search.steps=[2]")          # both labels
    assert sorted(json.loads((tmp_path / "out" / "search_schedule.json").read_text())) == \
        ["cm", "ctm"]
    # a range that excludes the rho grid's middle time: the best lies inside it even where
    # the rho grid (reported beside it) is better
    _search(run_main, path, "--set", "search.steps=[2, 3]", "--set", 'search.label="ctm"',
            "--set", "search.range=[0.01, 0.1]", "--set", "search.iterations=4")
    r = json.loads((tmp_path / "out" / "search_schedule.json").read_text())["ctm"]
    for K in ("2", "3"):
        best = r["schedules"][K]["best"]
        assert all(0.01 < t < 0.1 for t in best["schedule"][1:-1])
        assert best["value"] > r["schedules"][K]["rho_grid"]["value"]


def test_student_and_exported_jumpers(write_config, run_main, tmp_path):
    """jumper = "exported" reads [export] path; "student" wants student.pt (none here: one
    error line); "auto" without student.pt is the teacher's."""
    cfg = write_config(CTM_FAST.replace('stages = ["coefficients", "export", "sample", '
                                        '"evaluate"]', 'stages = ["export"]'))
    rc, _, err = run_main(cfg)
    assert rc == 0, err
    _search(run_main, cfg, "--set", "search.jumper=exported", "--set", "search.steps=[2]")
    exported = json.loads((tmp_path / "out" / "search_schedule.json").read_text())["ctm"]
    assert exported["jumper"].startswith("exported ") and exported["dtype"] == "float32"
    _search(run_main, cfg, "--set", "search.jumper=auto", "--set", "search.steps=[2]",
            "--set", 'search.dtype="float32"')
    auto = json.loads((tmp_path / "out" / "search_schedule.json").read_text())["ctm"]
    assert auto["jumper"] == "teacher-initialised"
    # the exported file is the teacher-initialised jumper in float32: the same numbers
    a, b = exported["schedules"]["2"], auto["schedules"]["2"]
    assert a["rho_grid"]["value"] == pytest.approx(b["rho_grid"]["value"], rel=1e-5)
    rc, _, err = run_main("search-schedule", cfg, "--set", "search.jumper=student")
    assert rc == 2 and "student.pt: not found" in err and err.count("\n") == 1


class _FakeMetric:
    """A deterministic 'metric': the distance of the samples' mean to the reference's."""
    name = "fake"

    def compute(self, samples, reference, cache_dir):
        ref = reference.x.double()
        return {"fake": float((samples.double().mean(0) - ref.mean(0)).norm())}


def test_metric_objective(monkeypatch, write_config, run_main, tmp_path):
    """objective = auto picks [evaluate] metrics' first; its value at the best schedule is the
    metric of the samples drawn there as the evaluate stage draws them."""
    from core.host import plugins
    from core.export.sampling import CTMSampler, draw

    monkeypatch.setitem(plugins.registry()["metric"], "fake", plugins.Plugin(
        "metric", "fake", lambda o, c: _FakeMetric(), "test"))
    x0 = _mixture().sample_data(400, torch.Generator().manual_seed(5))[0].float().numpy()
    np.save(tmp_path / "x0.npy", x0)
    cfg = write_config(CTM_FAST.replace("[evaluate]\n", '[evaluate]\nmetrics = ["fake"]\n'
                                        'data = "x0.npy"\nsample_batch = 16\n')
                       .replace("[search]\n", "[search]\nsteps = [2]\n"))
    _search(run_main, cfg)
    r = json.loads((tmp_path / "out" / "search_schedule.json").read_text())["ctm"]
    assert r["objective"] == "fake"
    best = r["schedules"]["2"]["best"]
    teacher = _mixture()
    meta = {"shape": [2], "dtype": "float64", "num_classes": 0}
    x, _ = draw(ctm_jumper(teacher), meta, CTMSampler(0.0), best["schedule"], 32, 16, r["seed"],
                progress=False)
    ref = torch.from_numpy(x0).double()
    assert best["value"] == pytest.approx(float((torch.from_numpy(x).double().mean(0)
                                                 - ref.mean(0)).norm()), rel=1e-6)


def test_help_and_a_bad_flag(capsys):
    from core.run import main

    with pytest.raises(SystemExit) as e:
        main(["search-schedule", "--help"])
    assert e.value.code == 0 and "ctmkit search-schedule" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["search-schedule", "c.toml", "--bogus"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1


@pytest.fixture
def old_result(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "search_schedule.json").write_text("old\n")


def _one_error_line(rc, err, tmp_path, *needles):
    assert rc == 2 and err.count("\n") == 1 and err.startswith("error: "), err
    assert "Traceback" not in err
    for n in needles:
        assert n in err, err
    assert (tmp_path / "out" / "search_schedule.json").read_text() == "old\n"
    assert not (tmp_path / "out" / "search_schedule.png").exists()


@pytest.mark.parametrize("value,why", [
    ("[1.0, 1.0]", "has no interior"), ("[2.0, 1.0]", "has no interior"),
    ("[0.001, 1.0]", "must lie within"), ("[0.01, 100.0]", "must lie within"),
    ("[0.5]", "expected [lo, hi]")])
def test_bad_range_is_one_error_line(value, why, write_config, run_main, tmp_path, old_result):
    rc, _, err = run_main("search-schedule", write_config(CTM_FAST), "--set",
                          f"search.range={value}")
    _one_error_line(rc, err, tmp_path, "[search] range", why)


@pytest.mark.parametrize("setting,needles", [
    ("search.steps=[1]", ["[search] steps", ">= 2"]),
    ('search.objective="fid"', ["[search] objective", "[evaluate] metrics"]),
    ('search.label="bcm"', ["[search] label", "'bcm'"])])
def test_bad_settings_are_one_error_line(setting, needles, write_config, run_main, tmp_path,
                                         old_result):
    rc, _, err = run_main("search-schedule", write_config(CTM_FAST), "--set", setting)
    _one_error_line(rc, err, tmp_path, *needles)


def test_teacher_returning_nan_is_one_error_line(write_config, run_main, tmp_path, old_result):
    from core.export.jumper import script

    class NaNTeacher(torch.nn.Module):
        def forward(self, x, t):
            return x * float("nan")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        script(NaNTeacher()).save(str(tmp_path / "nan.pt"))
    cfg = CTM_FAST.replace(GMM, 'kind = "torchscript"\npath = "nan.pt"\nshape = [2]')
    rc, _, err = run_main("search-schedule", write_config(cfg))
    _one_error_line(rc, err, tmp_path, "NaN/Inf")


def test_a_jumper_returning_nan_is_one_error_line(mixture_objective):
    fn = mixture_objective
    obj = ss.Objective("trajectory error", lambda ts: math.nan if ts[1] < 1.0 else fn(ts))
    with pytest.raises(ss.UserError, match="NaN/Inf"):
        ss.search(obj, 2, T_MIN, T_MAX, 7.0, T_MIN, T_MAX, 10, 1e-3, 1)


@pytest.mark.parametrize("name", ["search_schedule.json", "search_schedule.png", "gap.json",
                                  "gap.png"])
def test_a_configured_output_over_a_command_file_is_refused(name, write_config, run_main):
    """core/pipeline/ownership.py knows the files ctmkit gap / search-schedule write in out_dir."""
    rc, _, err = run_main(write_config(CTM_FAST), "--dry-run", "--set",
                          f'export.path="{name}"')
    assert rc == 2 and err.count("\n") == 1 and "[export] path" in err and name in err, err


def test_a_foreign_out_dir_is_refused(write_config, run_main, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine\n")
    rc, _, err = run_main("search-schedule", write_config(CTM_FAST))
    assert rc == 2 and err.count("\n") == 1 and "holds files ctmkit did not write" in err, err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["notes.txt"]


def test_the_distilled_student_is_the_exported_one(write_config, run_main, tmp_path):
    """jumper = "student" (and "auto", student.pt being there) searches the distilled student:
    the same objective as the exported student jumper of the same run (both float32)."""
    text = CTM_FAST.replace('stages = ["coefficients", "export", "sample", "evaluate"]',
                            'stages = ["distill", "export"]').replace(
        'path = "jumper.pt"', 'path = "jumper.pt"\nsource = "student"')
    cfg = write_config(text + "[distill]\niterations = 4\nbatch_size = 16\nN = 8\n"
                       "max_ode_steps = 4\neval_every = 100\ncheckpoint_every = 4\n")
    rc, _, err = run_main(cfg)
    assert rc == 0, err
    values = {}
    for jumper in ("student", "auto", "exported"):
        _search(run_main, cfg, "--set", f"search.jumper={jumper}", "--set", "search.steps=[2]",
                "--set", 'search.dtype="float32"')
        r = json.loads((tmp_path / "out" / "search_schedule.json").read_text())["ctm"]
        assert r["jumper"] == ("distilled" if jumper != "exported" else
                               f"exported {tmp_path / 'out' / 'jumper.pt'}")
        values[jumper] = r["schedules"]["2"]["rho_grid"]["value"]
    assert values["student"] == values["auto"]
    assert values["exported"] == pytest.approx(values["student"], rel=1e-5)
