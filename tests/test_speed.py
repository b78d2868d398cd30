"""The speed paths of the distill step (issue #13), on the CPU: the static-shape (sorted,
bucketed) teacher solve against the gathered one, the sync-free Heun step, the fused EMA, the
one-pass adaptive DSM weight against its definition, the deferred NaN check, the fused
optimiser, Analytic-Precond's range check (off in the step, on in evaluations), and distillation
runs with solve_buckets / channels_last / fused_optimizer / compile against the default run."""

import copy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _gmm_teacher(dim=4, classes=0):
    from plugins.teachers.gmm import GMMTeacher
    rng = np.random.default_rng(0)
    g = GMMTeacher(np.full(3, 1 / 3), rng.normal(size=(3, dim)), np.full(3, 0.4))
    base = g.denoiser(torch.float64)
    if not classes:
        return lambda x, t, y=None: base(x.double(), t.double(), None).to(x.dtype)
    # a label-dependent teacher, so mixing up rows' labels would show
    return lambda x, t, y: (base(x.double(), t.double(), None)
                            + 0.1 * y.double()[:, None]).to(x.dtype)


def _ctx(teacher, buckets, labels=None, host=None, dtype=torch.float32, N=18, solver="heun"):
    from core.train.distill import StepContext
    from core.diffusion.schedules import rho_grid
    from plugins.solvers import EulerSolver, HeunSolver
    grid = torch.tensor(rho_grid(N, 0.002, 80.0, 7.0), dtype=torch.float64)
    s = HeunSolver() if solver == "heun" else EulerSolver()
    return StepContext(precond=None, sigma_data=0.5, grid=grid, teacher=teacher, solver=s,
                       target=None, max_ode_steps=17, labels=labels, solve_buckets=buckets,
                       host=host, positive_grid=True)


@pytest.mark.parametrize("buckets", [1, 2, 3, 4, 1000])
@pytest.mark.parametrize("classes", [0, 10])
@pytest.mark.parametrize("solver", ["heun", "euler"])
def test_sorted_solve_matches_gathered(buckets, classes, solver):
    """Per sample the static-shape solve equals the gathered one to float rounding, whatever
    the bucket count, with and without labels (float32 ~1e-6 relative, float64 ~1e-14)."""
    from plugins.losses import CTMLoss
    gen = torch.Generator().manual_seed(1)
    B, N = 77, 18
    x0 = torch.randn(B, 4, generator=gen)
    d = CTMLoss(17).draw(gen, x0, N)
    labels = torch.randint(0, classes, (B,), generator=gen) if classes else None
    teacher = _gmm_teacher(classes=classes)
    for dtype, tol in ((torch.float32, 2e-5), (torch.float64, 1e-11)):
        x = (x0 + 3 * d["z"]).to(dtype)
        ref = _ctx(teacher, 0, labels, dtype=dtype, solver=solver).solve(x, d["n"], d["k"])
        host = (d["n"], d["k"])
        got = _ctx(teacher, buckets, labels, host=host, dtype=dtype,
                   solver=solver).solve(x, d["n"], d["k"], host=host)
        no_host = _ctx(teacher, buckets, labels, dtype=dtype,
                       solver=solver).solve(x, d["n"], d["k"])
        scale = ref.abs().amax(1, keepdim=True) + 1.0
        assert ((got - ref).abs() / scale).max() < tol
        assert torch.equal(got, no_host)
        assert not torch.equal(ref, x)                # it moved


def test_sorted_solve_edge_cases():
    """No steps at all, an empty batch, one sample, and the CM loss's single steps."""
    teacher = _gmm_teacher()
    x = torch.randn(5, 4)
    n = torch.tensor([3, 4, 5, 6, 7])
    ctx = _ctx(teacher, 2)
    assert torch.equal(ctx.solve(x, n, n), x)
    assert ctx.solve(x[:0], n[:0], n[:0]).shape == (0, 4)
    for sl in (slice(0, 1), slice(0, 5)):
        ref = _ctx(teacher, 0).solve(x[sl], n[sl], n[sl] + 1)
        got = ctx.solve(x[sl], n[sl], n[sl] + 1)
        assert torch.allclose(got, ref, rtol=1e-6, atol=1e-6)


