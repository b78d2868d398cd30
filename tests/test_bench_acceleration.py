"""tools/bench_acceleration.py: the level / case logic on synthetic curves (pure functions) and
the report structure of a tiny run (20 iterations, 1 seed, exact gmm teacher)."""

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import bench_acceleration as ba  # noqa: E402

ITS = [0, 25, 50, 75, 100]


def test_first_reach_interpolates_and_reports_none():
    assert ba.first_reach(ITS, [1.0, 0.8, 0.6, 0.4, 0.2], 0.7) == pytest.approx(37.5)
    assert ba.first_reach(ITS, [1.0, 0.8, 0.6, 0.4, 0.2], 1.0) == 0.0
    assert ba.first_reach(ITS, [1.0, 0.8, 0.6, 0.4, 0.2], 0.1) is None


def test_reached_gives_the_ratio_of_iterations():
    ctm = (ITS, [1.0, 0.8, 0.6, 0.4, 0.2])
    ana = (ITS, [1.2, 0.6, 0.2, 0.2, 0.2])
    c = ba.compare(ctm, ana, 100, 1.0)                 # level 0.2: CTM at 100, analytic at 50
    assert c["case"] == "reached" and c["level"] == pytest.approx(0.2)
    assert c["ctm_its"] == 100 and c["analytic_its"] == 50 and c["ratio"] == pytest.approx(2.0)
    c = ba.compare(ctm, ana, 100, 0.5)                 # level 0.6: CTM at 50, analytic at 25
    assert c["ratio"] == pytest.approx(2.0) and ba.score(c) == pytest.approx(2.0)


def test_already_below_is_its_own_case_not_budget_over_one():
    ctm = (ITS, [1.0, 0.8, 0.6, 0.4, 0.2])
    ana = (ITS, [0.15, 0.15, 0.1, 0.1, 0.1])
    c = ba.compare(ctm, ana, 100, 1.0)
    assert c["case"] == "already below" and c["ratio"] is None
    assert ba.score(c) == math.inf and ba.cell(c) == "already below"


def test_not_reached_is_reported_as_such_with_an_upper_bound():
    ctm = (ITS, [1.0, 0.8, 0.6, 0.4, 0.2])
    ana = (ITS, [1.0, 0.9, 0.8, 0.7, 0.6])
    c = ba.compare(ctm, ana, 100, 1.0)
    assert c["case"] == "not reached" and c["ratio"] is None and c["analytic_its"] is None
    assert c["ratio_upper_bound"] == pytest.approx(1.0) and "not reached" in ba.cell(c)
    c = ba.compare(ctm, ana, 100, 0.5)                 # level 0.6: analytic gets there at 100
    assert c["case"] == "reached" and c["ratio"] == pytest.approx(0.5)


def test_ctm_at_start_when_training_did_not_improve_ctm():
    ctm = (ITS, [0.5, 0.7, 0.9, 0.8, 0.6])
    ana = (ITS, [0.8, 0.6, 0.5, 0.4, 0.3])
    c = ba.compare(ctm, ana, 100, 1.0)
    assert c["case"] == "ctm at start" and ba.score(c) == 0.0


def test_median_of_scores():
    assert ba.median([1.0, 3.0, 2.0]) == 2.0
    assert ba.median([1.0, 3.0]) == 2.0
    assert ba.median([1.0, math.inf]) == math.inf
    assert ba.median([1.0, math.inf, 2.0]) == 2.0


def test_tiny_benchmark_report_structure(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    s = dict(ba.QUICK, its=20, eval_every=10, eval_num=64, width=16, depth=2, batch=16,
             coef_timesteps=12, coef_samples=128)
    s.pop("seeds")
    lines = []
    r = ba.benchmark(s, tmp_path / "b", [0], ["ctm", "analytic-backward"], log=lambda *a, **k:
                     lines.append(a[0]))
    assert r["determinism_max_rel_gap_3step"] == 0.0
    assert set(r["metrics"]) == set(ba.METRICS)
    for m, mr in r["metrics"].items():
        for p in ("ctm", "analytic-backward"):
            c = r["curves"][f"{m}|{p}|0"]
            assert c["iteration"] == [0, 10, 20] and len(c["rmse"]) == 3
            assert mr["init"][p] == [c["rmse"][0]] and mr["final"][p] == [c["rmse"][-1]]
        levels = mr["levels"]["analytic-backward"]
        assert list(levels) == ["0.25", "0.5", "1"]
        for lv in levels.values():
            (c,) = lv["per_seed"]
            assert c["case"] in ("reached", "already below", "not reached", "ctm at start")
            assert lv["median"] == ba.score(c)
            assert lv["median_is_upper_bound"] == (c["case"] == "not reached")
    assert isinstance(r["acceleration_is_upper_bound"], bool)
    # the headline is the paper's (and CTM's) 2-step schedule, the rho grid
    assert ba.HEADLINE == "2-step rho-grid" and r["headline"] == ba.HEADLINE
    assert r["acceleration"] == r["metrics"]["2-step rho-grid"]["levels"]["analytic-backward"][
        "1"]["median"]
    # the middle time 0.6 is really used: the two 2-step metrics differ at iteration 0
    assert r["metrics"]["2-step mid 0.6"]["init"]["ctm"] != r["metrics"]["2-step rho-grid"][
        "init"]["ctm"]
    assert sum(line.startswith("seed 0 ") for line in lines) == 2
    ba.print_report(r, log=lines.append)
    ba.plot(r, tmp_path / "a.png")
    assert (tmp_path / "a.png").stat().st_size > 0
