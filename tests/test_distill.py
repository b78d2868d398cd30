"""The training stages: student = teacher at initialisation, training lowers the loss, exact
resume after kill -9, DDP world-size invariance, bad checkpoints and NaNs."""

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

CONFIG = """
[run]
out_dir = "out"
stages = ["teacher", "coefficients", "distill", "export"]
[data]
gmm = { weights = [0.3, 0.7], means = [[-2.0, 0.0], [1.0, 1.0]], stds = [0.4, 0.3] }
[network]
name = "mlp"
width = 48
depth = 2
emb_dim = 16
[teacher]
kind = "network"
[teacher_train]
iterations = 150
batch_size = 128
lr = 2e-3
checkpoint_every = 150
[precond]
name = "analytic"
variant = "backward"
[coefficients]
n_timesteps = 24
n_samples = 256
batch = 128
[distill]
iterations = 40
batch_size = 32
checkpoint_every = 10
eval_every = 20
eval_num = 64
N = 8
max_ode_steps = 4
"""


def run_cli(cfg: Path, *extra, env=None):
    return subprocess.run([sys.executable, "-m", "core.run", str(cfg), "--no-progress", *extra],
                          cwd=ROOT, capture_output=True, text=True, env=env)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Teacher + coefficients once; every test copies this folder."""
    base = tmp_path_factory.mktemp("trained")
    (base / "c.toml").write_text(CONFIG)
    r = run_cli(base / "c.toml", "--stages", "teacher,coefficients")
    assert r.returncode == 0, r.stderr
    return base


@pytest.fixture
def work(trained, tmp_path):
    import shutil
    shutil.copytree(trained, tmp_path, dirs_exist_ok=True)
    return tmp_path


def _run_obj(cfg_path):
    from core.host.config import load_config
    from core.pipeline.stages import Run
    run = Run(load_config(cfg_path), progress=False)
    return run


def test_network_student_equals_teacher_at_initialisation(work):
    from core.train.students import build_student
    from core.train.distill import StepContext
    run = _run_obj(work / "c.toml")
    student = build_student(run)
    D = run.teacher.denoiser(torch.float32)
    ctx = StepContext(precond=None, sigma_data=0.5, grid=None, teacher=None, solver=None,
                      target=None, max_ode_steps=1)
    x = torch.randn(64, 2) * 3
    t = torch.exp(torch.empty(64).uniform_(np.log(0.002), np.log(80)))
    for s in (t, t * 0.5, torch.full_like(t, 0.002)):
        Ds = ctx.denoiser(student(x, t, s), x, t)
        assert torch.allclose(Ds, D(x, t), atol=1e-6, rtol=1e-5)


def test_analytic_teacher_residual_student_equals_teacher(tmp_path):
    from core.train.students import build_student
    from core.train.distill import StepContext
    (tmp_path / "c.toml").write_text(
        "[teacher]\nkind = \"gmm\"\nweights = [0.5, 0.5]\nmeans = [[-1.0], [1.0]]\n"
        "stds = [0.3, 0.5]\n[network]\nwidth = 16\ndepth = 1\nemb_dim = 8\n")
    run = _run_obj(tmp_path / "c.toml")
    student = build_student(run)
    assert any(p.requires_grad for p in student.parameters())
    D = run.teacher.denoiser(torch.float32)
    x, t = torch.randn(32, 1), torch.rand(32) * 5 + 0.01
    ctx = StepContext(precond=None, sigma_data=0.5, grid=None, teacher=None, solver=None,
                      target=None, max_ode_steps=1)
    Ds = ctx.denoiser(student(x, t, t * 0.3), x, t)
    assert torch.allclose(Ds, D(x, t), atol=1e-5)


def _metrics(path):
    with open(path) as fh:
        return list(csv.DictReader(fh))


def test_short_distillation_lowers_loss_and_trajectory_error(work):
    cfg = work / "c.toml"
    cfg.write_text(CONFIG.replace("iterations = 40", "iterations = 120").replace(
        "checkpoint_every = 10", "checkpoint_every = 60").replace("eval_every = 20",
                                                                  "eval_every = 120"))
    r = run_cli(cfg, "--stages", "distill,export")
    assert r.returncode == 0, r.stderr
    rows = _metrics(work / "out" / "metrics.csv")
    losses = [float(r["loss"]) for r in rows if r["loss"]]        # window means, 10 its each
    assert np.mean(losses[-3:]) < np.mean(losses[:3])
    errs = [float(r["traj_err_2"]) for r in rows if r["traj_err_2"]]
    assert errs[-1] < errs[0]
    assert (work / "out" / "curves.png").is_file() and (work / "out" / "student.pt").is_file()
    # TensorBoard events beside the CSV (tensorboard is in the dev extra)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    ev = EventAccumulator(str(work / "out" / "metrics_tb"))
    ev.Reload()
    assert "loss" in ev.Tags()["scalars"] and "traj_err_2" in ev.Tags()["scalars"]
    assert [e.step for e in ev.Scalars("loss")][-1] == 120


def _weights(path):
    from core.export.jumper import load
    j, _ = load(path)
    return {k: v.clone() for k, v in j.state_dict().items()}


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["", 'lr_schedule = "cosine"\nlr_min = 1e-5\nwarmup = 4'])
def test_kill_9_and_resume_equals_uninterrupted(work, tmp_path_factory, schedule):
    import shutil
    if schedule:              # a decaying lr: a resumed run must follow the same curve
        (work / "c.toml").write_text(CONFIG.replace("[distill]", "[distill]\n" + schedule))
    other = tmp_path_factory.mktemp("uninterrupted")
    shutil.copytree(work, other, dirs_exist_ok=True)
    r = run_cli(other / "c.toml", "--stages", "distill,export")
    assert r.returncode == 0, r.stderr
    # interrupted: kill -9 once the iteration-20 checkpoint exists
    p = subprocess.Popen([sys.executable, "-m", "core.run", str(work / "c.toml"), "--no-progress",
                          "--stages", "distill"], cwd=ROOT, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    ck = work / "out" / "checkpoints" / "ckpt-00000020.pt"
    deadline = time.time() + 120
    while not ck.exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert ck.exists()
    assert not (work / "out" / "student.pt").exists() or p.returncode == 0
    r = run_cli(work / "c.toml", "--stages", "distill,export")
    assert r.returncode == 0, r.stderr
    assert "resuming" in r.stdout
    a, b = _weights(work / "out" / "jumper.pt"), _weights(other / "out" / "jumper.pt")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ra, rb = _metrics(work / "out" / "metrics.csv"), _metrics(other / "out" / "metrics.csv")
    assert [r["iteration"] for r in ra] == [r["iteration"] for r in rb]
    if schedule:              # the logged lr is the schedule's, in both runs
        from core.train.loop import LRSchedule
        f = LRSchedule(4e-4, 4, "cosine", 1e-5, 0, 40)
        logged = [r for r in ra if r["lr"]]                  # evaluation rows have no lr
        assert len(logged) >= 4
        for r in logged:
            expected = f(int(r["iteration"]) - 1)
            assert float(r["lr"]) == pytest.approx(expected, rel=1e-5)      # CSV: 6 digits
        assert [r["lr"] for r in ra] == [r["lr"] for r in rb]


@pytest.mark.slow
@pytest.mark.parametrize("micro_batch,dsm_weight", [(0, "1.0"), (5, "1.0"), (0, '"adaptive"')])
def test_torchrun_two_processes_match_single_process(work, tmp_path_factory, micro_batch,
                                                     dsm_weight):
    """Same weights whatever the world size (and, with micro_batch = 5 in the two-process
    run, whatever the gradient accumulation inside each process's 16 samples; and with CTM's
    adaptive DSM weight, whose last-layer gradients are averaged over the processes)."""
    import shutil
    single = tmp_path_factory.mktemp("single")
    shutil.copytree(work, single, dirs_exist_ok=True)
    cfg_text = CONFIG.replace("iterations = 40", "iterations = 12").replace(
        "checkpoint_every = 10", f"checkpoint_every = 12\ndsm_weight = {dsm_weight}")
    (single / "c.toml").write_text(cfg_text)
    (work / "c.toml").write_text(cfg_text.replace("[distill]",
                                                  f"[distill]\nmicro_batch = {micro_batch}"))
    r = run_cli(single / "c.toml", "--stages", "distill,export")
    assert r.returncode == 0, r.stderr
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                        "--master_port", str(29517 + micro_batch + 50 * ("a" in dsm_weight)), "-m", "core.run", str(work / "c.toml"),
                        "--no-progress", "--stages", "distill,export"],
                       cwd=ROOT, capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = _weights(work / "out" / "jumper.pt"), _weights(single / "out" / "jumper.pt")
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4), k


def test_corrupt_and_foreign_checkpoints_are_clear_errors(work):
    cfg = work / "c.toml"
    cfg.write_text(CONFIG.replace("iterations = 40", "iterations = 10"))
    assert run_cli(cfg, "--stages", "distill").returncode == 0
    ck = work / "out" / "checkpoints" / "ckpt-00000010.pt"
    good = ck.read_bytes()
    cfg.write_text(CONFIG.replace("iterations = 40", "iterations = 20"))
    ck.write_bytes(good[: len(good) // 2])
    r = run_cli(cfg, "--stages", "distill")
    assert r.returncode == 2 and "unreadable checkpoint" in r.stderr and r.stderr.count("\n") == 1
    ck.write_bytes(good)
    cfg.write_text(CONFIG.replace("iterations = 40", "iterations = 20").replace(
        "batch_size = 32", "batch_size = 16"))
    r = run_cli(cfg, "--stages", "distill")
    assert r.returncode == 2 and "different configuration" in r.stderr
    assert ck.read_bytes() == good


def test_nan_loss_stops_with_message_and_keeps_last_checkpoint(work):
    cfg = work / "c.toml"
    cfg.write_text(CONFIG.replace("batch_size = 32", "batch_size = 32\nlr = 1e30"))
    r = run_cli(cfg, "--stages", "distill")
    assert r.returncode == 2 and "non-finite loss" in r.stderr and r.stderr.count("\n") == 1
    found = sorted((work / "out" / "checkpoints").glob("ckpt-*.pt"))
    if found:   # whatever was written before the blow-up still loads
        state = torch.load(found[-1], weights_only=True)
        assert state["format"] == "ctmkit.checkpoint"
    assert not (work / "out" / "student.pt").exists()


@pytest.mark.parametrize("loss", ["cm", "dsm"])
def test_other_losses_train_through_the_same_engine(work, loss):
    cfg = work / "c.toml"
    cfg.write_text(CONFIG.replace("iterations = 40", "iterations = 10").replace(
        "[distill]", f'[distill]\nloss = "{loss}"'))
    r = run_cli(cfg, "--stages", "distill")
    assert r.returncode == 0, r.stderr
    rows = _metrics(work / "out" / "metrics.csv")
    assert all(np.isfinite(float(r["loss"])) for r in rows if r["loss"])
    assert (work / "out" / "student.pt").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("dsm_weight", ["1.0", '"adaptive"'])
def test_micro_batch_gives_the_whole_batch_result(work, tmp_path_factory, dsm_weight):
    """[distill] micro_batch accumulates gradients inside the batch: the trained weights equal
    the whole-batch ones to float32 rounding, for a fixed and for the adaptive DSM weight."""
    import shutil
    whole = tmp_path_factory.mktemp("whole")
    shutil.copytree(work, whole, dirs_exist_ok=True)
    text = CONFIG.replace("iterations = 40", "iterations = 6").replace(
        "checkpoint_every = 10", f"checkpoint_every = 6\ndsm_weight = {dsm_weight}")
    (whole / "c.toml").write_text(text)
    (work / "c.toml").write_text(text.replace("[distill]", "[distill]\nmicro_batch = 5"))
    for d in (whole, work):
        r = run_cli(d / "c.toml", "--stages", "distill,export")
        assert r.returncode == 0, r.stderr
    a, b = _weights(work / "out" / "jumper.pt"), _weights(whole / "out" / "jumper.pt")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=2e-6, rtol=1e-5), k
    moved = False
    ma, mb = _metrics(work / "out" / "metrics.csv"), _metrics(whole / "out" / "metrics.csv")
    assert len(ma) == len(mb)
    for ra, rb in zip(ma, mb):
        if not rb["loss"]:                  # an evaluation-only row (iteration 0)
            continue
        moved |= float(ra["loss"]) != 0
        assert float(ra["loss"]) == pytest.approx(float(rb["loss"]), rel=1e-5)
        assert float(ra["dsm_weight"]) == pytest.approx(float(rb["dsm_weight"]), rel=1e-4)
    assert moved


# --- warm starts ([student] init = <path>; issue: CTM's whole recipe, item 1) -------------------

def _stage2(work, init: str, extra: str = "", iterations: int = 2) -> Path:
    """A second run in out2/ that starts from `init`, sharing out/'s teacher and coefficients."""
    out = work / "out"
    text = CONFIG.replace('out_dir = "out"', 'out_dir = "out2"').replace(
        'stages = ["teacher", "coefficients", "distill", "export"]', 'stages = ["distill"]'
    ).replace('kind = "network"', f'kind = "network"\npath = "{out / "teacher.pt"}"').replace(
        "[coefficients]", f'[coefficients]\npath = "{out / "coefficients.h5"}"').replace(
        "iterations = 40", f"iterations = {iterations}").replace(
        "checkpoint_every = 10", "checkpoint_every = 2\nlr = 1e-4\nema = [0.9, 0.5]")
    text += f'[student]\ninit = "{init}"\n{extra}\n'
    (work / "c2.toml").write_text(text)
    return work / "c2.toml"


