"""The config reference in docs/configuration.md, generated from the key declarations in
`core.host.config` (the renderer: core/config_reference.py; ``ctmkit config`` prints it too).

    python tools/config_reference.py            # print it (markdown)
    python tools/config_reference.py --check    # exit 1 if docs/configuration.md's copy differs
    python tools/config_reference.py --write    # rewrite docs/configuration.md's copy

docs/configuration.md holds the text between the lines `<!-- config-reference:begin -->` and
`<!-- config-reference:end -->`; tests/test_config_reference.py checks it is current.
"""

from __future__ import annotations

import argparse
import sys

import _common
from core.config_reference import page_copy, render, replace_copy

PAGE = _common.ROOT / "docs" / "configuration.md"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--check", action="store_true", help="exit 1 if the docs page's copy differs")
    g.add_argument("--write", action="store_true", help="rewrite the docs page's copy")
    args = ap.parse_args(argv)
    ref = render()
    if not (args.check or args.write):
        sys.stdout.write(ref)
        return 0
    text = PAGE.read_text(encoding="utf-8")
    current = page_copy(text, str(PAGE))
    if args.check:
        if current != ref:
            print(f"{PAGE}: the config reference is out of date; run "
                  f"python tools/config_reference.py --write", file=sys.stderr)
            return 1
        return 0
    if current != ref:
        PAGE.write_text(replace_copy(text, ref), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
