"""``ctmkit``: one command, with a subcommand for each thing users run.

    ctmkit run config.toml [--stages ..] [--set ..] [--dry-run] [--force]
    ctmkit config.toml ...                 # the same as ctmkit run (and python -m core.run)
    ctmkit plugins | config | plot | gap | search-schedule | build-sampler | feature-net ...   (ctmkit X --help)

:data:`SUBCOMMANDS` is the table: a subcommand is one line there, naming the function that
implements it (``main(argv) -> int``: 0, or 2 after one ``error:`` line). Installed plugins add
subcommands through the ``ctmkit_commands`` hook (:mod:`core.host.hookspecs`); they are listed
under ``ctmkit --help`` beside the built-in ones.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from core.base.errors import UserError, one_line

#: subcommand -> ("module:function", one line of help); the function is ``main(argv) -> int``
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "run": ("core.run:main", "run a config's stages (also: ctmkit config.toml, "
                             "python -m core.run config.toml)"),
    "config": ("core.commands:config_main", "print the config reference; 'config check "
                                            "file.toml' validates a file without running it"),
    "plugins": ("core.commands:plugins_main", "list the installed plugins by kind"),
    "gap": ("core.gap:main", "the consistency gap of each preconditioning for a teacher, "
                             "before training"),
    "search-schedule": ("core.search_schedule:main", "the best middle time(s) of K-step "
                                                     "schedules, by golden-section search"),
    "plot": ("core.commands:plot_main", "draw a coefficient store's preconditionings, or runs' "
                                        "FID-against-iterations curves"),
    "build-sampler": ("core.build_sampler:main", "build the C++ sampler ctm_sample (from a "
                                                 "checkout)"),
}


class Parser(argparse.ArgumentParser):
    """argparse with ctmkit's bad-input contract: one ``error:`` line, exit status 2."""

    def error(self, message):  # argparse's default prints the usage too
        print(f"error: {one_line(message)}", file=sys.stderr)
        sys.exit(2)


def exit_status(work, *args) -> int:
    """Run a command's `work(*args)` under ctmkit's bad-input contract: 0, or one ``error:``
    line on stderr and exit status 2 (130 when interrupted)."""
    try:
        work(*args)
        return 0
    except SystemExit as e:                 # a stage it ran failed (its line printed)
        return int(e.code or 2)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:                    # out_dir unwritable, disk full, ...
        where = f"{e.filename}: " if e.filename else ""
        print(f"error: {one_line(where + (e.strerror or e.__class__.__name__))} (nothing was "
              f"left half-written)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


def _function(target: str):
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


def plugin_commands() -> dict:
    """``{name: Plugin}`` of the subcommands installed plugins add (``ctmkit_commands``)."""
    from core.host import plugins

    table = plugins.registry().get("command", {})
    for name, plugin in table.items():
        if name in SUBCOMMANDS:
            raise UserError(f"command plugin {name!r} from {plugin.source}: {name!r} is a "
                            f"built-in subcommand")
        if not callable(plugin.factory):
            raise UserError(f"command plugin {name!r} from {plugin.source}: ctmkit_commands "
                            f"must map each name to a function main(argv) -> int")
    return table


def _summary(fn) -> str:
    doc = (getattr(fn, "__doc__", None) or "").strip()
    return doc.splitlines()[0].rstrip(".") if doc else ""


def help_text() -> str:
    rows = [(name, text) for name, (_, text) in SUBCOMMANDS.items()]
    try:
        added = plugin_commands()
        rows += [(name, _summary(p.factory)) for name, p in added.items()   # the built-ins'
                 if p.source.startswith("builtin")]
        extra = [(name, f"{_summary(p.factory)} [{p.source}]")
                 for name, p in added.items() if not p.source.startswith("builtin")]
    except UserError as e:                    # a broken plugin must not hide the help
        extra = [("(plugins)", f"error: {e}")]
    width = max(len(n) for n, _ in rows + extra)
    lines = ["usage: ctmkit <command> [options]   (ctmkit <command> --help)",
             "       ctmkit config.toml [options]   (= ctmkit run config.toml)", "",
             "ctmkit: distill a diffusion teacher into a few-step consistency (trajectory) "
             "model.", "", "commands:"]
    lines += [f"  {n:<{width}}  {t}" for n, t in rows]
    if extra:
        lines += ["", "commands added by plugins:"]
        lines += [f"  {n:<{width}}  {t}" for n, t in extra]
    return "\n".join(lines)


def _run_plugin_command(name: str, plugin, argv: list[str]) -> int:
    try:
        rc = plugin.factory(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:                   # argparse inside the plugin: it printed its line
        return e.code if isinstance(e.code, int) else 2
    except Exception as e:                    # a third-party bug: one line naming it
        print(f"error: command {name!r} from {plugin.source} raised {e.__class__.__name__}: "
              f"{one_line(str(e).strip().splitlines()[0] if str(e).strip() else '')}",
              file=sys.stderr)
        return 2
    return 0 if rc is None else int(rc)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        print("error: a command or a config file is required (ctmkit --help lists the "
              "commands)", file=sys.stderr)
        return 2
    first = args[0]
    if first in ("-h", "--help", "help"):
        print(help_text())
        return 0
    if first in SUBCOMMANDS:
        return _function(SUBCOMMANDS[first][0])(args[1:])
    if first.startswith("-") or first.endswith(".toml") or Path(first).is_file():
        return _function(SUBCOMMANDS["run"][0])(args)      # ctmkit config.toml, --list-plugins
    try:
        extra = plugin_commands()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if first in extra:
        return _run_plugin_command(first, extra[first], args[1:])
    known = ", ".join(list(SUBCOMMANDS) + list(extra))
    print(f"error: unknown command {one_line(first)!r} (commands: {known}; a config file "
          f"ends in .toml)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
