"""The run lock `.itertrain.lock`: one live run per output dir.

fcntl.flock is released by the kernel when the holder dies, so a SIGKILLed run never blocks the
next launch. The file names the holder (pid, host, start time) for the error message. On release
the file is put back as it was, so a refused launch leaves the directory byte-for-byte unchanged.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path

from itertrain.errors import LockHeld
from itertrain.layout import LOCK_NAME


# A directory nobody can write into: no run can be writing there either, so a read-only look is safe.
READ_ONLY_ERRNOS = (errno.EROFS, errno.EACCES, errno.EPERM)


class RunLock:
    def __init__(self, output_dir: Path):
        self.path = Path(output_dir) / LOCK_NAME
        self._fd: int | None = None
        self._previous: bytes | None = None
        self._created: list[Path] = []  # directories this launch created for the lock, deepest last
        self.read_only: str | None = None  # why the directory cannot be written (then no lock is held)

    def acquire(self) -> None:
        """Take the lock or raise LockHeld naming the holder. In an existing directory that cannot be
        written (a read-only file system or permissions) nothing is taken: `read_only` then says why,
        and the launch may still read (a finished experiment is reported complete), never write."""
        try:
            self._acquire()
        except OSError as e:
            from itertrain.errors import ArtifactWriteError
            from itertrain.fsutil import describe_write_error

            why = describe_write_error(e, self.path) + "; nothing was changed"
            if e.errno in READ_ONLY_ERRNOS and self.path.parent.is_dir() and not self._created:
                self.read_only = why
                return
            raise ArtifactWriteError(why) from e

    def _acquire(self) -> None:
        if self.path.is_symlink():
            from itertrain.errors import UsageError

            raise UsageError(f"{self.path} is a symbolic link; itertrain never writes through one. Remove it "
                             "(it is recreated by the next run)")
        missing = [d for d in (self.path.parent, *self.path.parent.parents) if not d.exists()]
        if missing:
            self.path.parent.mkdir(parents=True)
            self._created = missing[::-1]  # e.g. ./experiments/ and ./experiments/new_experiment/
        while True:
            try:
                self._previous = self.path.read_bytes()
            except FileNotFoundError:
                self._previous = None
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
            try:
                _lock_exclusive(fd)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise LockHeld(
                    f"{self.path.parent} is in use by another itertrain run ({holder}). Wait for it to finish or "
                    "stop it; a run that died releases the lock by itself."
                ) from None
            # The file may have been unlinked and recreated between open and flock: lock the live one.
            try:
                if os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        self._fd = fd
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)

    def release(self, restore: bool = False) -> None:
        """Release; with `restore`, put the lock file (and a directory we created) back as they were."""
        if self._fd is None:
            return
        try:
            if restore:
                if self._previous is None:
                    os.unlink(self.path)
                    for d in reversed(self._created):  # a refused launch leaves no directory behind
                        try:
                            d.rmdir()
                        except OSError:
                            break
                else:
                    os.ftruncate(self._fd, 0)
                    os.pwrite(self._fd, self._previous, 0)
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def _lock_exclusive(fd: int, attempts: int = 20) -> None:
    """flock(LOCK_EX | LOCK_NB), retried for a moment: `itertrain status` holds a shared lock for
    microseconds to see whether a run is alive, and must not make a launch fail."""
    for i in range(attempts):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if i == attempts - 1:
                raise
            time.sleep(0.05)


def live_holder(output_dir: Path) -> dict | None:
    """The run holding `output_dir` now ({"pid", "host", "started"}), None when no run is alive.
    Reads only: the lock file is never created or changed."""
    path = Path(output_dir) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                info = json.loads(os.pread(fd, 4096, 0) or b"{}")
            except ValueError:
                info = {}
            return info if isinstance(info, dict) else {}
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def describe_holder(info: dict) -> str:
    return f"pid {info.get('pid')} on {info.get('host')}, started {info.get('started')}"


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"pid {info.get('pid')} on {info.get('host')}, started {info.get('started')}"
    except (OSError, ValueError):
        return "holder unknown"
