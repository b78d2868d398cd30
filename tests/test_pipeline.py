"""`python -m core.run`: the stages end to end, rerunning, and bad input of many kinds."""

import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from conftest import QUICK_CONFIG
from core.export.jumper import load as load_jumper


def test_quick_pipeline_runs_all_stages_and_reuses_coefficients(write_config, run_main, tmp_path):
    cfg = write_config()
    rc, out, err = run_main(cfg)
    assert rc == 0, err
    o = tmp_path / "out"
    for f in ("coefficients.h5", "coefficients.png", "jumper.pt", "samples.npy", "samples.png",
              "metrics.json"):
        assert (o / f).is_file(), f
    x = np.load(o / "samples.npy")
    assert x.shape == (300, 2) and x.dtype == np.float32 and np.all(np.isfinite(x))
    metrics = json.loads((o / "metrics.json").read_text())
    assert set(metrics["trajectory_error"]) == {"1", "2"}
    assert metrics["samples"]["sliced_w1"] < 0.5
    _, meta = load_jumper(o / "jumper.pt")
    assert meta["precond"] == "analytic" and meta["variant"] == "forward"
    assert meta["shape"] == [2] and meta["t_min"] == 0.002 and meta["t_max"] == 80.0
    # rerunning: coefficients are reused (file untouched), other stages rerun alone
    stamp = (o / "coefficients.h5").stat().st_mtime_ns
    rc, out, err = run_main(cfg, "--stages", "coefficients,sample")
    assert rc == 0 and "reusing" in out
    assert (o / "coefficients.h5").stat().st_mtime_ns == stamp
    np.testing.assert_array_equal(np.load(o / "samples.npy"), x)   # same seed, same samples
    # a changed setting recomputes
    write_config(QUICK_CONFIG.replace("n_samples = 512", "n_samples = 256"))
    rc, out, err = run_main(cfg, "--stages", "coefficients")
    assert rc == 0 and "reusing" not in out
    assert (o / "coefficients.h5").stat().st_mtime_ns != stamp


def test_torchscript_teacher_gives_the_same_coefficients_as_gmm(write_config, run_main, tmp_path):
    from core.export.jumper import script
    from plugins.teachers.gmm import GMMTeacher

    teacher = GMMTeacher([0.3, 0.7], [[-2.0, 0.0], [1.0, 1.0]], [1.0, 0.5])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        script(teacher.denoiser(torch.float32)).save(str(tmp_path / "teacher.pt"))
    x0, _ = teacher.sample_data(4000, torch.Generator().manual_seed(0))
    np.save(tmp_path / "x0.npy", x0.numpy())
    rc, _, err = run_main(write_config(), "--stages", "coefficients")
    assert rc == 0, err
    ts_cfg = QUICK_CONFIG.replace('out_dir = "out"', 'out_dir = "out_ts"').replace(
        'kind = "gmm"\nweights = [0.3, 0.7]\nmeans = [[-2.0, 0.0], [1.0, 1.0]]\nstds = [1.0, 0.5]',
        'kind = "torchscript"\npath = "teacher.pt"\nshape = [2]').replace(
        'grid = "log"', 'grid = "log"\ndata = "x0.npy"')
    rc, _, err = run_main(write_config(ts_cfg, "ts.toml"), "--stages", "coefficients,export,sample")
    assert rc == 0, err
    from core.diffusion.coefficients import store
    a, b = store.load(tmp_path / "out/coefficients.h5"), store.load(tmp_path / "out_ts/coefficients.h5")
    # different x0 draws (data file vs exact sampling): agree within Monte-Carlo error
    assert np.abs(a.l - b.l).max() < 0.05 and np.abs(a.s - b.s).max() < 0.15
    assert (tmp_path / "out_ts/samples.npy").is_file()


