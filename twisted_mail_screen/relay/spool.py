# -*- test-case-name: tests.test_queue -*-
"""
The queue's files: the spool in C{<data_dir>/queue/} (docs/relay.md).

  - C{queue/msg/<id>}: the message as accepted (LF line endings, our
    Received header on top);
  - C{queue/env/<id>.json}: the envelope: sender, each recipient's state
    (pending, sent, failed, bounced) and last reply, arrival time, attempt
    count, next attempt, whether a delay warning went out; SMTPUTF8 and the
    DSN requests (RET, ENVID; each recipient's NOTIFY and ORCPT);
  - C{queue/hold/<id>}: present while the message is on hold;
  - C{queue/flush}: present when a flush has been asked for;
  - C{queue/claim/<id>}: locked (C{flock}) by the process sending the
    message, when several processes share the queue.

A message is committed when its envelope file exists: both files are
written to a temp file, fsync'd, renamed and the directory fsync'd, the
message first, before the SMTP client gets its 250. Envelopes are
rewritten the same way after every attempt. L{QueueDirectory} does all
file work (blocking: the server calls it in worker threads; the
C{mailscreen queue} command calls it directly, so holds, releases,
deletes and flushes work on a running server's queue through the files,
which the server re-reads every second of its clock).
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from twisted.logger import Logger

from twisted_mail_screen.runtime.atomic import fsync_directory, write_atomically

PENDING, SENT, FAILED, BOUNCED = "pending", "sent", "failed", "bounced"
ORPHAN_SECONDS = 3600

# the envelope

@dataclass
class Recipient:
    address: str
    state: str = PENDING
    reply: str = ""
    host: str = ""
    status: str = ""
    #: RFC 3461: the NOTIFY keywords (empty: none given) and the ORCPT
    #: ("type;address") of this recipient's RCPT.
    notify: list[str] = field(default_factory=list)
    orcpt: str = ""


@dataclass
class QueuedMessage:
    id: str
    sender: str
    created: float
    next_attempt: float
    size: int = 0
    attempts: int = 0
    warned: bool = False
    recipients: list[Recipient] = field(default_factory=list)
    #: MAIL's SMTPUTF8 (RFC 6531), RET and ENVID (RFC 3461). Envelopes
    #: written before these existed lack them and read as the defaults.
    smtputf8: bool = False
    ret: str = ""
    envid: str = ""

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=1, sort_keys=True).encode() + b"\n"

    @classmethod
    def from_json(cls, data: bytes) -> "QueuedMessage":
        raw = json.loads(data)
        raw["recipients"] = [Recipient(**r) for r in raw.get("recipients", [])]
        return cls(**raw)

    def pending(self) -> list[Recipient]:
        return [r for r in self.recipients if r.state == PENDING]

    def finished(self) -> bool:
        return all(r.state in (SENT, BOUNCED) for r in self.recipients)


def with_request(queued: QueuedMessage, request: Any) -> QueuedMessage:
    """C{queued} carrying an C{EnvelopeRequest}'s SMTPUTF8 and DSN parameters (C{None}: none)."""
    if request is not None:
        queued.smtputf8, queued.ret, queued.envid = request.smtputf8, request.ret, request.envid
        for r in queued.recipients:
            asked = request.of(r.address)
            r.notify, r.orcpt = list(asked.notify), asked.orcpt
    return queued


def adopt_if_tried(queued: QueuedMessage, on_disk: QueuedMessage, now: float) -> bool:
    """
    Take the envelope as on disk when another process tried the message
    since this one read it; C{True} when that leaves it not yet due.
    """
    if (on_disk.attempts, on_disk.pending()) == (queued.attempts, queued.pending()):
        return False
    vars(queued).update(vars(on_disk))
    return queued.next_attempt > now


def _valid_id(queue_id: str) -> bool:
    return bool(queue_id) and len(queue_id) <= 64 and all(c in "0123456789ABCDEF" for c in queue_id)


