"""GPU smoke check (run where a CUDA GPU is present): training with bf16 / fp16 autocast on CUDA,
coefficient estimation on CUDA vs CPU, and ctm_sample --device cuda vs the CPU samples; then an
EDM fixture teacher (the `edm` plugin) through coefficients -> distill (bf16) -> export ->
ctm_sample --device cuda, compared with ctm_sample on the CPU.

    python tools/gpu_check.py [--out DIR] [--no-cpp] [--edm PKL] [--only-edm] [--device cuda]

(`--only-edm --device cpu` runs the EDM part on a machine without a GPU, to check the script.)

    python tools/gpu_check.py --bench [--device cuda] [--bench-iters 20]
                                      [--bench-examples fashion_mnist,cifar10]

runs only the speed figures of issue #13 (docs/speed.md), each on its own, a failure printed
and the rest run: the distill step of the Fashion-MNIST and CIFAR-10 example configs (samples/s,
it/s, peak memory, overhead over the bare passes) as they are and with the speed options
(solve_buckets, compile, channels_last, tf32, fused_optimizer; then CUDA graphs through
compile_mode = "reduce-overhead"), the default tools/bench_train.py figures, and
the coefficient stage as a share of a Table-3 training run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import _common
import numpy as np
import torch

ROOT = _common.ROOT
CONFIG = """
[run]
out_dir = "{out}"
stages = {stages}
device = "{device}"
[data]
gmm = {{ weights = [0.3, 0.7], means = [[-2.0, 0.0], [1.0, 1.0]], stds = [0.4, 0.3] }}
[network]
width = 128
depth = 3
emb_dim = 32
[teacher]
kind = "network"
path = "{teacher}"
[teacher_train]
iterations = 300
batch_size = 256
lr = 2e-3
precision = "{precision}"
[precond]
name = "analytic"
[coefficients]
path = "{coef}"
n_timesteps = 40
n_samples = 1024
[distill]
iterations = 200
batch_size = 128
precision = "{precision}"
eval_every = 100
[sample]
num = 512
batch = 256
[evaluate]
steps = [1, 2]
num = 256
"""


def run(cfg_text, path):
    path.write_text(cfg_text)
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "core.run", str(path), "--no-progress"], cwd=ROOT,
                       capture_output=True, text=True)
    print(f"--- {path.name}: exit {r.returncode} in {time.perf_counter() - t0:.1f}s")
    print(r.stdout[-1500:], r.stderr[-1500:])
    return r.returncode


EDM_CONFIG = """
[run]
out_dir = "{out}"
stages = ["coefficients", "distill", "export"]
device = "{device}"
[data]
format = "array"
path = "{data}"
conditional = false
[teacher]
kind = "edm"
path = "{pkl}"
[precond]
name = "analytic"
variant = "backward"
[coefficients]
n_timesteps = 8
n_samples = 32
batch = 16
dtype = "float32"
[distill]
iterations = 20
batch_size = 16
micro_batch = 8
precision = "{precision}"
dsm_weight = "adaptive"
eval = []
N = 8
max_ode_steps = 4
"""


def edm_check(out, pkl, device: str, cpp: bool) -> dict:
    """The EDM fixture teacher on `device`: coefficients, bf16 distillation, export, ctm_sample
    on `device` vs on the CPU (same file, same seed)."""
    res = {}
    d = out / "edm"
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    np.save(d / "images.npy", rng.integers(0, 256, (64, 16, 16, 3)).astype(np.uint8))
    prec = "bf16" if device.startswith("cuda") else "fp32"
    res["edm_pipeline"] = run(EDM_CONFIG.format(out=d / "out", device=device, data=d / "images.npy",
                                                pkl=pkl, precision=prec), d / "edm.toml")
    if cpp and res["edm_pipeline"] == 0:
        outs = {}
        for dev in dict.fromkeys(("cpu", device)):
            r = subprocess.run([str(ROOT / "build" / "ctm_sample"), "--model",
                                str(d / "out" / "jumper.pt"), "--steps", "2", "--num", "64",
                                "--batch", "32", "--seed", "0", "--device", dev, "--out",
                                str(d / f"cpp_{dev}.npy")], capture_output=True, text=True)
            print(f"edm ctm_sample {dev}: exit {r.returncode} {r.stderr[-300:]}")
            if r.returncode == 0:
                outs[dev] = np.load(d / f"cpp_{dev}.npy")
        if len(outs) == 2:
            res["edm_cpp_device_vs_cpu_max_abs"] = float(np.abs(outs["cpu"] - outs[device]).max())
    return res


#: the [distill] speed options the GPU figures are measured with (besides the defaults)
FAST = {"solve_buckets": 4, "compile": True, "channels_last": True, "tf32": True,
        "fused_optimizer": True}
#: ... and with CUDA graphs (torch.compile's reduce-overhead mode)
GRAPHS = {**FAST, "compile_mode": "reduce-overhead"}


def bench(device: str = "cuda", iters: int = 20, quick: bool = False,
          examples=("fashion_mnist", "cifar10"), out=None) -> dict:
    """Every speed figure of issue #13, each in try/except; `quick` (CPU smoke): tiny sizes.
    The figures so far are written to `out`/bench.json after each one (a run cut short by a
    time limit keeps them)."""
    import traceback

    from bench_coefficients import main as coef_main
    from bench_train import measure, report

    name = torch.cuda.get_device_name(0) if device.startswith("cuda") else "CPU"
    print(f"# device: {name}; torch {torch.__version__}", flush=True)
    figures = {}

    def figure(label, fn):
        t0 = time.perf_counter()
        try:
            figures[label] = r = fn()
            print(f"--- {label} ({time.perf_counter() - t0:.0f}s)")
            if isinstance(r, dict) and "step_s" in r and "floor_s" in r:
                print(report(r, label))
        except BaseException as e:      # noqa: BLE001 (SystemExit of a tool included)
            if isinstance(e, KeyboardInterrupt):
                raise
            figures[label] = {"error": f"{type(e).__name__}: {e}"}
            print(f"--- {label}: FAILED after {time.perf_counter() - t0:.0f}s\n"
                  f"{traceback.format_exc()[-1500:]}")
        sys.stdout.flush()
        if out is not None:
            (out / "bench.json").write_text(json.dumps(figures, indent=1, default=str))

    small = dict(batch=2, iters=2) if quick else dict(iters=iters)
    figure("default bench_train", lambda: measure(None, device, **(dict(iters=3) if quick
                                                                   else {})))
    figure("default bench_train + solve_buckets=4, fused_optimizer",
           lambda: measure(None, device, sets={"solve_buckets": 4, "fused_optimizer": True},
                           **(dict(iters=3) if quick else {})))
    for ex in examples:
        cfg = str(ROOT / "examples" / f"{ex}.toml")
        figure(f"{ex} distill step", lambda: measure(cfg, device, **small))
        figure(f"{ex} distill step, {FAST}", lambda: measure(cfg, device, sets=FAST, **small))
        figure(f"{ex} distill step, CUDA graphs {GRAPHS}",
               lambda: measure(cfg, device, sets=GRAPHS, **small))
        figure(f"{ex} distill step, analytic (backward), {FAST}",
               lambda: measure(cfg, device, sets=FAST, precond="analytic", **small))
        steps = [figures.get(k, {}).get("step_s") for k in
                 (f"{ex} distill step, CUDA graphs {GRAPHS}", f"{ex} distill step, {FAST}",
                  f"{ex} distill step")]
        step = min([v for v in steps if v] or [1.0])
        coef_args = ["--config", cfg, "--device", device, "--step-s", str(step)]
        if quick:
            coef_args += ["--coef-batch", "2", "--times", "1"]
        figure(f"{ex} coefficient stage", lambda: coef_main(coef_args))
    return figures


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "runs" / "gpu_check"))
    ap.add_argument("--no-cpp", action="store_true")
    ap.add_argument("--edm", default=str(ROOT / "tests" / "fixtures" / "edm" /
                                         "edm-ddpmpp-cond-aug.pkl"), help="EDM snapshot")
    ap.add_argument("--only-edm", action="store_true", help="only the EDM teacher part")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--bench", action="store_true", help="only the speed figures (issue #13)")
    ap.add_argument("--bench-iters", type=int, default=20)
    ap.add_argument("--bench-quick", action="store_true", help="tiny sizes (a CPU smoke test)")
    ap.add_argument("--bench-examples", default="fashion_mnist,cifar10",
                    help="the example configs whose distill step and coefficient stage are timed")
    args = ap.parse_args()
    out = _common.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.bench:
        figures = bench(args.device, args.bench_iters, args.bench_quick,
                        [e for e in args.bench_examples.split(",") if e], out)
        (out / "bench.json").write_text(json.dumps(figures, indent=1, default=str))
        print(f"figures -> {out / 'bench.json'}")
        return
    print(f"torch {torch.__version__}, cuda {torch.cuda.is_available()}, "
          f"{torch.cuda.get_device_name(0) if torch.cuda.is_available() else '-'}")
    if not args.no_cpp:
        b = subprocess.run([sys.executable, "tools/build_cpp.py", "--quiet"], cwd=ROOT,
                           capture_output=True, text=True)
        print("build:", b.returncode, b.stdout[-500:], b.stderr[-1500:])
        args.no_cpp = b.returncode != 0
    edm = edm_check(out, args.edm, args.device, not args.no_cpp) \
        if _common.Path(args.edm).is_file() else {"edm": f"{args.edm} not found; skipped"}
    if args.only_edm:
        print(json.dumps(edm, indent=1, default=str))
        return
    results = {}
    for prec in ("bf16", "fp16", "fp32"):
        d = out / prec
        kw = dict(out=d, device="cuda", teacher=d / "teacher.pt", coef=d / "coefficients.h5",
                  precision=prec, stages='["teacher", "coefficients", "distill", "export", '
                                         '"sample", "evaluate"]')
        results[prec] = run(CONFIG.format(**kw), out / f"{prec}.toml")
        m = d / "metrics.json"
        if m.is_file():
            results[prec + "_metrics"] = json.loads(m.read_text())
    # coefficients: CPU vs CUDA from the same fp32 teacher
    d = out / "fp32"
    kw = dict(out=out / "cpu", device="cpu", teacher=d / "teacher.pt", coef=out / "cpu" / "c.h5",
              precision="fp32", stages='["coefficients"]')
    results["cpu_coefficients"] = run(CONFIG.format(**kw), out / "cpu.toml")
    from core.diffusion.coefficients import store
    try:
        a, b = store.load(d / "coefficients.h5"), store.load(out / "cpu" / "c.h5")
        results["coef_max_abs_diff_l"] = float(np.abs(a.l - b.l).max())
        results["coef_max_abs_diff_s"] = float(np.abs(a.s - b.s).max())
    except Exception as e:  # report, don't stop
        results["coef_error"] = str(e)
    if not args.no_cpp:
        for dev in ("cpu", "cuda"):
            r = subprocess.run([str(ROOT / "build" / "ctm_sample"), "--model",
                                str(d / "jumper.pt"), "--steps", "2", "--num", "512",
                                "--batch", "256", "--seed", "0", "--device", dev, "--out",
                                str(out / f"cpp_{dev}.npy")], capture_output=True, text=True)
            print(f"ctm_sample {dev}: exit {r.returncode} {r.stderr[-300:]}")
        try:
            x_cpu, x_gpu = np.load(out / "cpp_cpu.npy"), np.load(out / "cpp_cuda.npy")
            py = np.load(d / "samples.npy")
            results["cpp_cuda_vs_cpu_max_abs"] = float(np.abs(x_cpu - x_gpu).max())
            results["cpp_cuda_vs_python_cuda_max_abs"] = float(np.abs(py - x_gpu).max())
        except Exception as e:
            results["cpp_error"] = str(e)
    results.update(edm)
    print(json.dumps(results, indent=1, default=str))
    (out / "gpu_check.json").write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
