"""Reliability check: does ctmkit fail cleanly on bad input, survive kill -9, and keep two runs
out of one out_dir?

    python tools/check_reliability.py [--quick] [--keep DIR] [--seed S] [-v] [--only CLASS]

1. A catalogue of bad inputs (well over 100 cases, built in a scratch folder from tiny configs)
   in four classes:

   * ``config``     malformed TOML, unknown sections and keys, wrong types, out-of-range and
                    huge values (num = 1000000000, seeds >= 2**64), path-like preconds labels,
                    missing required keys, bad ``--set`` syntax, unknown stages, ...
   * ``files``      missing / folder / /dev/zero / truncated / header-lies .npy data; truncated,
                    bit-flipped or foreign teacher.pt, student.pt, checkpoints, jumper.pt and
                    coefficients.h5; non-UTF-8 metrics.csv; a meta.json shape that does not fit;
                    out_dir that is a file or below one; stale .tmp files; NaN samples.npy, ...
   * ``cli``        bad flags, no / missing config, a folder as config, unknown --stages, ...
                    (each in its own ``python -m core.run`` process)
   * ``ctm_sample`` the C++ sampler: missing model, a non-jumper file, a bit-flipped jumper,
                    bad --num / --steps / --timesteps / --device / --out values, ...

   A case is *clean* when the command exits with status 2, its stderr is exactly one line
   starting with ``error: `` (``ctm_sample: error: `` for the C++ sampler), there is no
   "Traceback", no ``*.tmp`` file is left behind, and every file that existed before the case
   (a good jumper.pt, a finished run's outputs) is byte-identical afterwards (the run's own
   bookkeeping -- ``.lock``, ``run.json``, ``stages.json`` -- excepted). The foreign pickles
   would print a marker if anything unpickled them unsafely; that counts as unclean too.
   ``core.run`` cases run in-process (stdout / stderr captured at the file-descriptor level,
   with a time limit) unless the point is a real process; every subprocess has a time limit.

2. Kill-and-rerun: N trials (10; 3 with --quick) of a tiny training run (teacher ->
   coefficients -> distill) killed with SIGKILL one to three times at seeded random moments --
   some at a random time, some just after a checkpoint appears, some while a temporary file is
   being written -- then rerun to completion. The student's content digest must equal that of
   an uninterrupted run: "resumed exact K/N".

3. Concurrency: D trials (3; 2 with --quick) of two runs into one out_dir at once. The second
   must be refused (exit 2, one error line naming the first run's PID) and the first must
   finish: "concurrent refused C/D".

It prints one line per class (``config: clean 41/41``), every unclean case with its command and
stderr tail, and ends with

    reliability: clean X/Y, resumed exact K/N, concurrent refused C/D

Exit status 0 when everything passed, 1 otherwise (2 for bad arguments of this tool). All
work is single-threaded (OMP_NUM_THREADS=1); --quick takes about 2 minutes on 2 CPU cores, the
full check about 4. --keep DIR keeps every case's inputs and outputs in DIR (which must be
empty or absent) so that any command listed can be rerun by hand; -v prints every case with
its error line; --only CLASS runs that class of cases alone (no trials).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import hashlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import pickle  # noqa: E402
import random  # noqa: E402
import shlex  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import struct  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import textwrap  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
import zipfile  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable  # noqa: E402

import _common  # noqa: E402,F401  (puts the checkout on sys.path)

ROOT = _common.ROOT
BINARY = ROOT / "build" / "ctm_sample"
CLASSES = ("config", "files", "cli", "ctm_sample", "ownership", "integrity", "bounds")
CASE_TIMEOUT = 120           # seconds, per case (in-process or subprocess)
RUN_TIMEOUT = 300            # seconds, per training run of the trials
#: files of an out_dir that every run rewrites (its own bookkeeping), never compared
BOOKKEEPING = {".lock", "run.json", "stages.json"}
#: printed by a foreign pickle if anything ever unpickled it without weights_only
UNSAFE_MARKER = "UNSAFE-UNPICKLE-MARKER"

sys.path.insert(0, str(ROOT / "tests"))
#: the tests' small configs (tests/small_configs.py): QUICK_CONFIG sized for the probe, and the
#: network-teacher config with its DATA / ITERS / CKPT filled by train_config
from small_configs import GMM_DATA, train_config  # noqa: E402
from small_configs import probe_quick_config  # noqa: E402

QUICK_CONFIG = probe_quick_config()
TRAIN_STAGES = "teacher,coefficients,distill"


def child_env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]]
                                                       if env.get("PYTHONPATH") else []))
    return env


# ---------------------------------------------------------------------------------------------
# Running one command
# ---------------------------------------------------------------------------------------------

@dataclass
class Result:
    rc: int | None
    stdout: str
    stderr: str
    timed_out: bool = False
    seconds: float = 0.0


class _CaseTimeout(BaseException):
    """Raised by SIGALRM inside an in-process case (a BaseException: ctmkit must not catch it)."""


def _alarm(signum, frame):
    raise _CaseTimeout()


def run_inprocess(argv: list[str], cwd: Path, timeout: int = CASE_TIMEOUT) -> Result:
    """``core.run.main(argv)`` with fds 1 and 2 redirected to files (C++ writes included)."""
    from core.run import main

    sys.stdout.flush()
    sys.stderr.flush()
    t0 = time.perf_counter()
    old_cwd = os.getcwd()
    with tempfile.TemporaryFile() as fo, tempfile.TemporaryFile() as fe:
        saved = os.dup(1), os.dup(2)
        os.dup2(fo.fileno(), 1)
        os.dup2(fe.fileno(), 2)
        old_handler = signal.signal(signal.SIGALRM, _alarm)
        signal.alarm(timeout)
        rc, timed_out, interrupted = None, False, False
        try:
            os.chdir(cwd)
            rc = main(list(argv))
        except SystemExit as e:
            if e.code is None or isinstance(e.code, int):
                rc = e.code or 0
            else:
                print(e.code, file=sys.stderr)
                rc = 1
        except _CaseTimeout:
            timed_out = True
        except KeyboardInterrupt:
            interrupted = True
        except BaseException:       # what the interpreter would print: a traceback, status 1
            traceback.print_exc()
            rc = 1
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, old_handler)
            os.chdir(old_cwd)
            with contextlib.suppress(Exception):
                sys.stdout.flush()
            with contextlib.suppress(Exception):
                sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
        if interrupted or (rc == 130 and not timed_out):
            raise KeyboardInterrupt
        fo.seek(0)
        fe.seek(0)
        out = fo.read().decode("utf-8", "replace")
        err = fe.read().decode("utf-8", "replace")
    return Result(rc, out, err, timed_out, time.perf_counter() - t0)


#: processes this tool started and has not yet waited for (killed if it is interrupted)
LIVE: set[subprocess.Popen] = set()


def kill_group(p: subprocess.Popen) -> None:
    """SIGKILL the process group of `p` (started with start_new_session: its own group)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(p.pid, signal.SIGKILL)


def run_process(cmd: list[str], cwd: Path, timeout: int = CASE_TIMEOUT) -> Result:
    """A subprocess in its own session; on timeout its whole process group is killed."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, cwd=cwd, env=child_env(), stdin=subprocess.DEVNULL,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    LIVE.add(p)
    try:
        out, err = p.communicate(timeout=timeout)
        timed_out = False
    except subprocess.TimeoutExpired:
        kill_group(p)
        out, err = p.communicate()
        timed_out = True
    finally:
        if p.poll() is None:      # interrupted: take the child down with us
            kill_group(p)
            p.wait()
        LIVE.discard(p)
    return Result(None if timed_out else p.returncode, out.decode("utf-8", "replace"),
                  err.decode("utf-8", "replace"), timed_out, time.perf_counter() - t0)


def core_run_cmd(argv: list[str]) -> list[str]:
    return [sys.executable, "-m", "core.run", *argv]


# ---------------------------------------------------------------------------------------------
# Snapshots: what a case must leave as it was
# ---------------------------------------------------------------------------------------------

def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def snapshot(folder: Path) -> dict[str, str]:
    """sha256 of every regular file under `folder` (symlinks and devices are not followed),
    bookkeeping, TensorBoard event folders and temporaries excepted."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.endswith("_tb")]
        for name in filenames:
            p = Path(dirpath) / name
            if name in BOOKKEEPING or name.endswith(".tmp") or p.is_symlink() or not p.is_file():
                continue
            out[str(p.relative_to(folder))] = sha256_file(p)
    return out


def temporaries(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*.tmp"))


# ---------------------------------------------------------------------------------------------
# The catalogue
# ---------------------------------------------------------------------------------------------

@dataclass
class Case:
    cls: str
    name: str
    prepare: Callable[[Path], list[str]]   # builds inputs in the case folder; returns argv
    how: str = "inprocess"                  # inprocess | process | binary
    out: str | None = None                  # binary: the --out file that must not appear
    keep: tuple[str, ...] = ()              # temporaries (not ctmkit's) that must survive


@dataclass
class Outcome:
    case: Case
    clean: bool
    problems: list[str]
    command: str
    result: Result | None = None


class TemplateError(Exception):
    """A good run that the cases start from could not be made: ctmkit itself is broken."""


#: [teacher] of a TorchScript teacher file `teacher.ts` (2-D), replacing QUICK_CONFIG's
TORCHSCRIPT_TEACHER = 'kind = "torchscript"\npath = "teacher.ts"\nshape = [2]'
GMM_TEACHER = ('kind = "gmm"\nweights = [0.3, 0.7]\nmeans = [[-2.0, 0.0], [1.0, 1.0]]\n'
               'stds = [1.0, 0.5]')


def torchscript_config() -> str:
    return textwrap.dedent(QUICK_CONFIG).replace(GMM_TEACHER, TORCHSCRIPT_TEACHER)


class Templates:
    """Finished runs made once, copied into the cases that need them: `quick` (a gmm teacher,
    coefficients -> evaluate), `train` (a network teacher trained and distilled) and `nan` (a
    jumper exported from a TorchScript teacher whose every output is NaN)."""

    def __init__(self, root: Path):
        self.root = root
        self.quick = root / "quick"
        self.train = root / "train"
        self.nan = root / "nan"

    def build(self) -> None:
        self.nan.mkdir(parents=True)
        scripted_teacher(self.nan / "teacher.ts", "nan")
        for folder, text, extra in (
                (self.quick, textwrap.dedent(QUICK_CONFIG), []),
                (self.train, train_config(), []),
                (self.nan, torchscript_config().replace('name = "analytic"\nvariant = "forward"',
                                                        'name = "ctm"'),
                 ["--stages", "export"])):
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "config.toml").write_text(text)
            r = run_inprocess([str(folder / "config.toml"), "--no-progress", *extra], folder,
                              timeout=RUN_TIMEOUT)
            if r.rc != 0:
                raise TemplateError(f"could not make the good '{folder.name}' run that the cases "
                                    f"start from (exit {r.rc}):\n{r.stderr[-3000:]}")

    def copy_out(self, which: str, dest: Path) -> Path:
        shutil.copytree(getattr(self, which) / "out", dest / "out", symlinks=True,
                        ignore=shutil.ignore_patterns(".lock"))
        return dest / "out"


def scripted_teacher(path: Path, kind: str) -> None:
    """A TorchScript denoiser D(x, t) that misbehaves: `nan` (every output NaN), `shape` (the
    wrong output shape), `raises` (fine at t = 1, an exception at small t)."""
    import torch

    class NaN(torch.nn.Module):
        def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return x * float("nan")

    class Shape(torch.nn.Module):
        def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return x[:, :1]

    class Raises(torch.nn.Module):
        def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            if bool(t.min() < 0.5):
                raise RuntimeError("this teacher fails below t = 0.5")
            return x / (1 + t.reshape(-1, 1) ** 2)

    module = {"nan": NaN, "shape": Shape, "raises": Raises}[kind]()
    jit_save(module, path)


def jit_save(module, path: Path) -> None:
    import warnings

    import torch
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)    # TorchScript is deprecated
        torch.jit.save(torch.jit.script(module), str(path))


# --- helpers that damage files ---------------------------------------------------------------

def flip_bit_in_tensor_data(path: Path, marker: str = "/data/") -> None:
    """Flip one bit inside the first tensor record of a (stored) zip archive."""
    with zipfile.ZipFile(path) as z:
        info = next(i for i in z.infolist() if marker in i.filename and i.file_size >= 8)
    raw = bytearray(path.read_bytes())
    name_len = int.from_bytes(raw[info.header_offset + 26:info.header_offset + 28], "little")
    extra_len = int.from_bytes(raw[info.header_offset + 28:info.header_offset + 30], "little")
    start = info.header_offset + 30 + name_len + extra_len
    raw[start + 3] ^= 0x10
    path.write_bytes(bytes(raw))


def truncate(path: Path, fraction: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * fraction)])


def random_bytes(path: Path, n: int = 4096, seed: int = 0) -> None:
    path.write_bytes(random.Random(seed).randbytes(n))