class QueueDirectory:
    """The queue's files; every method blocks (fsync)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.msg_dir = os.path.join(path, "msg")
        self.env_dir = os.path.join(path, "env")
        self.hold_dir = os.path.join(path, "hold")
        self.flush_path = os.path.join(path, "flush")
        # Envelopes found unreadable: the version (inode, size, mtime) logged.
        self._unreadable: dict[str, tuple[int, int, int]] = {}

    def create(self) -> None:
        for d in (self.msg_dir, self.env_dir, self.hold_dir):
            os.makedirs(d, mode=0o700, exist_ok=True)

    def _env(self, queue_id: str) -> str:
        return os.path.join(self.env_dir, queue_id + ".json")

    def _msg(self, queue_id: str) -> str:
        return os.path.join(self.msg_dir, queue_id)

    def store(self, message: QueuedMessage, data: bytes) -> None:
        """Commit a new message: message file first, then its envelope."""
        self.create()
        write_atomically(self._msg(message.id), data, 0o600)
        write_atomically(self._env(message.id), message.to_json(), 0o600)

    def update(self, message: QueuedMessage) -> bool:
        """Rewrite an envelope; C{False} if it was deleted meanwhile."""
        return self.write_envelope(message.id, message.to_json())

    def write_envelope(self, queue_id: str, data: bytes) -> bool:
        """Rewrite an envelope from its serialized form; C{False} if it was deleted."""
        if not os.path.exists(self._env(queue_id)):
            return False
        write_atomically(self._env(queue_id), data, 0o600)
        return True

    def remove(self, queue_id: str) -> bool:
        """Remove a message (envelope first, so it is never half there)."""
        try:
            os.unlink(self._env(queue_id))
        except FileNotFoundError:
            found = False
        else:
            found = True
        for path in (self._msg(queue_id), os.path.join(self.hold_dir, queue_id)):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        if found:
            fsync_directory(self.env_dir)
        return found

    def read_message(self, queue_id: str) -> bytes:
        with open(self._msg(queue_id), "rb") as f:
            return f.read()

    def read_envelope(self, queue_id: str) -> QueuedMessage:
        with open(self._env(queue_id), "rb") as f:
            return QueuedMessage.from_json(f.read())

    def ids(self) -> set[str]:
        try:
            names = os.listdir(self.env_dir)
        except FileNotFoundError:
            return set()
        found = {n[:-5] for n in names if n.endswith(".json") and not n.startswith(".")}
        for queue_id in set(self._unreadable) - found:
            del self._unreadable[queue_id]  # removed (or fixed and renamed in) since
        return found

    def load_all(self, log: Logger | None = None) -> list[QueuedMessage]:
        return self.read_envelopes(self.ids(), log)

    def read_envelopes(self, ids: set[str], log: Logger | None = None) -> list[QueuedMessage]:
        """
        The envelopes of C{ids} that are there and readable. An unreadable
        one (truncated, edited by hand) is logged once and left in place,
        and not read again until it changes (another inode, size or
        modification time): the poll asks every second for the envelopes
        it does not know.
        """
        out = []
        for queue_id in sorted(ids):
            try:
                with open(self._env(queue_id), "rb") as f:
                    st = os.fstat(f.fileno())
                    version = (st.st_ino, st.st_size, st.st_mtime_ns)
                    if self._unreadable.get(queue_id) == version:
                        continue  # told already
                    data = f.read()
            except FileNotFoundError:
                continue  # gone meanwhile
            try:
                out.append(QueuedMessage.from_json(data))
            except (ValueError, TypeError, KeyError, AttributeError) as e:
                self._unreadable[queue_id] = version
                if log is not None:
                    log.error("queue: envelope {id} unreadable, left in place and skipped until it "
                              "changes: {error}", id=queue_id, error=e)
                continue
            self._unreadable.pop(queue_id, None)
        return out

    def remove_orphans(self, now: float) -> list[str]:
        """Message files without an envelope (a crash before commit), once old."""
        removed = []
        try:
            names = os.listdir(self.msg_dir)
        except FileNotFoundError:
            return removed
        committed = self.ids()
        for name in names:
            if name.startswith(".") or name in committed:
                continue
            path = self._msg(name)
            try:
                if now - os.stat(path).st_mtime > ORPHAN_SECONDS:
                    os.unlink(path)
                    removed.append(name)
            except FileNotFoundError:
                pass
        return removed

    # holds and flushes: marker files, so another process can set them

    def held(self) -> set[str]:
        try:
            return {n for n in os.listdir(self.hold_dir) if not n.startswith(".")}
        except FileNotFoundError:
            return set()

    def exists(self, queue_id: str) -> bool:
        return _valid_id(queue_id) and os.path.exists(self._env(queue_id))

    def hold(self, queue_id: str) -> bool:
        if not self.exists(queue_id):
            return False
        os.makedirs(self.hold_dir, mode=0o700, exist_ok=True)
        write_atomically(os.path.join(self.hold_dir, queue_id), b"", 0o600)
        return True

    def release(self, queue_id: str) -> bool:
        if not _valid_id(queue_id):
            return False
        try:
            os.unlink(os.path.join(self.hold_dir, queue_id))
        except FileNotFoundError:
            return False
        fsync_directory(self.hold_dir)
        return True

    def delete(self, queue_id: str) -> bool:
        return _valid_id(queue_id) and self.remove(queue_id)

    def request_flush(self) -> None:
        self.create()
        write_atomically(self.flush_path, b"", 0o600)

    def take_flush(self) -> bool:
        try:
            os.unlink(self.flush_path)
        except FileNotFoundError:
            return False
        return True

    # claims: which process is sending a message (several may share the queue)

    def claim(self, queue_id: str) -> tuple[int, QueuedMessage] | None:
        """
        Claim a message for one delivery attempt, without waiting: an
        C{flock} on C{claim/<id>}, so one process at a time sends it and a
        crashed process's claim goes with it. Returns the descriptor to pass
        to L{unclaim} and the envelope as it is on disk now (another process
        may have tried the message since this one read it), or C{None} when
        another attempt has the claim or the message is gone.
        """
        claims = os.path.join(self.path, "claim")
        os.makedirs(claims, mode=0o700, exist_ok=True)
        fd = os.open(os.path.join(claims, queue_id), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            # Read after the claim: a process that sent it and removed it
            # did so before letting go.
            return fd, self.read_envelope(queue_id)
        except (BlockingIOError, FileNotFoundError):
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise

    def unclaim(self, queue_id: str, fd: int) -> None:
        """End an attempt's claim; a removed message's claim file goes too."""
        if not os.path.exists(self._env(queue_id)):
            try:
                # Safe while locked: a process that opens the old file finds no envelope.
                os.unlink(os.path.join(self.path, "claim", queue_id))
            except FileNotFoundError:
                pass
        os.close(fd)

    def scan(self) -> tuple[bool, set[str], set[str]]:
        """For the server's poll: (flush asked, held ids, committed ids)."""
        return self.take_flush(), self.held(), self.ids()


def iso(seconds: float) -> str:
    """A queue time as the listing and the log show it (UTC)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))
