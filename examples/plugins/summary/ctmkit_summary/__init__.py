"""An example ``ctmkit`` subcommand from a third-party distribution: ``ctmkit summary
RUN_DIR`` prints the numbers of a run's ``metrics.json``, one ``key value`` line each (nested
tables as dotted keys), sorted by key.

A command is a function ``main(argv) -> int``; the first line of its docstring is its line in
``ctmkit --help``. Bad input is a ``UserError`` or a ``core.api.ArgumentParser`` error: one
``error:`` line, exit status 2.
"""

import json
from pathlib import Path

from core.api import ArgumentParser, UserError, hookimpl


def _numbers(value, prefix=""):
    if isinstance(value, dict):
        for key, v in value.items():
            yield from _numbers(v, f"{prefix}{key}.")
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield prefix[:-1], value


def summary_main(argv):
    """Print the numbers of a run's metrics.json, one key value line each."""
    p = ArgumentParser(prog="ctmkit summary", description="The numbers of RUN_DIR/metrics.json.")
    p.add_argument("run_dir", help="a run's out_dir (holding metrics.json)")
    p.add_argument("--grep", default="", help="only keys containing this text")
    args = p.parse_args(argv)
    path = Path(args.run_dir) / "metrics.json"
    if not path.is_file():
        raise UserError(f"{path}: not found (run the 'evaluate' stage first)")
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not a JSON file ({e.__class__.__name__})") from None
    rows = sorted((k, v) for k, v in _numbers(metrics) if args.grep in k)
    width = max((len(k) for k, _ in rows), default=0)
    for key, value in rows:
        print(f"{key:<{width}}  {value:.6g}")
    return 0


@hookimpl
def ctmkit_commands():
    return {"summary": summary_main}
