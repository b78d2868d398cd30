"""Shared helpers for the tools/ scripts (not part of the installed package)."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def command_line() -> str:
    script = Path(sys.argv[0]).resolve()
    shown = script.relative_to(ROOT) if script.is_relative_to(ROOT) else script
    return " ".join(["python", str(shown)] + sys.argv[1:])


def builtin_preconds(table, sigma_data: float = 0.5) -> dict:
    """Every built-in preconditioning, the Analytic one in both variants, keyed by label."""
    from core.commands import builtin_preconds as made

    return made(table, sigma_data)
