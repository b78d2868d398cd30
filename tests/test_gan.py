"""CTM's GAN term (core/train/gan.py, plugins/discriminators): the hinge losses and DiffAugment
against their definitions, a run that logs the discriminator, exact resume after kill -9 and
2 processes = 1 process with the GAN on, and bad input as one error line."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

CONFIG = """
[run]
out_dir = "out"
stages = ["distill"]
[teacher]
kind = "gmm"
weights = [0.3, 0.7]
means = [[-2.0, 0.0], [1.0, 1.0]]
stds = [0.4, 0.3]
[network]
width = 32
depth = 2
emb_dim = 16
[precond]
name = "ctm"
[distill]
iterations = 12
batch_size = 16
checkpoint_every = 6
log_every = 2
eval_every = 100
eval_num = 16
eval_steps = [1]
N = 8
max_ode_steps = 2
gan_weight = "adaptive"
gan_start = 2
generator_every = 2
[discriminator]
name = "conv"
width = 16
"""


def run_cli(cfg: Path, *extra, env=None):
    env = dict(os.environ if env is None else env, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "core.run", str(cfg), "--no-progress", *extra],
                          cwd=ROOT, capture_output=True, text=True, env=env)


def _rows(out: Path) -> list[dict]:
    with open(out / "metrics.csv") as fh:
        return list(csv.DictReader(fh))


def _state(out: Path) -> dict:
    return torch.load(out / "student.pt", weights_only=False)["state_dict"]


def _one_error(r, text: str, out: Path | None = None):
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr[-3000:]
    assert r.stderr.startswith("error:") and text in r.stderr and "Traceback" not in r.stderr, \
        r.stderr
    if out is not None:
        assert not out.exists()


# -- the losses and the augmentations ---------------------------------------------------------

def test_hinge_losses_are_their_definitions():
    from core.train.gan import hinge_discriminator, hinge_generator
    real, fake = torch.randn(6, 5), torch.randn(6, 5)
    want = sum(max(0.0, 1 - float(v)) for v in real.flatten()) / real.numel() + \
        sum(max(0.0, 1 + float(v)) for v in fake.flatten()) / fake.numel()
    assert abs(float(hinge_discriminator(real, fake)) - want) < 1e-6
    assert abs(float(hinge_generator(fake)) + float(fake.mean())) < 1e-6
    one = torch.randn(7)                           # one logit per sample
    assert torch.isclose(hinge_generator(one), -one.mean())


def test_diffaugment_transforms_are_what_they_say():
    from plugins.discriminators import augment
    x = torch.rand(4, 3, 8, 8) * 2 - 1
    # translation by (dy, dx): pixel (i, j) moves to (i + dy, j + dx), zeros shifted in
    d = {"shift_y": torch.tensor([0, 1, -2, 0]), "shift_x": torch.tensor([0, 0, 1, -1])}
    y = augment.apply(x, d)
    assert torch.equal(y[0], x[0])
    assert torch.equal(y[1, :, 1:], x[1, :, :-1]) and (y[1, :, 0] == 0).all()
    assert torch.equal(y[2, :, :-2, 1:], x[2, :, 2:, :-1]) and (y[2, :, -2:] == 0).all()
    assert torch.equal(y[3, :, :, :-1], x[3, :, :, 1:]) and (y[3, :, :, -1] == 0).all()
    # cutout: a 4x4 square (half the size) around the centre drawn, zero; the rest kept
    d = {"cut_y": torch.tensor([4, 0, 7, 3]), "cut_x": torch.tensor([4, 0, 2, 5])}
    y = augment.apply(x, d)
    for i, (cy, cx) in enumerate([(4, 4), (0, 0), (7, 2), (3, 5)]):
        inside = torch.zeros(8, 8, dtype=torch.bool)
        inside[max(cy - 1, 0):cy + 2, max(cx - 1, 0):cx + 2] = True   # |i - c| < 2
        assert (y[i][:, inside] == 0).all() and torch.equal(y[i][:, ~inside], x[i][:, ~inside])
    # colour: brightness adds, saturation 1 and contrast 1 keep
    d = {"brightness": torch.full((4,), 0.25), "saturation": torch.ones(4),
         "contrast": torch.ones(4)}
    assert torch.allclose(augment.apply(x, d), x + 0.25, atol=1e-6)
    # draws: per sample, reproducible from the generator
    a = augment.draw(torch.Generator().manual_seed(3), x.shape, augment.POLICIES)
    b = augment.draw(torch.Generator().manual_seed(3), x.shape, augment.POLICIES)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(len(v) == 4 for v in a.values())
    assert a["shift_y"].abs().max() <= 1 and a["cut_y"].max() <= 8


def test_discriminators_judge_each_sample_alone():
    """A sample's logits do not depend on the other rows of the batch (2 processes = 1)."""
    from plugins.discriminators.conv import ConvDiscriminator
    torch.manual_seed(0)
    for D, x in ((ConvDiscriminator((2,), 3, 16), torch.randn(6, 2)),
                 (ConvDiscriminator((1, 8, 8), 3, 8, policies=["translation"]),
                  torch.randn(6, 1, 8, 8))):
        y = torch.tensor([0, 1, 2, 0, 1, 2])
        dr = D.draw(torch.Generator().manual_seed(0), x)
        whole = D(x, y, dr)
        half = D(x[3:], y[3:], {k: v[3:] for k, v in dr.items()})
        assert whole.shape[0] == 6 and torch.allclose(whole[3:], half, atol=1e-6)


