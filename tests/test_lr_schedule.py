"""Learning-rate schedules of [teacher_train] and [distill] (issue: CTM's whole recipe, item 2):
closed forms, the config's checks, and what enters the checkpoint fingerprint. Exact resume
across kill -9 with a cosine schedule: tests/test_distill.py::test_kill_9_and_resume_..."""

import math

import pytest

from core.train.loop import LRSchedule, with_lr_schedule


def test_constant_with_warmup_is_the_old_linear_warmup():
    f = LRSchedule(1e-3, warmup=4)
    assert [f(i) for i in range(6)] == [2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3]
    assert LRSchedule(1e-3)(0) == 1e-3


def test_linear_and_cosine_run_from_lr_after_warmup_to_lr_min_at_the_last_iteration():
    for kind in ("linear", "cosine"):
        f = LRSchedule(1e-3, warmup=10, kind=kind, lr_min=1e-5, iterations=111)
        assert f(9) == pytest.approx(1e-3) and f(10) == pytest.approx(1e-3)
        assert f(110) == pytest.approx(1e-5) and f(500) == pytest.approx(1e-5)
        assert f(4) == pytest.approx(0.5e-3)                       # still warming up
    mid = 10 + 50                                                 # half-way through the decay
    assert LRSchedule(1e-3, 10, "linear", 1e-5, 0, 111)(mid) == pytest.approx((1e-3 + 1e-5) / 2)
    assert LRSchedule(1e-3, 10, "cosine", 1e-5, 0, 111)(mid) == pytest.approx((1e-3 + 1e-5) / 2)
    quarter = LRSchedule(1e-3, 10, "cosine", 0.0, 0, 111)(10 + 25)
    assert quarter == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi / 4)))


def test_inverse_sqrt_is_edm2s():
    f = LRSchedule(1e-2, kind="inverse_sqrt", ref=100)
    assert f(0) == f(100) == 1e-2
    assert f(400) == pytest.approx(1e-2 / 2) and f(10_000) == pytest.approx(1e-3)
    g = LRSchedule(1e-2, warmup=10, kind="inverse_sqrt", ref=5)     # EDM2: the two multiply
    assert g(4) == pytest.approx(1e-2 * 0.5)


def test_fingerprint_view():
    from types import SimpleNamespace as NS
    base = {"lr": 1e-3, "warmup": 0}
    cfg = NS(lr_schedule="constant", lr_min=0.0, lr_ref_iterations=0, iterations=100)
    keys = dict(base, lr_schedule="constant", lr_min=0.0, lr_ref_iterations=0)
    assert with_lr_schedule(keys, cfg) == base       # as before schedules: old runs resume
    cos = NS(lr_schedule="cosine", lr_min=1e-5, lr_ref_iterations=0, iterations=100)
    view = with_lr_schedule(dict(keys, lr_schedule="cosine", lr_min=1e-5), cos)
    assert view["iterations"] == 100 and view["lr_schedule"] == "cosine"
    inv = NS(lr_schedule="inverse_sqrt", lr_min=0.0, lr_ref_iterations=50, iterations=100)
    assert "iterations" not in with_lr_schedule(keys, inv)    # extendable: lr ignores the end


@pytest.mark.parametrize("section", ["distill", "teacher_train"])
@pytest.mark.parametrize("keys,message", [
    ('lr_schedule = "step"', "must be one of"),
    ('lr_schedule = "cosine"\nlr_min = 1.0', "lr_min"),
    ('lr_schedule = "inverse_sqrt"', "lr_ref_iterations"),
    ("lr_min = -1e-5", "lr_min"),
])
def test_bad_schedules_are_one_error_line(write_config, run_main, section, keys, message):
    from conftest import QUICK_CONFIG
    cfg = write_config(QUICK_CONFIG + f"[{section}]\n{keys}\n")
    rc, _, err = run_main(cfg, "--dry-run")
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: ")
    assert message in lines[0] and section in lines[0]