def test_list_plugins(run_main):
    rc, out, _ = run_main("--list-plugins")
    assert rc == 0
    rows = {tuple(line.split()[:2]) for line in out.splitlines()}
    for kind, name in [("teacher", "gmm"), ("teacher", "torchscript"), ("precond", "cm"),
                       ("precond", "ctm"), ("precond", "bcm"), ("precond", "analytic"),
                       ("solver", "euler"), ("solver", "heun"), ("sampler", "ctm"),
                       ("sampler", "cm")]:
        assert (kind, name) in rows
    assert all(len(line.split()) >= 3 for line in out.splitlines())


BAD_CONFIGS = [
    ("[run\nout_dir = 1", "not valid TOML"),
    (QUICK_CONFIG + "\n[bogus]\n", "unknown section [bogus]"),
    (QUICK_CONFIG.replace("seed = 0\n[teacher]", "seed = 0\nsede = 1\n[teacher]"), "unknown key 'sede'"),
    (QUICK_CONFIG.replace("steps = 2", 'steps = "two"'), "[sample] steps: expected an integer"),
    (QUICK_CONFIG.replace("steps = 2", "steps = 0"), "[sample] steps: must be >= 1"),
    (QUICK_CONFIG.replace('kind = "gmm"', 'kind = "nope"'), "unknown teacher 'nope'"),
    (QUICK_CONFIG.replace('kind = "gmm"\n', ""), "[teacher] kind: is required"),
    (QUICK_CONFIG.replace('name = "analytic"', 'name = "fancy"'), "unknown precond 'fancy'"),
    (QUICK_CONFIG.replace('variant = "forward"', 'variant = "sideways"'), "variant: must be one of"),
    (QUICK_CONFIG.replace('sampler = "ctm"', 'sampler = "ctm"\ngamma = 2.0'), "gamma: must be <= 1.0"),
    (QUICK_CONFIG.replace('sampler = "ctm"', 'sampler = "ctm"\ngama = 0.5'), "unknown key 'gama'"),
    (QUICK_CONFIG.replace("stds = [1.0, 0.5]", "stds = [1.0]"), "one entry per component"),
    (QUICK_CONFIG.replace("stds = [1.0, 0.5]", "stds = [1.0, -0.5]"), "must be > 0"),
    (QUICK_CONFIG.replace("means = [[-2.0, 0.0], [1.0, 1.0]]", "means = [[-2.0, 0.0], [1.0]]"),
     "same length"),
    (QUICK_CONFIG.replace('grid = "log"', 'grid = "cosine"'), "grid: must be one of"),
    (QUICK_CONFIG.replace('stages = ["coefficients", "export", "sample", "evaluate"]',
                          'stages = ["coefficients", "train"]'), "unknown stage 'train'"),
    (QUICK_CONFIG.replace("seed = 0\n[teacher]", 'seed = 0\ndevice = "tpu"\n[teacher]'),
     "device must be"),
    ("[run]\nout_dir = \"out\"\n[diffusion]\nt_min = 5.0\nt_max = 1.0\n[teacher]\nkind = \"gmm\"",
     "t_min: must be below t_max"),
    (QUICK_CONFIG.replace("n_samples = 512", "n_samples = 1e3"), "expected an integer"),
    (QUICK_CONFIG.replace('kind = "gmm"', 'kind = "torchscript"\npath = "missing.pt"\nshape = [2]')
     .replace("weights = [0.3, 0.7]\nmeans = [[-2.0, 0.0], [1.0, 1.0]]\nstds = [1.0, 0.5]\n", ""),
     "teacher file not found"),
]


@pytest.mark.parametrize("text,msg", BAD_CONFIGS, ids=range(len(BAD_CONFIGS)))
def test_bad_config_is_one_line_exit_2_and_writes_nothing(text, msg, write_config, run_main,
                                                         tmp_path):
    rc, out, err = run_main(write_config(text))
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and msg in err, err
    assert not (tmp_path / "out").exists()


def test_missing_config_file(run_main, tmp_path):
    rc, _, err = run_main(tmp_path / "nope.toml")
    assert rc == 2 and "config file not found" in err and err.count("\n") == 1