def edit_zip_member(path: Path, suffix: str, edit: Callable[[bytes], bytes | None]) -> None:
    """Rewrite the member of a zip archive ending with `suffix` (None drops it)."""
    src = zipfile.ZipFile(io.BytesIO(path.read_bytes()))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith(suffix):
                data = edit(data)
                if data is None:
                    continue
            dst.writestr(info, data)
    path.write_bytes(buf.getvalue())


def edit_meta(path: Path, **changes) -> None:
    def edit(data: bytes) -> bytes:
        meta = json.loads(data)
        meta.update(changes)
        return json.dumps(meta).encode()
    edit_zip_member(path, "extra/meta.json", edit)


class _Loud:
    """Unpickled without weights_only, this prints UNSAFE_MARKER (and does nothing else)."""

    def __reduce__(self):
        return (print, (UNSAFE_MARKER,))


def foreign_pickle(path: Path) -> None:
    path.write_bytes(pickle.dumps({"format": "ctmkit.student", "obj": _Loud()}, protocol=2))


def foreign_torch(path: Path) -> None:
    import torch
    torch.save({"weights": torch.zeros(3), "note": "not a ctmkit file"}, path)


def foreign_torch_object(path: Path) -> None:
    import torch
    buf = io.BytesIO()
    torch.save({"obj": _Loud()}, buf)
    path.write_bytes(buf.getvalue())


def non_jumper_torchscript(path: Path) -> None:
    import torch
    jit_save(torch.nn.Linear(2, 2), path)


def zip_not_torchscript(path: Path) -> None:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("hello.txt", "a zip archive, not TorchScript")


def npy_header_lies(path: Path, shape=(10 ** 12, 2)) -> None:
    """A .npy header that claims far more data than the file holds."""
    import numpy as np
    path.write_bytes(_header_only(shape) + np.zeros(8).tobytes())


def _header_only(shape) -> bytes:
    import numpy.lib.format as fmt
    buf = io.BytesIO()
    fmt.write_array_header_1_0(buf, {"descr": "<f8", "fortran_order": False, "shape": shape})
    return buf.getvalue()


def save_npy(path: Path, array) -> None:
    import numpy as np
    with open(path, "wb") as fh:
        np.save(fh, array, allow_pickle=True)


def h5_change_value(path: Path) -> None:
    import h5py
    import numpy as np
    with h5py.File(path, "r+") as h:
        name = next(k for k in sorted(h.keys()) if isinstance(h[k], h5py.Dataset)
                    and h[k].ndim == 1 and np.issubdtype(h[k].dtype, np.floating)
                    and k != "t")
        h[name][0] += 1e-3


def h5_set_nan(path: Path) -> None:
    import h5py
    with h5py.File(path, "r+") as h:
        h["t"][1] = float("nan")


def h5_drop_dataset(path: Path) -> None:
    import h5py
    with h5py.File(path, "r+") as h:
        del h["t"]


def h5_empty(path: Path) -> None:
    import h5py
    path.unlink(missing_ok=True)
    with h5py.File(path, "w"):
        pass


def newest(folder: Path, pattern: str = "ckpt-*.pt") -> Path:
    return sorted(folder.glob(pattern))[-1]


# --- the four classes ------------------------------------------------------------------------

def config_cases(T: Templates) -> list[Case]:
    cases: list[Case] = []

    def text_case(name: str, text: str | bytes | Callable[[str], str], *extra: str,
                  stages: str | None = None) -> None:
        """A config file of its own (text, bytes, or an edit of QUICK_CONFIG) beside a copy of
        a finished run that must stay as it is."""
        def prepare(d: Path) -> list[str]:
            T.copy_out("quick", d)
            cfg = d / "config.toml"
            body = text(textwrap.dedent(QUICK_CONFIG)) if callable(text) else text
            (cfg.write_bytes if isinstance(body, bytes) else cfg.write_text)(body)
            return [str(cfg), *extra] + (["--stages", stages] if stages else [])
        cases.append(Case("config", name, prepare))

    def set_case(name: str, *overrides: str, stages: str | None = None,
                 edit: Callable[[str], str] | None = None) -> None:
        args = [a for o in overrides for a in ("--set", o)]
        text_case(name, edit or (lambda t: t), *args, stages=stages)

    def no_precond(t: str) -> str:        # for [run] preconds, which replace [precond]
        return t.replace('[precond]\nname = "analytic"\nvariant = "forward"\n', "")

    # malformed files
    text_case("toml-unclosed-table", "[run\nout_dir = 'out'\n")
    text_case("toml-duplicate-key", lambda t: t.replace("seed = 0\n", "seed = 0\nseed = 1\n", 1))
    text_case("toml-bad-value", lambda t: t.replace("num = 100", "num = 1e"))
    text_case("toml-duplicate-table", lambda t: t + "\n[run]\nseed = 3\n")
    text_case("toml-not-utf8", b"[run]\nout_dir = \"\xff\xfe\"\n")
    text_case("toml-binary-garbage", random.Random(1).randbytes(2048))
    text_case("toml-empty-file", "")
    text_case("toml-larger-than-1MiB", "# " + "x" * (1 << 20) + "\n")
    text_case("toml-section-not-table", lambda t: "run = 5\n" + t.replace(
        '[run]\nout_dir = "out"\nstages = ["coefficients", "export", "sample", "evaluate"]\n'
        'seed = 0\n', ""))
    # unknown names
    text_case("unknown-section", lambda t: t + "\n[nosuch]\nkey = 1\n")
    set_case("unknown-key-run", "run.nosuch=1")
    set_case("unknown-key-coefficients", "coefficients.nosuch=1")
    set_case("unknown-key-teacher", "teacher.nosuch=1")
    set_case("unknown-key-precond", "precond.nosuch=1", stages="export")
    set_case("unknown-key-sample", "sample.nosuch=1")
    set_case("unknown-key-evaluate", "evaluate.nosuch=1")
    set_case("unknown-key-export", "export.nosuch=1")
    set_case("unknown-key-distill", "distill.nosuch=1")
    set_case("unknown-key-network", "network.nosuch=1")
    set_case("unknown-key-data", "data.nosuch=1", edit=lambda t: t + "\n[data]\n" + GMM_DATA)
    set_case("unknown-teacher-kind", "teacher.kind=\"nosuch\"")
    set_case("unknown-precond-name", "precond.name=\"nosuch\"")
    set_case("unknown-precond-variant", "precond.variant=\"sideways\"", stages="export")
    set_case("unknown-sampler", "sample.sampler=\"nosuch\"")
    set_case("unknown-runner", "sample.runner=\"rust\"")
    set_case("unknown-network", "network.name=\"nosuch\"")
    set_case("unknown-loss", "distill.loss=\"nosuch\"")
    set_case("unknown-solver", "distill.solver=\"rk4\"")
    set_case("unknown-metric", "evaluate.metrics=[\"nosuch\"]")
    set_case("unknown-stage-in-config", "run.stages=[\"coefficients\", \"nosuch\"]")
    set_case("unknown-grid", "coefficients.grid=\"linear\"")
    set_case("unknown-student-init", "student.init=\"random\"")
    # missing required keys
    text_case("missing-teacher-kind", lambda t: t.replace('kind = "gmm"\n', ""))
    text_case("missing-teacher-section", lambda t: t.replace('[teacher]\nkind = "gmm"\n', "")
              .replace("weights = [0.3, 0.7]\nmeans = [[-2.0, 0.0], [1.0, 1.0]]\n"
                       "stds = [1.0, 0.5]\n", ""))
    text_case("missing-gmm-means", lambda t: t.replace("means = [[-2.0, 0.0], [1.0, 1.0]]\n", ""))
    set_case("torchscript-teacher-without-path", "teacher.kind=\"torchscript\"",
             edit=lambda t: t.replace("weights = [0.3, 0.7]\nmeans = [[-2.0, 0.0], [1.0, 1.0]]\n"
                                      "stds = [1.0, 0.5]\n", "shape = [2]\n"))
    set_case("data-neither-path-nor-gmm", "data.shape=[2]")
    # wrong types
    set_case("type-seed-float", "run.seed=1.5")
    set_case("type-seed-string", "run.seed=\"0\"")
    set_case("type-seed-bool", "run.seed=true")
    set_case("type-stages-string", "run.stages=\"coefficients\"")
    set_case("type-stages-ints", "run.stages=[1, 2]")
    set_case("type-out_dir-int", "run.out_dir=3")
    set_case("type-out_dir-empty", "run.out_dir=\"\"")
    set_case("type-device-int", "run.device=3")
    set_case("type-rho-string", "diffusion.rho=\"7\"")
    set_case("type-num-float", "sample.num=1e9")
    set_case("type-num-list", "sample.num=[1, 2]")
    set_case("type-num-unclosed-list", "sample.num=[1,2")
    set_case("type-steps-list-strings", "evaluate.steps=[\"1\"]")
    set_case("type-evaluate-steps-empty", "evaluate.steps=[]")
    set_case("type-aoti-string", "export.aoti=\"yes\"")
    set_case("type-metric-options", "evaluate.metric=3")
    set_case("type-gmm-means-string", "teacher.means=\"x\"")
    set_case("type-gmm-means-ragged", "teacher.means=[[1.0], [1.0, 2.0]]")
    set_case("type-precond-variant-int", "precond.variant=3", stages="export")
    set_case("type-dsm-weight", "distill.dsm_weight=\"auto\"")
    set_case("type-ema-string", "distill.ema=\"0.9\"")
    # out of range and huge
    set_case("seed-negative", "run.seed=-1")
    set_case("seed-2pow63", f"run.seed={2 ** 63}")
    set_case("seed-2pow64", f"run.seed={2 ** 64}")
    text_case("seed-2pow64-in-file", lambda t: t.replace("seed = 0\n", f"seed = {2 ** 64}\n", 1))
    set_case("coefficients-seed-2pow64", f"coefficients.seed={2 ** 64}")
    set_case("sample-seed-2pow64", f"sample.seed={2 ** 64}")
    set_case("evaluate-seed-2pow64", f"evaluate.seed={2 ** 64}")
    set_case("distill-seed-2pow64", f"distill.seed={2 ** 64}")
    set_case("sample-num-1e9", "sample.num=1000000000")
    text_case("sample-num-1e9-in-file", lambda t: t.replace("num = 100", "num = 1000000000"))
    set_case("sample-num-zero", "sample.num=0")
    set_case("sample-batch-1e8", "sample.batch=100000000")
    set_case("sample-batch-zero", "sample.batch=0")
    set_case("sample-steps-zero", "sample.steps=0")
    set_case("sample-steps-1e9", "sample.steps=1000000000")
    set_case("coefficients-n_timesteps-1e9", "coefficients.n_timesteps=1000000000")
    set_case("coefficients-n_timesteps-2", "coefficients.n_timesteps=2")
    set_case("coefficients-n_samples-1e9", "coefficients.n_samples=1000000000")
    set_case("coefficients-n_samples-1", "coefficients.n_samples=1")
    set_case("coefficients-batch-1e8", "coefficients.batch=100000000")
    set_case("evaluate-num-1e9", "evaluate.num=1000000000")
    set_case("evaluate-num-1", "evaluate.num=1")
    set_case("evaluate-projections-zero", "evaluate.projections=0")
    set_case("evaluate-steps-zero", "evaluate.steps=[0]")
    set_case("distill-N-1e9", "distill.N=1000000000")
    set_case("distill-batch-1e8", "distill.batch_size=100000000")
    set_case("distill-lr-zero", "distill.lr=0")
    set_case("distill-ema-above-1", "distill.ema=[1.5]")
    set_case("distill-iterations-zero", "distill.iterations=0")
    set_case("teacher_train-precision", "teacher_train.precision=\"fp8\"")
    set_case("sigma_data-zero", "diffusion.sigma_data=0")
    set_case("t_min-above-t_max", "diffusion.t_min=100.0")
    set_case("t_max-nan", "diffusion.t_max=nan")
    set_case("rho-inf", "diffusion.rho=inf")
    set_case("gmm-negative-weight", "teacher.weights=[-1.0, 2.0]")
    set_case("gmm-zero-std", "teacher.stds=[0.0, 1.0]")
    set_case("gmm-weights-means-mismatch", "teacher.weights=[1.0]")
    set_case("timesteps-single", "sample.timesteps=[1.0]")
    set_case("timesteps-increasing", "sample.timesteps=[1.0, 2.0]")
    set_case("timesteps-negative", "sample.timesteps=[80.0, -1.0]")
    set_case("timesteps-outside-t_max", "sample.timesteps=[100.0, 1.0]", stages="sample")
    set_case("export-path-pt2", "export.path=\"jumper.pt2\"")
    set_case("export-dtype-float16", "export.dtype=\"float16\"")
    set_case("device-tpu", "run.device=\"tpu\"")
    set_case("device-cuda-99", "run.device=\"cuda:99\"")
    set_case("runner-ctm_sample-with-cm-sampler", "sample.runner=\"ctm_sample\"",
             "sample.sampler=\"cm\"")
    set_case("fid-without-dataset", "evaluate.metrics=[\"fid\"]")
    # [run] preconds
    set_case("preconds-label-path", "run.preconds=[{name = \"ctm\", label = \"../../x\"}]",
             edit=no_precond)
    set_case("preconds-label-slash", "run.preconds=[{name = \"ctm\", label = \"a/b\"}]",
             edit=no_precond)
    set_case("preconds-label-int", "run.preconds=[{name = \"ctm\", label = 3}]", edit=no_precond)
    set_case("preconds-variant-int", "run.preconds=[{name = \"ctm\", variant = 3}]",
             edit=no_precond)
    set_case("preconds-not-a-list", "run.preconds=\"ctm\"", edit=no_precond)
    set_case("preconds-without-name", "run.preconds=[{variant = \"forward\"}]", edit=no_precond)
    set_case("preconds-duplicate-labels", "run.preconds=[{name = \"ctm\"}, {name = \"ctm\"}]",
             edit=no_precond)
    set_case("preconds-and-precond", "run.preconds=[{name = \"ctm\"}]")
    set_case("preconds-unknown-name", "run.preconds=[{name = \"nosuch\"}]", edit=no_precond)
    # --set syntax
    set_case("set-no-key", "sample=1")
    set_case("set-no-equals", "sample.num")
    set_case("set-empty-name", "=1")
    set_case("set-empty-key", "sample.=1")
    set_case("set-empty-section", ".num=1")
    set_case("set-unknown-section", "nosuch.key=1")
    set_case("set-below-a-value", "run.out_dir.x=1")
    set_case("set-sub-table-of-sample", "sample.x.y=1")
    return cases


