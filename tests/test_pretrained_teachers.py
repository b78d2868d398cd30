"""The `edm` and `openai` teacher plugins end to end, as a user would run them: a config with
the fixture's path -> the teacher-initialised jumper.pt reproduces the original code's
denoiser; the student starts equal to the teacher; distillation, export and ctm_sample run;
bad files are one error line."""

import json
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FIXTURES  # tests/fixtures/ (see its README)

ROOT = Path(__file__).resolve().parents[1]
EDM = ["edm-ddpmpp-cond-aug", "edm-ncsnpp-uncond", "edm-adm-cond", "vp-ddpmpp-uncond",
       "ve-ncsnpp-uncond"]

#: the openai fixture's UNetModel settings under openai's script names
OPENAI = """
image_size = 16
num_channels = 32
num_res_blocks = 1
attention_resolutions = [8]
channel_mult = [1, 2]
class_cond = true
num_classes = 10
num_heads = 4
num_head_channels = 16
use_scale_shift_norm = true
resblock_updown = true
dropout = 0.1
"""


def teacher_table(name: str) -> str:
    if name == "openai":
        return f'kind = "openai"\npath = "{FIXTURES / "openai" / "openai-unet-cond.pt"}"\n' + \
            OPENAI
    return f'kind = "edm"\npath = "{FIXTURES / "edm" / (name + ".pkl")}"\n'


def reference(name: str):
    f = FIXTURES / ("openai/openai-unet-cond" if name == "openai" else f"edm/{name}")
    z = np.load(str(f) + ".ref.npz")
    x, sigma, D = (torch.from_numpy(z[k]).float() for k in ("x", "sigma", "D"))
    if "y" in z.files:
        labels = torch.from_numpy(z["y"]).long()
    else:
        onehot = z["class_labels"]
        labels = torch.from_numpy(onehot.argmax(1)).long() if onehot.shape[1] else None
    return x, sigma, labels, D


def config(tmp_path, name, body: str = 'stages = ["export"]', extra: str = "") -> Path:
    t_min = 0.02 if name == "ve-ncsnpp-uncond" else 0.002
    p = tmp_path / "c.toml"
    p.write_text(textwrap.dedent(f"""
    [run]
    out_dir = "out"
    {body}
    [diffusion]
    t_min = {t_min}
    [teacher]
    """) + teacher_table(name) + textwrap.dedent("""
    [precond]
    name = "ctm"
    """) + extra)
    return p


@pytest.mark.parametrize("name", EDM + ["openai"])
def test_teacher_initialised_jumper_reproduces_the_reference_denoiser(name, tmp_path, run_main):
    """CTM's jump f(x, t, s) = (s/t) x + (1 - s/t) D_phi(x, t): with the exported file and the
    reference D of the original code, to 1e-5 relative."""
    rc, _, err = run_main(config(tmp_path, name))
    assert rc == 0, err
    from core.export.jumper import load
    jumper, meta = load(tmp_path / "out" / "jumper.pt")
    x, sigma, labels, D = reference(name)
    assert meta["shape"] == list(x.shape[1:])
    assert meta["num_classes"] == (10 if labels is not None else 0)
    s = sigma / 2
    with torch.no_grad():
        f = jumper(x, sigma.double(), s.double(), labels)
    r = (s / sigma).view(-1, 1, 1, 1)
    want = r * x + (1 - r) * D
    err = float((f - want).abs().max() / want.abs().max())
    assert err < 1e-5, err


@pytest.mark.parametrize("name", ["edm-ddpmpp-cond-aug", "vp-ddpmpp-uncond", "openai"])
def test_student_equals_teacher_at_initialisation(name, tmp_path):
    from core.host.config import load_config
    from core.export.jumper import Jumper, TeacherAsNetwork
    from core.pipeline.stages import Run
    from core.train.students import build_student
    from plugins.preconditionings import CTMPrecond

    run = Run(load_config(config(tmp_path, name)), progress=False)
    student = build_student(run).eval()
    assert {k for k in student.state_dict()} - {
        k for k in student.state_dict() if ".s_" in k or k.startswith("s_")}
    sd = run.cfg.diffusion.sigma_data
    teacher = Jumper(TeacherAsNetwork(run.teacher.denoiser(torch.float32), sd), CTMPrecond(), sd)
    jump = Jumper(student, CTMPrecond(), sd)
    x, sigma, labels, _ = reference(name)
    with torch.no_grad():
        for frac in (0.5, 0.01):
            a = jump(x, sigma.double(), (sigma * frac).double(), labels)
            b = teacher(x, sigma.double(), (sigma * frac).double(), labels)
            assert float((a - b).abs().max() / b.abs().max()) < 1e-5
        # the s pathway is live: a non-zero last layer makes the output depend on s
        last = [p for n, p in student.named_parameters() if "s_" in n][-1]
        last.add_(0.1)
        c = jump(x, sigma.double(), (sigma * 0.5).double(), labels)
        d = jump(x, sigma.double(), (sigma * 0.01).double(), labels)
    assert not torch.allclose(c, d)


