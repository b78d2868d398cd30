"""The one exception type for bad user input.

Anything the user can fix (a config value, a missing or corrupt file, a bad flag) raises
`UserError`; `core.run` prints its message as a single line and exits with status 2.
Any other exception is a bug in ctmkit and keeps its traceback.
"""

import re

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def one_line(text: str) -> str:
    """`text` with every control character (a line break, a tab, an escape sequence) written
    as its escape, ``\\n``, ``\\t``, ``\\x1b``: a path or value that holds one cannot break the
    one-line error or write to the terminal."""
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1], text)


def first_line(e: BaseException, width: int | None = 120, default: str | None = None) -> str:
    """The first line of an exception's message (at most `width` characters; None: all of
    it), or `default` (its class name when None) when it has none: what a one-line error
    quotes of a library's failure."""
    text = str(e).strip()
    if not text:
        return default if default is not None else type(e).__name__
    return text.splitlines()[0][:width]


class UserError(Exception):
    """Bad input: printed as one line, exit status 2. The message is kept on one line: control
    characters in it (e.g. a newline in a path it names) are escaped (`one_line`)."""

    def __init__(self, message="", *args):
        super().__init__(one_line(str(message)), *args)
