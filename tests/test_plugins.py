"""Third-party plugins: a separate distribution with a `ctmkit` entry point, installed with pip
into a folder of its own, is listed and usable by name; a name clash is a clear error."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import QUICK_CONFIG

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "plugins" / "powerlaw"


def _install(src: Path, target: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                        "--no-build-isolation", "--target", str(target), str(src)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def _run(args, site: Path, cwd: Path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), str(ROOT)]))
    return subprocess.run([sys.executable, "-m", "core.run", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    target = tmp_path_factory.mktemp("site")
    work = tmp_path_factory.mktemp("src") / "plugin"
    shutil.copytree(EXAMPLE, work)        # pip builds in place; keep the repo clean
    _install(work, target)
    return target


def test_installed_plugin_is_listed_and_usable_by_name(site, tmp_path):
    r = _run(["--list-plugins"], site, tmp_path)
    assert r.returncode == 0, r.stderr
    line = next(l for l in r.stdout.splitlines() if l.split()[:2] == ["precond", "powerlaw"])
    assert "ctmkit-powerlaw 0.1.0" in line and "ctmkit_powerlaw" in line
    cfg = QUICK_CONFIG.replace('name = "analytic"\nvariant = "forward"',
                               'name = "powerlaw"\npower = 1.5')
    (tmp_path / "c.toml").write_text(cfg)
    r = _run(["c.toml", "--stages", "export,sample", "--no-progress"], site, tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out" / "samples.npy").is_file()
    (tmp_path / "c.toml").write_text(cfg.replace("power = 1.5", "power = -1"))
    r = _run(["c.toml", "--stages", "export"], site, tmp_path)
    assert r.returncode == 2 and "[precond] power: must be > 0" in r.stderr


def test_name_clash_names_both_sources(tmp_path):
    src = tmp_path / "clash"
    (src / "ctmkit_clash").mkdir(parents=True)
    (src / "pyproject.toml").write_text(
        (EXAMPLE / "pyproject.toml").read_text().replace("ctmkit-powerlaw", "ctmkit-clash")
        .replace("powerlaw = \"ctmkit_powerlaw\"", "clash = \"ctmkit_clash\""))
    (src / "ctmkit_clash" / "__init__.py").write_text(
        "from core.host.hookspecs import hookimpl\n"
        "@hookimpl\ndef ctmkit_preconditionings():\n    return {'ctm': lambda o, c: None}\n")
    site = tmp_path / "site"
    _install(src, site)
    r = _run(["--list-plugins"], site, tmp_path)
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert "'ctm' is claimed twice" in r.stderr
    assert "builtin (plugins.preconditionings)" in r.stderr and "ctmkit-clash 0.1.0" in r.stderr


def _distribution(tmp_path: Path, name: str, module_text: str) -> Path:
    """A one-module distribution `name` with a `ctmkit` entry point, installed into a site."""
    src = tmp_path / f"src-{name}"
    pkg = name.replace("-", "_")
    (src / pkg).mkdir(parents=True)
    (src / "pyproject.toml").write_text(
        (EXAMPLE / "pyproject.toml").read_text().replace("ctmkit-powerlaw", name)
        .replace("powerlaw = \"ctmkit_powerlaw\"", f"{pkg} = \"{pkg}\""))
    (src / pkg / "__init__.py").write_text(module_text)
    site = tmp_path / f"site-{name}"
    _install(src, site)
    return site


@pytest.mark.parametrize("name, module_text, stages, msg", [
    ("ctmkit-typo", "from core.host.hookspecs import hookimpl\n@hookimpl\n"
     "def ctmkit_preconditioning():\n    return {}\n", None, "ctmkit_preconditioning"),
    ("ctmkit-broken", "import no_such_module_anywhere\n", None,
     "entry point 'ctmkit_broken' of ctmkit-broken 0.1.0 failed to import"),
    ("ctmkit-raises", "from core.host.hookspecs import hookimpl\n@hookimpl\n"
     "def ctmkit_solvers():\n    raise RuntimeError('boom')\n", None,
     "ctmkit_solvers() raised RuntimeError: boom"),
    ("ctmkit-factory", "from core.host.hookspecs import hookimpl\n@hookimpl\n"
     "def ctmkit_preconditionings():\n    def make(o, c):\n        raise KeyError('power')\n"
     "    return {'bad': make}\n", "export", "precond plugin 'bad' from ctmkit-factory 0.1.0"),
    ("ctmkit-noscript", "import torch\nfrom core.host.hookspecs import hookimpl\n"
     "class P(torch.nn.Module):\n    name, variant, jumps_denoiser = 'noscript', '', True\n"
     "    def forward(self, t, s):\n        return {1: t}.get(1, s) ** [1, 2], s\n"
     "@hookimpl\ndef ctmkit_preconditionings():\n    return {'noscript': lambda o, c: P()}\n",
     "export,sample", "not TorchScript-able"),
])
def test_plugin_errors_are_one_line_naming_the_plugin(name, module_text, stages, msg, tmp_path):
    site = _distribution(tmp_path, name, module_text)
    if stages is None:
        r = _run(["--list-plugins"], site, tmp_path)
    else:
        precond = "bad" if "factory" in name else "noscript"
        (tmp_path / "c.toml").write_text(QUICK_CONFIG.replace(
            'name = "analytic"\nvariant = "forward"', f'name = "{precond}"'))
        r = _run(["c.toml", "--stages", stages], site, tmp_path)
        assert not (tmp_path / "out").exists()          # refused before anything ran
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert msg in r.stderr and "Traceback" not in r.stderr, r.stderr
