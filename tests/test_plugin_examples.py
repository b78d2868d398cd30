"""The plugin guide works: every example distribution in examples/plugins/ (one per plugin kind,
written against core.api only) installs with pip, is listed with its distribution, runs end to
end selected by name, and turns a bad option into one ``error:`` line and exit status 2."""

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import QUICK_CONFIG

pytestmark = pytest.mark.slow          # 8 distributions, ~17 CLI runs

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "plugins"
#: distribution folder -> (kind printed by --list-plugins, plugin name, distribution)
DISTRIBUTIONS = {
    "powerlaw": ("precond", "powerlaw", "ctmkit-powerlaw"),
    "midpoint": ("solver", "midpoint", "ctmkit-midpoint"),
    "weightedcm": ("loss", "weighted_cm", "ctmkit-weightedcm"),
    "logcm": ("sampler", "logcm", "ctmkit-logcm"),
    "tinymlp": ("network", "tinymlp", "ctmkit-tinymlp"),
    "gaussian": ("teacher", "gaussian", "ctmkit-gaussian"),
    "spiral": ("dataset", "spiral", "ctmkit-spiral"),
    "checkers": ("dataset", "checkers", "ctmkit-checkers"),
    "swd": ("metric", "swd", "ctmkit-swd"),
    "summary": ("command", "summary", "ctmkit-summary"),
    "fourierdisc": ("discriminator", "fourier", "ctmkit-fourierdisc"),
}
#: what a plugin author may import from ctmkit (the guide's promise)
PUBLIC = {"core.api", "core.host.hookspecs", "core.base.errors"}

GMM = '[teacher]\nkind = "gmm"\nweights = [0.3, 0.7]\nmeans = [[-2.0, 0.0], [1.0, 1.0]]\nstds = [1.0, 0.5]\n'
DISTILL = """
[network]
name = "mlp"
width = 16
depth = 1
emb_dim = 8
[distill]
iterations = 3
batch_size = 16
N = 8
max_ode_steps = 2
checkpoint_every = 100
eval_every = 100
eval_num = 16
eval_steps = [1]
"""


def _config(precond='name = "ctm"', teacher=GMM, sampler='sampler = "ctm"', extra="") -> str:
    text = QUICK_CONFIG.replace('name = "analytic"\nvariant = "forward"', precond)
    text = text.replace(GMM, teacher).replace('sampler = "ctm"', sampler)
    assert precond in text and teacher in text and sampler in text
    return text + extra


