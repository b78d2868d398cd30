import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from core.diffusion.coefficients.estimate import estimate_table
from core.diffusion.schedules import log_grid
from plugins.teachers.gmm import GMMTeacher
from small_configs import QUICK_CONFIG  # noqa: F401  (tests import it from here)

T_MIN, T_MAX = 0.002, 80.0
ROOT = Path(__file__).resolve().parent.parent
#: the pretrained-teacher fixtures (EDM pickles, an openai state dict): tests/fixtures/README.md
FIXTURES = ROOT / "tests" / "fixtures"




@pytest.fixture(scope="session")
def binary() -> Path:
    """``build/ctm_sample``, built once per session by tools/build_cpp.py (incremental: a no-op
    when it is up to date). Only tests that ask for it pay for the build; they are all marked
    ``slow``, so the quick tier (``-m "not slow"``) never builds C++."""
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "build_cpp.py"), "--quiet"],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, f"build failed:\n{proc.stdout}\n{proc.stderr}"
    path = Path(proc.stdout.strip().splitlines()[-1])
    assert path.is_file()
    return path


@pytest.fixture
def write_config(tmp_path):
    def write(text: str = QUICK_CONFIG, name: str = "config.toml") -> Path:
        p = tmp_path / name
        p.write_text(textwrap.dedent(text))
        return p
    return write


@pytest.fixture
def run_main(capsys):
    """Run the CLI in-process: returns (exit status, stdout, stderr)."""
    from core.run import main

    def run(*argv):
        rc = main([str(a) for a in argv] + ["--no-progress"] if argv and argv[0] != "--list-plugins"
                  else [str(a) for a in argv])
        out, err = capsys.readouterr()
        return rc, out, err
    return run


def single_gaussian(mu=(1.0, -2.0, 0.5), sigma0=0.5):
    return GMMTeacher([1.0], [list(mu)], [sigma0])


def table_for(teacher, n_timesteps=120, n_samples=4096, batch=1024, seed=0):
    den = teacher.denoiser()
    return estimate_table(lambda x, t, y: den(x, t, y), teacher.sample_data, teacher.dim,
                          log_grid(n_timesteps, T_MIN, T_MAX), n_samples, batch, seed, {},
                          progress=False)


@pytest.fixture(scope="session")
def gaussian_table():
    """Default settings (120 log-uniform times x 4096 samples) on N(mu, 0.5^2 I)."""
    return table_for(single_gaussian())


@pytest.fixture(scope="session")
def mixture_table():
    return table_for(GMMTeacher([1 / 3, 2 / 3], [[-2.0], [1.0]], [1.0, 0.5]), 60, 2048)


def exact_single_gaussian(t, sigma0=0.5, T=T_MAX):
    t = np.asarray(t)
    return {"l": t ** 2 / (sigma0 ** 2 + t ** 2),
            "s": -2 * sigma0 ** 2 / (sigma0 ** 2 + t ** 2),
            "L": np.sqrt((T ** 2 + sigma0 ** 2) / (t ** 2 + sigma0 ** 2)),
            "S": (t ** 2 / T ** 2) * (T ** 2 + sigma0 ** 2) / (t ** 2 + sigma0 ** 2)}