def files_cases(T: Templates) -> list[Case]:
    cases: list[Case] = []

    def case(name: str, which: str | None, damage: Callable[[Path, Path], None], *argv: str,
             config: Callable[[Path], str] | None = None) -> None:
        """`which`: the template whose finished run is copied in (None: a fresh folder).
        `damage(case_dir, out_dir)` breaks something; argv follows the config path."""
        def prepare(d: Path) -> list[str]:
            if which:
                out = T.copy_out(which, d)
            else:
                out = d / "out"
            text = config(d) if config else (textwrap.dedent(QUICK_CONFIG) if which != "train"
                                             else train_config())
            (d / "config.toml").write_text(text)
            damage(d, out)
            return [str(d / "config.toml"), *argv]
        cases.append(Case("files", name, prepare))

    q, t = "quick", "train"
    sample = ("--stages", "sample", "--force")
    evaluate = ("--stages", "evaluate", "--force")
    export = ("--stages", "export", "--force")
    coef = ("--stages", "coefficients", "--force")
    resume_distill = ("--set", "distill.iterations=15", "--stages", "distill")
    resume_teacher = ("--set", "teacher_train.iterations=50", "--stages", "teacher")

    def j(out: Path) -> Path:
        return out / "jumper.pt"

    # jumper.pt, read by 'sample' (and 'evaluate')
    case("jumper-missing", q, lambda d, o: j(o).unlink(), "--stages", "sample")
    case("jumper-folder", q, lambda d, o: (j(o).unlink(), j(o).mkdir()), *sample)
    case("jumper-dev-zero", q, lambda d, o: None, "--set", "export.path=\"/dev/zero\"", *sample)
    case("jumper-symlink-dev-zero", q, lambda d, o: (j(o).unlink(), j(o).symlink_to("/dev/zero")),
         *sample)
    case("jumper-empty", q, lambda d, o: j(o).write_bytes(b""), *sample)
    case("jumper-truncated", q, lambda d, o: truncate(j(o)), *sample)
    case("jumper-truncated-tail", q, lambda d, o: truncate(j(o), 0.97), *sample)
    case("jumper-bit-flip", q, lambda d, o: flip_bit_in_tensor_data(j(o)), *sample)
    case("jumper-bit-flip-evaluate", q, lambda d, o: flip_bit_in_tensor_data(j(o)), *evaluate)
    case("jumper-random-bytes", q, lambda d, o: random_bytes(j(o)), *sample)
    case("jumper-foreign-torch-save", q, lambda d, o: foreign_torch(j(o)), *sample)
    case("jumper-foreign-pickle", q, lambda d, o: foreign_pickle(j(o)), *sample)
    case("jumper-non-jumper-torchscript", q, lambda d, o: non_jumper_torchscript(j(o)), *sample)
    case("jumper-zip-not-torchscript", q, lambda d, o: zip_not_torchscript(j(o)), *sample)
    case("jumper-no-meta.json", q,
         lambda d, o: edit_zip_member(j(o), "extra/meta.json", lambda b: None), *sample)
    case("jumper-meta.json-not-json", q,
         lambda d, o: edit_zip_member(j(o), "extra/meta.json", lambda b: b"{not json"), *sample)
    case("jumper-meta.json-a-list", q,
         lambda d, o: edit_zip_member(j(o), "extra/meta.json", lambda b: b"[1, 2]"), *sample)
    case("jumper-meta-shape-does-not-fit", q, lambda d, o: edit_meta(j(o), shape=[7]), *sample)
    case("jumper-meta-shape-negative", q, lambda d, o: edit_meta(j(o), shape=[-2]), *sample)
    case("jumper-meta-t_max-string", q, lambda d, o: edit_meta(j(o), t_max="x"), *sample)
    case("jumper-meta-dtype-unknown", q, lambda d, o: edit_meta(j(o), dtype="float8"), *sample)
    case("jumper-meta-no-payload-digest", q,
         lambda d, o: edit_zip_member(j(o), "extra/meta.json", lambda b: json.dumps(
             {k: v for k, v in json.loads(b).items() if k != "payload_sha256"}).encode()),
         *sample)
    case("jumper-stale-tmp-and-bit-flip", q,
         lambda d, o: ((o / ".jumper.pt.abc123.tmp").write_bytes(b"half"),
                       flip_bit_in_tensor_data(j(o))), *sample)
    # samples.npy, read by 'evaluate'
    import numpy as np

    def samples(o: Path) -> Path:
        return o / "samples.npy"

    def with_value(v):
        def damage(d, o):
            x = np.load(samples(o))
            x[3, 0] = v
            save_npy(samples(o), x)
        return damage
    case("samples-nan", q, with_value(np.nan), *evaluate)
    case("samples-inf", q, with_value(np.inf), *evaluate)
    case("samples-wrong-shape", q, lambda d, o: save_npy(samples(o), np.zeros((50, 3), "f4")),
         *evaluate)
    case("samples-3d", q, lambda d, o: save_npy(samples(o), np.zeros((50, 2, 1), "f4")),
         *evaluate)
    case("samples-one-row", q, lambda d, o: save_npy(samples(o), np.zeros((1, 2), "f4")),
         *evaluate)
    case("samples-int-dtype", q, lambda d, o: save_npy(samples(o), np.zeros((50, 2), "i8")),
         *evaluate)
    case("samples-object-dtype", q,
         lambda d, o: save_npy(samples(o), np.array([[_Loud(), 1.0]] * 4, dtype=object)),
         *evaluate)
    case("samples-truncated", q, lambda d, o: truncate(samples(o)), *evaluate)
    case("samples-header-lies", q, lambda d, o: npy_header_lies(samples(o)), *evaluate)
    case("samples-random-bytes", q, lambda d, o: random_bytes(samples(o)), *evaluate)
    case("samples-folder", q, lambda d, o: (samples(o).unlink(), samples(o).mkdir()), *evaluate)
    # coefficients.h5, read by 'export' (the analytic preconditioning)
    def h(o: Path) -> Path:
        return o / "coefficients.h5"
    case("coefficients-missing", q, lambda d, o: h(o).unlink(), "--stages", "export")
    case("coefficients-folder", q, lambda d, o: (h(o).unlink(), h(o).mkdir()), *export)
    case("coefficients-dev-zero", q, lambda d, o: None, "--set",
         "coefficients.path=\"/dev/zero\"", *export)
    case("coefficients-truncated", q, lambda d, o: truncate(h(o)), *export)
    case("coefficients-random-bytes", q, lambda d, o: random_bytes(h(o)), *export)
    case("coefficients-value-changed", q, lambda d, o: h5_change_value(h(o)), *export)
    case("coefficients-nan", q, lambda d, o: h5_set_nan(h(o)), *export)
    case("coefficients-dataset-removed", q, lambda d, o: h5_drop_dataset(h(o)), *export)
    case("coefficients-empty-hdf5", q, lambda d, o: h5_empty(h(o)), *export)
    case("coefficients-a-jumper", q, lambda d, o: shutil.copy(j(o), h(o)), *export)
    case("coefficients-of-another-teacher", q, lambda d, o: None,
         "--set", "teacher.means=[[-1.0, 0.0], [1.0, 1.0]]", *export)
    case("coefficients-other-t-range", q, lambda d, o: None, "--set", "diffusion.t_max=40.0",
         *export)
    case("coefficients-value-changed-distill", t, lambda d, o: h5_change_value(h(o)),
         "--stages", "distill", "--force")
    # data files ([data] path of a network teacher; coefficients.data / evaluate.data)
    def data_config(spec: str) -> Callable[[Path], str]:
        return lambda d: train_config(data=spec)

    def make_data(name: str, builder: Callable[[Path], None]):
        return lambda d, o: builder(d / name)
    good = lambda p: save_npy(p, np.random.default_rng(0).normal(size=(100, 2)))  # noqa: E731
    case("data-missing", None, lambda d, o: None, "--stages", "teacher",
         config=data_config('path = "missing.npy"'))
    case("data-folder", None, lambda d, o: (d / "x0.npy").mkdir(), "--stages", "teacher",
         config=data_config('path = "x0.npy"'))
    case("data-dev-zero", None, lambda d, o: None, "--stages", "teacher",
         config=data_config('path = "/dev/zero"'))
    case("data-empty", None, make_data("x0.npy", lambda p: p.write_bytes(b"")),
         "--stages", "teacher", config=data_config('path = "x0.npy"'))
    case("data-truncated", None, make_data("x0.npy", lambda p: (good(p), truncate(p, 0.3))),
         "--stages", "teacher", config=data_config('path = "x0.npy"'))
    case("data-header-lies", None, make_data("x0.npy", npy_header_lies), "--stages", "teacher",
         config=data_config('path = "x0.npy"'))
    case("data-object-array", None,
         make_data("x0.npy", lambda p: save_npy(p, np.array([[_Loud(), 1.0]] * 4, dtype=object))),
         "--stages", "teacher", config=data_config('path = "x0.npy"'))
    case("data-random-bytes", None, make_data("x0.npy", random_bytes), "--stages", "teacher",
         config=data_config('path = "x0.npy"'))
    case("data-npz-random-bytes", None, make_data("x0.npz", random_bytes), "--stages",
         "teacher", config=data_config('path = "x0.npz"\nshape = [2]'))
    case("data-text-file", None, make_data("x0.npy", lambda p: p.write_text("1,2\n3,4\n")),
         "--stages", "teacher", config=data_config('path = "x0.npy"'))
    case("data-nan-values", None,
         make_data("x0.npy", lambda p: save_npy(p, np.full((100, 2), np.nan))),
         "--stages", "teacher", config=data_config('path = "x0.npy"'))
    case("data-unknown-format", None, make_data("x0.npy", good), "--stages", "teacher",
         config=data_config('path = "x0.npy"\nformat = "nosuch"'))
    case("coefficients-data-missing", q, lambda d, o: None,
         "--set", "coefficients.data=\"missing.npy\"", *coef)
    case("coefficients-data-dev-zero", q, lambda d, o: None,
         "--set", "coefficients.data=\"/dev/zero\"", *coef)
    case("coefficients-data-header-lies", q, make_data("x0.npy", npy_header_lies),
         "--set", "coefficients.data=\"x0.npy\"", *coef)
    case("coefficients-data-wrong-dim", q,
         make_data("x0.npy", lambda p: save_npy(p, np.zeros((100, 5)))),
         "--set", "coefficients.data=\"x0.npy\"", *coef)
    case("evaluate-data-folder", q, lambda d, o: (d / "ref").mkdir(),
         "--set", "evaluate.data=\"ref\"", *evaluate)
    # a TorchScript teacher file
    def ts_cfg(d: Path) -> str:
        return torchscript_config()
    case("torchscript-teacher-missing", None, lambda d, o: None, config=ts_cfg)
    case("torchscript-teacher-random-bytes", None, make_data("teacher.ts", random_bytes),
         config=ts_cfg)
    case("torchscript-teacher-wrong-signature", None,
         make_data("teacher.ts", non_jumper_torchscript), config=ts_cfg)
    case("torchscript-teacher-foreign-pickle", None, make_data("teacher.ts", foreign_pickle),
         config=ts_cfg)
    case("torchscript-teacher-wrong-output-shape", None,
         make_data("teacher.ts", lambda p: scripted_teacher(p, "shape")), config=ts_cfg)
    for kind, stages in (("nan", "coefficients"), ("raises", "coefficients"),
                         ("raises", "export,sample")):
        case(f"torchscript-teacher-{'returns-nan' if kind == 'nan' else kind}-in-"
             f"{stages.split(',')[-1]}", None,
             make_data("teacher.ts", lambda p, kind=kind: scripted_teacher(p, kind)),
             "--stages", stages, "--set", "sample.steps=8",
             config=lambda d: torchscript_config().replace(
                 'name = "analytic"\nvariant = "forward"', 'name = "ctm"')
             + "\n[data]\n" + GMM_DATA + "\n")
    case("jumper-returns-nan", "nan", lambda d, o: shutil.copy(T.nan / "teacher.ts", d), *sample,
         config=lambda d: (T.nan / "config.toml").read_text())
    # teacher.pt, read by 'coefficients' (and everything after)
    def tp(o: Path) -> Path:
        return o / "teacher.pt"
    case("teacher-missing", t, lambda d, o: tp(o).unlink(), "--stages", "coefficients")
    case("teacher-folder", t, lambda d, o: (tp(o).unlink(), tp(o).mkdir()), *coef)
    case("teacher-empty", t, lambda d, o: tp(o).write_bytes(b""), *coef)
    case("teacher-truncated", t, lambda d, o: truncate(tp(o)), *coef)
    case("teacher-bit-flip", t, lambda d, o: flip_bit_in_tensor_data(tp(o)), *coef)
    case("teacher-random-bytes", t, lambda d, o: random_bytes(tp(o)), *coef)
    case("teacher-foreign-torch-save", t, lambda d, o: foreign_torch(tp(o)), *coef)
    case("teacher-foreign-pickle", t, lambda d, o: foreign_pickle(tp(o)), *coef)
    case("teacher-foreign-object-in-torch-file", t, lambda d, o: foreign_torch_object(tp(o)),
         *coef)

    def strip_digest(path: Path) -> None:
        import torch
        obj = torch.load(path, weights_only=True)
        obj.pop("sha256", None)
        torch.save(obj, path)
    case("teacher-without-checksum", t, lambda d, o: strip_digest(tp(o)), *coef)
    case("teacher-is-a-student-file", t, lambda d, o: None, "--set",
         "teacher.path=\"student.pt\"", *coef)
    case("teacher-is-a-jumper", t, lambda d, o: shutil.copy(j(o), tp(o)), *coef)
    # student.pt, read by 'export'
    def sp(o: Path) -> Path:
        return o / "student.pt"

    def look_alike_student(o: Path, state_dict=None) -> None:
        from core.base.io import load_torch, save_torch
        import torch
        teacher = load_torch(tp(o), "teacher file")
        body = {"format": "ctmkit.student", "version": 1,
                "teacher_fingerprint": "network:" + teacher["sha256"][:32]}
        if state_dict is not None:
            body["state_dict"] = {"w": torch.zeros(3)}
        save_torch(sp(o), body)
    case("student-truncated", t, lambda d, o: truncate(sp(o)), *export)
    case("student-bit-flip", t, lambda d, o: flip_bit_in_tensor_data(sp(o)), *export)
    case("student-random-bytes", t, lambda d, o: random_bytes(sp(o)), *export)
    case("student-foreign-pickle", t, lambda d, o: foreign_pickle(sp(o)), *export)
    case("student-folder", t, lambda d, o: (sp(o).unlink(), sp(o).mkdir()), *export)
    case("student-is-a-teacher-file", t, lambda d, o: shutil.copy(tp(o), sp(o)), *export)
    case("student-without-state_dict", t, lambda d, o: look_alike_student(o), *export)
    case("student-weights-that-do-not-fit", t, lambda d, o: look_alike_student(o, {}), *export)
    case("student-source-missing", q, lambda d, o: None, "--set", "export.source=\"student\"",
         *export)
    # distillation checkpoints, read when a longer run resumes
    def ck(o: Path) -> Path:
        return newest(o / "checkpoints")
    case("checkpoint-bit-flip", t, lambda d, o: flip_bit_in_tensor_data(ck(o)), *resume_distill)
    case("checkpoint-truncated", t, lambda d, o: truncate(ck(o)), *resume_distill)
    case("checkpoint-empty", t, lambda d, o: ck(o).write_bytes(b""), *resume_distill)
    case("checkpoint-foreign-pickle", t, lambda d, o: foreign_pickle(ck(o)), *resume_distill)
    case("checkpoint-is-a-student-file", t, lambda d, o: shutil.copy(sp(o), ck(o)),
         *resume_distill)
    case("checkpoint-folder", t, lambda d, o: (ck(o).unlink(), (o / "checkpoints" /
                                                               "ckpt-00000012.pt").mkdir()),
         *resume_distill)
    case("checkpoint-stale-tmp-and-bit-flip", t,
         lambda d, o: ((o / "checkpoints" / ".ckpt-00000015.pt.xyz789.tmp").write_bytes(b"ha"),
                       flip_bit_in_tensor_data(ck(o))), *resume_distill)
    case("checkpoints-is-a-file", t, lambda d, o: (shutil.rmtree(o / "checkpoints"),
                                                   (o / "checkpoints").write_text("x")),
         *resume_distill)
    case("teacher-checkpoint-bit-flip", t,
         lambda d, o: flip_bit_in_tensor_data(newest(o / "teacher_checkpoints")), *resume_teacher)
    case("teacher-checkpoint-truncated", t,
         lambda d, o: truncate(newest(o / "teacher_checkpoints")), *resume_teacher)
    case("teacher-checkpoint-foreign", t,
         lambda d, o: foreign_torch(newest(o / "teacher_checkpoints")), *resume_teacher)
    # logs read back when resuming
    case("metrics.csv-not-utf8", t,
         lambda d, o: (o / "metrics.csv").write_bytes(b"iteration,loss\n\xff\xfe,1\n"),
         *resume_distill)
    case("teacher_metrics.csv-not-utf8", t,
         lambda d, o: (o / "teacher_metrics.csv").write_bytes(b"iteration,loss\n\xff\xfe,1\n"),
         *resume_teacher)
    # out_dir
    case("out_dir-is-a-file", None, lambda d, o: (d / "f").write_text("x"),
         "--set", "run.out_dir=\"f\"")
    case("out_dir-below-a-file", None, lambda d, o: (d / "f").write_text("x"),
         "--set", "run.out_dir=\"f/sub\"")
    case("out_dir-is-dev-null", None, lambda d, o: None, "--set", "run.out_dir=\"/dev/null\"")
    case("out_dir-lock-is-a-folder", q, lambda d, o: (o / ".lock").mkdir(), *sample)
    return cases


