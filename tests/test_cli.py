"""``ctmkit``, one command (core/cli.py): the help lists every subcommand, each has --help,
bad input is one ``error:`` line and exit status 2, ``ctmkit config.toml`` is ``ctmkit run
config.toml``, and plugins add subcommands through the ``ctmkit_commands`` hook."""

import subprocess
import sys
import types
from pathlib import Path

import pytest

from core import cli
from core.host import plugins
from core.host.config import tomllib
from core.config_reference import render, toml_text

ROOT = Path(__file__).resolve().parents[1]


def ctmkit(capsys, *argv):
    """``ctmkit ARGV`` in-process: (exit status, stdout, stderr); argparse's exits included."""
    try:
        rc = cli.main([str(a) for a in argv])
    except SystemExit as e:
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def one_error_line(rc, err):
    assert rc == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_help_lists_every_subcommand(capsys):
    rc, out, err = ctmkit(capsys, "--help")
    assert rc == 0 and not err
    listed = {ln.split()[0] for ln in out.split("commands:", 1)[1].splitlines() if ln.strip()}
    assert set(cli.SUBCOMMANDS) <= listed
    assert {"run", "config", "plugins", "plot", "gap", "build-sampler", "feature-net"} <= listed


@pytest.mark.parametrize("name", list(cli.SUBCOMMANDS))
def test_each_subcommand_has_help(capsys, name):
    rc, out, err = ctmkit(capsys, name, "--help")
    assert rc == 0 and out.startswith("usage: ") and f"ctmkit {name}" in out.splitlines()[0], out


def test_the_installed_script_is_this_command():
    text = (ROOT / "pyproject.toml").read_text()
    assert tomllib.loads(text)["project"]["scripts"]["ctmkit"] == "core.cli:main"


@pytest.mark.parametrize("argv,text", [
    ([], "a command or a config file is required"),
    (["bogus"], "unknown command 'bogus'"),
    (["run"], "a config file is required"),
    (["run", "nope.toml"], "nope.toml"),
    (["nope.toml"], "nope.toml"),
    (["config", "--bogus"], "unrecognized arguments"),
    (["config", "check"], "the following arguments are required: config"),
    (["config", "check", "nope.toml"], "nope.toml"),
    (["plugins", "--kind", "nothing"], "invalid choice"),
    (["plot"], "name a figure"),
    (["plot", "bars"], "invalid choice"),
    (["plot", "coefficients"], "the following arguments are required"),
    (["plot", "coefficients", "missing.h5"], "missing.h5"),
    (["plot", "fid", "a", "b", "--labels", "x"], "--labels needs one label per run"),
    (["gap"], "config"),
    (["build-sampler", "--jobs", "0"], "--jobs must be >= 1"),
    (["feature-net", "--data", "x"], "--out"),
    (["feature-net", "--data", "missing.npz", "--out", "f.pt", "--epochs", "0"],
     "--epochs must be >= 1"),
])
def test_bad_input_is_one_line_and_exit_2(capsys, tmp_path, monkeypatch, argv, text):
    monkeypatch.chdir(tmp_path)
    err = one_error_line(*ctmkit(capsys, *argv)[::2])
    assert text in err, err
    assert list(tmp_path.iterdir()) == []                     # nothing written


def test_a_config_file_is_the_run_subcommand(capsys, write_config):
    cfg = write_config()
    a = ctmkit(capsys, cfg, "--dry-run", "--no-progress")
    b = ctmkit(capsys, "run", cfg, "--dry-run", "--no-progress")
    assert a[0] == b[0] == 0 and a[1] == b[1] and "plan:" in a[1]
    assert not (cfg.parent / "out").exists()


