"""One run per out_dir: an advisory ``fcntl`` lock on ``out_dir/.lock``.

The kernel drops the lock when its process dies (kill -9 included), so a stale lock file of a
dead run is simply taken over; the file records the holder's PID for the error message.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from core.errors import UserError


class RunLock:
    def __init__(self, out_dir: Path):
        self.path = Path(out_dir) / ".lock"
        self.fd: int | None = None

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise UserError(f"{self.path.parent}: another ctmkit run (PID {holder}) is using "
                            f"this out_dir; wait for it or choose another out_dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None