@pytest.fixture
def stage1(work):
    cfg = work / "c.toml"
    cfg.write_text(CONFIG.replace("iterations = 40", "iterations = 6").replace(
        "checkpoint_every = 10", "checkpoint_every = 3\nema = [0.9, 0.5]").replace(
        "eval_every = 20", "eval_every = 100"))
    r = run_cli(cfg, "--stages", "distill")
    assert r.returncode == 0, r.stderr
    return work


def _warm_modules(cfg_path):
    """The student, target and EMAs a run of `cfg_path` starts from (as distill() makes them)."""
    from core.train import distill, warm_start
    from core.train.students import build_student
    from core.train.loop import EMA
    run = _run_obj(cfg_path)
    precond = run.precond()
    ws = distill._warm_start(run, precond)
    student = build_student(run)
    warm_start.load_online(ws, student)
    target, emas = EMA(student, 0.99), [EMA(student, r) for r in run.cfg.distill.ema]
    warm_start.load_averages(ws, target.model, [e.model for e in emas])
    return ws, student, target.model, [e.model for e in emas]


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_warm_start_sources_load_what_they_promise(stage1):
    from core.base.io import load_torch
    out = stage1 / "out"
    student_pt = load_torch(out / "student.pt", "student")["state_dict"]
    ckpt = load_torch(out / "checkpoints" / "ckpt-00000006.pt", "checkpoint")
    # a student.pt: online weights, target and every EMA start as its weights
    ws, s, tgt, emas = _warm_modules(_stage2(stage1, str(out / "student.pt")))
    assert ws.kind == "student" and ws.iteration == 6
    for m in (s, tgt, *emas):
        assert _same(m.state_dict(), student_pt)
    # an out_dir: its newest checkpoint's online weights, everything else from them ...
    ws, s, tgt, emas = _warm_modules(_stage2(stage1, str(out)))
    assert ws.kind == "checkpoint" and ws.iteration == 6 and ws.path.name == "ckpt-00000006.pt"
    assert _same(s.state_dict(), ckpt["modules"]["student"])
    assert _same(emas[1].state_dict(), ckpt["modules"]["student"])
    assert not _same(ckpt["modules"]["ema_1"], ckpt["modules"]["student"])
    # ... and with init_ema its EMAs and stop-gradient target
    ws, s, tgt, emas = _warm_modules(_stage2(stage1, str(out), "init_ema = true"))
    assert _same(tgt.state_dict(), ckpt["modules"]["target"])
    assert _same(emas[0].state_dict(), ckpt["modules"]["ema_0"])
    assert _same(emas[1].state_dict(), ckpt["modules"]["ema_1"])