def cli_cases(T: Templates) -> list[Case]:
    cases: list[Case] = []

    def case(name: str, argv: Callable[[Path], list[str]], with_config: bool = True,
             with_run: bool = False) -> None:
        def prepare(d: Path) -> list[str]:
            if with_run:
                T.copy_out("quick", d)
            if with_config:
                (d / "config.toml").write_text(textwrap.dedent(QUICK_CONFIG))
            return argv(d)
        cases.append(Case("cli", name, prepare, how="process"))

    case("unknown-flag", lambda d: ["config.toml", "--bogus"])
    case("no-config", lambda d: [], with_config=False)
    case("missing-config", lambda d: ["nosuch.toml"], with_config=False)
    case("folder-as-config", lambda d: [str(d)])
    case("dev-zero-as-config", lambda d: ["/dev/zero"])
    case("fifo-as-config", lambda d: (os.mkfifo(d / "fifo.toml"), ["fifo.toml"])[1])
    case("two-configs", lambda d: ["config.toml", "config.toml"])
    case("stages-unknown", lambda d: ["config.toml", "--stages", "nosuch"])
    case("stages-one-unknown", lambda d: ["config.toml", "--stages", "coefficients,nosuch"])
    case("stages-wrong-case", lambda d: ["config.toml", "--stages", "Export"])
    case("stages-only-commas", lambda d: ["config.toml", "--stages", ","])
    case("stages-without-value", lambda d: ["config.toml", "--stages"])
    case("set-without-value", lambda d: ["config.toml", "--set"])
    case("set-bad-syntax", lambda d: ["config.toml", "--set", "nosuch"])
    case("dry-run-bad-config", lambda d: ["config.toml", "--dry-run", "--set", "sample.num=0"])
    case("force-missing-input", lambda d: ["config.toml", "--force", "--stages", "sample"])
    case("list-plugins-extra-flag", lambda d: ["--list-plugins", "--bogus"])
    case("dry-run-takes-no-value", lambda d: ["config.toml", "--dry-run=yes"])
    case("stages-bad-with-good-run", lambda d: ["config.toml", "--stages", "sample,,nosuch"],
         with_run=True)
    return cases


def ctm_sample_cases(T: Templates) -> list[Case]:
    cases: list[Case] = []

    def case(name: str, argv: Callable[[Path], list[str]],
             damage: Callable[[Path], None] | None = None) -> None:
        def prepare(d: Path) -> list[str]:
            shutil.copy(T.quick / "out" / "jumper.pt", d / "jumper.pt")
            if damage:
                damage(d)
            return argv(d)
        cases.append(Case("ctm_sample", name, prepare, how="binary", out="x.npy"))

    def flags(*extra: str, model: str = "jumper.pt") -> Callable[[Path], list[str]]:
        return lambda d: ["--model", model, "--out", "x.npy", *extra]

    case("no-arguments", lambda d: [])
    case("no-model", lambda d: ["--out", "x.npy"])
    case("no-out", lambda d: ["--model", "jumper.pt"])
    case("model-missing", flags(model="nosuch.pt"))
    case("model-folder", flags(model="."))
    case("model-dev-zero", flags(model="/dev/zero"))
    case("model-empty", flags(model="empty.pt"), lambda d: (d / "empty.pt").write_bytes(b""))
    case("model-text-file", flags(model="notes.txt"),
         lambda d: (d / "notes.txt").write_text("not a model\n"))
    case("model-random-bytes", flags(model="r.pt"), lambda d: random_bytes(d / "r.pt"))
    case("model-ctmkit-teacher-file", flags(model="teacher.pt"),
         lambda d: shutil.copy(T.train / "out" / "teacher.pt", d / "teacher.pt"))
    case("model-non-jumper-torchscript", flags(model="lin.pt"),
         lambda d: non_jumper_torchscript(d / "lin.pt"))
    case("model-zip-not-torchscript", flags(model="z.pt"),
         lambda d: zip_not_torchscript(d / "z.pt"))
    case("model-bit-flip", flags(), lambda d: flip_bit_in_tensor_data(d / "jumper.pt"))
    case("model-truncated", flags(), lambda d: truncate(d / "jumper.pt"))
    case("model-no-meta.json", flags(),
         lambda d: edit_zip_member(d / "jumper.pt", "extra/meta.json", lambda b: None))
    case("model-meta.json-not-json", flags(),
         lambda d: edit_zip_member(d / "jumper.pt", "extra/meta.json", lambda b: b"{x"))
    case("model-meta-shape-does-not-fit", flags(), lambda d: edit_meta(d / "jumper.pt", shape=[7]))
    case("model-meta-t_min-negative", flags(), lambda d: edit_meta(d / "jumper.pt", t_min=-1.0))
    case("model-returns-nan", flags(model="nan.pt"),
         lambda d: shutil.copy(T.nan / "out" / "jumper.pt", d / "nan.pt"))
    case("model-pt2-random-bytes", flags(model="j.pt2"), lambda d: random_bytes(d / "j.pt2"))
    case("num-zero", flags("--num", "0"))
    case("num-negative", flags("--num", "-5"))
    case("num-text", flags("--num", "many"))
    case("num-float", flags("--num", "1e3"))
    case("num-overflow", flags("--num", "99999999999999999999"))
    case("num-empty", flags("--num="))
    case("num-twice", flags("--num", "4", "--num", "5"))
    case("steps-zero", flags("--steps", "0"))
    case("steps-text", flags("--steps", "two"))
    case("timesteps-one-time", flags("--timesteps", "80"))
    case("timesteps-increasing", flags("--timesteps", "1,2"))
    case("timesteps-outside-model", flags("--timesteps", "100,1"))
    case("timesteps-text", flags("--timesteps", "a,b"))
    case("timesteps-trailing-comma", flags("--timesteps", "80,1,"))
    case("timesteps-negative", flags("--timesteps", "80,-1"))
    case("timesteps-nan", flags("--timesteps", "nan,1"))
    case("steps-disagree-with-timesteps", flags("--steps", "3", "--timesteps", "80,1"))
    case("device-tpu", flags("--device", "tpu"))
    case("device-cuda-text-index", flags("--device", "cuda:abc"))
    case("device-cuda-99", flags("--device", "cuda:99"))
    case("out-in-missing-folder", lambda d: ["--model", "jumper.pt", "--out", "nosuch/x.npy"])
    case("out-is-a-folder", lambda d: (Path(d / "x.npy").mkdir(),
                                       ["--model", "jumper.pt", "--out", "x.npy"])[1])
    case("out-below-a-file", lambda d: ((d / "f").write_text("x"),
                                        ["--model", "jumper.pt", "--out", "f/x.npy"])[1])
    case("out-is-the-model", lambda d: ["--model", "jumper.pt", "--out", "jumper.pt"])
    case("seed-2pow64", flags("--seed", str(2 ** 64)))
    case("seed-negative", flags("--seed", "-1"))
    case("gamma-above-1", flags("--gamma", "2"))
    case("gamma-nan", flags("--gamma", "nan"))
    case("class-label-unconditional", flags("--class-label", "0"))
    case("batch-zero", flags("--batch", "0"))
    case("threads-zero", flags("--threads", "0"))
    case("warmup-negative", flags("--warmup", "-1"))
    case("unknown-flag", flags("--bogus"))
    case("switch-with-value", flags("--timing=1"))
    case("positional-argument", flags("extra"))
    case("flag-without-value", lambda d: ["--out", "x.npy", "--model"])
    return cases


