"""The lock that keeps one vpipe process per output folder (a stage's, or a train run's)."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from pipeline.errors import UsageError

LOCK = ".vpipe.lock"


class FolderInUse(UsageError):
    """Another vpipe process is writing into this output folder."""


class FolderLock:
    """An exclusive ``flock`` on ``folder/.vpipe.lock``, holding the holder's pid.

    Two copies of a stage in one folder would delete each other's temp files and interleave
    records; the second copy is refused at once. The kernel drops the lock when its process
    dies, however it dies, so a killed run never blocks the next one.
    """

    def __init__(self, folder: Path) -> None:
        self.path = Path(folder) / LOCK
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 32).decode("ascii", "replace").strip()
                os.close(fd)
                who = f"pid {holder}" if holder.isdigit() else "another process"
                raise FolderInUse(
                    f"{folder}: another vpipe ({who}) is writing into this folder; wait for "
                    "it to end, or choose another --out"
                ) from None
            # The holder before us removes the file as it lets go: a lock on that removed
            # file would be no lock at all, so take the one now under the name.
            if _same_file(fd, self.path):
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd: int | None = fd

    def release(self) -> None:
        """Unlock and remove the file: a finished folder holds only its outputs and records."""
        if self._fd is not None:
            self.path.unlink(missing_ok=True)
            # Forgotten before it is closed: a second Ctrl-C between the two must not leave
            # __del__ to close the number again (by then perhaps another file's).
            fd, self._fd = self._fd, None
            os.close(fd)  # closing the only descriptor releases the flock

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    return (st.st_dev, st.st_ino) == (os.fstat(fd).st_dev, os.fstat(fd).st_ino)
