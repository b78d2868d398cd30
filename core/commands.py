"""The small subcommands of ``ctmkit`` (the table: core/cli.py): ``plugins``, ``config``,
and ``plot`` (``feature-net`` is the metric plugin's: plugins/metrics/command.py). Each is ``main(argv) -> int``: 0, or 2 after one ``error:`` line.
"""

from __future__ import annotations

import sys
import time
import types
from pathlib import Path

from core.base.errors import UserError


def _fail(e: UserError) -> int:
    print(f"error: {e}", file=sys.stderr)
    return 2


# --- ctmkit plugins --------------------------------------------------------------------------

def plugins_main(argv: list[str]) -> int:
    """``ctmkit plugins [--kind KIND]``: one ``KIND NAME SOURCE`` line per installed plugin."""
    from core.host import hookspecs, plugins
    from core.cli import Parser

    kinds = list(hookspecs.KINDS.values())
    p = Parser(prog="ctmkit plugins", description="List the installed plugins by kind: one "
               "KIND NAME SOURCE line each (built-ins and entry-point distributions). The same "
               "as ctmkit run --list-plugins.")
    p.add_argument("--kind", choices=kinds, help="only this kind")
    args = p.parse_args(argv)
    try:
        lines = plugins.list_lines()
    except UserError as e:
        return _fail(e)
    for line in lines:
        if args.kind is None or line.split()[0] == args.kind:
            print(line)
    return 0


# --- ctmkit config ---------------------------------------------------------------------------

def config_main(argv: list[str]) -> int:
    """``ctmkit config``: print the reference; ``ctmkit config check file.toml``: validate."""
    from core.cli import Parser

    if argv[:1] == ["check"]:
        return config_check_main(argv[1:])
    p = Parser(prog="ctmkit config", description="Print the config reference: every section "
               "and key at its default, with its choices, help and bounds, as a TOML file "
               "(docs/configuration.md holds the same). 'ctmkit config check file.toml' "
               "validates a config without running it.")
    p.add_argument("--markdown", action="store_true", help="as the docs page's fenced block")
    args = p.parse_args(argv)
    from core.config_reference import render, toml_text

    sys.stdout.write(render() if args.markdown else toml_text())
    return 0


def config_check_main(argv: list[str]) -> int:
    """``ctmkit config check file.toml [--set ..] [--stages ..]``: the checks a run makes
    before its first stage (keys, types, bounds, plugins and their options, files it reads,
    what it would write), writing nothing."""
    from core.cli import Parser

    p = Parser(prog="ctmkit config check", description="Validate a config as a run would "
               "before its first stage -- keys, types and bounds, every selected plugin and its "
               "options, the files it reads, the outputs it would own -- and write nothing.")
    p.add_argument("config", help="config.toml")
    p.add_argument("--stages", help="comma-separated stages overriding [run] stages")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value, as ctmkit run does; repeatable")
    args = p.parse_args(argv)
    import contextlib
    import io

    from core.run import main as run_main

    argv_run = [args.config, "--dry-run", "--no-progress"] + \
        [f"--set={v}" for v in args.set] + ([f"--stages={args.stages}"] if args.stages else [])
    with contextlib.redirect_stdout(io.StringIO()) as plan:    # a dry run: it writes nothing
        rc = run_main(argv_run)                                # (an error: its one line)
    if rc == 0:
        stages = [ln.split()[0] for ln in plan.getvalue().split("\nplan:\n", 1)[1].splitlines()
                  if ln.strip()]
        print(f"{args.config}: valid (stages {', '.join(dict.fromkeys(stages)) or 'none'})")
    return rc


# --- ctmkit plot -----------------------------------------------------------------------------

