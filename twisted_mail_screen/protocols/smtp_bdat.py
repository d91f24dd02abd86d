# -*- test-case-name: tests.test_smtp_chunking -*-
"""
CHUNKING (RFC 3030): C{BDAT <size> [LAST]}, the message in chunks of
exactly C{size} octets, neither dot-stuffed nor ended by a dot line.

A chunk is always read to its last octet, whatever the answer to it
(no transaction, a message already over the size limit, an injected
fault): the octets of a refused chunk read as commands would let message
text drive the session. Only a size that cannot be read at all ends the
session, since nobody then knows where the chunk stops.

The chunks of one message are gathered in one buffer, bounded like
DATA's (over C{max_message_size} it is dropped and the rest of the
message is consumed and thrown away), and checked as they arrive for
over-long lines and bare CR or LF with the same C-level counts as DATA.
The finished message goes down DATA's path: the same fault seam at its
end, the same stored form made off the reactor when large, the same
submission checks, Received header and fsync'd delivery before the 250.

BINARYMIME is not offered: messages are stored with LF line endings and
relayed as CRLF lines (BDAT to a next hop offering CHUNKING, else DATA),
so binary content (a CR or LF that is not a line end) could neither be
kept nor sent on intact.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from twisted.internet.defer import Deferred

from twisted_mail_screen.faults.plan import END_OF_DATA
from twisted_mail_screen.faults.seam import guard, smtp_reply
from twisted_mail_screen.protocols.smtp_data import BARE, LINE, SIZE, bare_newline, longest_line

#: RFC 3030: bdat-cmd ::= "BDAT" SP chunk-size [ SP end-marker ] CR LF;
#: chunk-size ::= 1*DIGIT. More than 20 digits is no real size.
_BDAT = re.compile(r"([0-9]{1,20})(?: +(LAST))? *", re.IGNORECASE)

#: An answer decided before a chunk is read: (code, enhanced status, text).
Answer = tuple[int, str, str]


def parse_bdat(arg: str) -> tuple[int, bool]:
    """C{(size, last)} of a BDAT argument; C{ValueError} when malformed."""
    m = _BDAT.fullmatch(arg)
    if m is None:
        raise ValueError(arg)
    return int(m.group(1)), m.group(2) is not None


def chunked_stored_form(raw: bytes) -> bytes:
    """The octets of a chunked message as stored: LF line endings, ending in one."""
    body = raw.replace(b"\r\n", b"\n")
    return body if not body or body.endswith(b"\n") else body + b"\n"


@dataclass
class ChunkedMessage:
    """The chunks received so far of one message, and what is wrong with them."""

    max_line_length: int
    max_message_size: int
    buffer: bytearray = field(default_factory=bytearray)
    error: str | None = None
    size: int = 0  # octets received, including those thrown away
    checked: int = 0  # the buffer before this offset has no bare CR or LF

    def add(self, data: memoryview) -> None:
        self.size += len(data)
        if self.error is not None:
            return
        buf = self.buffer
        if self.size > self.max_message_size:
            self.error = SIZE
            buf.clear()
            return
        line_from = buf.rfind(b"\n") + 1
        buf += data
        if longest_line(buf, line_from, len(buf)) >= self.max_line_length:
            self.error = LINE
            buf.clear()
            return
        # A CR at the very end may be half of a CRLF split across chunks.
        self._check(len(buf) - 1 if buf.endswith(b"\r") else len(buf))

    def _check(self, until: int) -> None:
        if bare_newline(self.buffer, self.checked, until):
            self.error = BARE
            self.buffer.clear()
        self.checked = max(self.checked, until)

    def finish(self) -> bytes:
        """The whole message once the last chunk is in (a final lone CR is bare)."""
        if self.error is None:
            self._check(len(self.buffer))
        return bytes(self.buffer)


@dataclass
class Chunk:
    """The BDAT command being read."""

    arg: str
    remaining: int
    last: bool
    refusal: Answer | None


class _Session(Protocol):
    """What L{Chunking} uses of the SMTP session it is mixed into."""

    envelope: Any
    factory: Any
    clock: Any
    chunk_failure: Answer | None
    _chunk: Chunk | None

    @property
    def closing(self) -> bool: ...
    def send(self, data: bytes) -> None: ...
    def close(self) -> None: ...
    def reply(self, code: int, status: str, text: str) -> None: ...
    def set_raw_handler(self, handler: Callable[[bytearray], bool] | None) -> None: ...
    def wait_for(self, result: Deferred, what: bytes = b"") -> None: ...
    def end_of_message(self, env: Any, raw: bytes, error: str | None,
                       form: Callable[[bytes], bytes]) -> Deferred | None: ...
    def _chunk_received(self, buf: bytearray) -> bool: ...
    def _chunk_done(self, chunk: Chunk) -> Deferred | None: ...


class Chunking:
    """The BDAT command of L{SMTPServer} (a mixin: it shares the session's state)."""

    _chunk: Chunk | None = None
    #: The answer a failed chunked transaction gives to the chunks the
    #: client pipelined after the failure (RFC 3030 2: "accept and
    #: discard"), until its LAST chunk or another command.
    chunk_failure: Answer | None = None

    def do_BDAT(self: _Session, arg: str) -> None:
        try:
            size, last = parse_bdat(arg)
        except ValueError:
            self.reply(501, "5.5.4", "Syntax: BDAT chunk-size [LAST]; closing, "
                       "the chunk's end is unknown")
            self.close()
            return None
        env = self.envelope
        refusal: Answer | None = self.chunk_failure
        if refusal is None:
            if env is None:
                refusal = (503, "5.5.1", "Need MAIL command")
            elif not env.recipients:
                refusal = (554, "5.5.1", "No valid recipients")
            elif env.chunks is None:
                smtp = self.factory.config.smtp
                env.chunks = ChunkedMessage(smtp.max_line_length, smtp.max_message_size)
        self._chunk = Chunk(arg, size, last, refusal)
        self.set_raw_handler(self._chunk_received)
        return None

    def _chunk_received(self: _Session, buf: bytearray) -> bool:
        """Take the chunk's octets from C{buf}; C{False} once it is complete."""
        chunk = self._chunk
        assert chunk is not None
        take = min(chunk.remaining, len(buf))
        if take:
            env = self.envelope
            if chunk.refusal is None and env is not None and env.chunks is not None:
                with memoryview(buf) as view:
                    env.chunks.add(view[:take])
            del buf[:take]
            chunk.remaining -= take
        if chunk.remaining:
            return True
        self._chunk = None
        self.set_raw_handler(None)
        result = guard(self.factory.faults, self, "BDAT", chunk.arg,
                       lambda: self._chunk_done(chunk), smtp_reply)
        if result is not None:
            self.wait_for(result)  # later pipelined commands wait for this answer
        return False

    def _chunk_done(self: _Session, chunk: Chunk) -> Deferred | None:
        if chunk.refusal is not None:
            if chunk.last:
                self.chunk_failure = None
            return self.reply(*chunk.refusal)
        env = self.envelope
        assert env is not None and env.chunks is not None
        message = env.chunks
        if message.error == SIZE:
            self.envelope = None
            answer: Answer = (552, "5.3.4", "Message size exceeds fixed limit")
            if not chunk.last:
                self.chunk_failure = answer
            return self.reply(*answer)
        if not chunk.last:
            return self.reply(250, "2.0.0", f"{message.size} octets received")
        self.envelope = None
        raw = message.finish()
        end: Callable[[], Deferred | None] = lambda: self.end_of_message(
            env, raw, message.error, chunked_stored_form)
        return guard(self.factory.faults, self, END_OF_DATA,
                     [r.address for r in env.recipients], end, smtp_reply)
