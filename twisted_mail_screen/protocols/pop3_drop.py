# -*- test-case-name: tests.test_pop3 -*-
"""
A POP3 session's maildrop: the snapshot taken at login (L{open_drop}), the
blocking file reads behind it (run in the worker pool, never on the
reactor), and L{Retriever}, which answers RETR and TOP from a bounded
read-ahead or by streaming.
"""

from __future__ import annotations

import hashlib
import os
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from twisted_mail_screen.protocols.lineproto import OutputGate
from twisted_mail_screen.protocols.pop3_wire import WireStream, lf_to_wire, to_wire, top_of
from twisted_mail_screen.store.folderlock import try_lock, unlock
from twisted_mail_screen.store.maildir import Maildir, MessageFile
from twisted_mail_screen.store.maildir_names import unique_of


#: Messages up to this size (octets as sent) are read whole, a batch at a
#: time; larger ones are streamed in L{STREAM_CHUNK} pieces.
SMALL_MESSAGE = 64 * 1024
#: Read-ahead: at most this many messages and octets held per session.
READ_AHEAD_MESSAGES = 64
READ_AHEAD_BYTES = 512 * 1024
#: The first read-ahead batch of a session; each further batch doubles.
READ_AHEAD_START = 8
#: Bytes read from disk per pool call when streaming a large message.
STREAM_CHUNK = 256 * 1024


