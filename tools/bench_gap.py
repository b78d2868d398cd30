"""How long ``ctmkit gap`` takes on the quickstart (examples/quickstart.toml): once into an
empty folder (the coefficients stage runs first, as the quickstart's own run would) and once
more with that coefficient store in place (the gap alone: the teacher ODE from 1,000 noise
draws, [evaluate] steps 1, 2, 3, 5 and the 18-point training grid).

    python tools/bench_gap.py [--config examples/quickstart.toml]

Prints the wall time of each, in seconds, and the command it timed (a subprocess each, so the
figure includes Python's and torch's start-up).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

from _common import ROOT, command_line


def timed(cmd: list[str]) -> float:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"bench_gap: {' '.join(cmd)} failed: {r.stderr.strip()[-300:]}")
    return time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="examples/quickstart.toml")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "core.run", "gap", args.config, "--out", tmp,
               "--no-progress"]
        fresh, again = timed(cmd), timed(cmd)
    shown = f"ctmkit gap {args.config} --out DIR"
    print(f"{shown}: {fresh:.1f} s into an empty DIR (coefficients stage first), "
          f"{again:.1f} s with the coefficient store in place ({os.cpu_count()} CPUs)")
    print(f"command: {command_line()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
