"""Configuration of the image path: [run] preconds, [sample] runner, [distill] eval, metrics;
bad input gives one line and exit status 2; the Fig. 3 tool."""

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import QUICK_CONFIG

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.replace("[run]", "[run]\npreconds = [{name = \"ctm\"}]"),
     "either [precond] or [run] preconds"),
    (lambda c: c.replace('[precond]\nname = "analytic"\nvariant = "forward"',
                         "").replace("[run]", "[run]\npreconds = [{name = \"ctm\"}, "
                                              "{name = \"ctm\"}]"),
     "share a label"),
    (lambda c: c.replace("[run]", "[run]\npreconds = [\"ctm\"]").replace(
        '[precond]\nname = "analytic"\nvariant = "forward"', ""), "list of tables"),
    (lambda c: c + "runner = \"cpp\"\n", "runner"),
    (lambda c: c.replace('sampler = "ctm"', 'sampler = "cm"\nrunner = "ctm_sample"'),
     "ctm sampler only"),
    (lambda c: c.replace('sampler = "ctm"', 'sampler = "ctm"\nrunner = "ctm_sample"\n'
                         'binary = "nowhere/ctm_sample"'), "ctm_sample not found"),
    (lambda c: c.replace("[evaluate]", "[evaluate]\nmetrics = [\"fidd\"]"), "unknown metric"),
    (lambda c: c.replace("[evaluate]", "[evaluate]\nmetrics = [\"fid\"]\n[evaluate.metric]\n"
                         "inception = \"nowhere\""), "inception-2015-12-05.pt"),
    (lambda c: c.replace("[evaluate]", "[evaluate]\nmetric = 3"), "metric"),
    (lambda c: c + "[data]\nformat = \"idx\"\npath = \"missing.gz\"\n", "missing.gz"),
    (lambda c: c + "[data]\nformat = \"tiff\"\npath = \"x\"\n", "unknown dataset"),
])
def test_bad_image_configs_give_one_line(write_config, run_main, tmp_path, edit, message):
    rc, out, err = run_main(write_config(edit(QUICK_CONFIG)))
    assert rc == 2, (out, err)
    assert err.startswith("error:") and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "out" / "jumper.pt").exists()


def test_preconds_share_the_coefficients_and_compare(write_config, run_main, tmp_path):
    cfg = QUICK_CONFIG.replace('[precond]\nname = "analytic"\nvariant = "forward"', "").replace(
        "[run]", "[run]\npreconds = [{name = \"ctm\"}, {name = \"analytic\", variant = "
                 "\"forward\", label = \"fwd\"}]")
    rc, out, err = run_main(write_config(cfg))
    assert rc == 0, err
    o = tmp_path / "out"
    assert (o / "coefficients.h5").is_file() and not (o / "ctm" / "coefficients.h5").exists()
    import json
    table = json.loads((o / "comparison.json").read_text())
    assert set(table) == {"ctm", "fwd"}
    assert table["ctm"]["precond"] == "ctm" and table["fwd"]["variant"] == "forward"
    # the analytic jumper beats CTM's at 1 step on this exact teacher (paper Fig. 7)
    assert table["fwd"]["trajectory_error"]["1"]["final_rmse"] < \
        0.7 * table["ctm"]["trajectory_error"]["1"]["final_rmse"]


def test_fig3_tool_draws_a_metric_per_step_count(tmp_path):
    for label, base in (("ctm", 30.0), ("analytic", 20.0)):
        d = tmp_path / label
        d.mkdir()
        rows = ["iteration,loss,fid_featnet-abc_1,fid_featnet-abc_2,traj_err_1"]
        rows += [f"{i},0.1,{base / (1 + i / 100):.3f},{base / (2 + i / 100):.3f},0.5"
                 for i in (0, 100, 200)]
        (d / "metrics.csv").write_text("\n".join(rows) + "\n")
    from core.pipeline.compare import read_curves
    curves = read_curves(tmp_path / "ctm" / "metrics.csv")
    assert set(curves) == {"fid_featnet-abc", "traj_err"}
    assert curves["fid_featnet-abc"][2] == ([0, 100, 200], [15.0, 10.0, 7.5])
    out = tmp_path / "fig3.png"
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "plot_fid_curves.py"),
                           str(tmp_path / "ctm"), str(tmp_path / "analytic"), "--out", str(out)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "fid_featnet-abc" in proc.stdout and out.stat().st_size > 1000
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "plot_fid_curves.py"),
                           str(tmp_path / "ctm"), "--metric", "kid", "--out", str(out)],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.startswith("error:") and "kid" in proc.stderr


def test_a_stage_data_file_of_images_is_scaled_like_the_data_section(tmp_path):
    import numpy as np

    from core.data.source import DataSource
    x = np.zeros((4, 1, 3, 3), np.uint8)
    x[:, :, 1, 1] = 255
    np.save(tmp_path / "ref.npy", x)
    src = DataSource.from_file(tmp_path / "ref.npy", (1, 3, 3))
    assert src.x.dtype.is_floating_point and float(src.x.min()) == -1.0
    assert float(src.x.max()) == 1.0
    from core.base.errors import UserError
    with pytest.raises(UserError, match="teacher expects"):
        DataSource.from_file(tmp_path / "ref.npy", (3, 3, 3))