# ---------------------------------------------------------------------------------------------
# Judging a case
# ---------------------------------------------------------------------------------------------

def judge(case: Case, r: Result, d: Path, before: dict[str, str], out_existed: bool,
          ) -> list[str]:
    problems = []
    prefixes = ("error: ", "ctm_sample: error: ") if case.how == "binary" else ("error: ",)
    if r.timed_out:
        problems.append(f"did not finish within {CASE_TIMEOUT}s")
    elif r.rc != 2:
        problems.append(f"exit status {r.rc}")
    lines = r.stderr.rstrip("\n").splitlines() if r.stderr.strip() else []
    if len(lines) != 1:
        problems.append(f"{len(lines)} stderr lines")
    elif not lines[0].startswith(prefixes):
        problems.append("stderr line does not start with " + " or ".join(
            repr(p) for p in prefixes))
    if "Traceback" in r.stderr or "Traceback" in r.stdout:
        problems.append("Traceback")
    if UNSAFE_MARKER in r.stdout or UNSAFE_MARKER in r.stderr:
        problems.append("executed code from a foreign pickle")
    left = [x for x in temporaries(d) if x not in case.keep]
    gone = [x for x in case.keep if not (d / x).is_file()]
    if gone:
        problems.append(f"deleted a temporary that is not its own: {', '.join(gone[:3])}")
    if left:
        problems.append(f"temporaries left: {', '.join(left[:3])}")
    after = snapshot(d)
    changed = sorted(k for k, v in before.items() if after.get(k) != v)
    if changed:
        problems.append(f"changed or removed: {', '.join(changed[:4])}"
                        + (f" (+{len(changed) - 4})" if len(changed) > 4 else ""))
    if case.how == "binary" and case.out and not out_existed:
        for name in (case.out, case.out[:-4] + ".labels.npy", case.out[:-4] + ".png"):
            p = d / name
            if p.exists() and not p.is_dir():
                problems.append(f"wrote {name} although it failed")
    return problems


def run_case(case: Case, d: Path) -> Outcome:
    d.mkdir(parents=True)
    try:
        argv = case.prepare(d)
    except Exception as e:  # a bug in this tool, not in ctmkit: report it as such
        return Outcome(case, False, [f"could not build the case ({e.__class__.__name__}: {e})"],
                       "", None)
    before = snapshot(d)
    out_existed = bool(case.out) and (d / case.out).exists()
    if case.how == "binary":
        cmd = [str(BINARY), *argv]
        r = run_process(cmd, d)
    elif case.how == "process":
        cmd = core_run_cmd(argv + ["--no-progress"])
        r = run_process(cmd, d)
    else:
        argv = argv + ["--no-progress"]
        cmd = core_run_cmd(argv)
        r = run_inprocess(argv, d)
    shown = f"cd {shlex.quote(str(d))} && " + " ".join(
        "python" if c == sys.executable else shlex.quote(c) for c in cmd)
    problems = judge(case, r, d, before, out_existed)
    return Outcome(case, not problems, problems, shown, r)


# ---------------------------------------------------------------------------------------------
# Kill-and-rerun and concurrency trials
# ---------------------------------------------------------------------------------------------

KILL_MODES = ("random", "after-checkpoint", "in-write")
KILL_ITERS = 150           # distillation iterations of a kill trial (checkpoint every 3)
CONCURRENT_ITERS = 1200    # of the first run of a concurrency trial (checkpoint every 200)


def popen_run(cfg: Path, extra: list[str], log: Path) -> subprocess.Popen:
    with open(log, "ab") as fh:
        p = subprocess.Popen(core_run_cmd([str(cfg), "--no-progress", *extra]),
                             cwd=cfg.parent, env=child_env(), stdin=subprocess.DEVNULL,
                             stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    LIVE.add(p)
    return p


def _fresh_temporaries(out: Path) -> set[str]:
    """Names of the temporaries being written in `out` and its checkpoint folders (where
    ctmkit writes them: beside the final file), cheaply enough to poll every millisecond."""
    names = set()
    for folder in (out, out / "checkpoints", out / "teacher_checkpoints"):
        with contextlib.suppress(OSError):
            with os.scandir(folder) as it:
                names.update(e.path for e in it if e.name.endswith(".tmp"))
    return names


def wait_and_kill(p: subprocess.Popen, mode: str, rng: random.Random, out: Path,
                  duration: float) -> tuple[bool, list[str], float]:
    """Kill `p` with SIGKILL at a moment chosen by `mode`; returns (killed, the temporary files
    it was writing when it died, seconds since start)."""
    t0 = time.monotonic()
    stale = _fresh_temporaries(out)        # left by an earlier kill (swept once it has the lock)
    deadline = t0 + max(duration * 3, 60)
    if mode == "random":
        at = t0 + rng.uniform(1.0, duration)
        while time.monotonic() < at and p.poll() is None:
            time.sleep(0.01)
    elif mode == "after-checkpoint":     # a random moment after a new checkpoint appeared
        def ckpts() -> set:
            return {str(x) for f in ("checkpoints", "teacher_checkpoints")
                    for x in (out / f).glob("ckpt-*.pt")}
        target, seen, count = rng.randint(1, 12), ckpts(), 0
        while time.monotonic() < deadline and p.poll() is None:
            now = ckpts()
            count += len(now - seen)
            seen |= now
            if count >= target:
                break
            time.sleep(0.002)
        time.sleep(rng.uniform(0.0, 0.3))
    else:  # "in-write": as soon as the k-th new temporary file is seen being written
        target, seen = rng.randint(1, 12), _fresh_temporaries(out)
        count = 0
        while time.monotonic() < deadline and p.poll() is None:
            now = _fresh_temporaries(out)
            count += len(now - seen)
            seen |= now
            if count >= target:
                break
            time.sleep(0.001)
    killed = False
    if p.poll() is None:
        p.send_signal(signal.SIGKILL)
        killed = True
    p.wait()
    LIVE.discard(p)
    inside = sorted(str(Path(x).relative_to(out)) for x in _fresh_temporaries(out) - stale) \
        if killed else []
    return killed, inside, time.monotonic() - t0


def student_digest(out: Path) -> str:
    from core.base.io import load_torch
    return load_torch(out / "student.pt", "student file")["sha256"]


@dataclass
class TrialResult:
    ok: bool
    line: str
    detail: list[str] = field(default_factory=list)


def kill_trials(n: int, work: Path, seed: int, bar) -> tuple[list[TrialResult], str]:
    text = train_config(iters=KILL_ITERS, ckpt=3)
    ref = work / "kill" / "reference"
    ref.mkdir(parents=True)
    (ref / "config.toml").write_text(text)
    t0 = time.monotonic()
    r = run_process(core_run_cmd([str(ref / "config.toml"), "--no-progress",
                                  "--stages", TRAIN_STAGES]), ref, timeout=RUN_TIMEOUT)
    duration = time.monotonic() - t0
    if r.rc != 0:
        return [TrialResult(False, "the uninterrupted reference run failed",
                            r.stderr.strip().splitlines()[-5:])] * n, ""
    reference = student_digest(ref / "out")
    results, kills_inside, kills = [], 0, 0
    for i in range(n):
        rng = random.Random(seed * 1000 + i)
        d = work / "kill" / f"trial-{i:02d}"
        d.mkdir(parents=True)
        cfg = d / "config.toml"
        cfg.write_text(text)
        log = d / "log.txt"
        events = []
        for k in range(rng.randint(1, 3)):
            mode = KILL_MODES[i % 3] if k == 0 else rng.choice(KILL_MODES)
            p = popen_run(cfg, ["--stages", TRAIN_STAGES], log)
            killed, inside, at = wait_and_kill(p, mode, rng, d / "out", duration)
            kills += killed
            kills_inside += bool(inside)
            events.append(f"{mode} {'kill' if killed else 'no kill (finished)'} at {at:.1f}s"
                          + (f" inside a write ({', '.join(inside)})" if inside else ""))
        r = run_process(core_run_cmd([str(cfg), "--no-progress", "--stages", TRAIN_STAGES]), d,
                        timeout=RUN_TIMEOUT)
        problems = []
        if r.rc != 0:
            problems.append(f"rerun exit status {r.rc}: "
                            + (r.stderr.strip().splitlines() or [""])[-1][:300])
        else:
            try:
                got = student_digest(d / "out")
                if got != reference:
                    problems.append(f"student.pt differs from the uninterrupted run "
                                    f"({got[:12]} vs {reference[:12]})")
            except Exception as e:  # noqa: BLE001
                problems.append(f"student.pt unreadable: {e}")
        left = temporaries(d / "out") if (d / "out").is_dir() else []
        if left:
            problems.append(f"temporaries left: {', '.join(left[:3])}")
        results.append(TrialResult(not problems, f"trial {i}: " + "; ".join(events),
                                   problems))
        bar.update(1)
    note = f"{kills} kills, {kills_inside} inside a write"
    return results, note


def concurrent_trials(n: int, work: Path, seed: int, bar) -> list[TrialResult]:
    text = train_config(iters=CONCURRENT_ITERS, ckpt=200)
    variants = [[], ["--force"], ["--set", "distill.lr=0.001"]]
    results = []
    for i in range(n):
        rng = random.Random(seed * 1000 + 500 + i)
        d = work / "concurrent" / f"trial-{i:02d}"
        d.mkdir(parents=True)
        cfg = d / "config.toml"
        cfg.write_text(text)
        variant = variants[i % len(variants)]
        first = popen_run(cfg, ["--stages", TRAIN_STAGES], d / "first.log")
        problems, said = [], ""
        try:
            deadline = time.monotonic() + 120
            while not (d / "out" / "run.json").exists() and first.poll() is None \
                    and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(rng.uniform(0.0, 1.0))
            second = run_process(core_run_cmd([str(cfg), "--no-progress", "--stages",
                                               TRAIN_STAGES, *variant]), d)
            lines = second.stderr.rstrip("\n").splitlines()
            said = lines[0] if len(lines) == 1 else ""
            if second.timed_out or second.rc != 2:
                problems.append(f"second run: exit status {second.rc}")
            if len(lines) != 1 or not lines[0].startswith("error: "):
                problems.append(f"second run: {len(lines)} stderr lines: "
                                + " | ".join(lines[-3:])[:400])
            elif f"PID {first.pid}" not in lines[0]:
                problems.append(f"second run's error does not name PID {first.pid}: "
                                f"{lines[0][:300]}")
            if "Traceback" in second.stderr:
                problems.append("second run: Traceback")
            try:
                rc = first.wait(timeout=RUN_TIMEOUT)
            except subprocess.TimeoutExpired:
                rc = f"none: still running after {RUN_TIMEOUT}s"
            if rc != 0:
                tail = (d / "first.log").read_text(errors="replace").strip().splitlines()[-3:]
                problems.append(f"first run: exit status {rc}: " + " | ".join(tail)[:400])
            elif not (d / "out" / "student.pt").is_file():
                problems.append("first run finished without student.pt")
        finally:
            if first.poll() is None:
                first.kill()
            first.wait()
            LIVE.discard(first)
        variant_s = " ".join(variant) or "same command"
        results.append(TrialResult(not problems, f"trial {i}: second run ({variant_s})"
                                   + (f" refused: {said}" if said and not problems else ""),
                                   problems))
        bar.update(1)
    return results


# ---------------------------------------------------------------------------------------------

class _NoBar:
    def __init__(self, *a, **k):
        pass

    def update(self, n=1):
        pass

    def set_postfix_str(self, s):
        pass

    def close(self):
        pass


def progress_bar(stream, total: int, desc: str):
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, desc=desc, file=stream, leave=False, dynamic_ncols=True,
                disable=None)