def read_files(maildir: Maildir, messages: list[MessageFile],
               sizes: list[int]) -> list[bytes | None]:
    """
    Read whole message files (blocking: a pool thread); C{None} for one
    that is gone. One call reads a read-ahead batch, so a session pays one
    thread hand-off per batch instead of one per RETR. C{sizes} (the CRLF
    sizes, never below the stored size) let one read take the whole file.
    """
    out: list[bytes | None] = []
    path = maildir.file_path
    for m, size in zip(messages, sizes):
        try:
            fd = os.open(path(m), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            out.append(None)
            continue
        try:
            data = os.read(fd, size + 1)
            if len(data) > size:  # larger than its name says: read on to the end
                parts = [data]
                while data:
                    data = os.read(fd, 65536)
                    parts.append(data)
                data = b"".join(parts)
        finally:
            os.close(fd)
        out.append(data)
    return out


def uidl_of(message: MessageFile) -> str:
    """
    A UIDL that never changes for this file: its Maildir unique name, or a
    hash of it where that would break RFC 1939's 70-character limit.
    """
    unique = unique_of(message.name)
    if len(unique) <= 70 and all(0x21 <= ord(c) <= 0x7E for c in unique):
        return unique
    return hashlib.sha256(unique.encode("utf-8", "surrogateescape")).hexdigest()[:40]


@dataclass
class Drop:
    """A locked mailbox as one POP3 session sees it."""

    address: str
    maildir: Maildir
    messages: list[MessageFile]
    sizes: list[int]
    deleted: set[int] = field(default_factory=set)
    #: the descriptor holding the mailbox's POP3 lock file (across processes)
    lock: int | None = None

    def release(self) -> None:
        if self.lock is not None:
            unlock(self.lock)
            self.lock = None


class MailboxInUse(Exception):
    """Another POP3 session (of this or another process sharing the Maildir) has the mailbox."""


def open_drop(address: str, maildir: Maildir) -> Drop:
    """Lock and scan a mailbox (blocking): names and sizes only."""
    if not maildir.exists():
        maildir.create()
    lock = try_lock(maildir.path)
    if lock is None:
        raise MailboxInUse(address)
    try:
        drop = _scan_drop(address, maildir)
    except BaseException:
        unlock(lock)
        raise
    drop.lock = lock
    return drop


def _scan_drop(address: str, maildir: Maildir) -> Drop:
    maildir.clean_tmp()
    messages = maildir.scan()
    sizes = []
    present = []
    for m in messages:
        try:
            sizes.append(maildir.size(m))
            present.append(m)
        except FileNotFoundError:
            continue  # removed by another client since the scan
    return Drop(address, maildir, present, sizes)


class ReadAhead:
    """Message contents read before their RETR, bounded by L{READ_AHEAD_BYTES}."""

    def __init__(self) -> None:
        self.data: dict[int, bytes | None] = {}
        self.bytes = 0
        self.pending: set[int] = set()  # being read in the pool
        self.waiters: list[tuple[int, int | None, Deferred]] = []  # (message, TOP lines, answer)
        self.window = READ_AHEAD_START

    def put(self, n: int, data: bytes | None) -> None:
        self.data[n] = data
        self.bytes += len(data) if data else 0

    def take(self, n: int) -> bytes | None:
        data = self.data.pop(n)
        self.bytes -= len(data) if data else 0
        return data

    def discard(self, n: int) -> None:
        if n in self.data:
            self.take(n)

    def clear(self) -> None:
        self.data.clear()
        self.bytes = 0


class Replies(Protocol):
    """What L{Retriever} needs of its session (a L{POP3Server})."""

    drop: Drop | None
    output: OutputGate

    @property
    def closing(self) -> bool: ...

    def send(self, data: bytes) -> None: ...

    def err(self, text: str) -> None: ...

    def corked(self) -> AbstractContextManager[None]: ...

    def keep_alive(self) -> None: ...


class Retriever:
    """
    RETR and TOP for one session.

    A small message (up to SMALL_MESSAGE octets) comes from the session's
    read-ahead: one pool call reads it and the next few live messages in
    one go, and the following RETRs are answered from memory without a
    thread hand-off; while a client keeps reading in order, the next batch
    is read in the background once half of the current one is used. The
    reactor itself never opens or reads a file, so a cold page cache or a
    slow disk stalls only this session, never the others. A large message
    is streamed: a chunk is read in the pool, sent, and the next one is
    read only once the client has taken the last (the output gate of
    lineproto), so memory per session stays bounded whatever the size.
    """

    def __init__(self, session: Replies, run: Callable[..., Deferred]) -> None:
        self._session = session
        self._run = run  # the worker pool's Blocking.run
        self._ahead = ReadAhead()

    def discard(self, n: int) -> None:
        """Message C{n} is deleted: drop what was read ahead of it."""
        self._ahead.discard(n)

    def clear(self) -> None:
        self._ahead.clear()

    def send_message(self, n: int, top: int | None) -> Deferred | None:
        drop = self._session.drop
        assert drop is not None
        if drop.sizes[n] > SMALL_MESSAGE:
            return self._stream(n, top)
        ahead = self._ahead
        if n in ahead.data:
            self._answer(ahead.take(n), top)
            self._read_ahead(n + 1, False)
            return None
        if n in ahead.pending:
            d: Deferred = Deferred()
            ahead.waiters.append((n, top, d))
            return d
        d = Deferred()
        ahead.waiters.append((n, top, d))
        self._read_ahead(n, True)
        return d

    def _answer(self, data: bytes | None, top: int | None) -> None:
        if data is None:
            self._session.err("Message was removed by another client")
            return
        wire = to_wire(data) if top is None else lf_to_wire(top_of(data, top))
        self._session.send(b"".join((b"+OK message follows\r\n", wire, b".\r\n")))

    def _read_ahead(self, n: int, needed: bool) -> None:
        """
        Read live message C{n} and the ones after it into the read-ahead, in
        one pool call. Unless C{needed} (a RETR waits for C{n}), only when
        less than half a batch is left and no read is in flight.
        """
        drop = self._session.drop
        ahead = self._ahead
        if drop is None or self._session.closing:
            return
        if not needed:
            if ahead.pending or len(ahead.data) * 2 > ahead.window:
                return
            n = max(ahead.data, default=n - 1) + 1
        picked: list[int] = []
        budget = READ_AHEAD_BYTES - ahead.bytes
        sizes, deleted, count = drop.sizes, drop.deleted, len(drop.messages)
        while n < count and len(picked) < ahead.window:
            if n not in deleted and n not in ahead.data and n not in ahead.pending:
                if sizes[n] > SMALL_MESSAGE or (picked and sizes[n] > budget):
                    break
                budget -= sizes[n]
                picked.append(n)
            n += 1
        if not picked:
            return
        ahead.window = min(READ_AHEAD_MESSAGES, ahead.window * 2)
        ahead.pending.update(picked)
        messages = drop.messages
        d = self._run(read_files, drop.maildir, [messages[i] for i in picked],
                                      [sizes[i] for i in picked])
        d.addCallbacks(self._read_done, self._read_failed, callbackArgs=(picked,),
                       errbackArgs=(picked,))

    def _read_done(self, contents: list[bytes | None], picked: list[int]) -> None:
        ahead = self._ahead
        ahead.pending.difference_update(picked)
        if self._session.drop is not None and not self._session.closing:
            deleted = self._session.drop.deleted
            for i, data in zip(picked, contents):
                if i not in deleted:
                    ahead.put(i, data)
        with self._session.corked():  # the waiting RETR and the pipelined ones after it: few sends
            self._wake_waiters(None)

    def _read_failed(self, reason: Failure, picked: list[int]) -> None:
        # A RETR waiting on this batch gets the error (and the session is
        # closed as for any failed command); with no waiter it is dropped, and
        # the RETR that later needs one of these messages reads it again.
        self._ahead.pending.difference_update(picked)
        self._wake_waiters(reason)

    def _wake_waiters(self, reason: Failure | None) -> None:
        ahead = self._ahead
        waiters, ahead.waiters = ahead.waiters, []
        for n, top, d in waiters:
            if n in ahead.pending:
                ahead.waiters.append((n, top, d))  # in a batch still being read
            elif reason is not None:
                d.errback(reason)
            elif n in ahead.data:
                self._answer(ahead.take(n), top)
                d.callback(None)
            else:  # not reachable while commands are answered one at a time
                self._session.err("No such message")
                d.callback(None)

    def _stream(self, n: int, top: int | None) -> Deferred:
        """Send a large message chunk by chunk, waiting for the client between chunks."""
        drop = self._session.drop
        assert drop is not None
        path = drop.maildir.file_path(drop.messages[n])
        run = self._run
        encoder = WireStream(top)
        done: Deferred = Deferred()
        handle: list[Any] = []

        def opened(f: Any) -> None:
            handle.append(f)
            self._session.send(b"+OK message follows\r\n")
            next_chunk()

        def not_opened(reason: Failure) -> None:
            if reason.check(FileNotFoundError):
                self._session.err("Message was removed by another client")
                done.callback(None)
            else:
                done.errback(reason)

        def next_chunk() -> None:
            if self._session.closing:
                finish(None)
            else:
                run(handle[0].read, STREAM_CHUNK).addCallbacks(got, finish)

        def got(chunk: bytes) -> None:
            if self._session.closing:
                return finish(None)
            self._session.keep_alive()  # a long download to a slow reader is not idleness
            if chunk:
                self._session.send(encoder.feed(chunk))
            if not chunk or encoder.done:
                self._session.send(encoder.end() + b".\r\n")
                return finish(None)
            if self._session.output.paused:
                self._session.output.waiter = next_chunk  # called once it drains or the peer goes
            else:
                next_chunk()

        def finish(result: Failure | None) -> None:
            if handle:
                handle.pop().close()
            if result is None:
                done.callback(None)
            else:
                done.errback(result)

        run(open, path, "rb", buffering=0).addCallbacks(opened, not_opened)
        return done