def test_heun_positive_skips_only_the_check():
    from plugins.solvers import HeunSolver
    D = _gmm_teacher()
    x, t0, t1 = torch.randn(9, 4), torch.full((9,), 2.0), torch.full((9,), 1.5)
    h = HeunSolver()
    assert torch.equal(h.step(D, x, t0, t1), h.step(D, x, t0, t1, positive=True))


def test_fused_ema_is_bitwise_the_per_tensor_lerp():
    from core.train.loop import EMA
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(7, 33), torch.nn.BatchNorm1d(33),
                              torch.nn.Linear(33, 3))
    ema = EMA(net, 0.999)
    ref = copy.deepcopy(ema.model)
    for _ in range(3):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
            net(torch.randn(5, 7))                    # moves the BatchNorm buffers
        ema.update(net)
        with torch.no_grad():
            for e, p in zip(ref.parameters(), net.parameters()):
                e.lerp_(p, 1.0 - 0.999)
            for e, b in zip(ref.buffers(), net.buffers()):
                e.copy_(b)
        for a, b in zip(ema.model.state_dict().values(), ref.state_dict().values()):
            assert torch.equal(a, b)


@pytest.mark.parametrize("scaled", [False, True])
def test_adaptive_backward_equals_the_definition(scaled):
    """One pass back through the loss (gradients at the student's output F, then F -> last
    weight for w, then F -> the student) gives CTM's adaptive weight
    ||d L_main / d last|| / ||d L_dsm / d last|| and the gradient of L_main + w L_dsm, as
    differentiating each loss with respect to the last weight does (with a loss network
    between F and L_main, as LPIPS is; with a scaler's common factor, which w ignores)."""
    from core.train.distill import _adaptive_backward
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.SiLU(), torch.nn.Linear(16, 5))
    head = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh())   # "the loss network"
    params = list(net.parameters())
    x, n = torch.randn(12, 5), 8

    def losses():
        F = net(x)
        l_main = head(F[:n]).square().mean() + (F[:n] - 1).abs().mean()
        l_dsm = (F[n:] - x[n:]).square().mean()
        return l_main, l_dsm, F

    l_main, l_dsm, _ = losses()
    g1 = torch.autograd.grad(l_main, params[-2], retain_graph=True)[0]
    g2 = torch.autograd.grad(l_dsm, params[-2], retain_graph=True)[0]
    w_ref = g1.norm() / (g2.norm() + 1e-8)
    ref = torch.autograd.grad(l_main + w_ref * l_dsm, params)

    class Scaler:                              # GradScaler's scale() on a fixed factor
        def scale(self, v):
            return v * 1024.0

    l_main, l_dsm, F = losses()
    w = _adaptive_backward(l_main, l_dsm, F, params, Scaler() if scaled else None)
    assert w.dim() == 0 and torch.isclose(w, w_ref, rtol=1e-5)
    k = 1024.0 if scaled else 1.0
    for p, r in zip(params, ref):
        assert torch.allclose(p.grad / k, r, rtol=1e-5, atol=1e-7)
    assert float(w_ref) != 1.0 and any(float(r.abs().max()) > 0 for r in ref)


def test_ema_follows_a_new_source_module():
    """The EMA keeps its parameter lists between updates; a different source is picked up."""
    from core.train.loop import EMA
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    ema = EMA(a, 0.5)
    ema.update(a)
    ema.update(b)
    want = 0.5 * a.weight.detach() + 0.5 * b.weight.detach()
    assert torch.allclose(ema.model.weight, want)