def test_python_m_core_run_keeps_working(write_config):
    cfg = write_config()
    r = subprocess.run([sys.executable, "-m", "core.run", str(cfg), "--dry-run"], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 0 and "plan:" in r.stdout, r.stderr
    r = subprocess.run([sys.executable, "-m", "core.run", "plugins", "--kind", "solver"],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.split()[:2] == ["solver", "euler"], r.stderr


def test_config_prints_the_reference_as_toml(capsys):
    rc, out, _ = ctmkit(capsys, "config")
    assert rc == 0 and out == toml_text() and tomllib.loads(out)["sample"]["num"] == 1000
    rc, out, _ = ctmkit(capsys, "config", "--markdown")
    assert rc == 0 and out == render()


def test_config_check_validates_without_writing(capsys, write_config):
    cfg = write_config()
    rc, out, err = ctmkit(capsys, "config", "check", cfg)
    assert rc == 0 and out.startswith(f"{cfg}: valid") and not err
    assert sorted(p.name for p in cfg.parent.iterdir()) == ["config.toml"]
    # a bad value, an unknown plugin, a bad override: what a run would refuse, one line each
    bad = write_config(cfg.read_text().replace("steps = 2\n", "steps = 0\n"), "bad.toml")
    assert "[sample] steps" in one_error_line(*ctmkit(capsys, "config", "check", bad)[::2])
    bad = write_config(cfg.read_text().replace('sampler = "ctm"', 'sampler = "nope"'), "b2.toml")
    assert "unknown sampler 'nope'" in one_error_line(*ctmkit(capsys, "config", "check",
                                                              bad)[::2])
    err = one_error_line(*ctmkit(capsys, "config", "check", cfg, "--stages", "nope")[::2])
    assert "--stages: unknown stage 'nope'" in err
    assert sorted(p.name for p in cfg.parent.iterdir()) == ["b2.toml", "bad.toml", "config.toml"]


def test_plugins_lists_by_kind(capsys):
    rc, out, _ = ctmkit(capsys, "plugins")
    assert rc == 0 and out.splitlines() == plugins.list_lines()
    rc, out, _ = ctmkit(capsys, "plugins", "--kind", "precond")
    assert rc == 0 and {ln.split()[1] for ln in out.splitlines()} >= {"cm", "ctm", "analytic"}
    assert {ln.split()[0] for ln in out.splitlines()} == {"precond"}


def test_plot_coefficients(capsys, tmp_path, gaussian_table):
    from core.diffusion.coefficients import store
    store.write(tmp_path / "c.h5", gaussian_table, grid="log", n_samples=4096,
                teacher_fingerprint="fp", settings={})
    rc, out, err = ctmkit(capsys, "plot", "coefficients", tmp_path / "c.h5", "--out",
                          tmp_path / "p.png")
    assert rc == 0, err
    assert (tmp_path / "p.png").stat().st_size > 10_000
    assert (tmp_path / "p_table.png").stat().st_size > 10_000


def test_build_sampler_says_what_it_needs_outside_a_checkout(capsys, monkeypatch, tmp_path):
    from core import build_sampler
    monkeypatch.setattr(build_sampler, "ROOT", tmp_path)
    err = one_error_line(*ctmkit(capsys, "build-sampler")[::2])
    assert "from a ctmkit checkout" in err and "CMakeLists.txt or cpp_runtime" in err
    monkeypatch.setattr(build_sampler, "ROOT", ROOT)
    monkeypatch.setenv("PATH", str(tmp_path))                 # no cmake here
    err = one_error_line(*ctmkit(capsys, "build-sampler")[::2])
    assert "cmake not found on PATH" in err


# --- subcommands from plugins (the ctmkit_commands hook) ----------------------------------

def _with_commands(monkeypatch, **commands):
    table = {name: plugins.Plugin("command", name, fn, "ctmkit-test 0.1 (test)")
             for name, fn in commands.items()}
    monkeypatch.setitem(plugins.registry(), "command", table)


def test_a_plugin_command_is_listed_and_runs(capsys, monkeypatch):
    seen = []

    def hello(argv):
        """Say hello to the arguments."""
        seen.append(argv)
        print("hello", *argv)

    _with_commands(monkeypatch, hello=hello)
    rc, out, _ = ctmkit(capsys, "--help")
    assert rc == 0 and "commands added by plugins:" in out
    assert any(ln.split()[:1] == ["hello"] and "Say hello to the arguments" in ln
               and "ctmkit-test" in ln for ln in out.splitlines()), out
    rc, out, _ = ctmkit(capsys, "hello", "a", "b")
    assert rc == 0 and out == "hello a b\n" and seen == [["a", "b"]]


def test_a_plugin_commands_errors_are_one_line(capsys, monkeypatch):
    from core.api import ArgumentParser, UserError

    def refuses(argv):
        """Refuse."""
        raise UserError("no, thanks")

    def crashes(argv):
        """Crash."""
        raise ZeroDivisionError("division by zero\nsecond line")

    def parses(argv):
        """Parse."""
        p = ArgumentParser(prog="ctmkit parses")
        p.add_argument("n", type=int)
        p.parse_args(argv)

    _with_commands(monkeypatch, refuses=refuses, crashes=crashes, parses=parses)
    assert one_error_line(*ctmkit(capsys, "refuses")[::2]) == "error: no, thanks\n"
    err = one_error_line(*ctmkit(capsys, "crashes")[::2])
    assert "'crashes' from ctmkit-test 0.1 (test) raised ZeroDivisionError" in err
    assert "invalid int value" in one_error_line(*ctmkit(capsys, "parses", "x")[::2])


def test_a_plugin_may_not_take_a_builtin_name(capsys, monkeypatch):
    _with_commands(monkeypatch, plot=lambda argv: 0)
    err = one_error_line(*ctmkit(capsys, "bogus")[::2])
    assert "command plugin 'plot'" in err and "built-in subcommand" in err
    rc, out, _ = ctmkit(capsys, "--help")                    # the help still shows
    assert rc == 0 and "plot" in out


def test_a_subcommand_is_one_line_of_the_table(capsys, monkeypatch):
    """What another subcommand needs: a module with ``main(argv)`` and one table entry."""
    mod = types.ModuleType("ctmkit_test_sub")
    mod.main = lambda argv: print("sub", *argv) or 0
    monkeypatch.setitem(sys.modules, "ctmkit_test_sub", mod)
    monkeypatch.setitem(cli.SUBCOMMANDS, "sub", ("ctmkit_test_sub:main", "a test subcommand"))
    assert ctmkit(capsys, "sub", "x")[:2] == (0, "sub x\n")
    assert "a test subcommand" in ctmkit(capsys, "--help")[1]
