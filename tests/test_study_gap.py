"""tools/study_gap.py: its gap measurement (one reference solve for named schedules) is
`ctmkit gap`'s, figure for figure; jump error = g * gap for a denoiser-jumping
preconditioning; the order and spread helpers."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import study_gap  # noqa: E402

CONFIG = """
[run]
out_dir = "out"
[teacher]
kind = "gmm"
weights = [0.3, 0.7]
means = [[-2.0, 0.0], [1.0, 1.0]]
stds = [1.0, 0.5]
[precond]
name = "ctm"
[distill]
N = 6
[gap]
steps = [1, 2, 3]
num = 48
seed = 3
"""


def test_measure_gap_is_ctmkit_gaps(tmp_path):
    from core.host.config import load_config
    from core.gap import main as gap_main
    from core.diffusion.schedules import rho_grid

    cfg_path = tmp_path / "config.toml"
    cfg_path.write_text(CONFIG)
    assert gap_main([str(cfg_path), "--no-progress"]) == 0
    ref = json.loads((tmp_path / "out" / "gap.json").read_text())["ctm"]

    cfg = load_config(cfg_path)
    d = cfg.diffusion
    schedules = {str(K): rho_grid(K, d.t_min, d.t_max, d.rho) for K in (1, 2, 3)}
    got = study_gap.measure_gap({"ctm": cfg}, schedules, 48, 3, progress=False)["ctm"]
    assert got["train_grid"]["gap_rms"] == pytest.approx(ref["train_grid"]["gap_rms"], rel=1e-9)
    assert got["train_grid"]["jump_rms"] == pytest.approx(ref["train_grid"]["jump_rms"],
                                                          rel=1e-9)
    for K in ("1", "2", "3"):
        for a, b in zip(got["schedules"][K], ref["schedules"][K], strict=True):
            assert (a["t"], a["s"]) == pytest.approx((b["t"], b["s"]))
            assert a["gap_rms"] == pytest.approx(b["gap_rms"], rel=1e-9)
            assert a["jump_rms"] == pytest.approx(a["g"] * a["gap_rms"], rel=1e-9)  # Eqn. 8


def test_order_and_spread_helpers():
    assert study_gap.order({"ctm": 0.5, "analytic-forward": 0.1,
                            "analytic-backward": 0.7}) == "f < c < b"
    assert study_gap.ms([1.0, 1.0, 1.0]) == "1 ± 0"
    assert study_gap.ms([1.0, 2.0, 3.0]) == "2 ± 1"
    assert study_gap.ms([0.25]) == "0.25"
    assert study_gap.schedule_rms([{"x": 3.0}, {"x": 4.0}], "x") == pytest.approx(12.5 ** 0.5)
