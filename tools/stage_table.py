"""The README's stage table, generated from the stage declarations in `core.host.stage_table`.

    python tools/stage_table.py            # print it (markdown)
    python tools/stage_table.py --check    # exit 1 if a copy differs
    python tools/stage_table.py --write    # rewrite the copies

A copy is the markdown table that starts with the line ``| stage | reads | writes |`` in
README.md or a page under docs/ (each file that has one); tests/test_stage_table.py checks
every copy is current and that there is at least one.
"""

from __future__ import annotations

import argparse
import sys

import _common
from core.host.stage_table import table

HEADER = "| stage | reads | writes |"


def copies() -> list:
    """The files that hold a stage table."""
    files = [_common.ROOT / "README.md", *sorted((_common.ROOT / "docs").rglob("*.md"))]
    return [f for f in files if f.is_file() and HEADER in f.read_text(encoding="utf-8")]


def split(text: str) -> tuple[str, str, str]:
    """(before, the table, after) of a text holding one stage table."""
    head, rest = text.split(HEADER, 1)
    lines = (HEADER + rest).split("\n")
    n = next((i for i, ln in enumerate(lines) if not ln.startswith("|")), len(lines))
    return head, "\n".join(lines[:n]) + "\n", "\n".join(lines[n:])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--check", action="store_true", help="exit 1 if a copy differs")
    g.add_argument("--write", action="store_true", help="rewrite the copies")
    args = ap.parse_args(argv)
    ref = table()
    if not (args.check or args.write):
        sys.stdout.write(ref)
        return 0
    stale = []
    for f in copies():
        head, current, tail = split(f.read_text(encoding="utf-8"))
        if current != ref:
            stale.append(f)
            if args.write:
                f.write_text(head + ref + tail, encoding="utf-8")
    if args.check and stale:
        print(f"{stale[0]}: the stage table is out of date; run python tools/stage_table.py "
              f"--write", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
