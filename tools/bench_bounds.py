"""How long ctmkit takes to refuse hostile inputs that used to hang or recurse (core/base/bounds.py).

Each input is built in memory (or a temporary folder) and handed to the reader a run uses; the
figure is the median wall time of --repeat refusals, in milliseconds, and the line it printed.

    python tools/bench_bounds.py [--repeat 5]

Inputs: a config with 10,000 nested arrays (tomllib: RecursionError before), one with a dotted
key of 100,000 parts (tomllib: quadratic, about 24 s for 20,000 parts), a 1 MB config of
brackets, a 200,000-deep JSON meta.json, an EDM snapshot whose init kwargs share one list
40 levels deep (2^40 lists when walked: it never finished before) and one whose sub-modules
form a 40-level DAG.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import _common  # noqa: F401  (puts the checkout on sys.path; tools/ is on it as the script's folder)


def _cases(tmp: Path) -> dict:
    from check_reliability import _edm_state, _module_dag, _shared_lists, edm_snapshot_bytes
    from core.base.bounds import load_json
    from core.host.config import load_config
    from plugins.edm.unpickle import load_edm_snapshot

    def config(name: str, text: str):
        p = tmp / name
        p.write_text(text)
        return lambda: load_config(p)

    def snapshot(name: str, state: dict):
        p = tmp / name
        p.write_bytes(edm_snapshot_bytes(state))
        return lambda: load_edm_snapshot(p)

    dag = _edm_state()
    dag["_modules"] = {"model": _module_dag()}
    return {
        "TOML, 10,000 nested arrays": config("a.toml", "x = " + "[" * 10_000 + "]" * 10_000),
        "TOML, dotted key of 100,000 parts": config("b.toml", "a." * 100_000 + "b = 1\n"),
        "TOML, 1 MB of brackets": config("c.toml", "x = " + "[" * 500_000 + "]" * 500_000),
        "JSON meta.json, 200,000 deep": lambda: load_json("[" * 200_000 + "]" * 200_000, "m",
                                                          "meta.json"),
        "EDM pickle, billion laughs (2^40)": snapshot("bomb.pkl",
                                                      _edm_state(augment_dim=_shared_lists())),
        "EDM pickle, sub-module DAG (2^40)": snapshot("dag.pkl", dag),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args(argv)
    from core.base.errors import UserError

    print(f"# {_common.command_line()}")
    with tempfile.TemporaryDirectory() as tmp:
        for name, refuse in _cases(Path(tmp)).items():
            times, line = [], ""
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                try:
                    refuse()
                    line = "ACCEPTED (a bound is missing)"
                except UserError as e:
                    line = str(e)
                times.append(time.perf_counter() - t0)
            print(f"{name:38s} {1000 * statistics.median(times):8.1f} ms   {line[-70:]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
