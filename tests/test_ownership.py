"""Own only what you wrote; processes and locks (issue 20, items 1 and 5).

A run never writes over its own inputs or another of its outputs, never adopts a folder that
is not ctmkit's, sweeps only the temporaries of its own dead runs, cannot be joined by a
second run (not even after `.lock` is deleted or from a sub-folder), and leaves no child
running when it is terminated or killed."""

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from core.base.errors import UserError

ROOT = Path(__file__).resolve().parents[1]

#: a gmm teacher exported as a CTM jumper: the cheapest run that writes files
EXPORT_CONFIG = """
[run]
out_dir = "out"
stages = ["export"]
[teacher]
kind = "gmm"
weights = [0.3, 0.7]
means = [[-2.0, 0.0], [1.0, 1.0]]
stds = [1.0, 0.5]
[precond]
name = "ctm"
[export]
path = "jumper.pt"
"""


@pytest.fixture
def cfg(write_config):
    return write_config(EXPORT_CONFIG)


def tree(folder: Path) -> dict:
    """sha256 of every file below `folder`."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def refused(run_main, *argv) -> str:
    rc, _, err = run_main(*argv)
    assert rc == 2 and err.count("\n") == 1 and err.startswith("error: "), (rc, err)
    assert "Traceback" not in err
    return err


# --- 1. no output over an input or another output -------------------------------------------

@pytest.mark.parametrize("path, role", [
    ("../config.toml", "the config file"),
    ("coefficients.h5", "[coefficients] path"),
    ("run.json", "out_dir's run.json"),
    (".lock", "out_dir's .lock"),
    ("samples.npy", "samples.npy"),
])
def test_an_output_over_an_input_or_another_output_is_refused_before_any_write(
        path, role, cfg, run_main, tmp_path):
    before = tree(tmp_path)
    err = refused(run_main, cfg, "--set", f'export.path="{path}"')
    assert "[export] path (the jumper)" in err and role in err, err
    assert tree(tmp_path) == before and not (tmp_path / "out").exists()
    refused(run_main, cfg, "--dry-run", "--set", f'export.path="{path}"')


def test_collisions_are_found_through_symlinks_hard_links_and_dotdot(cfg, run_main, tmp_path):
    (tmp_path / "data").mkdir()
    x0 = tmp_path / "data" / "x0.npy"
    x0.write_bytes(b"the user's data")
    text = cfg.read_text().replace("[export]", '[coefficients]\ndata = "data/x0.npy"\n[export]')
    cfg.write_text(text)
    os.link(x0, tmp_path / "hard.npy")
    (tmp_path / "link.pt").symlink_to(x0)
    for path in ("../data/x0.npy", str(tmp_path / "hard.npy"), str(tmp_path / "link.pt"),
                 "../data/../data/./x0.npy"):
        err = refused(run_main, cfg, "--set", f'export.path="{path}"')
        assert "[coefficients] data" in err, err
    assert x0.read_bytes() == b"the user's data"


def test_an_output_that_is_a_device_fifo_or_folder_is_refused(cfg, run_main, tmp_path):
    import stat
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "folder").mkdir()
    cases = [("fifo", "not a regular file"), ("folder", "a folder is there")]
    try:         # a copy of /dev/null: the real one must never be at stake in a test
        os.mknod(tmp_path / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        cases.append(("null", "not a regular file"))
    except PermissionError:
        pass
    for name, why in cases:
        err = refused(run_main, cfg, "--set", f'export.path="{tmp_path / name}"')
        assert why in err, err
    assert not (tmp_path / "null").exists() or (tmp_path / "null").is_char_device()


def test_two_runs_of_a_comparison_may_not_write_one_file(cfg, run_main, tmp_path):
    text = cfg.read_text().replace('[precond]\nname = "ctm"\n', "").replace(
        'stages = ["export"]', 'stages = ["export"]\npreconds = [{name = "ctm"}, '
                              '{name = "cm"}]')
    cfg.write_text(text)
    shared = tmp_path / "one.pt"
    err = refused(run_main, cfg, "--set", f'export.path="{shared}"')
    assert "of another of its runs" in err, err
    # their own jumpers (the default) and the shared metrics cache are fine
    assert run_main(cfg)[0] == 0
    assert (tmp_path / "out" / "ctm" / "jumper.pt").is_file()
    assert (tmp_path / "out" / "cm" / "jumper.pt").is_file()


def test_a_user_named_path_outside_out_dir_is_allowed(cfg, run_main, tmp_path):
    elsewhere = tmp_path / "shared" / "jumper.pt"
    rc, _, err = run_main(cfg, "--set", f'export.path="{elsewhere}"')
    assert rc == 0, err
    assert elsewhere.is_file()


# --- out_dir must be ctmkit's ---------------------------------------------------------------

def test_root_is_refused_as_out_dir(cfg, run_main):
    """Through --dry-run and the check itself only: should the check ever regress, a real run
    into / would write there and sweep it."""
    from core.pipeline.ownership import check_out_dir
    with pytest.raises(UserError, match="refusing the root folder"):
        check_out_dir(Path("/"), [])
    assert "root folder" in refused(run_main, cfg, "--dry-run", "--set", 'run.out_dir="/"')
    assert "root folder" in refused(run_main, cfg, "--dry-run", "--set",
                                    'run.out_dir="/tmp/../"')


@pytest.mark.parametrize("flag", [[], ["--dry-run"]])
def test_home_is_refused_as_out_dir(flag, cfg, run_main, tmp_path, monkeypatch):
    home = tmp_path / "home"               # HOME is a scratch folder: nothing real at stake
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    assert "home directory" in refused(run_main, cfg, *flag, "--set", 'run.out_dir="~"')
    assert "home directory" in refused(run_main, cfg, *flag, "--set",
                                       f'run.out_dir="{home}/x/.."')
    assert list(home.iterdir()) == []


@pytest.mark.parametrize("flag", [[], ["--dry-run"]])
def test_a_folder_holding_foreign_files_is_refused_as_out_dir(flag, cfg, run_main, tmp_path):
    out = tmp_path / "out"
    (out / "notes").mkdir(parents=True)
    (out / "thesis.tex").write_text("mine")
    err = refused(run_main, cfg, *flag)
    assert "holds files ctmkit did not write (notes, thesis.tex)" in err, err
    assert sorted(p.name for p in out.iterdir()) == ["notes", "thesis.tex"]


def test_out_dirs_ctmkit_wrote_empty_ones_and_the_configs_own_folder_are_accepted(
        cfg, run_main, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    assert run_main(cfg)[0] == 0                        # empty: adopted and marked
    assert (out / ".ctmkit").is_file()
    (out / "notes.txt").write_text("added later: the folder is ctmkit's")
    assert run_main(cfg, "--force")[0] == 0
    old = tmp_path / "old"                              # an earlier version's out_dir
    old.mkdir()
    (old / "stages.json").write_text("{}")
    (old / "curves.png").write_bytes(b"x")
    assert run_main(cfg, "--set", 'run.out_dir="old"')[0] == 0
    here = tmp_path / "here"                            # out_dir = "." beside the config
    here.mkdir()
    (here / "config.toml").write_text(cfg.read_text().replace('out_dir = "out"',
                                                              'out_dir = "."'))
    rc, _, err = run_main(here / "config.toml")
    assert rc == 0, err


# --- temporaries -----------------------------------------------------------------------------

def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_temporaries_carry_the_writers_run_id(tmp_path):
    from core.base.io import atomic_path, run_id
    with atomic_path(tmp_path / "a.pt") as tmp:
        tmp.write_bytes(b"x")
        assert tmp.name.startswith(f".a.pt.ctmkit-{run_id()}-") and tmp.name.endswith(".tmp")
    assert (tmp_path / "a.pt").read_bytes() == b"x"


def test_the_sweep_removes_only_dead_runs_temporaries_in_folders_ctmkit_writes(tmp_path):
    from core.base.io import _start_time, remove_stale_temporaries
    out, shared = tmp_path / "out", tmp_path / "shared"
    for d in (out / "notes", out / "other-run", out / "checkpoints", shared):
        d.mkdir(parents=True)
    dead, me = _dead_pid(), os.getpid()
    start = _start_time(me)
    files = {
        "dead": out / f".jumper.pt.ctmkit-{dead}-12345-abcdefgh.tmp",
        "dead-ckpt": out / "checkpoints" / f".ckpt-1.pt.ctmkit-{dead}-1-abcdefgh.tmp",
        "pid-reused": out / f".metrics.json.ctmkit-{me}-{start + 1}-abcdefgh.tmp",
        "old-style": out / ".jumper.pt.k2j4l5m6.tmp",
        "dead-shared": shared / f".c.h5.ctmkit-{dead}-7-abcdefgh.tmp",
        # kept: a live writer's, a user's backup, a sub-folder's, an old-style name outside
        "live": out / f".jumper.pt.ctmkit-{me}-{start}-abcdefgh.tmp",
        "user": out / "notes" / ".draft.k2j4l5m6.tmp",
        "sub-run": out / "other-run" / f".jumper.pt.ctmkit-{dead}-1-abcdefgh.tmp",
        "old-outside": shared / ".c.h5.k2j4l5m6.tmp",
        "plain": out / "report.tmp",
    }
    for p in files.values():
        p.write_bytes(b"x")
    removed = remove_stale_temporaries([shared], owned=[out, out / "checkpoints"])
    gone = {k for k, p in files.items() if not p.exists()}
    assert gone == {"dead", "dead-ckpt", "pid-reused", "old-style", "dead-shared"}
    assert sorted(removed) == sorted(files[k] for k in gone)


def test_a_run_sweeps_its_out_dir_but_not_a_users_sub_folder(cfg, run_main, tmp_path):
    out = tmp_path / "out"
    (out / "notes").mkdir(parents=True)
    (out / ".ctmkit").write_text("")
    stale = out / f".jumper.pt.ctmkit-{_dead_pid()}-1-abcdefgh.tmp"
    backup = out / "notes" / ".thesis.tex.abcdefgh.tmp"
    stale.write_bytes(b"half")
    backup.write_bytes(b"the user's")
    rc, out_text, _ = run_main(cfg)
    assert rc == 0 and "removed 1 temporary file" in out_text
    assert not stale.exists() and backup.read_bytes() == b"the user's"


# --- 5. locks --------------------------------------------------------------------------------

def test_deleting_the_lock_file_admits_no_second_run(tmp_path):
    from core.pipeline.lock import RunLock
    lock = RunLock(tmp_path).acquire()
    try:
        (tmp_path / ".lock").unlink()
        with pytest.raises(UserError, match="another ctmkit run"):
            RunLock(tmp_path).acquire()
    finally:
        lock.release()
    RunLock(tmp_path).acquire().release()


def test_a_run_below_a_locked_out_dir_is_refused(cfg, run_main, tmp_path):
    from core.pipeline.lock import RunLock
    lock = RunLock(tmp_path / "out").acquire()
    try:
        err = refused(run_main, cfg, "--set", 'run.out_dir="out/ctm"')
        assert f"inside {tmp_path / 'out'}" in err and f"PID {os.getpid()}" in err, err
        assert not (tmp_path / "out" / "ctm").exists()
    finally:
        lock.release()
    assert run_main(cfg, "--set", 'run.out_dir="out/ctm"')[0] == 0


def test_a_comparison_is_refused_while_a_run_holds_one_of_its_label_folders(cfg, run_main,
                                                                             tmp_path):
    from core.pipeline.lock import RunLock
    text = cfg.read_text().replace('[precond]\nname = "ctm"\n', "").replace(
        'stages = ["export"]', 'stages = ["export"]\npreconds = [{name = "ctm"}, '
                              '{name = "cm"}]')
    cfg.write_text(text)
    lock = RunLock(tmp_path / "out" / "cm").acquire()
    try:
        err = refused(run_main, cfg)
        assert "another ctmkit run" in err and str(tmp_path / "out" / "cm") in err, err
        assert not (tmp_path / "out" / "ctm").exists()
    finally:
        lock.release()
    # the comparison's own lock on out/ is released: a run there now starts
    RunLock(tmp_path / "out").acquire().release()


# --- 5. processes ----------------------------------------------------------------------------

SLOW_TEACHER = """
[run]
out_dir = "out"
stages = ["teacher"]
[data]
gmm = { weights = [1.0], means = [[0.0, 0.0]], stds = [1.0] }
[network]
name = "mlp"
width = 16
depth = 2
emb_dim = 8
[teacher]
kind = "network"
[teacher_train]
iterations = 1000000
batch_size = 16
checkpoint_every = 1
keep_checkpoints = 1
"""


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))


def _wait_for(pred, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.02)
    return pred()


@pytest.mark.parametrize("when", ["started", pytest.param("training", marks=pytest.mark.slow)])
def test_sigterm_is_one_line_exit_143_lock_released_no_temporaries(when, tmp_path):
    from core.pipeline.lock import RunLock
    (tmp_path / "c.toml").write_text(textwrap.dedent(SLOW_TEACHER))
    p = subprocess.Popen([sys.executable, "-m", "core.run", "c.toml", "--no-progress"],
                         cwd=tmp_path, env=_env(), stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    try:
        ckpts = tmp_path / "out" / "teacher_checkpoints"
        assert _wait_for(lambda: (tmp_path / "out" / "run.json").is_file() if when == "started"
                         else ckpts.is_dir() and any(ckpts.glob("ckpt-*.pt")), 60)
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 143, err
    assert err.strip().splitlines() == ["error: terminated (SIGTERM)"], err
    assert not list((tmp_path / "out").rglob("*.tmp"))
    RunLock(tmp_path / "out").acquire().release()


FAKE_CTM_SAMPLE = """#!/bin/sh
echo $$ > "{pidfile}"
exec sleep 60
"""


@pytest.mark.slow
@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_a_killed_run_leaves_no_ctm_sample_running(how, write_config, run_main, tmp_path):
    cfg = write_config(EXPORT_CONFIG)
    assert run_main(cfg)[0] == 0                        # a jumper for the sample stage
    binary, pidfile = tmp_path / "fake_ctm_sample", tmp_path / "child.pid"
    binary.write_text(FAKE_CTM_SAMPLE.format(pidfile=pidfile))
    binary.chmod(0o755)
    p = subprocess.Popen([sys.executable, "-m", "core.run", str(cfg), "--no-progress",
                          "--stages", "sample", "--set", 'sample.runner="ctm_sample"',
                          "--set", f'sample.binary="{binary}"'], cwd=tmp_path, env=_env(),
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert _wait_for(lambda: pidfile.is_file() and pidfile.read_text().strip(), 60)
        child = int(pidfile.read_text())
        p.send_signal(getattr(signal, how))
        p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()

    def gone() -> bool:
        try:
            state = Path(f"/proc/{child}/stat").read_text().rpartition(")")[2].split()[0]
        except OSError:
            return True
        return state == "Z"                         # a zombie is dead, awaiting its reaper
    assert _wait_for(gone, 10), f"ctm_sample (PID {child}) still runs after {how}"
    if how == "SIGTERM":
        assert p.returncode == 143
