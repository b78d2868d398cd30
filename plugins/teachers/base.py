"""The teacher contract lives in core.api; re-exported here for older imports."""

from core.api import Teacher  # noqa: F401
