"""``ctmkit run config.toml`` (= ``ctmkit config.toml``, ``python -m core.run config.toml``):
run the configured stages in order. The other subcommands: core/cli.py.

``python -m core.run --list-plugins`` prints one ``KIND NAME SOURCE`` line per plugin.
Bad input — a filesystem error included (out_dir not writable, disk full) — ends with one
``error:`` line on stderr and exit status 2.

A run holds ``out_dir/.lock`` (one run per out_dir), writes ``out_dir/run.json`` (what ran,
where, with what) and skips every stage that ``out_dir/stages.json`` says is up to date
(``--force`` runs them anyway); ``--dry-run`` prints the resolved config and that plan and
writes nothing; ``--set section.key=value`` overrides a config value (a TOML value; a bare
word is a string).
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import warnings

from core.base.errors import UserError, first_line, one_line
from core.host.stage_table import BY_NAME, NAMES, STAGES


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse's default prints usage too)
        print(f"error: {one_line(message)}", file=sys.stderr)
        sys.exit(2)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised wherever the run is: it unwinds like Ctrl-C (temporaries removed, the
    ctm_sample child killed, the lock released) and ends with one line and status 143."""


def _on_sigterm(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)      # one is enough; cleanup is under way
    raise Terminated()


#: stages that a comparison of several [run] preconds runs once, in the parent out_dir
SHARED_STAGES = tuple(s.name for s in STAGES if s.shared)


def _run_stage(run, name: str, force: bool, label: str = "") -> None:
    from core.base import distributed as dist
    from core.pipeline.ledger import Ledger, stage_key, watched_files
    from core.pipeline.stages import log

    ledger = key = before = None
    decision = None
    if dist.is_main():     # rank 0 decides; an error here must stop every rank, not hang them
        try:
            ledger, key = Ledger(run.out_dir), stage_key(run, name)
            decision = (not force and ledger.up_to_date(name, key), None)
        except UserError as e:
            decision = (False, str(e))
    skip, err = dist.broadcast_object(decision)
    if err:
        raise UserError(err)
    if skip:
        if dist.is_main():
            log(f"stage {name}{label}: up to date (same inputs and settings), skipped, "
                f"reusing its outputs")
        return
    if dist.is_main():
        log(f"stage {name}{label}")
        before = watched_files(run)
    _execute(run, name)
    if dist.is_main():
        ledger.record(run, name, key, before, watched_files(run))
    dist.barrier()


def _execute(run, name: str) -> None:
    from core.base import distributed as dist

    stage = BY_NAME[name]
    if stage.distributed or dist.world() == 1:
        stage.run(run)
    else:                      # rank 0 works, the others wait; an error stops all
        err = None
        if dist.is_main():
            try:
                stage.run(run)
            except UserError as e:
                err = str(e)
        dist.broadcast_error(err)
    dist.barrier()


def torch_jit_error() -> type:
    """The exception TorchScript raises when the code inside a scripted file fails."""
    import torch
    return torch.jit.Error