def ensure_binary(say) -> str | None:
    """Build ctm_sample if it is missing; returns why it is unavailable, or None."""
    if BINARY.is_file() and os.access(BINARY, os.X_OK):
        return None
    say(f"{BINARY.relative_to(ROOT)} is missing: building it (python tools/build_cpp.py) ...")
    r = run_process([sys.executable, str(ROOT / "tools" / "build_cpp.py")], ROOT, timeout=1800)
    if r.rc != 0 or not BINARY.is_file():
        return ("could not build it: " + (r.stderr.strip().splitlines() or ["?"])[-1][:200])
    return None


#: locks the ownership cases hold while ctmkit runs (released when this tool exits)
HELD_LOCKS: list = []


def _hold_lock(folder: Path) -> None:
    """Hold `folder` locked as a running ctmkit run would (in this process)."""
    from core.pipeline.lock import RunLock
    HELD_LOCKS.append(RunLock(folder).acquire())


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def ownership_cases(T: Templates) -> list[Case]:
    """Outputs that would collide with an input or another output, out_dirs ctmkit does not own,
    temporaries of other runs and other programs, locks (issue: hostile input, items 1 and 5)."""
    cases: list[Case] = []

    def case(name: str, which: str | None, setup: Callable[[Path, Path], None] | None,
             *argv: str, edit: Callable[[str], str] | None = None, keep=()) -> None:
        """`which`: the template whose finished run is copied in (None: a fresh folder);
        `setup(case_dir, out_dir)` makes the hostile surroundings; argv follows the config."""
        def prepare(d: Path) -> list[str]:
            out = T.copy_out(which, d) if which else d / "out"
            text = textwrap.dedent(QUICK_CONFIG) if which != "train" else train_config()
            (d / "config.toml").write_text(edit(text) if edit else text)
            if setup:
                setup(d, out)
            return [str(d / "config.toml"), *argv]
        cases.append(Case("ownership", name, prepare, keep=tuple(keep)))

    q, t = "quick", "train"
    export = ("--stages", "export", "--force")

    def out_path(key: str, value: str, *stages: str, which=q, setup=None, name=None):
        case(name or f"{key.replace('.', '-')}-is-{value.strip('./').replace('/', '-')}",
             which, setup, "--set", f'{key}="{value}"', *stages)

    # 1. an output over an input or over another output (before anything is written)
    out_path("export.path", "../config.toml", *export)
    out_path("export.path", "../out/../config.toml", *export, name="export-path-dotdot-config")
    out_path("export.path", "coefficients.h5", *export)
    out_path("export.path", "run.json", *export)
    out_path("export.path", "stages.json", *export)
    out_path("export.path", ".lock", *export)
    out_path("export.path", "samples.npy")
    out_path("export.path", "metrics.json")
    out_path("coefficients.path", "jumper.pt", "--stages", "coefficients", "--force")
    out_path("coefficients.path", "../config.toml", "--stages", "coefficients", "--force")
    out_path("coefficients.path", "samples.h5", name="coefficient-plot-is-samples-png")
    out_path("coefficients.path", "metrics.csv", "--stages", "coefficients", "--force")
    out_path("evaluate.cache_dir", "../config.toml", "--stages", "evaluate", "--force")
    out_path("export.path", "../link.pt", *export, name="export-path-symlink-to-config",
             setup=lambda d, o: (d / "link.pt").symlink_to(d / "config.toml"))
    out_path("export.path", "../hard.pt", *export, name="export-path-hard-link-to-config",
             setup=lambda d, o: os.link(d / "config.toml", d / "hard.pt"))
    out_path("export.path", "../x0.npy", *export, name="export-path-is-evaluate-data",
             setup=lambda d, o: (np_save(d / "x0.npy"), add_key(d, "evaluate", "data",
                                                                  "x0.npy")))
    out_path("teacher.path", "../config.toml", "--stages", "teacher", "--force", which=t)
    out_path("teacher.path", "coefficients.h5", "--stages", "teacher", "--force", which=t)
    out_path("teacher.path", "student.pt", "--stages", "teacher", "--force", which=t)
    # ... or over what is not a regular file
    out_path("export.path", "../null", *export, name="export-path-is-a-character-device",
             setup=lambda d, o: char_device(d / "null"))
    out_path("export.path", "../fifo", *export, name="export-path-is-a-fifo",
             setup=lambda d, o: os.mkfifo(d / "fifo"))
    out_path("export.path", "../folder", *export, name="export-path-is-a-folder",
             setup=lambda d, o: (d / "folder").mkdir())
    out_path("export.path", "../sock", *export, name="export-path-is-a-socket",
             setup=lambda d, o: bind_socket(d / "sock"))
    # two runs of one comparison writing one file
    case("preconds-share-an-absolute-export-path", None,
         lambda d, o: None, "--set", f'export.path="{Path(tempfile.gettempdir())}/shared.pt"',
         "--stages", "export",
         edit=lambda t: t.replace('[precond]\nname = "analytic"\nvariant = "forward"\n', "")
         .replace("seed = 0\n", 'seed = 0\npreconds = [{name = "ctm"}, {name = "cm"}]\n', 1))

    # out_dirs that are not ctmkit's (checked by --dry-run as by a run)
    for value in ("/", "~", "..", "~/."):
        case(f"out-dir-{value.replace('/', 'slash').replace('~', 'home').replace('.', 'dot')}",
             None, None, "--set", f'run.out_dir="{value}"', "--dry-run")
    case("out-dir-holds-a-users-files", None,
         lambda d, o: (o.mkdir(), (o / "thesis.tex").write_text("mine")))
    case("out-dir-holds-a-users-folder", None,
         lambda d, o: (o.mkdir(), (o / "photos").mkdir(), (o / "photos" / "a.jpg")
                       .write_bytes(b"x")), "--dry-run")
    case("out-dir-is-the-configs-folder-with-a-readme", None,
         lambda d, o: (d / "README.md").write_text("mine"), "--set", 'run.out_dir="."')
    # the start-up sweep: only dead ctmkit runs' temporaries, only in ctmkit's folders (each
    # case ends with exit 2 in a stage: after the sweep)
    bad_jumper = ("--stages", "sample", "--force")

    def sweep_case(name: str, where: str, temp_name: Callable[[], str],
                   argv: tuple = bad_jumper) -> None:
        def setup(d: Path, o: Path) -> None:
            (d / where).mkdir(parents=True, exist_ok=True)
            (d / where / temp_name()).write_bytes(b"not ctmkit's to delete")
            truncate(o / "jumper.pt")
        case(name, q, setup, *argv, keep=[f"{where}/{temp_name()}"])
    sweep_case("sweep-keeps-a-users-backup-in-a-sub-folder", "out/notes",
               lambda: ".thesis.tex.abcdefgh.tmp")
    dead = _dead_pid()
    sweep_case("sweep-keeps-a-sub-run's-temporary", "out/other-run",
               lambda: f".jumper.pt.ctmkit-{dead}-1-abcdefgh.tmp")
    sweep_case("sweep-keeps-a-live-writer's-temporary", "out",
               lambda: f".coefficients.h5.{live_run_id()}-abcdefgh.tmp")
    sweep_case("sweep-keeps-a-users-tmp-beside-a-shared-store", "shared",
               lambda: ".c.h5.abcdefgh.tmp", ("--set", 'coefficients.path="../shared/c.h5"',
                                               "--stages", "coefficients,sample", "--force"))

    # locks: a second run may not join, not after .lock is deleted, not from a sub-folder
    case("lock-file-deleted-under-a-running-run", q,
         lambda d, o: (_hold_lock(o), (o / ".lock").unlink()), "--stages", "export", "--force")
    case("out-dir-inside-a-running-runs-out-dir", q,
         lambda d, o: _hold_lock(o), "--set", 'run.out_dir="out/analytic"')
    case("comparison-while-a-run-holds-a-label-folder", None,
         lambda d, o: _hold_lock(o / "cm"), "--stages", "export",
         edit=lambda t: t.replace('[precond]\nname = "analytic"\nvariant = "forward"\n', "")
         .replace("seed = 0\n", 'seed = 0\npreconds = [{name = "ctm"}, {name = "cm"}]\n', 1))
    return cases


def _record_offset(path: Path, suffix: str) -> tuple[int, int]:
    """(offset, stored size) of the bytes of the zip member ending in `suffix`."""
    with zipfile.ZipFile(path) as z:
        info = next(i for i in z.infolist() if i.filename.endswith(suffix))
    raw = path.read_bytes()
    n = int.from_bytes(raw[info.header_offset + 26:info.header_offset + 28], "little")
    e = int.from_bytes(raw[info.header_offset + 28:info.header_offset + 30], "little")
    return info.header_offset + 30 + n + e, info.compress_size


def flip_bit_in_record(path: Path, suffix: str, where: float = 0.5) -> None:
    """Flip one bit of the stored bytes of the zip member ending in `suffix` (a transmission
    error: the zip's CRC no longer matches)."""
    offset, size = _record_offset(path, suffix)
    raw = bytearray(path.read_bytes())
    raw[offset + int(size * where)] ^= 0x08
    path.write_bytes(bytes(raw))


def reseal_with_meta(path: Path, edit: Callable[[str], str]) -> None:
    """Rewrite the jumper's meta.json text with `edit` and seal the archive again (a digest
    that matches: what a buggy or hostile exporter would write); the meta rules must refuse."""
    from core.base.integrity import seal_archive
    edit_zip_member(path, "extra/meta.json", lambda b: edit(b.decode()).encode())
    path.write_bytes(seal_archive(path.read_bytes()))


def meta_value(key: str, text: str) -> Callable[[str], str]:
    """meta.json text with `key`'s value replaced by the JSON text `text`."""
    def edit(meta: str) -> str:
        items = {k: json.dumps(v) for k, v in json.loads(meta).items()}
        items[key] = text
        return "{" + ", ".join(f"{json.dumps(k)}: {v}" for k, v in items.items()) + "}"
    return edit


def aoti_template(T: Templates) -> Path:
    """jumper.pt2 (and its sidecar) exported once from the quick run (AOTInductor compiles for
    a minute), for the .pt2 cases; a folder holding both."""
    folder = T.root / "aoti"
    if not (folder / "out" / "jumper.pt2.sha256").is_file():
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        T.copy_out("quick", folder)
        (folder / "config.toml").write_text(textwrap.dedent(QUICK_CONFIG))
        r = run_inprocess([str(folder / "config.toml"), "--no-progress", "--set",
                           "export.aoti=true", "--stages", "export", "--force"], folder,
                          timeout=RUN_TIMEOUT)
        if r.rc != 0:
            raise TemplateError(f"could not export jumper.pt2 (exit {r.rc}): {r.stderr[-500:]}")
    return folder / "out"


def live_run_id() -> str:
    """``ctmkit-<pid>-<start>`` of this (live) process, as its temporaries carry it."""
    from core.base.io import run_id
    return f"ctmkit-{run_id()}"


def np_save(path: Path) -> None:
    import numpy as np
    save_npy(path, np.zeros((8, 2), "f4"))


def add_key(d: Path, section: str, key: str, value: str) -> None:
    cfg = d / "config.toml"
    cfg.write_text(cfg.read_text().replace(f"[{section}]\n", f'[{section}]\n{key} = "{value}"\n',
                                           1))


def char_device(path: Path) -> None:
    """A copy of /dev/null at `path` (a FIFO where mknod is not allowed): a device to aim an
    output at without risking the real /dev/null should ctmkit ever replace it."""
    import stat
    try:
        os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    except (PermissionError, AttributeError):
        os.mkfifo(path)


def bind_socket(path: Path) -> None:
    import socket
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    s.close()