# -- runs ----------------------------------------------------------------------------------------

def test_gan_run_logs_the_discriminator_and_alternates(tmp_path):
    (tmp_path / "c.toml").write_text(CONFIG)
    r = run_cli(tmp_path / "c.toml")
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "out"
    rows = [row for row in _rows(out) if row["lr"]]
    by_it = {int(row["iteration"]): row for row in rows}
    assert by_it[2]["loss_gan"] == "" and by_it[2]["d_loss"] == ""     # before gan_start
    for it in (4, 6, 8, 10, 12):       # each row: one student and one discriminator iteration
        row = by_it[it]
        assert float(row["d_loss"]) > 0 and row["d_real"] and row["d_fake"]
        assert float(row["gan_weight"]) > 0 and row["loss_gan"] and row["loss"]
    ck = torch.load(out / "checkpoints" / "ckpt-00000012.pt", weights_only=False)
    assert "discriminator" in ck["modules"] and "discriminator" in ck["optimizers"]
    assert (out / "curves.png").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("extra", ["", 'gan_fake = "jump_then_target"\ngenerator_every = 1\n'
                                       'gan_weight = 0.3\nmicro_batch = 4'])
def test_kill_9_and_resume_with_the_gan_equals_uninterrupted(tmp_path, extra):
    text = CONFIG.replace("iterations = 12", "iterations = 40").replace(
        "checkpoint_every = 6", "checkpoint_every = 10")
    if extra:
        text = text.replace("generator_every = 2\n", "").replace(
            'gan_weight = "adaptive"\n', "").replace("[discriminator]", extra + "\n[discriminator]")
    a, b = tmp_path / "a", tmp_path / "b"
    for f in (a, b):
        f.mkdir()
        (f / "c.toml").write_text(text)
    r = run_cli(a / "c.toml")
    assert r.returncode == 0, r.stderr[-3000:]
    p = subprocess.Popen([sys.executable, "-m", "core.run", str(b / "c.toml"), "--no-progress"],
                         cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    ck = b / "out" / "checkpoints" / "ckpt-00000020.pt"
    deadline = time.time() + 300
    while not ck.exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert ck.exists()
    r = run_cli(b / "c.toml")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming" in r.stdout
    sa, sb = _state(a / "out"), _state(b / "out")
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    da = torch.load(a / "out" / "checkpoints" / "ckpt-00000040.pt", weights_only=False)
    db = torch.load(b / "out" / "checkpoints" / "ckpt-00000040.pt", weights_only=False)
    for k, v in da["modules"]["discriminator"].items():
        assert torch.equal(v, db["modules"]["discriminator"][k]), k
    cols = ("loss", "loss_gan", "d_loss", "d_real", "d_fake", "gan_weight")
    assert [[r.get(c) for c in cols] for r in _rows(a / "out")] == \
        [[r.get(c) for c in cols] for r in _rows(b / "out")]


@pytest.mark.slow
def test_torchrun_two_processes_match_single_process_with_the_gan(tmp_path):
    text = CONFIG.replace("[discriminator]", "micro_batch = 0\n[discriminator]")
    single, double = tmp_path / "single", tmp_path / "double"
    for f in (single, double):
        f.mkdir()
        (f / "c.toml").write_text(text)
    r = run_cli(single / "c.toml")
    assert r.returncode == 0, r.stderr[-3000:]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                        "--master_port", "29611", "-m", "core.run", str(double / "c.toml"),
                        "--no-progress"], cwd=ROOT, capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = _state(single / "out"), _state(double / "out")
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4), k
    da = torch.load(single / "out" / "checkpoints" / "ckpt-00000012.pt", weights_only=False)
    db = torch.load(double / "out" / "checkpoints" / "ckpt-00000012.pt", weights_only=False)
    # The discriminator: its gradients are averaged over processes, so they agree to float
    # rounding -- but the hinge loss's gradient of a bias is exactly 0 where every logit is
    # inside (-1, 1) (real and fake terms cancel), and one process count's rounding leaves
    # +-1e-9 there instead, which Adam turns into a full step of lr. So: every weight within
    # the largest such drift (lr per discriminator step, 5 steps here), and nearly all of them
    # to rounding.
    close = total = 0
    for k, v in da["modules"]["discriminator"].items():
        w = db["modules"]["discriminator"][k]
        assert (v - w).abs().max() <= 2 * 2e-4 * 5 + 1e-5, k
        close += int(((v - w).abs() <= 1e-5 + 1e-4 * w.abs()).sum())
        total += v.numel()
    assert close >= 0.98 * total, (close, total)
    ra, rb = _rows(single / "out"), _rows(double / "out")
    for x, y in zip(ra, rb):
        for c in ("d_loss", "d_real", "d_fake"):
            if x[c]:
                assert abs(float(x[c]) - float(y[c])) <= 1e-4 * max(1.0, abs(float(x[c])))


