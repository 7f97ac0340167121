"""An exclusive lock on an output directory, so two runs never write into the same one.

The lock is the file ``DIR/.learned_opt.lock`` (the owner's PID, host and start time, for the
message a second run gets) with an ``flock`` on it held for the run's life. The kernel drops an
``flock`` when its process dies, however it dies (SIGKILL included), so a lock file a dead process
left behind is stale: the next run takes it over. Where ``flock`` is unavailable (Windows, some
network file systems) the run goes ahead unlocked, with a warning.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

LOCK_NAME = ".learned_opt.lock"


class DirectoryLockError(ValueError):
    """The output directory is in use by another live run, or cannot be created."""


def _owner(fd: int) -> str:
    """The holder recorded in a lock file, as words (for messages)."""
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"PID {info['pid']} on {info['host']}, since {info['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "owner unknown"


def _open_locked(path: Path) -> int:
    """A descriptor of ``path`` holding its flock; DirectoryLockError naming the holder if another has it."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _owner(fd)
            os.close(fd)
            raise DirectoryLockError(f"{path.parent} is in use by another run ({holder}); wait for it to end, "
                                     "or use another output directory") from None
        except BaseException:
            os.close(fd)
            raise
        try:  # the previous holder unlinks the file on release: hold the lock of the file still there
            current, mine = os.stat(path), os.fstat(fd)
            if (current.st_dev, current.st_ino) == (mine.st_dev, mine.st_ino):
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


def _created_dirs(directory: Path) -> list[Path]:
    """Create ``directory`` (and missing parents); the ones created, deepest first."""
    if directory.exists() and not directory.is_dir():
        raise DirectoryLockError(f"output directory {directory} exists and is not a directory")
    missing = [p for p in (directory, *directory.parents) if not p.exists()]
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DirectoryLockError(f"cannot create output directory {directory}: {exc.strerror or exc}") from exc
    return missing


def _acquire(path: Path, directory: Path) -> int | None:
    """The locked descriptor of ``path`` with this process recorded in it; None where locking is unsupported."""
    if fcntl is None:
        log.warning("cannot lock %s on this platform: make sure no other run uses it", directory)
        return None
    try:
        fd = _open_locked(path)
    except OSError as exc:
        if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
            log.warning("cannot lock %s (%s): make sure no other run uses it", directory, exc.strerror)
            return None
        raise DirectoryLockError(f"cannot lock output directory {directory}: {exc.strerror or exc}") from exc
    if os.fstat(fd).st_size:
        log.info("%s: taking over a stale lock (%s, no longer running)", directory, _owner(fd))
    os.ftruncate(fd, 0)
    since = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": since}).encode(), 0)
    return fd


def _release(path: Path, fd: int | None) -> None:
    if fd is None:
        return
    try:
        path.unlink(missing_ok=True)  # while still holding the lock, so no one locks a file about to vanish
    finally:
        os.close(fd)


@contextmanager
def lock_directory(directory: str | os.PathLike[str]) -> Iterator[Path]:
    """Hold the exclusive lock on ``directory`` (created if missing) for the ``with`` block.

    Raises :class:`DirectoryLockError` naming the directory and the live holder if another process
    holds it. On exit the lock file is removed, and so are the directories this call created if the
    block left them empty (a run refused before writing anything leaves no trace).
    """
    directory = Path(directory)
    created = _created_dirs(directory)
    path, fd = directory / LOCK_NAME, None
    try:
        fd = _acquire(path, directory)
        yield path
    finally:
        _release(path, fd)
        for d in created:
            try:
                d.rmdir()
            except OSError:  # not empty: the run wrote something
                break
