"""Atomic file writes: a crash leaves either the old file or the new one, never a torn one.

Files get the mode any other tool's would (0o666 less the umask), not ``mkstemp``'s private 0o600.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any

# Bits the kernel masks by the umask when a file is created, as for open(path, "w").
NEW_FILE_MODE = 0o666
_TEMP_ATTEMPTS = 100


def create_temp(path: Path) -> tuple[int, Path]:
    """A new, empty ``.NAME.<random>.tmp`` next to ``path``, opened for writing: ``(fd, temp path)``.

    Created with mode :data:`NEW_FILE_MODE`, so the kernel applies the umask (and any default ACL)
    exactly as for a plain ``open``; ``O_EXCL`` makes the name ours, as ``mkstemp`` does.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0)
    for _ in range(_TEMP_ATTEMPTS):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            return os.open(tmp, flags, NEW_FILE_MODE), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temp file name next to {path} after {_TEMP_ATTEMPTS} tries")


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` via a temp file in the same directory, fsync, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = create_temp(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")