# -- bad input -------------------------------------------------------------------------------

IMAGES = CONFIG.replace("means = [[-2.0, 0.0], [1.0, 1.0]]",
                        "means = [" + ", ".join(["[" + ", ".join([str(m)] * 48) + "]"
                                                 for m in (-0.5, 0.5)]) + "]\nshape = [3, 4, 4]")


def _projected(extra: str) -> str:
    return IMAGES.replace('name = "conv"\nwidth = 16',
                          'name = "projected"\nresolution = 32\nwidth = 8\ncmap = 8\n' + extra)


@pytest.mark.parametrize("text, msg", [
    (CONFIG.replace("gan_start = 2", "gan_start = 12"), "[distill] gan_start: must be below "
                                                         "iterations (12)"),
    (CONFIG.replace('name = "conv"\nwidth = 16', 'name = "projected"\nrandom_weights = true'),
     "projected judges images"),
    (_projected(""), "[discriminator] weights: is required"),
    (_projected('weights = ["nowhere.pth"]'), "nowhere.pth not found"),
    (_projected('weights = ["foreign.pth"]'), "is not timm's tf_efficientnet_lite0"),
    (CONFIG.replace('name = "conv"', 'name = "nosuch"'), "unknown discriminator 'nosuch'"),
    (CONFIG.replace("width = 16", "width = 16\naugment = [\"cutout\"]"), "augments images"),
], ids=["gan_start", "projected_vectors", "no_weights", "missing_weights", "foreign_weights",
        "unknown", "augment_vectors"])
def test_bad_gan_input_is_one_error_line(tmp_path, text, msg):
    pytest.importorskip("timm") if "projected" in text else None
    torch.save({"weight": torch.zeros(3, 3)}, tmp_path / "foreign.pth")   # not an EfficientNet
    (tmp_path / "c.toml").write_text(text)
    _one_error(run_cli(tmp_path / "c.toml"), msg, tmp_path / "out")


BAD_PLUGIN = '''
import torch
from core.api import Discriminator, hookimpl


class Bad(Discriminator):
    def __init__(self, mode):
        super().__init__()
        self.mode, self.lin = mode, torch.nn.Linear(2, 1)

    def forward(self, x, labels=None, draws=None):
        if self.mode == "raises":
            raise RuntimeError("the discriminator broke")
        out = self.lin(x).squeeze(1)
        return out[:1] if self.mode == "shape" else out * float("nan")


@hookimpl
def ctmkit_discriminators():
    return {m: (lambda o, c, shape, num_classes, m=m: Bad(m)) for m in ("raises", "shape", "nan")}
'''


