"""Runs that survive reruns, kills, full disks and each other (issue: reliability).

Each test drives the CLI as a user would, in a subprocess where the point is a real process
(kill -9, two runs at once), in-process otherwise."""

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from core.base.errors import UserError
from small_configs import train_config as train_config_text

ROOT = Path(__file__).resolve().parents[1]




def cli(*args, cwd=None, check=False, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "core.run", *map(str, args), "--no-progress"],
                       cwd=cwd or ROOT, capture_output=True, text=True, env=env,
                       timeout=timeout)
    if check:
        assert r.returncode == 0, r.stderr
    return r


def digests(folder: Path) -> dict:
    """sha256 of every file under folder but the lock (its PID changes from run to run)."""
    import hashlib
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lock"
            and "_tb" not in str(p.parent)}


def one_error_line(r) -> str:
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    return lines[0]


@pytest.fixture
def train_config(tmp_path):
    def write(iters: int = 12, name: str = "config.toml") -> Path:
        p = tmp_path / name
        p.write_text(train_config_text(iters))
        return p
    return write


# --- 1. rerunning the same command ---------------------------------------------------------

@pytest.mark.slow
def test_rerun_of_the_whole_pipeline_skips_every_stage_and_changes_nothing(train_config,
                                                                          tmp_path):
    cfg = train_config()
    cli(cfg, check=True)
    before = digests(tmp_path / "out")
    r = cli(cfg, check=True)
    for stage in ("teacher", "coefficients", "distill", "export", "sample", "evaluate"):
        assert f"stage {stage}: up to date" in r.stdout, r.stdout
    assert digests(tmp_path / "out") == before
    # a changed setting reruns its stage and those after it, not those before
    r = cli(cfg, "--set", "sample.num=60", check=True)
    assert "stage distill: up to date" in r.stdout and "stage sample: up to date" not in r.stdout
    assert np.load(tmp_path / "out" / "samples.npy").shape[0] == 60
    # --force reruns; the teacher resumes from its last checkpoint: the same bytes again
    teacher = (tmp_path / "out" / "teacher.pt").read_bytes()
    cli(cfg, "--force", "--stages", "teacher", check=True)
    assert (tmp_path / "out" / "teacher.pt").read_bytes() == teacher


def test_saved_files_are_deterministic_bytes(tmp_path):
    from core.base.io import save_torch
    obj = {"format": "x", "state_dict": {"w": torch.arange(6.0).reshape(2, 3)}}
    save_torch(tmp_path / "a.pt", obj)
    save_torch(tmp_path / "b.pt", obj)
    assert (tmp_path / "a.pt").read_bytes() == (tmp_path / "b.pt").read_bytes()


