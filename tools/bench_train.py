"""Distillation throughput and the overhead of a training step over the network passes it needs.

One CTM iteration (Eqn. 7 + DSM) on a batch of B needs: the student's forward + backward on 2B
inputs (loss and DSM parts together), the stop-gradient jumper's forward on B twice (target path)
and forward + backward on B once (the student's path to eps), and the teacher's Heun solver,
2 forwards on B per grid step (the drawn mean number of steps). The floor is the time of those
bare passes, measured on the same network and shapes in the same run; the overhead is
(step time / floor) - 1.

    python tools/bench_train.py [--width 256] [--batch 128] [--iters 60]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import tempfile
import time

import _common
import torch

from core.run import main as core_main

CONFIG = """
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
width = {width}
depth = 4
emb_dim = 64
[precond]
name = "ctm"
[distill]
iterations = {iters}
batch_size = {batch}
checkpoint_every = {iters}
eval_every = 100000
log_every = {iters}
N = 18
max_ode_steps = 17
"""


def timed(fn, repeats=5) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--iters", type=int, default=60)
    args = ap.parse_args(argv)
    from core.config import parse_config
    from core.stages import Run
    from core.students import build_student
    from plugins.losses import CTMLoss

    with tempfile.TemporaryDirectory() as tmp:
        cfg = _common.Path(tmp) / "c.toml"
        cfg.write_text(CONFIG.format(width=args.width, iters=args.iters, batch=args.batch))
        with contextlib.redirect_stdout(io.StringIO()):
            t0 = time.perf_counter()
            assert core_main([str(cfg), "--no-progress"]) == 0
            total = time.perf_counter() - t0
            cfg2 = _common.Path(tmp) / "c2.toml"          # start-up cost alone: 1 iteration
            cfg2.write_text(CONFIG.format(width=args.width, iters=1, batch=args.batch)
                            .replace('"out"', '"out2"'))
            t0 = time.perf_counter()
            assert core_main([str(cfg2), "--no-progress"]) == 0
            startup = time.perf_counter() - t0
        step = (total - startup) / (args.iters - 1)

        import tomllib
        run = Run(parse_config(tomllib.loads(cfg.read_text()), cfg), progress=False)
        net = build_student(run)
        teacher = run.teacher.denoiser(torch.float32)
        B, d = args.batch, run.teacher.dim
        x, t = torch.randn(B, d), torch.rand(B) * 10 + 0.01
        x2, t2 = torch.randn(2 * B, d), torch.rand(2 * B) * 10 + 0.01

        def fwd_bwd_2b():
            net.zero_grad(set_to_none=True)
            net(x2, t2, t2).square().mean().backward()

        def fwd_b():
            with torch.no_grad():
                net(x, t, t)

        def fwd_bwd_input_b():
            xi = x.clone().requires_grad_(True)
            net(xi, t, t).square().mean().backward()

        def teacher_b():
            with torch.no_grad():
                teacher(x, t)

        gen = torch.Generator().manual_seed(0)
        draws = CTMLoss(17).draw(gen, torch.zeros(100_000, 1), 18)
        mean_steps = float((draws["k"] - draws["n"]).float().mean())
        floor = (timed(fwd_bwd_2b) + 2 * timed(fwd_b) + timed(fwd_bwd_input_b)
                 + 2 * mean_steps * timed(teacher_b))
    print(f"# {_common.command_line()}")
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, CPU, fp32; "
          f"student = gmm teacher + MLP residual (width {args.width}, depth 4), batch {B}")
    print(f"step time          {step * 1e3:9.2f} ms   ({B / step:,.0f} samples/s)")
    print(f"floor (bare passes){floor * 1e3:9.2f} ms   (teacher Heun steps per sample: "
          f"{mean_steps:.2f})")
    print(f"overhead           {100 * (step / floor - 1):9.1f} %")


if __name__ == "__main__":
    main()