@pytest.mark.slow
def test_warm_started_run_records_its_source_resumes_exactly_and_refuses_a_changed_one(stage1):
    import json
    import shutil
    from core.base.io import load_torch
    from core.train.students import save_student
    out = stage1 / "out"
    cfg = _stage2(stage1, str(out), "init_ema = true\ninit_optimizer = true", iterations=4)
    r = run_cli(cfg)
    assert r.returncode == 0, r.stderr
    rec = json.loads((stage1 / "out2" / "run.json").read_text())["student_init"]
    assert rec["iteration"] == 6 and rec["path"].endswith("ckpt-00000006.pt")
    assert len(rec["sha256"]) == 64
    rows = _metrics(stage1 / "out2" / "metrics.csv")
    assert [r["iteration"] for r in rows if r["loss"]][-1] == "4"     # counts from 0 again
    # kill nothing, but resume from the new run's own iteration-2 checkpoint: same weights
    done = load_torch(stage1 / "out2" / "student.pt", "student")["state_dict"]
    (stage1 / "out2" / "checkpoints" / "ckpt-00000004.pt").unlink()
    (stage1 / "out2" / "student.pt").unlink()
    r = run_cli(cfg)
    assert r.returncode == 0 and "resuming" in r.stdout, r.stderr
    assert _same(load_torch(stage1 / "out2" / "student.pt", "student")["state_dict"], done)
    # the source changes under the new run: its checkpoints are another configuration
    shutil.rmtree(out / "checkpoints")
    st = load_torch(out / "student.pt", "student")
    net = _run_obj(stage1 / "c.toml")
    from core.train.students import build_student
    s = build_student(net)
    s.load_state_dict({k: v * 1.01 for k, v in st["state_dict"].items()})
    save_student(out / "student.pt", s, st["teacher_fingerprint"])
    cfg = _stage2(stage1, str(out / "student.pt"), iterations=4)
    (stage1 / "out2" / "stages.json").unlink()
    r = run_cli(cfg)
    assert r.returncode == 2 and "different configuration" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_warm_start_sources_that_do_not_fit_are_one_error_line(stage1):
    out = stage1 / "out"
    cases = [
        (str(stage1 / "nowhere.pt"), "", "does not exist"),
        (str(stage1), "", "without distill checkpoints"),
        (str(out / "teacher.pt"), "", "neither a ctmkit student.pt nor a distill checkpoint"),
        (str(out / "student.pt"), "init_ema = true", "init_ema / init_optimizer need"),
        (str(out / "checkpoints" / "ckpt-00000006.pt"), "", "mixes F_theta"),
    ]
    for init, extra, message in cases:
        cfg = _stage2(stage1, init, extra)
        if "F_theta" in message:              # a D-mixing (analytic) source into a cm run
            cfg.write_text(cfg.read_text().replace('name = "analytic"\nvariant = "backward"',
                                                   'name = "cm"'))
        r = run_cli(cfg)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and message in lines[0], (init, r.stderr)
    # weights of another shape (a layer narrower): they do not fit
    from core.base.io import load_torch
    from core.train.students import save_student
    st = load_torch(out / "student.pt", "student")
    k = next(k for k, v in st["state_dict"].items() if v.dim() == 2)
    narrow = {n: (v[:-1] if n == k else v) for n, v in st["state_dict"].items()}

    class Holder(torch.nn.Module):
        def state_dict(self, *a, **kw):
            return narrow
    save_student(stage1 / "narrow.pt", Holder(), st["teacher_fingerprint"])
    r = run_cli(_stage2(stage1, str(stage1 / "narrow.pt")))
    assert r.returncode == 2 and "does not fit this run's student" in r.stderr, r.stderr
    # a truncated source
    bad = stage1 / "truncated.pt"
    data = (out / "student.pt").read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    r = run_cli(_stage2(stage1, str(bad)))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    # {label} without [run] preconds
    r = run_cli(_stage2(stage1, "../{label}/out"), "--dry-run")
    assert r.returncode == 2 and "{label}" in r.stderr