@pytest.fixture(scope="module")
def bad_site(tmp_path_factory):
    src = tmp_path_factory.mktemp("src") / "bad"
    (src / "ctmkit_baddisc").mkdir(parents=True)
    (src / "pyproject.toml").write_text(
        (ROOT / "examples" / "plugins" / "powerlaw" / "pyproject.toml").read_text()
        .replace("ctmkit-powerlaw", "ctmkit-baddisc")
        .replace('powerlaw = "ctmkit_powerlaw"', 'baddisc = "ctmkit_baddisc"'))
    (src / "ctmkit_baddisc" / "__init__.py").write_text(BAD_PLUGIN)
    site = tmp_path_factory.mktemp("site")
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                        "--no-build-isolation", "--target", str(site), str(src)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return site


@pytest.mark.parametrize("mode, msg", [
    ("raises", "raised RuntimeError: the discriminator broke"),
    ("shape", "returned [1] for a batch of 16"),
    ("nan", "returned non-finite logits"),
])
def test_a_discriminator_plugin_that_misbehaves_is_one_error_line(bad_site, tmp_path, mode, msg):
    (tmp_path / "c.toml").write_text(CONFIG.replace('name = "conv"\nwidth = 16',
                                                    f'name = "{mode}"'))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(bad_site), str(ROOT)]))
    r = run_cli(tmp_path / "c.toml", env=env)
    _one_error(r, msg)
    assert f"discriminator '{mode}' (ctmkit-baddisc 0.1.0" in r.stderr or "raised" in r.stderr
    assert not list((tmp_path / "out").glob("checkpoints/*.pt"))   # stopped before any


@pytest.mark.skipif(__import__("importlib").util.find_spec("timm") is None,
                    reason="timm (the gan extra) is not installed")
def test_projected_discriminator_trains_on_small_images_with_random_backbone(tmp_path):
    """The projected discriminator (random tf_efficientnet_lite0, 32x32 input) in a run on
    4x4 RGB images, class-conditional: finite logits from every scale, and it loads weights
    of its own architecture from a file."""
    from plugins.discriminators.projected import ProjectedDiscriminator, _FeatureNet
    net = _FeatureNet("tf_efficientnet_lite0", None)
    torch.save(net.net.state_dict(), tmp_path / "lite0.pth")
    text = _projected('weights = ["lite0.pth"]').replace("iterations = 12", "iterations = 4")
    (tmp_path / "c.toml").write_text(text)
    r = run_cli(tmp_path / "c.toml")
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [row for row in _rows(tmp_path / "out") if row.get("d_loss")]
    assert rows and all(abs(float(row["d_real"])) < 1e3 for row in rows)
    D = ProjectedDiscriminator((3, 4, 4), 2, ["tf_efficientnet_lite0"], None, 32, 8, 8,
                               ["color", "translation", "cutout"])
    x = torch.rand(3, 3, 4, 4) * 2 - 1
    out = D(x, torch.tensor([0, 1, 0]), D.draw(torch.Generator().manual_seed(0), x))
    assert out.shape[0] == 3 and out.shape[1] >= 4 and torch.isfinite(out).all()
    trainable = {n.split(".")[0] for n, p in D.named_parameters() if p.requires_grad}
    assert trainable == {"heads"}              # the features and projections stay frozen


def _recipe_stage2_flags(text: str) -> list[str]:
    """The stage-2 command's --set flags, as examples/recipe_smoke.toml's header gives them."""
    import re
    import shlex
    head = "\n".join(line[1:] for line in text.splitlines() if line.startswith("#"))
    cmd = head[head.index("python -m core.run examples/recipe_smoke.toml \\"):]
    cmd = cmd[:cmd.index("# stage 2")].replace("\\\n", " ")
    return [a for a in shlex.split(cmd)[4:] if a != "--set"]