def _run(args, site: Path, cwd: Path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), str(ROOT)]),
               OMP_NUM_THREADS="1")     # tiny tensors: threads only contend (6x faster)
    return subprocess.run([sys.executable, "-m", "core.run", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """Every example distribution, installed once into one folder as a user would."""
    target = tmp_path_factory.mktemp("site")
    src = tmp_path_factory.mktemp("src")
    copies = []
    for folder in DISTRIBUTIONS:
        shutil.copytree(EXAMPLES / folder, src / folder)    # pip builds in place
        copies.append(str(src / folder))
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                        "--no-build-isolation", "--target", str(target), *copies],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return target


def test_every_kind_has_an_example_using_only_the_public_api():
    assert sorted(p.name for p in EXAMPLES.iterdir() if p.is_dir()) == sorted(DISTRIBUTIONS)
    assert {k for k, _, _ in DISTRIBUTIONS.values()} == {
        "precond", "solver", "loss", "sampler", "network", "teacher", "dataset", "metric",
        "command",
        "discriminator"}
    for folder in DISTRIBUTIONS:
        for path in (EXAMPLES / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                         [node.module] if isinstance(node, ast.ImportFrom) else [])
                for name in names:
                    top = name.split(".")[0]
                    assert top not in ("core", "plugins") or name in PUBLIC, \
                        f"{path.relative_to(ROOT)} imports {name}"


def test_each_example_is_listed_with_its_distribution(site, tmp_path):
    r = _run(["--list-plugins"], site, tmp_path)
    assert r.returncode == 0, r.stderr
    rows = {tuple(line.split()[:2]): line for line in r.stdout.splitlines()}
    for folder, (kind, name, dist) in DISTRIBUTIONS.items():
        line = rows[(kind, name)]
        assert f"{dist} 0.1.0" in line and f"ctmkit_{folder}" in line, line


def _metrics(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


def _finite(tree) -> bool:
    if isinstance(tree, dict):
        return all(_finite(v) for v in tree.values())
    if isinstance(tree, list):
        return all(_finite(v) for v in tree)
    return not isinstance(tree, float) or np.isfinite(tree)


def _image_reference(tmp_path: Path) -> str:
    rng = np.random.default_rng(0)
    ref = np.clip(rng.normal(0.0, 0.4, size=(200, 1, 2, 2)), -1, 1).astype(np.float32)
    np.save(tmp_path / "ref.npy", ref)
    return "ref.npy"


# folder -> (config text, stages, files the stages write, (replace, by) for a bad option,
#            the error's text)
CASES = {
    "powerlaw": (lambda tmp: _config(precond='name = "powerlaw"\npower = 1.5'),
                 "export,sample,evaluate", ["jumper.pt", "samples.npy", "metrics.json"],
                 ("power = 1.5", "power = -1"), "[precond] power: must be > 0"),
    "midpoint": (lambda tmp: _config(extra=DISTILL.replace("[distill]",
                                                           '[distill]\nsolver = "midpoint"')),
                 "distill,export,sample", ["student.pt", "jumper.pt", "samples.npy"],
                 ('solver = "midpoint"', 'solver = "midpiont"'),
                 "unknown solver 'midpiont'"),
    "weightedcm": (lambda tmp: _config(extra=DISTILL.replace(
                       "[distill]", '[distill]\nloss = "weighted_cm"\nweighting = "inverse_gap"')),
                   "distill,export,sample", ["student.pt", "metrics.csv", "jumper.pt"],
                   ('weighting = "inverse_gap"', 'weighting = "gap"'), "[distill] weighting"),
    "logcm": (lambda tmp: _config(sampler='sampler = "logcm"\ns_noise = 0.8'),
              "export,sample,evaluate", ["jumper.pt", "samples.npy", "metrics.json"],
              ("s_noise = 0.8", "s_noise = 0"), "[sample] s_noise: must be > 0"),
    "tinymlp": (lambda tmp: _config(extra=DISTILL.replace(
                    'name = "mlp"\nwidth = 16\ndepth = 1\nemb_dim = 8',
                    'name = "tinymlp"\nwidth = 16\ndepth = 1')),
                "distill,export,sample", ["student.pt", "jumper.pt", "samples.npy"],
                ("width = 16", "width = 1"), "[network] width: must be >= 2"),
    "gaussian": (lambda tmp: _config(teacher='[teacher]\nkind = "gaussian"\nmean = [1.0, -1.0]\n'
                                             'std = 0.5\n'),
                 "export,sample,evaluate", ["jumper.pt", "samples.npy", "metrics.json"],
                 ("std = 0.5", "std = -0.5"), "[teacher] std: must be > 0"),
    "spiral": (lambda tmp: _config(extra='[data]\nformat = "spiral"\nn = 300\nnoise = 0.05\n'),
               "export,sample,evaluate", ["jumper.pt", "samples.npy", "metrics.json"],
               ("noise = 0.05", "noise = -1"), "[data] noise: must be >= 0"),
    "checkers": (lambda tmp: _config(
                     teacher='[teacher]\nkind = "gmm"\nweights = [1.0]\nmeans = [[0.0, 0.0, '
                             '0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]]\nstds = [0.5]\n'
                             'shape = [3, 2, 2]\n',
                     extra='[data]\nformat = "checkers"\nn = 200\nresolution = 2\n'
                           'squares = 2\n'),
                 "coefficients", ["coefficients.h5", "datastore"],
                 ("resolution = 2", "resolution = 1"), "[data] resolution: must be >= 2"),
    "swd": (lambda tmp: _config(
                teacher='[teacher]\nkind = "gmm"\nweights = [0.5, 0.5]\n'
                        'means = [[-0.5, 0.0, 0.0, 0.5], [0.5, 0.0, 0.0, -0.5]]\n'
                        'stds = [0.2, 0.2]\nshape = [1, 2, 2]\n',
                extra="").replace("[evaluate]\nsteps = [1, 2]\nnum = 200\n",
                                  f'[evaluate]\nsteps = [1]\nnum = 64\ntrajectory = false\n'
                                  f'data = "{_image_reference(tmp)}"\nmetrics = ["swd"]\n'
                                  f'sample_num = 64\nsample_batch = 64\n'
                                  f'[evaluate.metric]\nprojections = 16\n'),
            "export,sample,evaluate", ["jumper.pt", "samples.npy", "metrics.json"],
            ("projections = 16", "projections = 0"), "[evaluate.metric] projections: must be >= 1"),
    "fourierdisc": (lambda tmp: _config(extra=DISTILL.replace(
                        "[distill]", '[distill]\ngan_weight = 0.5\ngan_start = 1') +
                        '[discriminator]\nname = "fourier"\nfeatures = 32\n'),
                    "distill,export,sample", ["student.pt", "metrics.csv", "jumper.pt"],
                    ("features = 32", "features = 0"), "[discriminator] features: must be >= 1"),
}


@pytest.mark.parametrize("folder", list(CASES))
def test_each_example_runs_end_to_end_and_rejects_a_bad_option(folder, site, tmp_path):
    make, stages, outputs, (old, new), msg = CASES[folder]
    text = make(tmp_path)
    assert old in text
    (tmp_path / "c.toml").write_text(text)
    r = _run(["c.toml", "--stages", stages, "--no-progress"], site, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "out"
    for name in outputs:
        assert (out / name).exists(), name
    if folder == "checkers":             # its store was built once, in out_dir/datastore
        assert len(list((out / "datastore").glob("checkers-*/store.json"))) == 1
    else:
        assert np.all(np.isfinite(np.load(out / "samples.npy")))
    if "evaluate" in stages:
        m = _metrics(out)
        assert _finite(m), m
        if folder == "swd":
            assert m["quality"]["1"]["swd"] > 0 and m["samples"]["swd"] > 0
            assert m["quality"]["info"]["swd"]["features"]["name"].startswith("raw")
        if folder == "fourierdisc":     # the GAN term ran with the plugin's discriminator
            assert "d_loss" in (out / "metrics.csv").read_text().splitlines()[0]
        if folder == "gaussian":        # the teacher's exact reference_solve scored the jumper
            assert set(m["trajectory_error"]) == {"1", "2"}

    bad = tmp_path / "bad"
    bad.mkdir()
    for extra in tmp_path.glob("*.npy"):
        shutil.copy(extra, bad)
    (bad / "c.toml").write_text(text.replace(old, new))
    r = _run(["c.toml", "--stages", stages, "--no-progress"], site, bad)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr[-3000:]
    assert r.stderr.startswith("error:") and msg in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and not (bad / "out").exists()


def _ctmkit(args, site: Path, cwd: Path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), str(ROOT)]))
    return subprocess.run([sys.executable, "-m", "core.cli", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True)


def test_a_plugin_adds_a_subcommand(site, tmp_path):
    """examples/plugins/summary: ``ctmkit summary RUN_DIR`` through the ctmkit_commands hook,
    listed under ``ctmkit --help``; its bad input is one error line and exit status 2."""
    r = _ctmkit(["--help"], site, tmp_path)
    assert r.returncode == 0, r.stderr
    assert "commands added by plugins:" in r.stdout
    line = next(ln for ln in r.stdout.splitlines() if ln.split()[:1] == ["summary"])
    assert "metrics.json" in line and "ctmkit-summary 0.1.0" in line, line
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "metrics.json").write_text(json.dumps(
        {"samples": {"w1": 0.25}, "quality": {"2": {"final_rmse": 0.125}}, "note": "x"}))
    r = _ctmkit(["summary", "out"], site, tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["quality.2.final_rmse", "0.125", "samples.w1", "0.25"]
    for args, text in ((["summary", "missing"], "metrics.json: not found"),
                       (["summary"], "the following arguments are required"),
                       (["summary", "out", "--bogus"], "unrecognized arguments")):
        r = _ctmkit(args, site, tmp_path)
        assert r.returncode == 2 and r.stderr.count("\n") == 1, (args, r.stderr)
        assert r.stderr.startswith("error:") and text in r.stderr, (args, r.stderr)
