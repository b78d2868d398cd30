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
        from core.stages import STAGE_FUNCTIONS, Run, log

        cfg = load_config(args.config)
        stages = cfg.run.stages
        if args.stages:
            stages = [s.strip() for s in args.stages.split(",") if s.strip()]
            bad = [s for s in stages if s not in STAGES]
            if bad:
                raise UserError(f"--stages: unknown stage {bad[0]!r} (known: {', '.join(STAGES)})")
        from core import distributed as dist
        from core.stages import DISTRIBUTED_STAGES

        run = Run(cfg, progress=not args.no_progress)
        dist.init(run.device)
        run.validate(stages)
        for name in stages:
            if dist.is_main():
                log(f"stage {name}")
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