def main(argv=None) -> int:
    argv_list = sys.argv[1:] if argv is None else list(argv)
    from core.cli import SUBCOMMANDS
    if argv_list[:1] == ["run"]:          # ``ctmkit run config.toml``
        argv_list = argv_list[1:]
    elif argv_list[:1] and argv_list[0] in SUBCOMMANDS:   # ``python -m core.run gap ...``
        from core.cli import main as cli_main
        return cli_main(argv_list)
    p = _Parser(prog="ctmkit run", description="ctmkit: distill a diffusion teacher "
                "into a few-step consistency (trajectory) model. Also: ctmkit config.toml, "
                "python -m core.run config.toml.",
                epilog="other commands: ctmkit --help (ctmkit gap, plot, config, plugins, ...)")
    p.add_argument("config", nargs="?", help="config.toml")
    p.add_argument("--stages", help="comma-separated stages overriding [run] stages")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value (a TOML value, e.g. distill.lr=1e-4 or "
                        "run.out_dir=runs/x); repeatable")
    p.add_argument("--dry-run", action="store_true",
                   help="print the resolved config and the stage plan; run and write nothing")
    p.add_argument("--force", action="store_true",
                   help="run every stage, also those stages.json says are up to date")
    p.add_argument("--list-plugins", action="store_true", help="list registered plugins")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    args = p.parse_args(argv_list)
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.jit")
    locks = []
    old_sigterm = signal.signal(signal.SIGTERM, _on_sigterm) \
        if threading.current_thread() is threading.main_thread() else None
    try:
        from core.host import plugins
        if args.list_plugins:
            for line in plugins.list_lines():
                print(line)
            return 0
        if not args.config:
            p.error("a config file is required (or --list-plugins)")
        from core.host.config import load_config
        from core.pipeline.stages import Run

        cfg = load_config(args.config, overrides=args.set)
        stages = cfg.run.stages
        if args.stages:
            stages = [s.strip() for s in args.stages.split(",") if s.strip()]
            bad = [s for s in stages if s not in NAMES]
            if bad:
                raise UserError(f"--stages: unknown stage {bad[0]!r} (known: {', '.join(NAMES)})")
            if not stages:
                raise UserError(f"--stages: names no stage (known: {', '.join(NAMES)})")
        from core.base import distributed as dist

        runs = [(cfg, stages)]
        if cfg.run.preconds:          # shared stages once, the rest once per preconditioning
            from core.host.config import for_precond
            shared = [s for s in stages if s in SHARED_STAGES]
            runs = [(for_precond(cfg, e), [s for s in stages if s not in SHARED_STAGES])
                    for e in cfg.run.preconds]
            runs.insert(0, (for_precond(cfg, cfg.run.preconds[0], own_dir=False), shared))
        if args.dry_run:
            from core.pipeline.record import dry_run
            dry_run(cfg, runs, args.force, progress=not args.no_progress)
            return 0
        from core.pipeline.record import prepare_out_dirs, write_run_record
        prepared = []
        for i, (c, st) in enumerate(runs):
            # for_precond keeps [data] as it is: the runs share one loaded dataset
            r = Run(c, progress=not args.no_progress,
                    data=prepared[0][0].data_source() if prepared else None)
            if i == 0:
                # the data first: a store that must be decoded is built (one process per store,
                # under its file lock; the others wait) before the process group exists, so a
                # long decode never meets torch.distributed's timeout
                r.data_source()
                dist.init(r.device)
            r.validate(stages)
            prepared.append((r, st))
        if dist.is_main():   # once the config is valid, before anything is written
            from core.pipeline.ownership import check_ownership, written_folders
            check_ownership(prepared)
            locks = prepare_out_dirs(list(dict.fromkeys(r.out_dir for r, _ in prepared)),
                                     written_folders(prepared))
        record = lambda: write_run_record(cfg, prepared[0][0],       # noqa: E731
                                          argv if argv is not None else sys.argv[1:])
        if dist.is_main() and not (cfg.run.out_dir / "run.json").exists():
            record()            # a first record now; a failing rerun leaves the last one
        for r, st in prepared:
            for name in st:
                label = f" ({r.out_dir.name})" if cfg.run.preconds and name not in \
                    SHARED_STAGES else ""
                _run_stage(r, name, args.force, label)
        if cfg.run.preconds and dist.is_main():
            from core.pipeline.compare import summarise
            summarise(cfg, [r for r, _ in prepared[1:]])
        if dist.is_main():
            record()            # again: now with the SHA-256 of a teacher trained by this run
        dist.shutdown()
        return 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except torch_jit_error() as e:   # a user's TorchScript file (teacher) failed inside
        lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
        print(f"error: a TorchScript module failed: {(lines or ['(no message)'])[-1][:200]}",
              file=sys.stderr)
        return 2
    except OSError as e:          # out_dir unwritable, read-only filesystem, disk full, ...
        where = f"{e.filename}: " if e.filename else ""
        why = e.strerror or first_line(e, None)
        print(f"error: {one_line(f'{where}{why}')} (nothing was left half-written)",
              file=sys.stderr)
        return 2
    except Terminated:
        print("error: terminated (SIGTERM)", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    finally:
        for lock in reversed(locks):
            lock.release()
        if old_sigterm is not None:
            signal.signal(signal.SIGTERM, old_sigterm)


if __name__ == "__main__":
    sys.exit(main())
