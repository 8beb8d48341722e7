"""Advisory locks (fcntl) on output folders and per-slide outputs, so two slidemil processes never
write into the same place at once.

The kernel releases a lock when its process dies (kill -9 included), so a lock left by a dead process
is simply taken over; the lock file names the owner (pid, host, start time) for the message a second
process prints.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import time
from pathlib import Path

from slidemil.errors import InputError

log = logging.getLogger(__name__)


class LockedError(InputError):
    """Another process holds the lock."""


class Lock:
    """`with Lock(path, what):` holds an exclusive lock on `path` (created if needed) or raises LockedError;
    `wait=True` waits for the lock instead (for short critical sections such as merging a table)."""

    def __init__(self, path: str | os.PathLike, what: str, wait: bool = False):
        self.path, self.what, self.wait, self._fd = Path(path), what, wait, None

    def acquire(self) -> Lock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if self.wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.read(fd, 512).decode(errors="replace").strip() or "unknown process"
            os.close(fd)
            raise LockedError(f"{self.what} is in use by another slidemil process ({owner}); wait for it to "
                              f"finish, or stop it (its lock is {self.path})") from None
        previous = os.read(fd, 512).decode(errors="replace").strip()
        if previous:
            log.info("%s: taking over the lock left by %s, which is no longer running", self.what, previous)
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)          # an empty lock file means: released cleanly
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> Lock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
