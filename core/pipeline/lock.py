"""One run per out_dir: an advisory ``fcntl`` lock on the out_dir folder itself.

The lock is taken on the folder (and, for ctmkit versions that lock only that file, on
``out_dir/.lock``, which records the holder's PID for the error message). Deleting ``.lock``
mid-run therefore admits no second run: the folder stays locked. The kernel drops the locks
when their process dies (kill -9 included), so a stale lock file of a dead run is simply taken
over. A run into a folder *below* a locked out_dir (say a ``[run] preconds`` label's folder of
a running comparison) is refused as well; a comparison locks its label folders too, so a run
in one of them keeps the comparison out.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from core.base.errors import UserError

LOCK_FILE = ".lock"


def _holder(folder: Path) -> str:
    """The PID recorded in `folder`/.lock ("unknown" where it is gone or empty)."""
    try:
        return (folder / LOCK_FILE).read_text(errors="replace").strip()[:32] or "unknown"
    except OSError:
        return "unknown"


def _is_locked(path: Path, flags: int) -> bool:
    """Whether another open file (of any process, this one included) holds a lock on `path`."""
    try:
        fd = os.open(path, flags)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)            # closing drops the shared lock just taken
    return False


def locked_parent(folder: Path) -> Path | None:
    """The nearest folder above `folder` that a running ctmkit run holds as its out_dir."""
    from core.base.io import MARKER

    for parent in Path(os.path.realpath(folder)).parents:
        if not ((parent / LOCK_FILE).exists() or (parent / MARKER).exists()):
            continue
        if _is_locked(parent, os.O_RDONLY | os.O_DIRECTORY) or \
                _is_locked(parent / LOCK_FILE, os.O_RDONLY):
            return parent
    return None


class RunLock:
    def __init__(self, out_dir: Path):
        self.folder = Path(out_dir)
        self.path = self.folder / LOCK_FILE
        self.fds: list[int] = []

    @property
    def fd(self) -> int | None:
        return self.fds[-1] if self.fds else None

    def check(self, check_parents: bool = True) -> None:
        """Refuse (with the holder's PID) an out_dir another run holds, or one below an
        out_dir another run holds when `check_parents`; creates nothing. `acquire` checks
        again: this only lets a command refuse before it creates any of its folders."""
        if check_parents:
            parent = locked_parent(self.folder)
            if parent is not None:
                raise UserError(f"{self.folder}: lies inside {parent}, the out_dir of a running "
                                f"ctmkit run (PID {_holder(parent)}); wait for it or choose "
                                f"another out_dir")
        if _is_locked(self.folder, os.O_RDONLY | os.O_DIRECTORY) or \
                _is_locked(self.path, os.O_RDONLY):
            self._busy()

    def _busy(self):
        raise UserError(f"{self.folder}: another ctmkit run (PID {_holder(self.folder)}) "
                        f"is using this out_dir; wait for it or choose another out_dir")

    def acquire(self, check_parents: bool = True) -> "RunLock":
        """Lock the out_dir (refused as `check` says)."""
        self.check(check_parents)
        self.folder.mkdir(parents=True, exist_ok=True)
        try:
            self._lock(os.open(self.folder, os.O_RDONLY | os.O_DIRECTORY))
            self._lock(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644))
        except BlockingIOError:
            self.release()
            self._busy()
        except BaseException:
            self.release()
            raise
        os.ftruncate(self.fd, 0)
        os.write(self.fd, f"{os.getpid()}\n".encode())
        return self

    def _lock(self, fd: int) -> None:
        self.fds.append(fd)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)

    def release(self) -> None:
        while self.fds:
            fd = self.fds.pop()
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