@pytest.fixture(scope="module")
def _finished_once(tmp_path_factory):
    from core.run import main

    base = tmp_path_factory.mktemp("finished")
    (base / "config.toml").write_text(QUICK_CONFIG)
    assert main([str(base / "config.toml"), "--no-progress"]) == 0
    return base


@pytest.fixture
def finished_run(_finished_once, tmp_path, capsys):
    """A copy of one complete run (config.toml + out/) in this test's tmp_path."""
    import shutil

    shutil.copytree(_finished_once, tmp_path, dirs_exist_ok=True)
    capsys.readouterr()
    return tmp_path / "config.toml", tmp_path / "out"


@pytest.mark.parametrize("damage,stages,msg", [
    ("truncate coefficients.h5", "export", "unreadable coefficient file"),
    ("garbage coefficients.h5", "export", "unreadable coefficient file"),
    ("delete coefficients.h5", "export", "coefficient file not found"),
    ("truncate jumper.pt", "sample", "not a loadable TorchScript jumper"),
    ("garbage jumper.pt", "sample", "not a loadable TorchScript jumper"),
    ("delete jumper.pt", "sample", "jumper file not found"),
    ("truncate samples.npy", "evaluate", "samples.npy: unreadable"),
])
def test_damaged_files_give_one_line_and_leave_other_outputs_intact(
        finished_run, run_main, damage, stages, msg):
    cfg, o = finished_run
    action, name = damage.split()
    before = {p.name: p.read_bytes() for p in o.iterdir() if p.name != name}
    target = o / name
    if action == "truncate":
        target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    elif action == "garbage":
        target.write_bytes(b"\x00garbage" * 100)
    else:
        target.unlink()
    rc, _, err = run_main(cfg, "--stages", stages)
    assert rc == 2 and msg in err and err.count("\n") == 1, err
    after = {p.name: p.read_bytes() for p in o.iterdir() if p.name != name}
    assert before == after
    assert not [p for p in o.iterdir() if p.name.endswith(".tmp")]


def test_non_jumper_torchscript_file_is_rejected(finished_run, run_main):
    cfg, o = finished_run
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.script(torch.nn.Linear(2, 2)).save(str(o / "jumper.pt"))
    rc, _, err = run_main(cfg, "--stages", "sample")
    assert rc == 2 and "not a ctmkit jumper" in err


def test_coefficients_for_another_teacher_are_not_used(finished_run, run_main, write_config):
    cfg, o = finished_run
    write_config(QUICK_CONFIG.replace("stds = [1.0, 0.5]", "stds = [1.0, 0.6]"))
    rc, _, err = run_main(cfg, "--stages", "export")
    assert rc == 2 and "computed for another teacher" in err


def test_cli_in_a_subprocess_has_no_traceback(tmp_path):
    (tmp_path / "c.toml").write_text("[run]\nstages = 3\n[teacher]\nkind='gmm'\n")
    r = subprocess.run([sys.executable, "-m", "core.run", str(tmp_path / "c.toml")],
                       capture_output=True, text=True,
                       cwd=os.path.dirname(os.path.dirname(__file__)))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert "[run] stages: expected a list of strings" in r.stderr


def test_export_also_writes_an_aoti_package(finished_run, run_main):
    from core.export.aoti import load_aoti

    cfg, o = finished_run
    cfg.write_text(cfg.read_text().replace('path = "jumper.pt"', 'path = "jumper.pt"\naoti = true'))
    rc, out, err = run_main(cfg, "--stages", "export")
    assert rc == 0, err
    ts_jumper, meta = load_jumper(o / "jumper.pt")
    pt2, meta2 = load_aoti(o / "jumper.pt2")
    assert meta2["precond"] == meta["precond"] and meta2["shape"] == meta["shape"]
    x = torch.randn(5, 2) * 80
    t, s = torch.full((5,), 80.0), torch.full((5,), 0.5)
    assert torch.allclose(pt2(x, t, s), ts_jumper(x, t, s), atol=1e-5, rtol=1e-5)