def integrity_cases(T: Templates) -> list[Case]:
    """Every byte a loader reads is covered by a digest checked before use (item 2): the
    TorchScript jumper's code, constants, data.pkl and meta.json (extra/archive_sha256), the
    .pt2 package as a whole (its sidecar), in core.run and in ctm_sample; meta.json values that
    a sealed archive may still hold wrongly."""
    cases: list[Case] = []
    sample = ("--stages", "sample", "--force")
    evaluate = ("--stages", "evaluate", "--force")

    def run_case_(name: str, damage: Callable[[Path], None], *stages: str) -> None:
        def prepare(d: Path) -> list[str]:
            out = T.copy_out("quick", d)
            (d / "config.toml").write_text(textwrap.dedent(QUICK_CONFIG))
            damage(out / "jumper.pt")
            return [str(d / "config.toml"), *(stages or sample)]
        cases.append(Case("integrity", name, prepare))

    def binary_case(name: str, damage: Callable[[Path], None] | None,
                    argv: Callable[[Path], list[str]] | None = None, pt2: bool = False) -> None:
        def prepare(d: Path) -> list[str]:
            model = "jumper.pt2" if pt2 else "jumper.pt"
            src = aoti_template(T) if pt2 else T.quick / "out"
            shutil.copy(src / model, d / model)
            if pt2:
                shutil.copy(src / (model + ".sha256"), d / (model + ".sha256"))
            if damage:
                damage(d / model)
            return argv(d) if argv else ["--model", model, "--out", "x.npy", "--num", "4"]
        cases.append(Case("integrity", name, prepare, how="binary", out="x.npy"))

    pkl_constant = ("data.pkl", lambda b: b.replace(struct.pack(">d", 0.5),
                                                    struct.pack(">d", 0.75), 1))
    code_edit = ("code/__torch__/core/export/jumper.py", lambda b: b.replace(b"expand", b"expanD", 1))
    meta_edit = ("extra/meta.json", lambda b: b.replace(b'"t_max": 80.0', b'"t_max": 40.0', 1))
    bad_metas = {
        "t_min-a-string": ("t_min", '"0.002"'), "t_min-true": ("t_min", "true"),
        "sigma_data-infinity": ("sigma_data", "Infinity"), "version-true": ("version", "true"),
        "shape-9-dims": ("shape", "[1, 1, 1, 1, 1, 1, 1, 1, 2]"),
        "shape-2^24-values-and-1": ("shape", "[2, 8388609]"),
        "num_classes-2^31": ("num_classes", "2147483648"),
        "num_classes-false": ("num_classes", "false"),
        "nested-100-deep": ("notes", "[" * 100 + "]" * 100),
        "precond-a-number": ("precond", "7"),
        "shape-does-not-fit": ("shape", "[7]"),   # valid meta: the load probe refuses it
    }

    # --- core.run: the jumper read by 'sample' / 'evaluate' ---
    for what, suffix in (("code", "code/__torch__/core/export/jumper.py"), ("data.pkl", "data.pkl"),
                         ("constants.pkl", "constants.pkl"), ("meta.json", "extra/meta.json"),
                         ("version-record", "archive/version"),
                         ("digest-record", "extra/archive_sha256")):
        run_case_(f"jumper-bit-flip-in-{what}", lambda p, s=suffix: flip_bit_in_record(p, s))
    run_case_("jumper-bit-flip-in-code-evaluate",
              lambda p: flip_bit_in_record(p, "core/diffusion/edm.py"), *evaluate)
    run_case_("jumper-data.pkl-constant-edited", lambda p: edit_zip_member(p, *pkl_constant))
    run_case_("jumper-code-edited", lambda p: edit_zip_member(p, *code_edit))
    run_case_("jumper-meta.json-t_max-edited", lambda p: edit_zip_member(p, *meta_edit))
    run_case_("jumper-meta.json-t_max-edited-evaluate",
              lambda p: edit_zip_member(p, *meta_edit), *evaluate)
    run_case_("jumper-from-before-the-archive-digest",
              lambda p: edit_zip_member(p, "extra/archive_sha256", lambda b: None))
    run_case_("jumper-digest-record-not-hex",
              lambda p: edit_zip_member(p, "extra/archive_sha256", lambda b: b"z" * 64))
    run_case_("jumper-second-meta.json-record",
              lambda p: _append_record(p, "extra/meta.json", b'{"format": "ctmkit.jumper"}'))
    run_case_("jumper-zip-bomb-record",
              lambda p: _append_record(p, "extra/bomb", bytes(256 << 20), zipfile.ZIP_DEFLATED))
    run_case_("jumper-record-outside-the-top-folder",
              lambda p: _append_record(p, "../evil.py", b"print('x')", top=False))
    for name, (key, text) in bad_metas.items():
        run_case_(f"jumper-sealed-meta-{name}", lambda p, k=key, t=text:
                  reseal_with_meta(p, meta_value(k, t)))

    # --- ctm_sample on the same damage ---
    binary_case("model-bit-flip-in-code", lambda p: flip_bit_in_record(p, "core/export/jumper.py"))
    binary_case("model-bit-flip-in-data.pkl", lambda p: flip_bit_in_record(p, "data.pkl"))
    binary_case("model-bit-flip-in-meta.json", lambda p: flip_bit_in_record(p, "meta.json"))
    binary_case("model-data.pkl-constant-edited", lambda p: edit_zip_member(p, *pkl_constant))
    binary_case("model-code-edited", lambda p: edit_zip_member(p, *code_edit))
    binary_case("model-meta.json-t_max-edited", lambda p: edit_zip_member(p, *meta_edit))
    binary_case("model-from-before-the-archive-digest",
                lambda p: edit_zip_member(p, "extra/archive_sha256", lambda b: None))
    binary_case("model-zip-bomb-record",
                lambda p: _append_record(p, "extra/bomb", bytes(256 << 20), zipfile.ZIP_DEFLATED))
    binary_case("model-second-meta.json-record",
                lambda p: _append_record(p, "extra/meta.json", b'{"format": "ctmkit.jumper"}'))
    for name, (key, text) in bad_metas.items():
        binary_case(f"model-sealed-meta-{name}", lambda p, k=key, t=text:
                    reseal_with_meta(p, meta_value(k, t)))

    # --- .pt2 packages: the whole file against its sidecar, before anything loads it ---
    binary_case("pt2-bit-flip-in-library", lambda p: flip_bit_in_record(p, ".so", 0.3),
                pt2=True)
    binary_case("pt2-bit-flip-in-wrapper-code", lambda p: flip_bit_in_record(p, "wrapper.cpp"),
                pt2=True)
    binary_case("pt2-bit-flip-in-metadata",
                lambda p: flip_bit_in_record(p, "wrapper_metadata.json"), pt2=True)
    binary_case("pt2-without-sidecar", lambda p: Path(str(p) + ".sha256").unlink(), pt2=True)
    binary_case("pt2-sidecar-not-a-digest",
                lambda p: Path(str(p) + ".sha256").write_text("hello\n"), pt2=True)
    binary_case("pt2-sidecar-a-fifo", lambda p: (Path(str(p) + ".sha256").unlink(),
                                                 os.mkfifo(str(p) + ".sha256")), pt2=True)
    binary_case("pt2-sidecar-to-dev-zero", lambda p: (
        Path(str(p) + ".sha256").unlink(), Path(str(p) + ".sha256").symlink_to("/dev/zero")),
        pt2=True)
    binary_case("pt2-truncated-with-old-sidecar", lambda p: truncate(p, 0.9), pt2=True)

    # --- ctm_sample --out: only regular files are replaced, never the model ---
    def out_case(name: str, make: Callable[[Path], str], pt2: bool = False) -> None:
        binary_case(name, None, lambda d: ["--model", "jumper.pt2" if pt2 else "jumper.pt",
                                           "--out", make(d), "--num", "4"], pt2=pt2)
    out_case("out-dev-null", lambda d: "/dev/null")
    out_case("out-a-fifo", lambda d: (os.mkfifo(d / "fifo.npy"), "fifo.npy")[1])
    out_case("out-a-symlink-to-dev-null",
             lambda d: ((d / "l.npy").symlink_to("/dev/null"), "l.npy")[1])
    out_case("out-a-hard-link-of-the-model",
             lambda d: ((d / "h.npy").hardlink_to(d / "jumper.pt"), "h.npy")[1])
    out_case("out-the-model-by-another-path",
             lambda d: ((d / "sub").mkdir(), "sub/../jumper.pt")[1])
    out_case("out-the-pt2-sidecar", lambda d: "jumper.pt2.sha256", pt2=True)
    out_case("out-a-socket", lambda d: _socket(d / "s.npy"))

    # --- ctm_sample counts: one line naming the flag and the bound ---
    for flag, value in (("--steps", "10001"), ("--num", "2147483648"), ("--batch", "1048577"),
                        ("--threads", "1025"), ("--warmup", "101"),
                        ("--timesteps", ",".join(f"{80 - k * 1e-3:.4f}" for k in range(10002)))):
        binary_case(f"flag{flag}-beyond-its-bound", None,
                    lambda d, f=flag, v=value: ["--model", "jumper.pt", "--out", "x.npy", f, v])
    return cases


def _append_record(path: Path, name: str, data: bytes, compression: int = zipfile.ZIP_STORED,
                   top: bool = True) -> None:
    """Append a record `<top folder>/name` (or `name` itself) to a zip archive."""
    import warnings
    with zipfile.ZipFile(path) as z:
        first = z.namelist()[0].split("/")[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)          # "Duplicate name"
        with zipfile.ZipFile(path, "a", compression=compression) as z:
            z.writestr(f"{first}/{name}" if top else name, data)


def _socket(path: Path) -> str:
    bind_socket(path)
    return path.name


def edm_snapshot_bytes(state: dict) -> bytes:
    """An EDM snapshot pickle {ema: persistent EDMPrecond(state)} written opcode by opcode (the
    meta dict pickled with protocol 4, frame header dropped, inside
    torch_utils.persistence._reconstruct_persistent_obj(meta)): no fake modules needed."""
    inner = pickle.dumps(dict(type="class", version=6, class_name="training.networks.EDMPrecond",
                              state=state), protocol=4)
    assert inner[2:3] == b"\x95" and len(inner) < 65536          # one frame
    return (b"\x80\x04}\x8c\x03ema" + b"ctorch_utils.persistence\n_reconstruct_persistent_obj\n"
            + inner[11:-1] + b"\x85Rs.")


def _edm_state(**init_kwargs) -> dict:
    return dict(_init_kwargs={"img_resolution": 8, "img_channels": 1, **init_kwargs},
                _parameters={}, _buffers={}, _modules={})


def _shared_lists(levels: int = 40) -> list:
    bomb: list = []
    for _ in range(levels):
        bomb = [bomb, bomb]               # 2^levels lists when walked, levels + 1 in the file
    return bomb


def _module_dag(levels: int = 40):
    import torch
    m = torch.nn.Module()
    for _ in range(levels):
        parent = torch.nn.Module()
        parent.a, parent.b = m, m
        m = parent
    return m


def _retyped_state_dict(path: Path, what: str, convert: Callable) -> None:
    """Rewrite a ctmkit .pt file (digest recomputed: a file that passes its checksum) with the
    first floating tensor of its state dict(s) converted by `convert`."""
    from core.base.io import DIGEST_KEY, load_torch, save_torch
    obj = load_torch(path, what)
    obj.pop(DIGEST_KEY)
    sds = [obj["state_dict"]] if "state_dict" in obj else list(obj["modules"].values())
    name = next(k for k, v in sds[0].items() if v.is_floating_point())
    sds[0][name] = convert(sds[0][name])
    save_torch(path, obj)