@pytest.mark.slow
def test_recipe_smoke_both_stages_on_a_small_image_set(tmp_path):
    """examples/recipe_smoke.toml's two commands, shrunk to 8x8 images the test makes: stage 1
    (teacher, CTM + DSM), then stage 2 (warm start from stage 1, the GAN on) as its header
    says; stage 2 records its source and logs the discriminator."""
    import re

    import numpy as np
    text = (ROOT / "examples" / "recipe_smoke.toml").read_text()
    flags = _recipe_stage2_flags(text)
    assert any("gan_weight" in f for f in flags) and any("student.init" in f for f in flags)
    rng = np.random.default_rng(0)
    x = np.clip(rng.normal(0, 0.5, (64, 1, 8, 8)) + np.linspace(-0.5, 0.5, 8), -1, 1)
    np.save(tmp_path / "x.npy", x.astype(np.float32))
    small = {"format": '"array"', "path": '"x.npy"', "model_channels": "8",
             "channel_mult": "[1, 2]", "attn_resolutions": "[]", "iterations": "6",
             "batch_size": "8", "N": "8", "max_ode_steps": "3", "checkpoint_every": "3",
             "log_every": "2", "width": "8", "warmup": "2"}
    for k, v in small.items():
        text = re.sub(rf"(?m)^{k} = .*$", f"{k} = {v}", text)
    text = text.replace('stages = ["teacher", "distill", "export", "sample", "evaluate"]',
                        'stages = ["teacher", "distill"]')
    (tmp_path / "examples").mkdir()
    cfg = tmp_path / "examples" / "recipe_smoke.toml"
    cfg.write_text(text.replace('"x.npy"', f'"{tmp_path / "x.npy"}"'))
    r = run_cli(cfg)
    assert r.returncode == 0, r.stderr[-3000:]
    stage2 = [f.replace('["distill", "export", "sample", "evaluate"]', '["distill"]')
              for f in flags]
    r = run_cli(cfg, *[a for f in stage2 for a in ("--set", f)])
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "runs" / "recipe_smoke" / "stage2"
    rows = _rows(out)
    assert any(row.get("d_loss") for row in rows) and any(row.get("loss_gan") for row in rows)
    run = json.loads((out / "run.json").read_text())
    assert "stage1" in json.dumps(run)           # the warm start's source is recorded
    assert (out / "student.pt").is_file() and (out / "curves.png").is_file()


def test_adaptive_gan_and_dsm_weights_are_the_definition_on_both_chunk_paths(tmp_path):
    """With DSM and the GAN term both "adaptive", each w = ||dL_main/dW|| / (||dL_i/dW|| +
    1e-8) on the student's last weight matrix W, and the gradient of L_main + sum w_i L_i:
    the same from the one-pass path and from micro-batches."""
    from core.host.config import load_config
    from core.train.distill import Distiller, last_layer
    from core.pipeline.stages import Run
    (tmp_path / "c.toml").write_text(CONFIG.replace('out_dir = "out"',
                                                    f'out_dir = "{tmp_path / "out"}"').replace(
        "[discriminator]", 'dsm_weight = "adaptive"\n[discriminator]'))
    dl = Distiller(Run(load_config(tmp_path / "c.toml"), progress=False))
    b = dl.draw(2)                                  # gan_start: a student iteration
    assert b.gan_draws is not None and dl.gan.turns(2) == (True, False)
    ls = dl.losses(b)
    params = dl.params
    last = params[last_layer(params)]
    g = [torch.autograd.grad(l, last, retain_graph=True)[0] for l in (ls.main, ls.dsm, ls.gan)]
    w_dsm, w_gan = (g[0].norm() / (g[i].norm() + 1e-8) for i in (1, 2))
    ref = torch.autograd.grad(ls.main + w_dsm * ls.dsm + w_gan * ls.gan, params)
    for micro in (16, 4):
        dl.micro = micro
        stats, (a, c), fake = dl.backward(b)
        assert torch.isclose(a, w_dsm, rtol=1e-5) and torch.isclose(c, w_gan, rtol=1e-5)
        assert fake.shape == (16, 2) and torch.isclose(stats[3], ls.gan.double(), rtol=1e-5)
        for p, r in zip(params, ref):
            assert torch.allclose(p.grad, r, rtol=1e-4, atol=1e-6)
    dl.data.close()