def test_nan_check_needs_no_sync_and_names_the_first_bad_iteration(tmp_path):
    """check_finite only notes (on the device) which iteration first had a non-finite loss;
    verify (log rows, checkpoints, the end of the loop) raises the one-line error naming it."""
    from core.base.errors import UserError
    from core.train.loop import TrainingLoop
    net = torch.nn.Linear(2, 2)
    opt = torch.optim.Adam(net.parameters())
    loop = TrainingLoop("distill", ckdir=tmp_path / "ck", fingerprint="f",
                        modules={"net": net}, optimizer=opt, params=list(net.parameters()),
                        ema_source=net, emas=[], lr=1e-3, warmup=0, grad_clip=0.0,
                        iterations=10, checkpoint_every=100, keep_checkpoints=1,
                        metrics=tmp_path / "m.csv", fields=["loss"], progress=False)
    loop.check_finite(torch.tensor([1.0, 2.0]), 0)
    loop.verify()
    loop.check_finite(torch.tensor([float("nan"), 2.0]), 3)
    loop.check_finite(torch.tensor([float("inf"), 2.0]), 4)
    loop.check_finite(torch.tensor([1.0, 2.0]), 5)
    with pytest.raises(UserError, match="non-finite loss at iteration 3;"):
        loop.verify()


def test_fused_optimizer_is_the_same_update(tmp_path):
    """fused_optimizer: Adam's fused kernel and RAdam's foreach one update as the default
    implementations do, to float rounding; the config's choice survives a resume from a
    checkpoint written without it."""
    from core.train.loop import TrainingLoop, make_optimizer, save_checkpoint
    torch.manual_seed(0)
    for name in ("adam", "radam"):
        a, b = torch.nn.Linear(6, 4), torch.nn.Linear(6, 4)
        b.load_state_dict(a.state_dict())
        start = a.weight.detach().clone()
        oa, ob = make_optimizer(name, a.parameters(), 1e-2), \
            make_optimizer(name, b.parameters(), 1e-2, fused=True)
        flag = "fused" if name == "adam" else "foreach"
        assert ob.param_groups[0][flag] and not oa.param_groups[0][flag]
        for _ in range(5):
            x = torch.randn(8, 6)
            for net, opt in ((a, oa), (b, ob)):
                opt.zero_grad()
                net(x).square().mean().backward()
                opt.step()
        assert not torch.allclose(a.weight, start, atol=1e-3)
        for p, q in zip(a.parameters(), b.parameters()):
            assert torch.allclose(p, q, rtol=1e-5, atol=1e-6)
        ck = tmp_path / name
        save_checkpoint(ck, 5, "f", {"net": a}, oa, 1)
        loop = TrainingLoop("distill", ckdir=ck, fingerprint="f", modules={"net": b},
                            optimizer=ob, params=list(b.parameters()), ema_source=b, emas=[],
                            lr=1e-2, warmup=0, grad_clip=0.0, iterations=10,
                            checkpoint_every=100, keep_checkpoints=1,
                            metrics=tmp_path / f"{name}.csv", fields=["loss"], progress=False)
        assert loop.start == 5 and ob.param_groups[0][flag]


def test_config_keys_default_off():
    from core.host.config import parse_config
    cfg = parse_config({"teacher": {"kind": "gmm", "weights": [1.0], "means": [[0.0]],
                                    "stds": [1.0]}}, Path("x.toml"))
    d, c = cfg.distill, cfg.coefficients
    assert (d.solve_buckets, d.compile, d.channels_last, d.tf32) == (0, False, False, False)
    assert (d.compile_mode, d.fused_optimizer, c.times_per_call, c.compile) == \
        ("default", False, 1, False)
    cfg = parse_config({"teacher": {"kind": "gmm", "weights": [1.0], "means": [[0.0]],
                                    "stds": [1.0]},
                        "distill": {"solve_buckets": 4, "compile": True, "channels_last": True,
                                    "tf32": True}}, Path("x.toml"))
    d = cfg.distill
    assert (d.solve_buckets, d.compile, d.channels_last, d.tf32) == (4, True, True, True)