@pytest.mark.slow
def test_edm_teacher_through_every_stage_and_ctm_sample(binary, tmp_path, run_main):
    rng = np.random.default_rng(0)
    np.save(tmp_path / "img.npy", rng.integers(0, 256, (32, 16, 16, 3)).astype(np.uint8))
    cfg = config(tmp_path, "edm-ddpmpp-cond-aug",
                 'stages = ["coefficients", "distill", "export", "sample"]', """
    [data]
    format = "array"
    path = "img.npy"
    [coefficients]
    n_timesteps = 4
    n_samples = 4
    batch = 4
    dtype = "float32"
    [distill]
    iterations = 2
    batch_size = 2
    eval = []
    N = 4
    max_ode_steps = 3
    [sample]
    num = 4
    batch = 4
    runner = "ctm_sample"
    """.replace("\n    ", "\n"))
    cfg.write_text(cfg.read_text().replace('name = "ctm"', 'name = "analytic"'))
    rc, out, err = run_main(cfg)
    assert rc == 0, err
    x = np.load(tmp_path / "out" / "samples.npy")
    assert x.shape == (4, 3, 16, 16) and np.all(np.isfinite(x))
    assert np.load(tmp_path / "out" / "samples.labels.npy").shape == (4,)


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_that_calls_os_system_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "ran"
    bad = tmp_path / "evil.pkl"
    bad.write_bytes(pickle.dumps({"ema": _Payload(marker)}))
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[run]\nout_dir = "out"\nstages = ["export"]\n[teacher]\nkind = "edm"\n'
                   f'path = "{bad}"\n[precond]\nname = "ctm"\n')
    r = subprocess.run([sys.executable, "-m", "core.run", str(cfg)], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "system" in r.stderr, r.stderr
    assert not marker.exists() and not (tmp_path / "out" / "jumper.pt").exists()


def test_bad_teacher_inputs_are_one_line(tmp_path, run_main):
    # truncated snapshot
    data = (FIXTURES / "edm" / "edm-adm-cond.pkl").read_bytes()
    (tmp_path / "t.pkl").write_bytes(data[: len(data) // 3])
    cfg = tmp_path / "c.toml"
    base = '[run]\nout_dir = "out"\nstages = ["export"]\n[precond]\nname = "ctm"\n[teacher]\n'
    cfg.write_text(base + f'kind = "edm"\npath = "{tmp_path / "t.pkl"}"\n')
    rc, _, err = run_main(cfg)
    assert rc == 2 and err.count("\n") == 1 and "t.pkl" in err, err
    # a VE teacher asked for sigma below its range
    cfg.write_text(base + f'kind = "edm"\npath = "{FIXTURES / "edm" / "ve-ncsnpp-uncond.pkl"}"\n')
    rc, _, err = run_main(cfg)
    assert rc == 2 and "covers sigma in [0.02, 100]" in err and err.count("\n") == 1, err
    # an openai state dict with settings that do not fit: the first mismatching key is named
    cfg.write_text(base + teacher_table("openai").replace("num_channels = 32",
                                                          "num_channels = 64"))
    rc, _, err = run_main(cfg)
    assert rc == 2 and err.count("\n") == 1 and "openai-unet-cond.pt" in err, err
    assert not (tmp_path / "out" / "jumper.pt").exists()


@pytest.mark.parametrize("name, N, max_ode, iters, batch, grid, nt, ns", [
    ("cifar10_cond", 18, 17, 150000, 512, "log", 120, 4096),
    ("cifar10_uncond", 18, 17, 200000, 256, "log", 120, 4096),
    ("ffhq64", 18, 17, 150000, 256, "log", 120, 4096),
    ("imagenet64", 40, 20, 60000, 2048, "edm", 160, 1024)])
def test_paper_configs_hold_table_3(name, N, max_ode, iters, batch, grid, nt, ns):
    """examples/paper/*.toml parse and carry Table 3's and Appendix B's settings."""
    from core.host.config import load_config
    cfg = load_config(ROOT / "examples" / "paper" / f"{name}.toml",
                      overrides=['run.device="cpu"'])
    d, c = cfg.distill, cfg.coefficients
    assert (d.N, d.max_ode_steps, d.iterations, d.batch_size) == (N, max_ode, iters, batch)
    assert (d.lr, d.target_ema, d.ema, d.solver, d.loss, d.distance) == (
        4e-4, 0.999, [0.999], "heun", "ctm", "lpips")
    assert (c.grid, c.n_timesteps, c.n_samples) == (grid, nt, ns)
    assert cfg.teacher_kind == "edm" and cfg.sample.num == 50000
    assert cfg.evaluate.sample_num == 50000
    assert (cfg.diffusion.t_min, cfg.diffusion.t_max, cfg.diffusion.sigma_data,
            cfg.diffusion.rho) == (0.002, 80.0, 0.5, 7.0)


def test_teacher_dtype_runs_the_teacher_in_bfloat16(tmp_path, run_main):
    """[teacher] dtype = "bfloat16": the float32 denoiser runs the network in bf16 (close to the
    reference, not equal), the export scripts, float64 requests stay float64."""
    from core.host.config import load_config
    from core.pipeline.stages import Run
    cfg = config(tmp_path, "edm-ddpmpp-cond-aug")
    cfg.write_text(cfg.read_text().replace('kind = "edm"', 'kind = "edm"\ndtype = "bfloat16"'))
    run = Run(load_config(cfg), progress=False)
    x, sigma, labels, D = reference("edm-ddpmpp-cond-aug")
    with torch.no_grad():
        out = run.teacher.denoiser(torch.float32)(x, sigma, labels)
        exact = run.teacher.denoiser(torch.float64)(x.double(), sigma.double(), labels)
    assert out.dtype == torch.float32 and exact.dtype == torch.float64
    err = float((out - D).abs().max() / D.abs().max())
    assert 1e-6 < err < 5e-2, err
    assert float((exact.float() - D).abs().max() / D.abs().max()) < 1e-5
    assert run_main(cfg)[0] == 0 and (tmp_path / "out" / "jumper.pt").is_file()
