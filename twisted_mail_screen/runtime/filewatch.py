# -*- test-case-name: tests.test_cli -*-
"""
A small text file edited by hand and by the server while it runs (the
users, aliases, block list and whitelist files): which version of it was
last read or written, so a reader re-parses it only when it changed.

A version is the file's (inode, size, mtime): an atomic replacement gets a
new inode even within one mtime tick.
"""

from __future__ import annotations

import os

from twisted_mail_screen.runtime.atomic import write_atomically

Signature = tuple[int, int, int]


class FileWatch:
    """Remembers which version of a file was last read or written."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self._signature: Signature | None = None

    def current(self) -> Signature | None:
        if self.path is None:
            return None
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    @property
    def signature(self) -> Signature | None:
        """The version last read or written (C{None}: none yet, or no file)."""
        return self._signature

    def changed(self) -> bool:
        return self.current() != self._signature

    def remember(self) -> None:
        self._signature = self.current()

    def read(self) -> str:
        assert self.path is not None
        try:
            with open(self.path, encoding="utf-8", errors="replace") as f:
                text = f.read()
        except FileNotFoundError:
            text = ""
        self.remember()
        return text

    def write(self, text: str) -> Signature | None:
        """Replace the file with C{text}; the new version's signature. Thread-safe."""
        assert self.path is not None
        write_atomically(self.path, text.encode("utf-8"), 0o640)
        return self.current()

    def written(self, signature: Signature | None) -> None:
        """The file is now the version L{write} returned C{signature} for."""
        self._signature = signature