@pytest.mark.slow
def test_kill_9_at_random_moments_then_rerun_gives_the_uninterrupted_weights(train_config,
                                                                              tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    text = train_config_text(30)
    ref_cfg, cfg = tmp_path / "a" / "c.toml", tmp_path / "b" / "c.toml"
    ref_cfg.write_text(text)
    cfg.write_text(text)
    cli(ref_cfg, "--stages", "teacher,coefficients,distill", check=True)
    rng = random.Random(0)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    kills = 0
    for _ in range(3):
        p = subprocess.Popen([sys.executable, "-m", "core.run", str(cfg), "--no-progress",
                              "--stages", "teacher,coefficients,distill"], cwd=ROOT, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(3.0, 9.0))
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
            kills += 1
        p.wait()
    cli(cfg, "--stages", "teacher,coefficients,distill", check=True)
    from core.base.io import load_torch
    a = load_torch(tmp_path / "a" / "out" / "student.pt", "student file")
    b = load_torch(tmp_path / "b" / "out" / "student.pt", "student file")
    assert a["sha256"] == b["sha256"], f"after {kills} kills"
    assert not list((tmp_path / "b" / "out").rglob("*.tmp"))


# --- 2. one run per out_dir ----------------------------------------------------------------

@pytest.mark.slow
def test_a_second_run_into_the_same_out_dir_is_refused_naming_the_pid(train_config, tmp_path):
    cfg = train_config(iters=400)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    first = subprocess.Popen([sys.executable, "-m", "core.run", str(cfg), "--no-progress"],
                             cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while not (tmp_path / "out" / "run.json").exists() and time.time() < deadline:
            time.sleep(0.2)
        line = one_error_line(cli(cfg))
        assert f"PID {first.pid}" in line and "another ctmkit run" in line
    finally:
        first.kill()
        first.wait()
    # the dead run's lock file stays behind; the next run takes it over
    assert (tmp_path / "out" / ".lock").exists()
    r = cli(cfg, "--dry-run")
    assert r.returncode == 0


def test_lock_is_released_and_stale_lock_files_are_taken_over(tmp_path):
    from core.pipeline.lock import RunLock
    (tmp_path / ".lock").write_text("999999\n")          # a dead process's file
    lock = RunLock(tmp_path).acquire()
    with pytest.raises(UserError, match=f"PID {os.getpid()}"):
        RunLock(tmp_path).acquire()
    lock.release()
    RunLock(tmp_path).acquire().release()


# --- 3. filesystem errors ------------------------------------------------------------------

def test_out_dir_that_is_a_file_or_below_a_file(write_config, run_main, tmp_path):
    (tmp_path / "f").write_text("x")
    for out in ("f", "f/sub"):
        rc, _, err = run_main(write_config(), "--set", f'run.out_dir="{out}"')
        assert rc == 2 and err.count("\n") == 1 and "is a file" in err, err


def test_disk_full_is_one_line_and_leaves_no_temporaries(write_config, run_main, tmp_path,
                                                         monkeypatch):
    cfg = write_config()
    assert run_main(cfg)[0] == 0
    jumper = (tmp_path / "out" / "jumper.pt").read_bytes()
    import core.base.io

    real_open = open

    def full_disk_open(path, mode="r", *a, **k):
        fh = real_open(path, mode, *a, **k)
        if "w" in mode and str(path).endswith(".tmp"):
            def write(data):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
            fh.write = write
        return fh
    monkeypatch.setattr(core.base.io, "open", full_disk_open, raising=False)
    rc, _, err = run_main(cfg, "--force", "--stages", "export")
    assert rc == 2 and "No space left on device" in err and err.count("\n") == 1, err
    assert (tmp_path / "out" / "jumper.pt").read_bytes() == jumper
    assert not list((tmp_path / "out").rglob("*.tmp"))


def _mount_tmpfs(where: Path, size: str, read_only: bool = False) -> bool:
    where.mkdir(parents=True, exist_ok=True)
    opts = f"size={size}" + (",ro" if read_only else "")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)],
                       capture_output=True)
    return r.returncode == 0


@pytest.mark.slow
def test_real_full_and_read_only_filesystems(write_config, tmp_path):
    full, ro = tmp_path / "full", tmp_path / "ro"
    if not _mount_tmpfs(full, "96k"):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        assert _mount_tmpfs(ro, "64k", read_only=True)
        try:
            for out, why in ((full, "No space left on device"), (ro, "Read-only file system")):
                cfg = write_config().read_text().replace('out_dir = "out"',
                                                         f'out_dir = "{out}/run"')
                path = tmp_path / f"{out.name}.toml"
                path.write_text(cfg)
                line = one_error_line(cli(path))
                assert why in line, line
                assert not list(out.rglob("*.tmp"))
        finally:
            subprocess.run(["umount", str(ro)])
    finally:
        subprocess.run(["umount", str(full)])


def test_stale_temporaries_of_killed_runs_are_removed(write_config, run_main, tmp_path):
    (tmp_path / "out").mkdir()
    stale = tmp_path / "out" / ".jumper.pt.abc123.tmp"
    stale.write_bytes(b"half")
    assert run_main(write_config())[0] == 0
    assert not stale.exists()


# --- 4. validate before reading ------------------------------------------------------------

@pytest.mark.parametrize("path, why", [("/dev/zero", "not a regular file"),
                                       ("missing.npy", "not found"), (".", "found a folder"),
                                       ("trunc.npy", "truncated")])
def test_data_paths_are_checked_before_they_are_read(path, why, train_config, run_main,
                                                     tmp_path):
    np.save(tmp_path / "full.npy", np.zeros((100, 2)))
    (tmp_path / "trunc.npy").write_bytes((tmp_path / "full.npy").read_bytes()[:300])
    cfg = train_config()
    cfg.write_text(cfg.read_text().replace(
        'gmm = { weights = [0.3, 0.7], means = [[-2.0, 0.0], [1.0, 1.0]], stds = [0.4, 0.3] }',
        f'path = "{path}"'))
    rc, _, err = run_main(cfg)
    assert rc == 2 and why in err and err.count("\n") == 1, err
    assert not (tmp_path / "out" / "teacher.pt").exists()