RUN = """
[run]
out_dir = "out"
stages = ["distill"]
[teacher]
kind = "gmm"
weights = [0.5, 0.5]
means = [[-1.0, 0.0, 0.5, 0.0], [1.0, 0.5, 0.0, -0.5]]
stds = [0.3, 0.4]
[network]
name = "mlp"
width = 32
depth = 2
emb_dim = 16
[precond]
name = "ctm"
[distill]
iterations = 6
batch_size = 24
checkpoint_every = 3
eval_every = 6
eval_num = 16
eval_steps = [1]
N = 10
max_ode_steps = 6
{extra}
"""


def _distill(tmp: Path, name: str, extra: str = "") -> dict:
    d = tmp / name
    d.mkdir()
    (d / "c.toml").write_text(RUN.format(extra=extra))
    r = subprocess.run([sys.executable, "-m", "core.run", str(d / "c.toml"), "--no-progress"],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    return torch.load(d / "out" / "student.pt", weights_only=False)["state_dict"]


def _close(a: dict, b: dict, tol: float) -> float:
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst < tol, worst
    return worst


@pytest.mark.slow
def test_distill_speed_options_match_the_default(tmp_path):
    """solve_buckets (2 and 1: a fixed count of masked steps) and channels_last (a no-op for
    an MLP) end where the default run ends, to float rounding; the fingerprint ignores them,
    so a run resumes across them."""
    ref = _distill(tmp_path, "ref")
    _close(ref, _distill(tmp_path, "b2", "solve_buckets = 2"), 1e-5)
    _close(ref, _distill(tmp_path, "b1", "solve_buckets = 1\nchannels_last = true\ntf32 = true"),
           1e-5)
    _close(ref, _distill(tmp_path, "f", "fused_optimizer = true"), 1e-5)


@pytest.mark.slow
def test_distill_compiled_matches_the_default(tmp_path):
    """compile = true (torch.compile on the CPU) with the static-shape solve."""
    ref = _distill(tmp_path, "ref")
    _close(ref, _distill(tmp_path, "c", "compile = true\nsolve_buckets = 2"), 1e-4)
    # compile_mode reaches torch.compile (reduce-overhead: CUDA graphs on a GPU; on the CPU
    # the default mode's code)
    _close(ref, _distill(tmp_path, "c_ro", 'compile = true\ncompile_mode = "reduce-overhead"\n'
                         'solve_buckets = 2\nfused_optimizer = true'), 1e-4)
    # the adaptive DSM weight differentiates with retain_graph=True, which a compiled backward
    # with donated buffers refuses (found by gpu_check --bench; _compiled turns them off)
    ref = _distill(tmp_path, "ref_a", 'dsm_weight = "adaptive"')
    _close(ref, _distill(tmp_path, "c_a", 'dsm_weight = "adaptive"\ncompile = true\n'
                         'solve_buckets = 2'), 1e-4)


@pytest.mark.slow
def test_channels_last_unet_step_matches(tmp_path):
    """channels_last on an image network: one StepContext solve and student pass agree with
    the contiguous ones to float rounding."""
    from core.host.config import DiffusionCfg
    from core.host.plugins import Context, create_network
    from plugins.networks import EDMDenoiser
    torch.manual_seed(0)
    net = create_network("unet", {"model_channels": 8, "channel_mult": [1, 2], "num_blocks": 1,
                                  "attn_resolutions": []}, Context(diffusion=DiffusionCfg()),
                         (1, 8, 8), 3, False, "test")
    den = EDMDenoiser(net, 0.5).eval()
    den_cl = copy.deepcopy(den).to(memory_format=torch.channels_last)
    x = torch.randn(6, 1, 8, 8)
    t = torch.linspace(0.1, 5, 6)
    y = torch.arange(6) % 3
    with torch.no_grad():
        a = den(x, t, y)
        b = den_cl(x.contiguous(memory_format=torch.channels_last), t, y)
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)
    n = torch.tensor([0, 1, 2, 3, 4, 5])
    k = n + torch.tensor([3, 1, 2, 1, 3, 2])
    ref = _ctx(den, 0, y).solve(x, n, k)
    got = _ctx(den_cl, 2, y).solve(x.contiguous(memory_format=torch.channels_last), n, k)
    assert torch.allclose(ref, got, rtol=1e-5, atol=1e-5)