def test_adaptive_dsm_weight_is_the_definition_on_both_chunk_paths(work):
    """CTM's adaptive DSM weight w = ||d L_main / d W_last|| / (||d L_dsm / d W_last|| + 1e-8)
    over the whole batch, and the gradient of L_main + w L_dsm: the same (to float rounding)
    from the one-pass path (one chunk) and from gradient accumulation over micro-batches."""
    from core.train.distill import Distiller, last_layer
    cfg = work / "c.toml"
    cfg.write_text(CONFIG.replace("N = 8", "N = 8\ndsm_weight = \"adaptive\""))
    dl = Distiller(_run_obj(cfg))
    b = dl.draw(0)
    ls = dl.losses(b)
    params = dl.params
    last = params[last_layer(params)]
    g1 = torch.autograd.grad(ls.main, last, retain_graph=True)[0]
    g2 = torch.autograd.grad(ls.dsm, last, retain_graph=True)[0]
    w_ref = g1.norm() / (g2.norm() + 1e-8)
    ref = torch.autograd.grad(ls.main + w_ref * ls.dsm, params)
    assert float(w_ref) != 1.0
    for micro in (32, 8):
        dl.micro = micro
        stats, (w, _), _ = dl.backward(b)
        assert torch.isclose(torch.as_tensor(w), w_ref, rtol=1e-5)
        assert torch.isclose(stats[2], (ls.main + w_ref * ls.dsm).double(), rtol=1e-5)
        for p, r in zip(params, ref):
            assert torch.allclose(p.grad, r, rtol=1e-4, atol=1e-6)
    dl.data.close()
