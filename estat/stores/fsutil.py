"""Crash-safe file primitives shared by the local store and the dead-letter
directory: a file is durable once `write_file` returns, and a path written
with `write_atomically` holds either nothing or all of its data, even after
a crash or power loss. Plain blocking functions, run on a thread pool."""

from __future__ import annotations

import os
import secrets


def fsync_directory(path: str) -> None:
    """Make the names in `path` (a rename, a new file) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file(path: str, data: bytes) -> None:
    """Create or truncate `path`, write `data` and fsync it (the directory
    entry is the caller's business: see `fsync_directory`)."""
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def write_atomically(path: str, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same directory
    and a rename, then fsync the directory. Creates missing directories."""
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    temporary = os.path.join(
        directory, f".{os.path.basename(path)}.{secrets.token_hex(4)}.tmp"
    )
    try:
        write_file(temporary, data)
        os.replace(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except OSError:
            pass
        raise
    fsync_directory(directory)