# --- 5. integrity --------------------------------------------------------------------------

def flip_bit_in_tensor_data(path: Path, marker: bytes = b"/data/") -> None:
    """Flip one bit inside the first tensor record of a zip archive (not its metadata)."""
    import zipfile
    with zipfile.ZipFile(path) as z:
        info = next(i for i in z.infolist() if marker.decode() in i.filename
                    and i.file_size >= 8)
    raw = bytearray(path.read_bytes())
    # the local header: 30 bytes + name + extra, then the stored (uncompressed) bytes
    name_len = int.from_bytes(raw[info.header_offset + 26:info.header_offset + 28], "little")
    extra_len = int.from_bytes(raw[info.header_offset + 28:info.header_offset + 30], "little")
    start = info.header_offset + 30 + name_len + extra_len
    raw[start + 3] ^= 0x10
    path.write_bytes(bytes(raw))


@pytest.mark.slow
def test_bit_flips_in_every_file_are_caught(train_config, tmp_path):
    cfg = train_config()
    cli(cfg, check=True)
    out = tmp_path / "out"
    ckpt = sorted((out / "checkpoints").glob("ckpt-*.pt"))[-1]
    cases = {"student.pt": ("export", "--force"), "teacher.pt": ("coefficients", "--force"),
             "jumper.pt": ("sample", "--force"), str(ckpt.relative_to(out)): None}
    for name, stage in cases.items():
        path = out / name
        good = path.read_bytes()
        flip_bit_in_tensor_data(path)
        if stage is None:            # the newest checkpoint: resuming a longer run reads it
            r = cli(cfg, "--set", "distill.iterations=15", "--stages", "distill")
        else:
            r = cli(cfg, "--stages", stage[0], stage[1])
        line = one_error_line(r)
        assert "corrupt" in line and name.split("/")[-1] in line, line
        path.write_bytes(good)
    # the coefficient store: a value changed in place
    import h5py
    with h5py.File(out / "coefficients.h5", "r+") as h:
        h["l_stderr"][0] += 1e-3
    line = one_error_line(cli(cfg, "--stages", "distill", "--force"))
    assert "coefficients.h5" in line and "corrupt" in line


