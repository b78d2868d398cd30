"""The small configs of the tests, kept once: conftest.py and test_reliability.py use them, and
so does the reliability probe (tools/check_reliability.py), which must not drift from them.

Plain text, no pytest: the probe imports this file from tools/.
"""

import textwrap

#: an analytic Gaussian-mixture teacher: coefficients -> export -> sample -> evaluate in seconds
QUICK_CONFIG = """
[run]
out_dir = "out"
stages = ["coefficients", "export", "sample", "evaluate"]
seed = 0
[teacher]
kind = "gmm"
weights = [0.3, 0.7]
means = [[-2.0, 0.0], [1.0, 1.0]]
stds = [1.0, 0.5]
[precond]
name = "analytic"
variant = "forward"
[coefficients]
grid = "log"
n_timesteps = 40
n_samples = 512
batch = 256
[export]
path = "jumper.pt"
[sample]
sampler = "ctm"
steps = 2
num = 300
batch = 128
seed = 0
[evaluate]
steps = [1, 2]
num = 200
"""

#: the edits that make QUICK_CONFIG the probe's (fewer coefficient samples and draws: the probe
#: runs it hundreds of times)
PROBE_EDITS = (
    ("n_timesteps = 40\nn_samples = 512\nbatch = 256\n", "n_timesteps = 12\nn_samples = 128\nbatch = 128\n"),
    ("num = 300\nbatch = 128\n", "num = 100\nbatch = 64\n"),
    ("[evaluate]\nsteps = [1, 2]\nnum = 200\n", "[evaluate]\nsteps = [1, 2]\nnum = 50\nprojections = 16\n"),
)


def probe_quick_config() -> str:
    """QUICK_CONFIG, sized for the reliability probe."""
    text = QUICK_CONFIG
    for old, new in PROBE_EDITS:
        assert text.count(old) == 1, f"small_configs.PROBE_EDITS: {old!r} is not in QUICK_CONFIG"
        text = text.replace(old, new)
    return text


#: a network teacher, its coefficients and a CTM distillation, small enough for seconds
#: (DATA, ITERS, CKPT: filled by train_config)
TRAIN_CONFIG = """
[run]
out_dir = "out"
stages = ["teacher", "coefficients", "distill", "export", "sample", "evaluate"]
[data]
DATA
[network]
name = "mlp"
width = 32
depth = 2
emb_dim = 16
[teacher]
kind = "network"
[teacher_train]
iterations = 40
batch_size = 64
checkpoint_every = 10
[precond]
name = "analytic"
variant = "backward"
[coefficients]
n_timesteps = 8
n_samples = 64
batch = 64
[distill]
iterations = ITERS
batch_size = 16
ema = [0.9]
checkpoint_every = CKPT
eval_every = 1000
eval_num = 16
eval_steps = [1]
N = 6
max_ode_steps = 5
[sample]
num = 50
[evaluate]
steps = [1, 2]
num = 40
projections = 16
"""
GMM_DATA = ('gmm = { weights = [0.3, 0.7], means = [[-2.0, 0.0], [1.0, 1.0]], '
            'stds = [0.4, 0.3] }')


def train_config(iters: int = 12, ckpt: int = 3, data: str = GMM_DATA) -> str:
    return textwrap.dedent(TRAIN_CONFIG).replace("ITERS", str(iters)).replace(
        "CKPT", str(ckpt)).replace("DATA", data)
