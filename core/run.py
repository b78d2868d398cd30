"""``python -m core.run config.toml``: run the configured stages in order.

``python -m core.run --list-plugins`` prints one ``KIND NAME SOURCE`` line per plugin.
Bad input ends with one ``error:`` line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
import warnings

from core.errors import UserError


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse's default prints usage too)
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


#: stages that a comparison of several [run] preconds runs once, in the parent out_dir
SHARED_STAGES = ("teacher", "coefficients")


def _run_stage(run, name: str) -> None:
    from core import distributed as dist
    from core.stages import DISTRIBUTED_STAGES, STAGE_FUNCTIONS

    if name in DISTRIBUTED_STAGES or dist.world() == 1:
        STAGE_FUNCTIONS[name](run)
    else:                      # rank 0 works, the others wait; an error stops all
        err = None
        if dist.is_main():
            try:
                STAGE_FUNCTIONS[name](run)
            except UserError as e:
                err = str(e)
        dist.broadcast_error(err)
    dist.barrier()


def main(argv=None) -> int:
    p = _Parser(prog="python -m core.run", description="ctmkit: distill a diffusion teacher "
                "into a few-step consistency (trajectory) model.")
    p.add_argument("config", nargs="?", help="config.toml")
    p.add_argument("--stages", help="comma-separated stages overriding [run] stages")
    p.add_argument("--list-plugins", action="store_true", help="list registered plugins")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.jit")
    try:
        from core import plugins
        if args.list_plugins:
            for line in plugins.list_lines():
                print(line)
            return 0
        if not args.config:
            p.error("a config file is required (or --list-plugins)")
        from core.config import STAGES, load_config
        from core.stages import Run, log

        cfg = load_config(args.config)
        stages = cfg.run.stages
        if args.stages:
            stages = [s.strip() for s in args.stages.split(",") if s.strip()]
            bad = [s for s in stages if s not in STAGES]
            if bad:
                raise UserError(f"--stages: unknown stage {bad[0]!r} (known: {', '.join(STAGES)})")
        from core import distributed as dist

        runs = [(cfg, stages)]
        if cfg.run.preconds:          # shared stages once, the rest once per preconditioning
            from core.config import for_precond
            shared = [s for s in stages if s in SHARED_STAGES]
            runs = [(for_precond(cfg, e), [s for s in stages if s not in SHARED_STAGES])
                    for e in cfg.run.preconds]
            runs.insert(0, (for_precond(cfg, cfg.run.preconds[0], own_dir=False), shared))
        prepared = []
        for i, (c, st) in enumerate(runs):
            # for_precond keeps [data] as it is: the runs share one loaded dataset
            r = Run(c, progress=not args.no_progress,
                    data=prepared[0][0].data_source() if prepared else None)
            if i == 0:
                dist.init(r.device)
            r.validate(stages)
            prepared.append((r, st))
        for r, st in prepared:
            for name in st:
                if dist.is_main():
                    label = f" ({r.out_dir.name})" if cfg.run.preconds and name not in \
                        SHARED_STAGES else ""
                    log(f"stage {name}{label}")
                _run_stage(r, name)
        if cfg.run.preconds and dist.is_main():
            from core.compare import summarise
            summarise(cfg, [r for r, _ in prepared[1:]])
        dist.shutdown()
        return 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