@pytest.mark.slow
def test_ctm_sample_checks_the_jumper_digest(binary, write_config, run_main, tmp_path):
    assert run_main(write_config())[0] == 0
    jumper = tmp_path / "out" / "jumper.pt"
    flip_bit_in_tensor_data(jumper)
    r = subprocess.run([str(binary), "--model", str(jumper), "--out",
                        str(tmp_path / "x.npy"), "--num", "4", "--steps", "1"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "corrupt" in r.stderr, r.stderr
    assert not (tmp_path / "x.npy").exists()


# --- 6. files that look like ctmkit's but are not -------------------------------------------

@pytest.mark.slow
def test_look_alike_files_are_one_line(train_config, tmp_path):
    cfg = train_config()
    cli(cfg, check=True)
    out = tmp_path / "out"
    from core.base.io import save_torch
    # a student file with the right format and a valid checksum but no state_dict
    good = (out / "student.pt").read_bytes()
    save_torch(out / "student.pt", {"format": "ctmkit.student", "version": 1,
                                    "teacher_fingerprint": "x"})
    assert "lacks 'state_dict'" in one_error_line(cli(cfg, "--stages", "export", "--force"))
    # ... with weights of the wrong shapes
    from core.base.io import load_torch
    st = load_torch(out.parent / "out" / "teacher.pt", "t")
    save_torch(out / "student.pt", {"format": "ctmkit.student", "version": 1,
                                    "teacher_fingerprint": "network:" + st["sha256"][:32],
                                    "state_dict": {"w": torch.zeros(3)}})
    assert "do not fit" in one_error_line(cli(cfg, "--stages", "export", "--force"))
    (out / "student.pt").write_bytes(good)
    # a non-UTF-8 metrics.csv when resuming
    (out / "metrics.csv").write_bytes(b"iteration,loss\n\xff\xfe,1\n")
    line = one_error_line(cli(cfg, "--set", "distill.iterations=15", "--stages", "distill"))
    assert "metrics.csv" in line


def test_meta_json_shape_that_does_not_fit_the_network(write_config, run_main, tmp_path):
    import io
    import zipfile
    assert run_main(write_config())[0] == 0
    jumper = tmp_path / "out" / "jumper.pt"
    src = zipfile.ZipFile(io.BytesIO(jumper.read_bytes()))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("extra/meta.json"):
                meta = json.loads(data)
                meta["shape"] = [7]
                data = json.dumps(meta).encode()
            dst.writestr(info, data)
    from core.base.integrity import seal_archive     # a digest that matches the edited meta.json:
    jumper.write_bytes(seal_archive(buf.getvalue()))   # the probe is under test, not the digest
    rc, _, err = run_main(write_config(), "--stages", "sample", "--force")
    assert rc == 2 and "does not fit the network" in err and err.count("\n") == 1, err


# --- 7. config holes -----------------------------------------------------------------------

@pytest.mark.parametrize("override, msg", [
    ('run.seed=18446744073709551616', "must be <="),
    ('sample.num=1000000000', "must be <="),
    ('sample.batch=100000000', "must be <="),
    ('coefficients.n_timesteps=1000000000', "must be <="),
    ('distill.N=1000000000', "must be <="),
    ('run.seed=-1', "must be >= 0"),
    ('run.preconds=[{name = "ctm", label = "../../x"}]', "plain folder name"),
    ('run.preconds=[{name = "ctm", label = 3}]', "must be a string"),
    ('run.preconds=[{name = "ctm", variant = 3}]', "must be a string"),
    ('sample.binary="noexec"', "not executable"),
    ('sample.binary="garbage"', "cannot run ctm_sample"),
    ('nosuch.key=1', "unknown section"),
    ('sample=1', "expected section.key=value"),
])
def test_config_holes_are_one_line(override, msg, write_config, run_main, tmp_path):
    (tmp_path / "noexec").write_text("#!/bin/sh\n")
    (tmp_path / "garbage").write_bytes(b"\x00\x01 not a program")
    (tmp_path / "garbage").chmod(0o755)
    text = write_config().read_text()
    if "preconds" in override:
        text = text.replace('[precond]\nname = "analytic"\nvariant = "forward"\n', "")
    cfg = write_config(text)
    extra = ["--set", "sample.runner=\"ctm_sample\""] if "binary" in override else []
    rc, _, err = run_main(cfg, "--set", override, *extra)
    assert rc == 2 and msg in err and err.count("\n") == 1, err
    if "cannot run" not in msg:               # found when the sample stage runs it
        assert not (tmp_path / "out").exists()


def test_ctm_sample_binary_that_writes_nothing(write_config, run_main, tmp_path):
    fake = tmp_path / "fake_ctm_sample"
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    cfg = write_config()
    rc, _, err = run_main(cfg, "--set", 'sample.runner="ctm_sample"', "--set",
                          f'sample.binary="{fake}"')
    assert rc == 2 and "wrote no samples" in err and err.count("\n") == 1, err


# --- 8. NaN samples ------------------------------------------------------------------------

def test_evaluate_refuses_nan_samples_and_metrics_json_stays_json(write_config, run_main,
                                                                  tmp_path):
    cfg = write_config()
    assert run_main(cfg)[0] == 0
    before = (tmp_path / "out" / "metrics.json").read_text()
    x = np.load(tmp_path / "out" / "samples.npy")
    x[3, 0] = np.nan
    np.save(tmp_path / "out" / "samples.npy", x)
    rc, _, err = run_main(cfg, "--stages", "evaluate", "--force")
    assert rc == 2 and "NaN" in err and err.count("\n") == 1, err
    assert (tmp_path / "out" / "metrics.json").read_text() == before
    json.loads(before)


# --- 11. the run's record, --dry-run, --set ------------------------------------------------

def test_run_json_dry_run_and_set(write_config, run_main, tmp_path):
    cfg = write_config()
    rc, out, _ = run_main(cfg, "--dry-run")
    assert rc == 0 and not (tmp_path / "out").exists()
    assert "plan:" in out and "coefficients run" in " ".join(out.split())
    assert run_main(cfg, "--set", "sample.num=123")[0] == 0
    rec = json.loads((tmp_path / "out" / "run.json").read_text())
    assert rec["config"]["sample"]["num"] == 123
    assert rec["command"][-3:] == ["--set", "sample.num=123", "--no-progress"]
    assert rec["versions"]["torch"] == torch.__version__ and rec["world_size"] == 1
    assert rec["config"]["coefficients"]["n_timesteps"] == 40
    rc, out, _ = run_main(cfg, "--dry-run", "--set", "sample.num=123")
    assert "coefficients skip: up to date" in " ".join(out.split())
    assert "sample       skip" in out or "sample skip" in " ".join(out.split())