def bounds_cases(T: Templates) -> list[Case]:
    """Sizes, counts and nesting a file or config may ask for; one-line errors (items 3 and 4)."""
    import numpy as np
    cases: list[Case] = []

    def case(name: str, which: str | None, make: Callable[[Path, Path], None] | None,
             *argv: str, config: str | Callable[[str], str] | None = None) -> None:
        """`which`: the template copied in (None: a fresh folder); `make(case_dir, out_dir)`
        writes the hostile input; `config` the config text or an edit of the template's."""
        def prepare(d: Path) -> list[str]:
            out = T.copy_out(which, d) if which else d / "out"
            base = train_config() if which == "train" else textwrap.dedent(QUICK_CONFIG)
            text = config(base) if callable(config) else (config or base)
            (d / "config.toml").write_text(text)
            if make:
                make(d, out)
            return [str(d / "config.toml"), *argv]
        cases.append(Case("bounds", name, prepare))

    def teacher(spec: str) -> Callable[[str], str]:     # QUICK_CONFIG with another [teacher]
        return lambda t: t.replace('kind = "gmm"\nweights = [0.3, 0.7]\n'
                                   'means = [[-2.0, 0.0], [1.0, 1.0]]\nstds = [1.0, 0.5]\n',
                                   spec + "\n")

    def data(spec: str) -> Callable[[str], str]:        # a network teacher on this [data]
        return lambda t: train_config(data=spec)

    coef, teach = ("--stages", "coefficients"), ("--stages", "teacher")
    export = ("--stages", "export", "--force")
    resume_distill = ("--set", "distill.iterations=15", "--stages", "distill")
    # nesting of TOML: tomllib recurses on brackets and is quadratic in a dotted key's length
    case("toml-10000-nested-arrays", None, None,
         config=lambda t: t.replace("seed = 0\n", "seed = " + "[" * 10_000 + "]" * 10_000 + "\n", 1))
    case("toml-3000-nested-inline-tables", None, None,
         config=lambda t: t.replace("seed = 0\n", "seed = " + "{a = " * 3000 + "1" + "}" * 3000
                                    + "\n", 1))
    case("toml-dotted-key-of-100000-parts", None, None,
         config=lambda t: t + "\n[evaluate.metric]\n" + "a." * 100_000 + "b = 1\n")
    case("set-value-5000-nested-arrays", None, None,
         "--set", "run.seed=" + "[" * 5000 + "]" * 5000)
    # --set: an unclosed quote or a line break is an error, not a literal
    case("set-unclosed-double-quote", "quick", None, "--set", 'export.path="jumper2.pt', *export)
    case("set-unclosed-single-quote", "quick", None, "--set", "export.path='jumper2.pt", *export)
    case("set-unclosed-bracket", "quick", None, "--set", "evaluate.steps=[1, 2")
    case("set-embedded-newline", "quick", None, "--set", 'export.path="a\nb.pt"', *export)
    case("set-bare-word-with-newline", "quick", None, "--set", "export.path=a\nb.pt", *export)
    # counts beyond their bound
    case("distill-iterations-1e9", None, None, "--set", "distill.iterations=1000000000")
    case("teacher_train-warmup-1e12", None, None, "--set", "teacher_train.warmup=1000000000000")
    case("keep_checkpoints-1e6", None, None, "--set", "distill.keep_checkpoints=1000000")
    case("evaluate-steps-entry-1e9", None, None, "--set", "evaluate.steps=[1, 1000000000]")
    case("evaluate-steps-1001-entries", None, None,
         "--set", "evaluate.steps=[" + ", ".join(["1"] * 1001) + "]")
    case("distill-eval_steps-entry-1e9", None, None, "--set", "distill.eval_steps=[1000000000]")
    case("distill-17-ema-rates", None, None,
         "--set", "distill.ema=[" + ", ".join(["0.9"] * 17) + "]")
    # a path holding a newline is named on one line
    case("data-path-with-newline", None, None, *teach,
         config=data('path = "x0\\nmissing\\r.npy"'))
    case("coefficients-data-path-with-newline", "quick", None,
         "--set", 'coefficients.data="line\\nbreak.npy"', *coef, "--force")
    # memory a header claims, checked before allocating
    def h5(builder):
        def make(d: Path, o: Path) -> None:
            import h5py
            with h5py.File(d / "x0.h5", "w") as f:
                builder(f)
        return make
    case("data-h5-header-claims-1.6GB", None,
         h5(lambda f: f.create_dataset("x", shape=(10 ** 8, 2), dtype="f8")), *teach,
         config=data('path = "x0.h5"\nshape = [2]'))
    case("data-h5-strings", None, h5(lambda f: f.create_dataset("x", data=np.array(
        [[b"a", b"b"]] * 10, dtype="S1"))), *teach, config=data('path = "x0.h5"\nshape = [2]'))
    case("data-h5-compound", None, h5(lambda f: f.create_dataset("x", data=np.zeros(
        10, dtype=[("a", "f8"), ("b", "f8")]))), *teach,
         config=data('path = "x0.h5"\nshape = [2]'))
    case("data-h5-external-storage", None, h5(lambda f: f.create_dataset(
        "x", shape=(10, 2), dtype="f8", external=[("/dev/zero", 0, 160)])), *teach,
         config=data('path = "x0.h5"\nshape = [2]'))
    # numpy's warnings are the error, not a second line
    case("data-npy-complex", None,
         lambda d, o: save_npy(d / "x0.npy", np.ones((100, 2), np.complex128)), *teach,
         config=data('path = "x0.npy"'))
    case("data-array-overflows-float32", None,
         lambda d, o: save_npy(d / "x0.npy", np.full((100, 2), 1e300)), *teach,
         config=data('format = "array"\npath = "x0.npy"'))
    # JSON ctmkit reads: nesting bounded
    def edm_folder(labels_json: str):
        def make(d: Path, o: Path) -> None:
            from PIL import Image
            (d / "ds").mkdir()
            Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(d / "ds" / "a.png")
            (d / "ds" / "dataset.json").write_text(labels_json)
        return make
    case("dataset-json-100000-nested", None,
         edm_folder('{"labels": ' + "[" * 100_000 + "]" * 100_000 + "}"), *teach,
         config=data('format = "edm"\npath = "ds"'))
    case("jumper-meta-json-100000-nested", "quick",
         lambda d, o: edit_zip_member(o / "jumper.pt", "extra/meta.json",
                                      lambda b: b"[" * 100_000 + b"]" * 100_000),
         "--stages", "sample", "--force")
    # EDM pickles: object graphs and constructor kwargs
    def pkl(state: dict):
        return lambda d, o: (d / "net.pkl").write_bytes(edm_snapshot_bytes(state))
    edm = teacher('kind = "edm"\npath = "net.pkl"')
    case("edm-billion-laughs-init-kwargs", None, pkl(_edm_state(augment_dim=_shared_lists())),
         *coef, config=edm)
    dag = _edm_state()
    dag["_modules"] = {"model": _module_dag()}
    case("edm-submodule-dag-2^40", None, pkl(dag), *coef, config=edm)
    deep: object = 1
    for _ in range(300):
        deep = [deep]
    case("edm-init-kwargs-300-deep", None, pkl(_edm_state(augment_dim=deep)), *coef, config=edm)
    case("edm-negative-label_dim", None, pkl(_edm_state(label_dim=-3)), *coef, config=edm)
    case("edm-img_resolution-1e9", None, pkl(_edm_state(img_resolution=10 ** 9)), *coef,
         config=edm)
    case("edm-model_channels-parameter-bomb", None, pkl(_edm_state(
        model_type="SongUNet", model_channels=4096, channel_mult=[64, 64, 64])), *coef,
         config=edm)
    case("edm-num_blocks-1e6", None, pkl(_edm_state(model_type="SongUNet", num_blocks=10 ** 6)),
         *coef, config=edm)
    case("edm-use_fp16-a-string", None, pkl(_edm_state(use_fp16="yes")), *coef, config=edm)
    # openai state dicts: settings bounded before the network is built
    def openai(**settings) -> Callable[[str], str]:
        kv = {"image_size": 8, "num_channels": 64, "channel_mult": '"1"',
              "attention_resolutions": '""', **settings}
        return teacher('kind = "openai"\npath = "sd.pt"\n'
                       + "".join(f"{k} = {v}\n" for k, v in kv.items()))

    def sd(d: Path, o: Path) -> None:
        import torch
        torch.save({"w": torch.zeros(2)}, d / "sd.pt")
    case("openai-num_res_blocks-1e6", None, sd, *coef, config=openai(num_res_blocks=1000000))
    case("openai-parameter-bomb", None, sd, *coef,
         config=openai(num_channels=4096, channel_mult='"64,64,64"'))
    case("openai-dropout-2", None, sd, *coef, config=openai(dropout=2.0))
    # state dicts of the wrong kind: in openai files (no checksum) and in ctmkit's files that
    # pass their checksum (sparse and meta tensors cannot: its digest refuses them)
    import torch
    for kind, tensor in (("sparse", lambda: torch.zeros(4, 4).to_sparse()),
                         ("meta", lambda: torch.empty(4, 4, device="meta")),
                         ("complex", lambda: torch.zeros(4, 4, dtype=torch.complex64))):
        case(f"openai-{kind}-weights", None,
             lambda d, o, t=tensor: torch.save({"input_blocks.0.0.weight": t()}, d / "sd.pt"),
             *coef, config=openai())
    for kind, convert in (("int64", lambda t: t.long()), ("complex", lambda t: t.to(
            torch.complex64))):
        case(f"student-{kind}-weights", "train",
             lambda d, o, c=convert: _retyped_state_dict(o / "student.pt", "student file", c),
             *export)
        case(f"checkpoint-{kind}-weights", "train",
             lambda d, o, c=convert: _retyped_state_dict(newest(o / "checkpoints"), "checkpoint",
                                                         c), *resume_distill)
    case("teacher-int64-weights", "train",
         lambda d, o: _retyped_state_dict(o / "teacher.pt", "teacher file", lambda t: t.long()),
         "--stages", "coefficients", "--force")
    return cases


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="ctmkit reliability check: bad inputs, kill -9 "
                                "and rerun, two runs in one out_dir.")
    p.add_argument("--quick", action="store_true",
                   help="3 kill-and-rerun and 2 concurrency trials instead of 10 and 3")
    p.add_argument("--keep", metavar="DIR", help="keep every case's files in DIR (empty or new)")
    p.add_argument("--seed", type=int, default=0, help="seed of the kill moments (default 0)")
    p.add_argument("--only", choices=CLASSES, action="append",
                   help="run only these case classes (repeatable) and no trials")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="print every case with its error line")
    args = p.parse_args(argv)

    if args.keep:
        work = Path(args.keep).resolve()
        if work.exists() and (not work.is_dir() or any(work.iterdir())):
            print(f"error: --keep {args.keep}: must be an empty or new folder", file=sys.stderr)
            return 2
        work.mkdir(parents=True, exist_ok=True)
        cleanup = None
    else:
        cleanup = tempfile.TemporaryDirectory(prefix="ctmkit-reliability-")
        work = Path(cleanup.name)

    # the bar and our messages go to the real terminal even while a case captures fds 1 / 2
    term_err = os.fdopen(os.dup(2), "w", buffering=1)

    def say(msg: str) -> None:
        print(msg, flush=True)

    t_start = time.monotonic()
    try:
        import torch
        torch.set_num_threads(1)
        n_kill = 0 if args.only else (3 if args.quick else 10)
        n_conc = 0 if args.only else (2 if args.quick else 3)
        say(f"reliability check in {work} ({'quick' if args.quick else 'full'}: "
            f"{n_kill} kill-and-rerun, {n_conc} concurrency trials)")
        binary_problem = ensure_binary(say)
        templates = Templates(work / "templates")
        try:
            templates.build()
        except TemplateError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        say(f"templates built in {time.monotonic() - t_start:.0f}s")

        builders = {"config": config_cases, "files": files_cases, "cli": cli_cases,
                    "ctm_sample": ctm_sample_cases, "ownership": ownership_cases,
                    "integrity": integrity_cases, "bounds": bounds_cases}
        classes = args.only or list(CLASSES)
        cases = [c for cls in classes for c in builders[cls](templates)]
        if binary_problem:
            cases = [c for c in cases if c.how != "binary"]
        outcomes: list[Outcome] = []
        bar = progress_bar(term_err, len(cases), "bad inputs")
        for i, case in enumerate(cases):
            bar.set_postfix_str(f"{case.cls}/{case.name}"[:40])
            outcomes.append(run_case(case, work / "cases" / f"{i:03d}-{case.cls}-{case.name}"))
            bar.update(1)
        bar.close()
        t_cases = time.monotonic() - t_start

        bar = progress_bar(term_err, n_kill + n_conc, "trials")
        kills, kill_note = kill_trials(n_kill, work, args.seed, bar) if n_kill else ([], "")
        concurrent = concurrent_trials(n_conc, work, args.seed, bar) if n_conc else []
        bar.close()

        # --- report ---
        print()
        for cls in classes:
            mine = [o for o in outcomes if o.case.cls == cls]
            if cls == "ctm_sample" and binary_problem:
                print(f"ctm_sample: not run ({BINARY}: {binary_problem})")
                continue
            print(f"{cls}: clean {sum(o.clean for o in mine)}/{len(mine)}")
        if args.verbose:
            for o in outcomes:
                first = (o.result.stderr.strip().splitlines() or [""])[0] if o.result else ""
                print(f"  {'clean  ' if o.clean else 'UNCLEAN'} [{o.case.cls}] {o.case.name}: "
                      f"{first[:200]}")
        unclean = [o for o in outcomes if not o.clean]
        if unclean:
            print(f"\nunclean cases ({len(unclean)}):")
            for o in unclean:
                print(f"  [{o.case.cls}] {o.case.name}: {'; '.join(o.problems)}")
                if o.command:
                    print(f"    command: {o.command}")
                if o.result is not None:
                    tail = o.result.stderr.strip().splitlines()[-6:]
                    for line in tail or ["(stderr empty)"]:
                        print(f"    | {line[:300]}")
            if not args.keep:
                print("  (the folders above are removed at exit: rerun with --keep DIR to "
                      "keep them)")
        if kills:
            print(f"\nkill-and-rerun ({kill_note}):")
            for t in kills:
                print(f"  {'ok  ' if t.ok else 'FAIL'} {t.line}")
                for prob in t.detail:
                    print(f"       {prob}")
        if concurrent:
            print("\nconcurrency:")
            for t in concurrent:
                print(f"  {'ok  ' if t.ok else 'FAIL'} {t.line}")
                for prob in t.detail:
                    print(f"       {prob}")
        total = time.monotonic() - t_start
        print(f"\ntime: {total:.0f}s ({t_cases:.0f}s for {len(cases)} cases)"
              + (f"; files kept in {work}" if args.keep else ""))
        x, y = sum(o.clean for o in outcomes), len(outcomes)
        k, n = sum(t.ok for t in kills), len(kills)
        c, dd = sum(t.ok for t in concurrent), len(concurrent)
        print(f"reliability: clean {x}/{y}, resumed exact {k}/{n}, concurrent refused {c}/{dd}")
        ok = x == y and k == n and c == dd and not binary_problem
        return 0 if ok else 1
    finally:
        for child in list(LIVE):          # only after an interruption
            kill_group(child)
            child.wait()
        term_err.close()
        if cleanup is not None:
            cleanup.cleanup()


if __name__ == "__main__":
    sys.exit(main())
