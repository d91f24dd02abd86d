# -*- test-case-name: tests.test_durability -*-
"""
Crash-safe replacement of small state files: write a sibling temp file,
fsync it, rename it over the target, fsync the directory.
"""

from __future__ import annotations

import os
import threading


def fsync_directory(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_all(fd: int, data: bytes) -> None:
    """Write all of C{data} to C{fd} (a short write is continued)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def write_and_fsync(fd: int, data: bytes) -> None:
    """Write all of C{data} to C{fd} and fsync it."""
    write_all(fd, data)
    os.fsync(fd)


def write_atomically(path: str, data: bytes, mode: int = 0o600) -> None:
    """
    Replace C{path} with C{data} so that a reader (or a crash) sees either
    the old content or the new one, never a mixture.
    """
    directory = os.path.dirname(os.path.abspath(path))
    temp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.{threading.get_ident()}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        write_and_fsync(fd, data)
    except BaseException:
        os.close(fd)
        os.unlink(temp)
        raise
    os.close(fd)
    os.replace(temp, path)
    fsync_directory(directory)
