"""The one exception type for bad user input.

Anything the user can fix (a config value, a missing or corrupt file, a bad flag) raises
`UserError`; `core.run` prints its message as a single line and exits with status 2.
Any other exception is a bug in ctmkit and keeps its traceback.
"""


class UserError(Exception):
    """Bad input: printed as one line, exit status 2."""