def test_analytic_step_skips_the_range_check_and_evaluations_keep_it(write_config, run_main,
                                                                     monkeypatch):
    """With Analytic-Precond the distill step passes grid times only: after one checked call
    on the whole grid, its lookups run with check_range off (no host read-back per jump), and
    the evaluations (trajectory errors at d.eval_steps) run with it on."""
    from conftest import QUICK_CONFIG
    from plugins.preconditionings import AnalyticPrecond
    seen, inside_eval = [], []
    lookup = AnalyticPrecond._lookup

    def spy(self, t):
        seen.append((bool(inside_eval), self.check_range))
        return lookup(self, t)
    monkeypatch.setattr(AnalyticPrecond, "_lookup", spy)
    import core.evaluation.evaluate
    traj = core.evaluation.evaluate.trajectory_errors

    def traj_spy(*a, **k):
        inside_eval.append(1)
        try:
            return traj(*a, **k)
        finally:
            inside_eval.pop()
    monkeypatch.setattr(core.evaluation.evaluate, "trajectory_errors", traj_spy)
    cfg = write_config(QUICK_CONFIG.replace(
        '"coefficients", "export", "sample", "evaluate"', '"coefficients", "distill"') + """
[network]
width = 16
depth = 2
emb_dim = 8
[distill]
iterations = 4
batch_size = 8
checkpoint_every = 4
eval_every = 2
eval_num = 8
eval_steps = [1]
N = 6
max_ode_steps = 3
""")
    rc, out, err = run_main(cfg)
    assert rc == 0, err
    steps = [on for ev, on in seen if not ev]
    evals = [on for ev, on in seen if ev]
    assert evals and all(evals)                       # evaluations: checked
    assert steps.count(True) == 2                     # the one checked call on the grid (t, s)
    assert len(steps) > 2 * 4 and not any(steps[2:])  # then every step's lookups unchecked


def test_the_step_reads_no_tensor_values_back(tmp_path):
    """No host-device sync inside a distill step: with the static-shape solve, an
    Analytic-Precond and CTM's adaptive DSM weight, a step reads no tensor value back on the
    host (tools/bench_train.host_reads_per_step: aten::_local_scalar_dense and nonzero, from
    the profiler, per iteration); the gathered solve (solve_buckets = 0) does, which shows the
    count sees them."""
    sys.path.insert(0, str(ROOT / "tools"))
    from bench_train import host_reads_per_step

    def text(extra, precond):
        stages = '["coefficients", "distill"]' if precond == "analytic" else '["distill"]'
        return lambda n: (RUN.replace('stages = ["distill"]', f"stages = {stages}")
                          .replace('name = "ctm"', f'name = "{precond}"')
                          .replace("iterations = 6", f"iterations = {n}")
                          .replace("checkpoint_every = 3", f"checkpoint_every = {n}")
                          .replace("eval_every = 6", f"eval_every = {n}\nlog_every = {n}\neval = []")
                          .format(extra=extra)
                          + "[coefficients]\nn_timesteps = 8\nn_samples = 32\nbatch = 32\n")
    fast = 'solve_buckets = 2\ndsm_weight = "adaptive"\ngrad_clip = 1.0\n'
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    assert host_reads_per_step(text(fast, "analytic"), tmp_path / "a") == 0
    assert host_reads_per_step(text("", "ctm"), tmp_path / "b") >= 2