def builtin_preconds(table, sigma_data: float = 0.5) -> dict:
    """Every built-in preconditioning, the Analytic one in both variants, keyed by label, made
    through the plugin registry as a run makes them."""
    from core.host import plugins
    from core.host.config import DiffusionCfg, Section

    ctx = plugins.Context(DiffusionCfg(sigma_data=sigma_data, t_min=table.t_min,
                                       t_max=table.t_max), coefficients_loader=lambda: table)
    out = {}
    for label, name, opts in (("cm", "cm", {}), ("ctm", "ctm", {}), ("bcm", "bcm", {}),
                              ("analytic-forward", "analytic", {"variant": "forward"}),
                              ("analytic-backward", "analytic", {"variant": "backward"})):
        out[label] = plugins.build("precond", name, Section("precond", opts, "<plot>", Path(".")),
                                   ctx, f"<plot>: {label}")
    return out


def plot_coefficients(path: str, out: str | None = None, sigma_data: float = 0.5
                      ) -> tuple[Path, Path]:
    """f(t, eps), g(t, eps) against log t for every built-in preconditioning (paper Fig. 2c)
    and g(t, s) heat maps (Fig. 4) from a coefficient store, and the store's own curves."""
    from core.diffusion.coefficients import store
    from core.evaluation.plots import plot_coefficient_table, plot_preconditionings

    table = store.load(path)
    out_path = Path(out) if out else Path(path).with_name(Path(path).stem +
                                                          "_preconditionings.png")
    plot_preconditionings(builtin_preconds(table, sigma_data), table.t_min, table.t_max,
                          out_path)
    table_png = out_path.with_name(out_path.stem + "_table.png")
    plot_coefficient_table(table, table_png)
    return out_path, table_png


def plot_main(argv: list[str], prog: str = "ctmkit plot") -> int:
    """``ctmkit plot coefficients STORE`` / ``ctmkit plot fid RUN [RUN ...]``."""
    from core.cli import Parser

    p = Parser(prog=prog, description="Figures from files a run wrote.")
    sub = p.add_subparsers(dest="what", metavar="{coefficients,fid}")
    c = sub.add_parser("coefficients", help="a coefficient store's preconditionings: f, g "
                       "against log t (paper Fig. 2c) and g(t, s) heat maps (Fig. 4)",
                       description="f(t, eps) and g(t, eps) against log t for every built-in "
                       "preconditioning (paper Fig. 2c) and g(t, s) heat maps (Fig. 4), as one "
                       "PNG, and the store's l, s, L, S, eta curves as a second.")
    c.add_argument("coefficients", help="an HDF5 coefficient store (stage 'coefficients')")
    c.add_argument("--out", help="PNG path (default: beside the store, *_preconditionings.png)")
    c.add_argument("--sigma-data", type=float, default=0.5)
    f = sub.add_parser("fid", help="a metric (FID by default) against distillation "
                       "iterations, one line per run (paper Fig. 3)",
                       description="The paper's Fig. 3: a sample metric (FID by default) against "
                       "distillation iterations, one line per run, one panel per number of "
                       "jumps, from each run's metrics.csv ([distill] eval = [\"fid\"]).")
    f.add_argument("runs", nargs="+", type=Path, help="run folders holding metrics.csv")
    f.add_argument("--out", type=Path, default=Path("fig3.png"))
    f.add_argument("--metric", help="column family, e.g. fid or fid_featnet-xxxx (default: "
                   "the first FID column)")
    f.add_argument("--labels", nargs="+", help="legend labels (default: folder names)")
    for q in (c, f):
        q.error = p.error                             # one line, exit 2, in every parser
    args = p.parse_args(argv)
    if args.what is None:
        p.error("name a figure: coefficients or fid (ctmkit plot --help)")
    try:
        if args.what == "coefficients":
            if not args.sigma_data > 0:
                raise UserError(f"--sigma-data must be > 0, got {args.sigma_data}")
            out, table_png = plot_coefficients(args.coefficients, args.out, args.sigma_data)
            print(f"wrote {out} and {table_png}")
            return 0
        from core.pipeline.compare import plot_metric_curves

        labels = args.labels or [r.name for r in args.runs]
        if len(labels) != len(args.runs):
            raise UserError("--labels needs one label per run")
        metric = plot_metric_curves(dict(zip(labels, args.runs)), args.out, args.metric)
        print(f"{metric} against iterations -> {args.out}")
        return 0
    except UserError as e:
        return _fail(e)
