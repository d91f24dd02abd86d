"""
imaplib with COMPRESS=DEFLATE (RFC 4978): after C{compress()}, what the
client sends is raw deflate with a sync flush per command, and what it reads
is inflated; plain, STARTTLS and implicit TLS alike (the layer sits on top
of whatever socket imaplib holds, as in Thunderbird).
"""

from __future__ import annotations

import imaplib
import zlib
from typing import Any

imaplib.Commands.setdefault("COMPRESS", ("AUTH", "SELECTED"))


class Deflating:
    """A mix-in for C{imaplib.IMAP4} and C{imaplib.IMAP4_SSL}."""

    _z_out: Any = None
    _z_in: Any = None
    _z_buf: bytearray
    #: Compressed octets read from the socket since compression started.
    wire_in = 0

    def compress(self) -> tuple[str, list]:
        typ, data = self._simple_command("COMPRESS", "DEFLATE")  # type: ignore[attr-defined]
        if typ == "OK":
            self._z_out = zlib.compressobj(6, zlib.DEFLATED, -15)
            self._z_in = zlib.decompressobj(-15)
            # A bytearray: appending to bytes would copy a 20 MB literal
            # quadratically, holding the GIL the in-process server needs.
            self._z_buf = bytearray()
        return typ, data

    def send(self, data: bytes) -> None:
        if self._z_out is not None:
            data = self._z_out.compress(data) + self._z_out.flush(zlib.Z_SYNC_FLUSH)
        super().send(data)  # type: ignore[misc]

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)  # type: ignore[attr-defined]
        if not chunk:
            raise imaplib.IMAP4.abort("socket error: EOF")
        self.wire_in += len(chunk)
        self._z_buf += self._z_in.decompress(chunk)

    def readline(self) -> bytes:
        if self._z_in is None:
            return super().readline()  # type: ignore[misc]
        while b"\n" not in self._z_buf:
            self._fill()
        end = self._z_buf.index(b"\n") + 1
        line = bytes(self._z_buf[:end])
        del self._z_buf[:end]
        return line

    def read(self, size: int) -> bytes:
        if self._z_in is None:
            return super().read(size)  # type: ignore[misc]
        while len(self._z_buf) < size:
            self._fill()
        data = bytes(self._z_buf[:size])
        del self._z_buf[:size]
        return data


class DeflateIMAP4(Deflating, imaplib.IMAP4):
    pass


class DeflateIMAP4_SSL(Deflating, imaplib.IMAP4_SSL):
    pass
