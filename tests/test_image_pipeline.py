"""Images end to end on a tiny labelled dataset: a class-conditional UNet teacher -> coefficients
-> distillation with the ctm and the analytic preconditionings (LPIPS distance, periodic FID)
-> export -> the C++ ctm_sample -> FID / KID in an auto-trained feature net's features."""

import json

import numpy as np
import pytest
import torch


CONFIG = """
[run]
out_dir = "out"
stages = ["teacher", "coefficients", "distill", "export", "sample", "evaluate"]
preconds = [{{name = "ctm"}}, {{name = "analytic", variant = "backward"}}]
[data]
format = "array"
path = "images.npz"
[network]
name = "unet"
model_channels = 8
channel_mult = [1, 2]
num_blocks = 1
attn_resolutions = [4]
[teacher]
kind = "network"
[teacher_train]
iterations = 30
batch_size = 16
lr = 2e-3
checkpoint_every = 15
[coefficients]
n_timesteps = 6
n_samples = 16
batch = 8
[distill]
iterations = 4
batch_size = 4
distance = "lpips"
lpips_net = "alex"
lpips_random = true
checkpoint_every = 2
eval = ["fid"]
eval_every = 2
eval_num = 40
eval_steps = [1, 2]
[sample]
runner = "{runner}"
binary = "{binary}"
steps = 2
num = 24
batch = 10
[evaluate]
trajectory = true
steps = [1, 2]
num = 8
metrics = ["fid", "kid"]
sample_num = 40
sample_batch = 20
[evaluate.metric]
features = "feature_net"
feature_net = "auto"
num = 200
"""

pytestmark = pytest.mark.slow      # the end-to-end image pipeline; CI runs every tier


def make_images(path, n=240, seed=0):
    """Three classes of 8x8 grey images: a bright square top-left, bottom-right, or a bar."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    x = np.full((n, 1, 8, 8), 20, np.uint8)
    for i, c in enumerate(y):
        if c == 0:
            x[i, :, 1:4, 1:4] = 230
        elif c == 1:
            x[i, :, 4:7, 4:7] = 230
        else:
            x[i, :, :, 3:5] = 230
    x = np.clip(x.astype(int) + rng.integers(-15, 16, x.shape), 0, 255).astype(np.uint8)
    np.savez(path, x=x, y=y)


@pytest.fixture(scope="module")
def image_run(tmp_path_factory, binary):  # noqa: F811
    from core.run import main

    d = tmp_path_factory.mktemp("images")
    make_images(d / "images.npz")
    cfg = d / "config.toml"
    cfg.write_text(CONFIG.format(runner="ctm_sample", binary=binary))
    rc = main([str(cfg), "--no-progress"])
    assert rc == 0
    return d, cfg


def test_every_stage_writes_its_files(image_run):
    d, _ = image_run
    o = d / "out"
    for f in ("teacher.pt", "teacher_samples.png", "coefficients.h5", "comparison.json",
              "comparison.png"):
        assert (o / f).is_file(), f
    for label in ("ctm", "analytic-backward"):
        for f in ("student.pt", "jumper.pt", "samples.npy", "samples.labels.npy", "samples.png",
                  "metrics.json", "metrics.csv", "curves.png", "samples_1step.png",
                  "samples_2step.png", "distill_samples_2step.png"):
            assert (o / label / f).is_file(), f"{label}/{f}"
        x = np.load(o / label / "samples.npy")
        assert x.shape == (24, 1, 8, 8) and np.all(np.isfinite(x))
        labels = np.load(o / label / "samples.labels.npy")
        assert labels.shape == (24,) and set(labels) <= {0, 1, 2}


def test_metrics_are_named_for_their_feature_net_never_plain_fid(image_run):
    d, _ = image_run
    table = json.loads((d / "out" / "comparison.json").read_text())
    assert set(table) == {"ctm", "analytic-backward"}
    for m in table.values():
        for k in ("1", "2"):
            keys = set(m["quality"][k])
            assert len(keys) == 2 and all(key.startswith(("fid_featnet-", "kid_featnet-"))
                                          for key in keys), keys
            assert all(np.isfinite(v) for v in m["quality"][k].values())
        assert set(m["trajectory_error"]) == {"1", "2"}
        assert m["samples"]["num"] == 24                          # ctm_sample's samples
    assert len(list((d / "out" / "refstats").glob("featnet-*.pt"))) == 1   # trained once
    head = (d / "out" / "ctm" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert any(c.startswith("fid_featnet-") and c.endswith("_2") for c in head)


def test_ctm_sample_matches_the_python_sampler_for_the_conditional_unet(image_run):
    from core.host.config import for_precond, load_config
    from core.export.sampling import draw
    from core.pipeline.stages import Run, load_exported

    d, cfg = image_run
    base = load_config(cfg)
    run = Run(for_precond(base, base.run.preconds[1]), progress=False)
    jumper, meta = load_exported(run)
    assert meta["num_classes"] == 3 and meta["shape"] == [1, 8, 8]
    ts = run.sampler().timesteps(2, meta["t_min"], meta["t_max"], meta["rho"])
    x, labels = draw(jumper, meta, run.sampler(), ts, 24, 10, 0, progress=False)
    o = d / "out" / "analytic-backward"
    np.testing.assert_array_equal(np.load(o / "samples.labels.npy"), labels)
    np.testing.assert_allclose(np.load(o / "samples.npy"), x, rtol=0, atol=1e-5)


def test_unet_student_equals_its_teacher_at_initialisation(image_run):
    from core.host.config import for_precond, load_config
    from core.export.jumper import Jumper, TeacherAsNetwork
    from core.pipeline.stages import Run
    from core.train.students import build_student

    d, cfg = image_run
    base = load_config(cfg)
    run = Run(for_precond(base, base.run.preconds[1]), progress=False)
    student = build_student(run).eval()
    teacher = TeacherAsNetwork(run.teacher.denoiser(torch.float32), 0.5)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 1, 8, 8, generator=g) * 3
    t = torch.tensor([80.0, 10.0, 3.0, 1.0, 0.3, 0.01])
    s = t * torch.rand(6, generator=g)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    precond = run.precond()
    with torch.no_grad():
        a = Jumper(student, precond, 0.5)(x, t, s, y)
        b = Jumper(teacher, precond, 0.5)(x, t, s, y)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(Jumper(student, precond, 0.5)(x, t, s, (y + 1) % 3), a)
