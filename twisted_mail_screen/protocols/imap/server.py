# -*- test-case-name: tests.test_imap -*-
"""
The IMAP4rev1 server (RFC 3501) on the Maildirs SMTP writes and POP3
reads, with LITERAL+ (RFC 7888), SASL-IR (RFC 4959), IDLE (RFC 2177),
NAMESPACE (RFC 2342), UIDPLUS (RFC 4315), MOVE (RFC 6851), UNSELECT (RFC
3691), ID (RFC 2971), ENABLE (RFC 5161), SPECIAL-USE (RFC 6154) and
CHILDREN (RFC 3348).

The protocol is written on the project's L{CommandProtocol} rather than
on C{twisted.mail.imap4.IMAP4Server}: that class builds whole FETCH
responses in memory, schedules work on the global reactor, buffers
literals without limit and leaves the timing of EXPUNGE responses to the
mailbox; each of those is a requirement here. Its modified UTF-7 codec is
used.

A command is assembled from its lines and literals (each literal checked
against its limit before a byte of it is accepted), tokenized, and
answered strictly in order. Large responses are streamed in chunks with
the transport as a push producer's consumer, so a client that does not
read cannot make the server buffer more than a chunk.
"""

from __future__ import annotations

import bisect
import re
import weakref
from array import array
from typing import Any, Callable, Iterator

from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure

from twisted_mail_screen.protocols.imap import mailbox as mb
from twisted_mail_screen.store.auth import Authenticator, SASLError, decode_base64, parse_sasl_plain
from twisted_mail_screen.config.settings import Config
from twisted_mail_screen.protocols.imap.account import DELIMITER, AccountFolders, FolderError
from twisted_mail_screen.protocols.imap.fetch import (PIECE_BYTES, cached_rows, chunk_rows, distinct_atts,
                                            flags_item, item_groups, needs_disk, render_rows,
                                            row_cost)
from twisted_mail_screen.protocols.imap.listing import MAX_PATTERNS, ListPattern, list_lines
from twisted_mail_screen.protocols.imap.parse import (Atom, BadCommand, SeqSet, Section, Token, astring,
                                            encode_mailbox, format_set, mailbox_name, mailbox_text,
                                            parse_datetime, parse_fetch_atts, parse_seqset, tokenize)
from twisted_mail_screen.protocols.imap.registry import Registry
from twisted_mail_screen.protocols.imap.searchplan import Snapshot, search_command
from twisted_mail_screen.protocols.imap.store import LONG_SET, expunge_files, set_positions, store_files
from twisted_mail_screen.screening.interfaces import ClientScreen, Screening
from twisted_mail_screen.protocols.lineproto import CommandProtocol
from twisted_mail_screen.store.maildir import Maildir, MailStore
from twisted_mail_screen.runtime.workers import Blocking

LITERAL_RE = re.compile(rb"\{(\d+)(\+?)\}$")
HUGE_LITERAL = 10 ** 13  # stands for any size of more than 12 digits (all far over every limit)
TAG_RE = re.compile(rb"^[!#$&'+,\-./0-9:;<=>?@A-Z\[^_`a-z|}~]+$")
SMALL_LITERAL = 64 * 1024
MAX_COMMAND = 1024 * 1024
REACTOR_ROWS = 500  # FETCH rows of index-only items rendered without a thread hop

ANY_STATE = {"CAPABILITY", "NOOP", "LOGOUT", "ID"}
UNAUTH = {"STARTTLS", "AUTHENTICATE", "LOGIN"}
AUTH = {"SELECT", "EXAMINE", "CREATE", "DELETE", "RENAME", "SUBSCRIBE", "UNSUBSCRIBE", "LIST",
        "LSUB", "STATUS", "APPEND", "NAMESPACE", "ENABLE", "IDLE"}
SELECTED = {"CHECK", "CLOSE", "UNSELECT", "EXPUNGE", "SEARCH", "FETCH", "STORE", "COPY", "MOVE",
            "UID"}
NO_EXPUNGE = {"FETCH", "STORE", "SEARCH"}
BASE_CAPS = ["IMAP4rev1", "LITERAL+", "SASL-IR", "ID", "ENABLE", "IDLE", "NAMESPACE", "UNSELECT",
             "UIDPLUS", "MOVE", "SPECIAL-USE", "CHILDREN"]


class No(Exception):
    """A command that is answered NO, with an optional response code."""

    def __init__(self, text: str, code: str | None = None) -> None:
        super().__init__(text)
        self.code = code


def _pending(d: Deferred) -> Deferred | None:
    """C{d} if it has not fired all the way through yet (so input must wait), else C{None}."""
    done: list[bool] = []
    d.addBoth(lambda r: done.append(True) or r)
    return None if done else d


class IMAPServer(CommandProtocol):
    """One IMAP session."""

    log = Logger()
    factory: "IMAPFactory"
    max_line_length = 64 * 1024

    def __init__(self) -> None:
        super().__init__()
        self.peer_host = ""
        self.screen: ClientScreen | None = None
        self.state = "unauth"
        self.address: str | None = None
        self.folders: AccountFolders | None = None
        self.folder: mb.Folder | None = None
        self.folder_name = ""
        self.ended = False  # the connection is gone; commands still in the worker pool must not attach
        self.writable = False
        self.view: array[int] = array("L")
        self.recent: set[int] = set()
        self.doomed: set[int] = set()
        self.seen = 0
        self._idle_tag: bytes | None = None
        self._sasl: Callable[[bytes], Any] | None = None
        self._reset_command()

    # connection ------------------------------------------------------------------

    def connectionMade(self) -> None:
        f = self.factory
        self.clock = f.clock
        self.idle_timeout = f.config.imap.idle_timeout
        super().connectionMade()
        self.peer_host = getattr(self.transport.getPeer(), "host", "") or ""
        self.screen = f.screening.open(self.peer_host, "imap")
        if self.screen.refusal is not None:
            self.send(f"* BYE [UNAVAILABLE] {self.screen.refusal}\r\n".encode())
            self.close()
            return
        self.untagged(f"OK [CAPABILITY {' '.join(self.capabilities())}] "
                      f"{f.config.hostname} IMAP4rev1 ready")

    def session_ended(self) -> None:
        self.ended = True
        self._deselect()
        if self.screen is not None:
            self.screen.closed()
            self.screen = None

    def timed_out(self) -> None:
        self.untagged("BYE Autologout; idle for too long")
        self.close()

    def internal_error(self) -> None:
        self.untagged("BYE Internal error")
        self.close()

    def line_too_long(self) -> None:
        self._reset_command()
        self.untagged("BAD Command line too long")

    def untagged(self, text: str | bytes) -> None:
        data = text.encode("utf-8", "surrogateescape") if isinstance(text, str) else text
        self.send(b"* " + data + b"\r\n")

    def tagged(self, tag: bytes, text: str) -> None:
        self.send(tag + b" " + text.encode("utf-8", "surrogateescape") + b"\r\n")

    def capabilities(self) -> list[str]:
        caps = list(BASE_CAPS)
        if self.state == "unauth":
            if self.factory.tls is not None and not self.secure:
                caps.append("STARTTLS")
            if self._plaintext_ok():
                caps.append("AUTH=PLAIN")
            else:
                caps.append("LOGINDISABLED")
        return caps

    def _plaintext_ok(self) -> bool:
        return self.factory.authenticator.plaintext_allowed(self.peer_host, self.secure)

    # command assembly ---------------------------------------------------------------

    def _reset_command(self) -> None:
        self._text = bytearray()
        self._literals: list[bytes] = []
        self._lit_remaining = 0
        self._lit_buf: bytearray | None = None
        self._discard_rest = False

    def _first_words(self) -> tuple[bytes, str]:
        # The whole tag, however long (the line limit bounds it): a reply
        # must carry the tag the client sent, not its first 200 bytes.
        end = self._text.find(b" ")
        end = len(self._text) if end < 0 else end
        words = [bytes(self._text[:end])] + bytes(self._text[end + 1:end + 200]).split(b" ", 2)
        tag = words[0] if TAG_RE.match(words[0]) else b"*"
        name = words[1].upper().decode("ascii", "replace") if len(words) > 1 else ""
        if name == "UID" and len(words) > 2:
            name = words[2].upper().decode("ascii", "replace")
        return tag, name

    def line_received(self, line: bytes) -> Deferred | None:
        if self._idle_tag is not None:
            return self._idle_line(line)
        if self._sasl is not None:
            step, self._sasl = self._sasl, None
            return step(line)
        m = LITERAL_RE.search(line)
        size = 0 if m is None else int(m.group(1)) if len(m.group(1)) <= 12 else HUGE_LITERAL
        if self._discard_rest:
            if m and m.group(2) == b"+":
                self._start_literal(size, keep=False)
            else:
                self._reset_command()
            return None
        if m is None:
            self._text += line
            if b"\x00" in line:
                return self._refuse_nul(self._first_words()[0], None)
            text, literals = bytes(self._text), self._literals
            self._reset_command()
            if not text.strip() and not literals:
                return None
            return self._execute(text, literals)
        nonsync = m.group(2) == b"+"
        self._text += line[:m.start()]
        tag, name = self._first_words()
        if b"\x00" in line:
            return self._refuse_nul(tag, size if nonsync else None)
        limit = self.factory.config.imap.max_literal_size if name == "APPEND" else SMALL_LITERAL
        total = len(self._text) + sum(len(x) for x in self._literals) + size
        if size > limit or total > limit + MAX_COMMAND:
            self.tagged(tag, f"NO [TOOBIG] Literal of {size} octets is larger than the limit"
                        if name == "APPEND" else f"BAD Literal of {size} octets is too large here")
            self._reset_command()
            if nonsync:
                self._discard_rest = True
                self._start_literal(size, keep=False)
            return None
        self._text += b"\x00%d\x00" % len(self._literals)
        if not nonsync:
            self.send(b"+ Ready for literal data\r\n")
        self._start_literal(size, keep=True)
        return None

    def _refuse_nul(self, tag: bytes, nonsync_size: int | None) -> None:
        # NUL is not IMAP text (RFC 3501 CHAR8); inside the command it would
        # also pass for the parser's literal placeholders.
        self.tagged(tag, "BAD NUL character in command")
        self._reset_command()
        if nonsync_size is not None:  # the client sends its literal anyway: skip it and the rest
            self._discard_rest = True
            self._start_literal(nonsync_size, keep=False)
        return None

    def _start_literal(self, size: int, keep: bool) -> None:
        self._lit_remaining = size
        self._lit_buf = bytearray() if keep else None
        if size == 0:
            self._literal_done()
            return
        self.set_raw_handler(self._literal_data)

    def _literal_data(self, buf: bytearray) -> bool:
        take = min(self._lit_remaining, len(buf))
        if self._lit_buf is not None:
            self._lit_buf += buf[:take]
        del buf[:take]
        self._lit_remaining -= take
        if self._lit_remaining:
            return True
        self._literal_done()
        return False

    def _literal_done(self) -> None:
        if self._lit_buf is not None:
            self._literals.append(bytes(self._lit_buf))
        self._lit_buf = None

    # dispatch -------------------------------------------------------------------------

    def _execute(self, text: bytes, literals: list[bytes]) -> Deferred | None:
        tag, _, rest = text.partition(b" ")
        if not TAG_RE.match(tag) or tag == b"+":
            self.untagged("BAD Invalid tag")
            return None
        name_raw, _, args_text = rest.partition(b" ")
        name = name_raw.upper().decode("ascii", "replace")
        if not name:
            self.tagged(tag, "BAD Missing command")
            return None
        allowed = ANY_STATE | (UNAUTH if self.state == "unauth" else AUTH) | \
            (SELECTED if self.state == "selected" else set())
        if name not in allowed:
            known = name in ANY_STATE | UNAUTH | AUTH | SELECTED
            self.tagged(tag, f"BAD {name} not allowed now" if known else "BAD Unknown command")
            return None
        uid = False
        if name == "UID":
            sub, _, args_text = args_text.partition(b" ")
            name = sub.upper().decode("ascii", "replace")
            if name not in ("FETCH", "STORE", "SEARCH", "COPY", "MOVE", "EXPUNGE"):
                self.tagged(tag, "BAD Unknown UID command")
                return None
            uid = True
        handler = getattr(self, f"do_{name}")
        try:
            if name in ("AUTHENTICATE",):
                args: list[Token] = [Atom(a) for a in args_text.decode("ascii", "replace").split()]
            else:
                args = tokenize(args_text, literals)
        except BadCommand as e:
            self.tagged(tag, f"BAD {e}")
            return None
        expunge_ok = uid or name not in NO_EXPUNGE
        d = maybeDeferred(handler, tag, args, uid) if name in SELECTED - {"CHECK", "CLOSE", "UNSELECT"} \
            else maybeDeferred(handler, tag, args)
        d.addCallbacks(self._completed, self._failed, callbackArgs=(tag, expunge_ok),
                       errbackArgs=(tag, expunge_ok))
        return _pending(d)

    def _completed(self, text: str | None, tag: bytes, expunge_ok: bool) -> None:
        if text is None:
            return
        if self.folder is not None:
            self.flush_updates(expunge_ok)
        self.tagged(tag, text)

    def _failed(self, failure: Failure, tag: bytes, expunge_ok: bool = True) -> None:
        if failure.check(BadCommand):
            self.tagged(tag, f"BAD {failure.value}")
        elif failure.check(No, FolderError):
            code = failure.value.code  # type: ignore[union-attr]
            if self.folder is not None:
                self.flush_updates(expunge_ok)
            self.tagged(tag, f"NO {'[' + code + '] ' if code else ''}{failure.value}")
        else:
            self.log.failure("imap: error in command", failure)
            self.tagged(tag, "NO [SERVERBUG] Internal error")

    # updates to the selected folder -------------------------------------------------------

    def folder_changed(self) -> None:
        if self._idle_tag is not None and self.folder is not None:
            self.flush_updates(True)

    def flush_updates(self, expunge_ok: bool) -> None:
        f = self.folder
        assert f is not None
        entries = f.entries_since(self.seen)
        self.seen = f.modseq
        new: list[int] = []
        new_set: set[int] = set()
        changed: dict[int, None] = {}
        view = self.view
        for kind, uid, origin in entries:
            if kind == mb.NEW:
                new.append(uid)
                new_set.add(uid)
                if origin is self or (not self.writable and (f.name(uid) or "").startswith("new/")):
                    self.recent.add(uid)
            elif kind == mb.EXPUNGE:
                if uid in new_set:
                    new_set.discard(uid)
                    new.remove(uid)
                    self.recent.discard(uid)
                else:
                    self.doomed.add(uid)
            elif kind == mb.FLAGS and origin is not self:
                changed[uid] = None
        out: list[bytes] = []
        if expunge_ok and self.doomed:
            positions = []
            for uid in self.doomed:
                i = bisect.bisect_left(view, uid)
                if i < len(view) and view[i] == uid:
                    positions.append(i)
            positions.sort(reverse=True)
            out += [b"* %d EXPUNGE\r\n" % (i + 1) for i in positions]
            gone = self.doomed
            self.view = view = array("L", (u for u in view if u not in gone))
            self.recent -= gone
            self.doomed = set()
        if new:
            view.extend(new)
            out.append(b"* %d EXISTS\r\n" % len(view))
            out.append(b"* %d RECENT\r\n" % len(self.recent))
        for uid in changed:
            if uid in self.doomed:
                continue
            i = bisect.bisect_left(view, uid)
            rel = f.name(uid)
            if i < len(view) and view[i] == uid and rel is not None:
                out.append(b"* %d FETCH (UID %d %s)\r\n" % (
                    i + 1, uid, flags_item(rel, f.keywords, uid in self.recent)))
        f.trim()
        if out:
            self.send(b"".join(out))

    def _deselect(self) -> None:
        if self.folder is not None:
            self.folder.detach(self)
        self.folder = None
        self.view = array("L")
        self.recent = set()
        self.doomed = set()
        if self.state == "selected":
            self.state = "auth"

    # any state -------------------------------------------------------------------------------

    def do_CAPABILITY(self, tag: bytes, args: list) -> str:
        self._no_args(args)
        self.untagged("CAPABILITY " + " ".join(self.capabilities()))
        return "OK CAPABILITY completed"

    def do_NOOP(self, tag: bytes, args: list) -> Any:
        self._no_args(args)
        if self.folder is not None:
            return self.factory.registry.sync(self.folder).addCallback(lambda _: "OK NOOP completed")
        return "OK NOOP completed"

    def do_CHECK(self, tag: bytes, args: list) -> Any:
        return self.do_NOOP(tag, args).addCallback(lambda _: "OK CHECK completed") \
            if self.folder is not None else "OK CHECK completed"

    def do_LOGOUT(self, tag: bytes, args: list) -> None:
        self.untagged("BYE Logging out")
        self.tagged(tag, "OK LOGOUT completed")
        self.close()

    def do_ID(self, tag: bytes, args: list) -> str:
        self.untagged('ID ("name" "twisted-mail-screen" "vendor" "twisted-mail-screen")')
        return "OK ID completed"

    @staticmethod
    def _no_args(args: list) -> None:
        if args:
            raise BadCommand("unexpected arguments")

    # not authenticated ---------------------------------------------------------------------------

    def do_STARTTLS(self, tag: bytes, args: list) -> None:
        self._no_args(args)
        if self.factory.tls is None or self.secure:
            self.tagged(tag, "NO STARTTLS not available")
            return
        self.tagged(tag, "OK Begin TLS negotiation now")
        self._reset_command()
        self.start_tls(self.factory.tls)

    def do_LOGIN(self, tag: bytes, args: list) -> Any:
        if len(args) != 2:
            raise BadCommand("LOGIN needs a user name and a password")
        user, password = astring(args[0]), astring(args[1])
        if not self._plaintext_ok():
            raise No("Plaintext authentication disallowed on non-secure connections",
                     "PRIVACYREQUIRED")
        return self._login(tag, user.decode("utf-8", "replace"), password.decode("utf-8", "replace"))

    def do_AUTHENTICATE(self, tag: bytes, args: list) -> Any:
        if not args:
            raise BadCommand("mechanism expected")
        if args[0].upper() != "PLAIN":
            raise No("Unsupported authentication mechanism", "CANNOT")
        if not self._plaintext_ok():
            raise No("Plaintext authentication disallowed on non-secure connections",
                     "PRIVACYREQUIRED")
        if len(args) > 1:
            return self._auth_plain(tag, b"" if args[1] == "=" else args[1].encode())

        def response(line: bytes) -> Deferred | None:
            if line.strip() == b"*":
                self.tagged(tag, "BAD Authentication cancelled")
                return None
            d = maybeDeferred(self._auth_plain, tag, line.strip())
            d.addCallbacks(self._completed, self._failed, callbackArgs=(tag, True),
                           errbackArgs=(tag,))
            return _pending(d)

        self._sasl = response
        self.send(b"+ \r\n")
        return None

    def _auth_plain(self, tag: bytes, encoded: bytes) -> Any:
        try:
            username, password = parse_sasl_plain(decode_base64(encoded))
        except SASLError as e:
            raise BadCommand(f"Cannot decode response: {e}") from None
        return self._login(tag, username, password)

    def _login(self, tag: bytes, username: str, password: str) -> Deferred:
        f = self.factory
        d = f.authenticator.authenticate(username, password)

        def checked(address: str | None) -> Any:
            if address is None:
                if self.screen is not None and self.screen.auth_failed(username, password.encode()):
                    self.tagged(tag, "NO [AUTHENTICATIONFAILED] Authentication failed")
                    self.untagged("BYE Too many failures")
                    self.close()
                    return None
                raise No("Authentication failed", "AUTHENTICATIONFAILED")
            if self.screen is not None:
                self.screen.auth_succeeded(address)
            folders = AccountFolders(f.store.maildir(address).path, f.config.imap.max_folders)
            lock = f.registry.lock(folders.inbox)
            return lock.run(f.blocking.run, folders.setup).addCallback(self._logged_in, address, folders)

        return d.addCallback(checked)

    def _logged_in(self, _: object, address: str, folders: AccountFolders) -> str:
        self.address = address
        self.folders = folders
        self.state = "auth"
        return f"OK [CAPABILITY {' '.join(self.capabilities())}] Logged in"

    # authenticated -----------------------------------------------------------------------------------

    def _account_call(self, f: Callable[..., Any], *args: Any) -> Deferred:
        """Run a blocking L{AccountFolders} call in the pool, under the account lock."""
        assert self.folders is not None
        return self.factory.registry.lock(self.folders.inbox).run(self.factory.blocking.run, f, *args)

    def _mailbox_arg(self, args: list, count: int = 1) -> str:
        if len(args) < count:
            raise BadCommand("mailbox name expected")
        return mailbox_name(args[0])

    def do_NAMESPACE(self, tag: bytes, args: list) -> str:
        self.untagged(f'NAMESPACE (("" "{DELIMITER}")) NIL NIL')
        return "OK NAMESPACE completed"

    def do_ENABLE(self, tag: bytes, args: list) -> str:
        if not args:
            raise BadCommand("ENABLE needs capability names")
        self.untagged("ENABLED")
        return "OK ENABLE completed"

    def do_SELECT(self, tag: bytes, args: list, readonly: bool = False) -> Deferred:
        if len(args) != 1:
            raise BadCommand("SELECT needs one mailbox name" if len(args) < 2 else
                             "SELECT parameters are not supported")
        name = mailbox_name(args[0])
        assert self.folders is not None
        self._deselect()
        try:
            path = self.folders.path(name)
        except FolderError as e:
            raise No(str(e), "NONEXISTENT") from None
        registry = self.factory.registry
        self.writable = not readonly
        self.recent = set()
        d = registry.open(self.folders.inbox, path, claim_for=self if self.writable else None)

        def selected(folder: mb.Folder) -> str | None:
            if self.ended:  # the client left while the folder was scanned: never attach a gone session
                if not folder.sessions:
                    registry.idle(folder)
                return None
            if not folder.loaded or not Maildir(path).exists():
                registry.idle(folder)
                raise No("No such mailbox", "NONEXISTENT")
            self.folder = folder
            self.folder_name = name
            self.state = "selected"
            self.seen = folder.attach(self)
            self.view = array("L", folder.uids)
            if not self.writable:
                self.recent = {u for u, n in zip(folder.uids, folder.names) if n.startswith("new/")}
            self.recent |= folder.claim(self)
            unseen = next((i + 1 for i, n in enumerate(folder.names) if "S" not in mb.info_of(n)), None)
            flags = " ".join(mb.SYSTEM_FLAGS + tuple(folder.keywords))
            perm = flags + (" \\*" if len(folder.keywords) < mb.MAX_KEYWORDS else "")
            self.untagged(f"FLAGS ({flags})")
            self.untagged(f"{len(self.view)} EXISTS")
            self.untagged(f"{len(self.recent)} RECENT")
            if unseen is not None:
                self.untagged(f"OK [UNSEEN {unseen}] First unseen")
            self.untagged(f"OK [UIDVALIDITY {folder.uidvalidity}] UIDs valid")
            self.untagged(f"OK [UIDNEXT {folder.next_uid}] Predicted next UID")
            self.untagged(f"OK [PERMANENTFLAGS ({perm if self.writable else ''})] Flags permitted")
            return ("OK [READ-WRITE] SELECT completed" if self.writable
                    else "OK [READ-ONLY] EXAMINE completed")

        return d.addCallback(selected)

    def do_EXAMINE(self, tag: bytes, args: list) -> Deferred:
        return self.do_SELECT(tag, args, readonly=True)

    def do_CREATE(self, tag: bytes, args: list) -> Deferred:
        name = self._mailbox_arg(args)
        if name.endswith(DELIMITER):
            name = name.rstrip(DELIMITER)
        assert self.folders is not None
        return self._account_call(self.folders.create, name).addCallback(
            lambda _: "OK CREATE completed")

    def do_DELETE(self, tag: bytes, args: list) -> Deferred:
        name = self._mailbox_arg(args)
        assert self.folders is not None
        if self.folder is not None and name == self.folder_name:
            self._deselect()
        path = self.folders.path(name)

        def done(_: object) -> str:
            self.factory.registry.forget(path)
            return "OK DELETE completed"

        return self._account_call(self.folders.delete, name).addCallback(done)

    def do_RENAME(self, tag: bytes, args: list) -> Deferred:
        if len(args) != 2:
            raise BadCommand("RENAME needs two mailbox names")
        old, new = mailbox_name(args[0]), mailbox_name(args[1]).rstrip(DELIMITER)
        assert self.folders is not None
        registry = self.factory.registry

        def done(moves: list[tuple[str, str]]) -> Any:
            for src, dst in moves:
                registry.move(src, dst)
            inbox = registry.folders.get(self.folders.inbox)  # type: ignore[union-attr]
            if old == "INBOX" and inbox is not None and inbox.loaded:
                return registry.sync(inbox).addCallback(lambda _: "OK RENAME completed")
            return "OK RENAME completed"

        return self._account_call(self.folders.rename, old, new).addCallback(done)

    def do_SUBSCRIBE(self, tag: bytes, args: list, on: bool = True) -> Deferred:
        name = self._mailbox_arg(args)
        assert self.folders is not None
        word = "SUBSCRIBE" if on else "UNSUBSCRIBE"
        return self._account_call(self.folders.subscribe, name, on).addCallback(
            lambda _: f"OK {word} completed")

    def do_UNSUBSCRIBE(self, tag: bytes, args: list) -> Deferred:
        return self.do_SUBSCRIBE(tag, args, on=False)

    def do_LIST(self, tag: bytes, args: list, lsub: bool = False) -> Any:
        args = list(args)
        select_opts: set[str] = set()
        return_opts: set[str] = set()
        if args and isinstance(args[0], list) and not lsub:
            select_opts = {str(a).upper() for a in args.pop(0)}
        if len(args) >= 4 and isinstance(args[2], Atom) and args[2].upper() == "RETURN":
            return_opts = {str(a).upper() for a in args[3]} if isinstance(args[3], list) else set()
            args = args[:2]
        if len(args) != 2:
            raise BadCommand("LIST needs a reference and a mailbox pattern")
        reference = mailbox_text(args[0])
        patterns = args[1] if isinstance(args[1], list) else [args[1]]
        pats = [mailbox_text(p) for p in patterns]
        word = "LSUB" if lsub else "LIST"
        if pats == [""] and not lsub:
            self.untagged(f'LIST (\\Noselect) "{DELIMITER}" ""')
            return "OK LIST completed"
        assert self.folders is not None
        folders = self.folders
        if len(pats) > MAX_PATTERNS:
            raise BadCommand("too many mailbox patterns")
        matchers = [ListPattern(reference, p) for p in pats]

        def gather() -> list[bytes]:
            # Scan and match in the worker: a thousand folders and a long
            # pattern cost the reactor only the writing of the lines.
            return list_lines(folders.names(), folders.subscriptions(), matchers, lsub,
                              select_opts, return_opts)

        def answer(lines: list[bytes]) -> str:
            for line in lines:
                self.untagged(line)
            return f"OK {word} completed"

        return self.factory.blocking.run(gather).addCallback(answer)

    def do_LSUB(self, tag: bytes, args: list) -> Any:
        return self.do_LIST(tag, args, lsub=True)

    def do_STATUS(self, tag: bytes, args: list) -> Deferred:
        if len(args) != 2 or not isinstance(args[1], list):
            raise BadCommand("STATUS needs a mailbox and a list of items")
        name = mailbox_name(args[0])
        items = [str(a).upper() for a in args[1]]
        for item in items:
            if item not in ("MESSAGES", "RECENT", "UIDNEXT", "UIDVALIDITY", "UNSEEN"):
                raise BadCommand(f"unknown status item {item[:20]}")
        assert self.folders is not None
        try:
            path = self.folders.path(name)
        except FolderError as e:
            raise No(str(e), "NONEXISTENT") from None
        registry = self.factory.registry

        def answer(folder: mb.Folder) -> str:
            if not folder.sessions:
                registry.idle(folder)
            if not folder.loaded or not Maildir(path).exists():
                raise No("No such mailbox", "NONEXISTENT")
            values = {"MESSAGES": len(folder.uids), "UIDNEXT": folder.next_uid,
                      "UIDVALIDITY": folder.uidvalidity,
                      "RECENT": folder.recent_count(),
                      "UNSEEN": sum(1 for n in folder.names if "S" not in mb.info_of(n))}
            body = " ".join(f"{i} {values[i]}" for i in items)
            self.untagged(b"STATUS " + encode_mailbox(name) + f" ({body})".encode())
            return "OK STATUS completed"

        return registry.open(self.folders.inbox, path).addCallback(answer)

    def do_APPEND(self, tag: bytes, args: list) -> Deferred:
        if len(args) < 2:
            raise BadCommand("APPEND needs a mailbox and a message")
        name = mailbox_name(args[0])
        rest = list(args[1:])
        flags: list[str] = []
        date = None
        if rest and isinstance(rest[0], list):
            flags = self._flag_list(rest.pop(0))
        if len(rest) == 2 and isinstance(rest[0], bytes):
            date = parse_datetime(rest.pop(0))
        if len(rest) != 1 or not isinstance(rest[0], bytes):
            raise BadCommand("APPEND message literal expected")
        message = rest[0]
        if not message:
            raise No("Empty message")
        assert self.folders is not None
        path = self.folders.path(name)  # a name no folder can have: NO [CANNOT], not [TRYCREATE]
        registry = self.factory.registry
        folder = registry.folder(self.folders.inbox, path)
        flags = [f for f in flags if f.lower() != "\\recent"]

        def locked() -> Deferred:
            def loaded(_: object) -> Any:
                if not folder.loaded or not Maildir(path).exists():
                    raise No("No such mailbox", "TRYCREATE")
                return self.factory.blocking.run(
                    mb.append_file, self.factory.store, path, message, flags, date, list(folder.keywords),
                    folder.uidvalidity, folder.next_uid, array("L", folder.uids), list(folder.names))

            def appended(result: tuple[int, str, list[str]]) -> int:
                uid, rel, keywords = result
                folder.keywords = keywords
                folder.add([(uid, rel)], uid + 1)
                folder.notify()
                return uid

            return registry.ensure_loaded(folder).addCallback(loaded).addCallback(appended)

        def done(uid: int) -> str:
            if not folder.sessions:
                registry.idle(folder)
            return f"OK [APPENDUID {folder.uidvalidity} {uid}] APPEND completed"

        def failed(failure: Failure) -> Any:
            if not folder.sessions:
                registry.idle(folder)
            if failure.check(ValueError):
                raise No("Too many keywords in this mailbox", "LIMIT")
            return failure

        return folder.lock.run(locked).addCallbacks(done, failed)

    def do_IDLE(self, tag: bytes, args: list) -> None:
        self._no_args(args)
        self._idle_tag = tag
        self.send(b"+ idling\r\n")
        if self.folder is not None:
            self.flush_updates(True)
        return None

    def _idle_line(self, line: bytes) -> None:
        tag, self._idle_tag = self._idle_tag, None
        assert tag is not None
        if line.strip().upper() != b"DONE":
            self.tagged(tag, "BAD Expected DONE")
            return
        if self.folder is not None:
            self.flush_updates(True)
        self.tagged(tag, "OK IDLE terminated")

    # selected ------------------------------------------------------------------------------------------

    def do_CLOSE(self, tag: bytes, args: list) -> Any:
        self._no_args(args)
        if not self.writable:
            self._deselect()
            return "OK CLOSE completed"

        def closed(_: object) -> str:
            self._deselect()
            return "OK CLOSE completed"

        return self._expunge(None).addCallback(closed)

    def do_UNSELECT(self, tag: bytes, args: list) -> str:
        self._no_args(args)
        self._deselect()
        return "OK UNSELECT completed"

    def do_EXPUNGE(self, tag: bytes, args: list, uid: bool = False) -> Deferred:
        uids: SeqSet | Token | None = None
        if uid:
            if len(args) != 1:
                raise BadCommand("UID EXPUNGE needs a UID set")
            uids = self._seqset(args[0])
        elif args:
            raise BadCommand("unexpected arguments")
        if not self.writable:
            raise No("Mailbox is read-only", "READ-ONLY")
        return self._expunge(uids).addCallback(lambda _: "OK EXPUNGE completed")

    def _expunge(self, uids: SeqSet | Token | None) -> Deferred:
        folder = self.folder
        assert folder is not None
        view = array("L", self.view)

        def locked() -> Deferred:
            def unlinked(gone: list[int]) -> None:
                folder.remove(gone, self)
                folder.notify()

            # Choosing the victims (and resolving a long UID set) is the worker's.
            return self.factory.blocking.run(expunge_files, folder.path, array("L", folder.uids),
                                             list(folder.names), view, uids).addCallback(unlinked)

        return folder.lock.run(locked)

    @staticmethod
    def _seqset(tok: Token) -> SeqSet | Token:
        """A short set parsed now (syntax errors answered first); a long one left for the worker."""
        if isinstance(tok, Atom) and len(tok) > LONG_SET:
            return tok
        return parse_seqset(tok)

    def _ranges(self, seqset: SeqSet | Token, uid: bool) -> Deferred:
        """The view's position ranges a set names (a long set's are found in the worker)."""
        if isinstance(seqset, SeqSet):
            return succeed(self._positions(seqset, uid))
        return self.factory.blocking.run(set_positions, seqset, array("L", self.view), uid)

    def _positions(self, seqset: SeqSet, uid: bool) -> list[tuple[int, int]]:
        """0-based [start, stop) position ranges of the view that a set names."""
        return set_positions(seqset, self.view, uid)

    @staticmethod
    def _iter_positions(ranges: list[tuple[int, int]]) -> Iterator[int]:
        for lo, hi in ranges:
            yield from range(lo, hi)

    def _flag_list(self, tok: Token) -> list[str]:
        items = tok if isinstance(tok, list) else [tok]
        out = []
        for item in items:
            if not isinstance(item, Atom) or not item:
                raise BadCommand("flag expected")
            if item.startswith("\\"):
                if item.lower() == "\\recent":
                    out.append("\\Recent")
                    continue
                match = [f for f in mb.SYSTEM_FLAGS if f.lower() == item.lower()]
                if not match:
                    raise BadCommand(f"unknown system flag {item[:20]}")
                out.append(match[0])
            else:
                if any(c in item for c in "(){%*\"\\]"):
                    raise BadCommand("bad keyword")
                out.append(str(item))
        return out

    def do_FETCH(self, tag: bytes, args: list, uid: bool = False) -> Deferred:
        if len(args) != 2:
            raise BadCommand("FETCH needs a sequence set and attributes")
        seqset = self._seqset(args[0])
        atts = distinct_atts(parse_fetch_atts(args[1]))
        if uid and "UID" not in atts:
            atts.insert(0, "UID")
        marks_seen = self.writable and any(
            (isinstance(a, Section) and not a.peek) or a in ("RFC822", "RFC822.TEXT") for a in atts)
        if marks_seen and "FLAGS" not in atts:
            atts.append("FLAGS")

        def fetch(ranges: list[tuple[int, int]]) -> Deferred:
            d: Deferred = succeed(None)
            if marks_seen:
                uids = [self.view[i] for i in self._iter_positions(ranges)]
                d = self._store_flags(uids, "+", ["\\Seen"])
            return d.addCallback(lambda _: self._stream_fetch(ranges, atts))

        return self._ranges(seqset, uid).addCallback(fetch).addCallback(
            lambda _: ("OK UID FETCH completed" if uid else "OK FETCH completed"))

    def _rows(self, positions: Iterator[int]) -> Iterator[tuple[int, int, str, int, bool]]:
        folder = self.folder
        assert folder is not None
        view = self.view
        for i in positions:
            uid = view[i]
            rel = folder.name(uid)
            if rel is None:
                continue
            yield (i + 1, uid, rel, folder.size(uid, rel), uid in self.recent)

    def _stream_fetch(self, ranges: list[tuple[int, int]], atts: list) -> Deferred:
        if self.ended:  # the client left while flags were stored or the set resolved
            return succeed(None)
        folder = self.folder
        assert folder is not None
        rows = self._rows(self._iter_positions(ranges))
        disk = needs_disk(atts)
        per_chunk = chunk_rows([], atts)
        blocking = self.factory.blocking
        cache = folder.cache
        first = [True]

        def learnt(result: tuple[bytes, dict]) -> bytes:
            data, learned = result
            if learned:
                cache.learn(learned)
            return data

        def render(chunk: list, items: list = atts, head: bool = True, tail: bool = True) -> Any:
            keywords = list(folder.keywords)
            # Only a small first chunk of index-only items is rendered here
            # (a few ms); the rest go through the worker, so a large FETCH
            # gives the reactor back between chunks even when output never
            # pauses.
            if first[0] and len(chunk) <= REACTOR_ROWS and (not disk or
                                                            cached_rows(chunk, items, cache)):
                first[0] = False
                return learnt(render_rows(folder.path, chunk, items, keywords, cache))
            first[0] = False
            return blocking.run(render_rows, folder.path, chunk, items, keywords,
                                cache, head, tail).addCallback(learnt)

        def chunks() -> Iterator[tuple[list, bool]]:
            # Every item a message is asked for counts against the piece's
            # budget (a message asked for once per item is sent once per item).
            chunk: list = []
            budget = 0
            flat = row_cost(atts, 0) if not disk else None  # index-only items: no size to weigh
            for row in rows:
                cost = flat if flat is not None else row_cost(atts, row[3])
                if chunk and (len(chunk) >= per_chunk or budget + cost > PIECE_BYTES):
                    yield chunk, budget >= PIECE_BYTES // 2
                    chunk, budget = [], 0
                chunk.append(row)
                budget += cost
            if chunk:
                yield chunk, budget >= PIECE_BYTES // 2

        def pieces() -> Iterator[Any]:
            # One chunk is rendered (in a worker thread when it reads files)
            # while the one before it is being written; a chunk of large
            # bodies is written before the next one is read, and one
            # message whose items exceed a piece is rendered a group of
            # items at a time.
            ahead: Any = None
            for chunk, big in chunks():
                if len(chunk) == 1 and row_cost(atts, chunk[0][3]) > PIECE_BYTES:
                    groups = item_groups(atts, chunk[0][3])
                    if len(groups) > 1:
                        if ahead is not None:
                            yield ahead
                            ahead = None
                        for i, group in enumerate(groups):
                            yield render(chunk, group, i == 0, i == len(groups) - 1)
                        continue
                piece = render(chunk)
                if ahead is not None:
                    yield ahead
                ahead = piece
                if big:
                    yield ahead
                    ahead = None
            if ahead is not None:
                yield ahead

        return self.stream(pieces())

    def stream(self, pieces: Iterator[Any]) -> Deferred:
        """Write bytes (or Deferreds of bytes) from C{pieces}, pausing while the transport is full."""
        drain = self.output
        done: Deferred = Deferred()

        def finish(result: Any = None) -> None:
            if isinstance(result, Failure):
                done.errback(result)
            else:
                done.callback(None)

        def step() -> None:
            while True:
                if self._closing or drain.stopped:
                    return finish()
                if drain.paused:
                    drain.waiter = step
                    return
                try:
                    piece = next(pieces)
                except StopIteration:
                    return finish()
                except Exception:
                    return finish(Failure())
                if isinstance(piece, Deferred):
                    def write(data: bytes) -> None:
                        self.send(data)
                        step()
                    piece.addCallbacks(write, finish)
                    return
                self.send(piece)

        step()
        return done

    def do_STORE(self, tag: bytes, args: list, uid: bool = False) -> Deferred:
        if len(args) != 3:
            raise BadCommand("STORE needs a sequence set, an item and flags")
        seqset = self._seqset(args[0])
        item = str(args[1]).upper() if isinstance(args[1], Atom) else ""
        m = re.match(r"^([+-]?)FLAGS(\.SILENT)?$", item)
        if not m:
            raise BadCommand("STORE item must be [+-]FLAGS[.SILENT]")
        flags = [f for f in self._flag_list(args[2]) if f != "\\Recent"]
        if not self.writable:
            raise No("Mailbox is read-only", "READ-ONLY")
        def store(ranges: list[tuple[int, int]]) -> Deferred:
            if self.ended:  # the client left while a long set was resolved in the worker
                return succeed(None)
            uids = [self.view[i] for i in self._iter_positions(ranges)]
            d = self._store_flags(uids, m.group(1) or "=", flags)
            if m.group(2):
                return d
            atts = ["UID", "FLAGS"] if uid else ["FLAGS"]
            return d.addCallback(lambda _: self._stream_fetch(ranges, atts))

        return self._ranges(seqset, uid).addCallback(store).addCallback(
            lambda _: "OK STORE completed")

    def _store_flags(self, uids: list[int], mode: str, flags: list[str]) -> Deferred:
        folder = self.folder
        assert folder is not None

        def locked() -> Any:
            keywords = mb.merge_keywords(folder.keywords, flags) if mode != "-" else folder.keywords
            if keywords is None:
                raise No("Too many keywords in this mailbox", "LIMIT")
            names = folder.names
            rows = [(u, names[i]) for u in uids if (i := folder.position(u)) is not None]
            if not rows and keywords == folder.keywords:
                return None
            changed_keywords = keywords if keywords != folder.keywords else None

            def renamed(done: list[tuple[int, str]]) -> None:
                folder.keywords = list(keywords)
                for u, rel in done:
                    i = folder.position(u)
                    if i is not None:
                        folder.names[i] = rel
                        folder.record(mb.FLAGS, u, self)
                folder.notify()

            # Which files change, and their renames, are the worker's job.
            return self.factory.blocking.run(store_files, folder.path, rows, mode, flags,
                                             list(folder.keywords), list(keywords),
                                             changed_keywords).addCallback(renamed)

        return folder.lock.run(locked)

    def do_COPY(self, tag: bytes, args: list, uid: bool = False, move: bool = False) -> Deferred:
        if len(args) != 2:
            raise BadCommand("COPY needs a sequence set and a mailbox")
        seqset = self._seqset(args[0])
        name = mailbox_name(args[1])
        if move and not self.writable:
            raise No("Mailbox is read-only", "READ-ONLY")
        assert self.folders is not None and self.folder is not None
        path = self.folders.path(name)  # a name no folder can have: NO [CANNOT], not [TRYCREATE]
        source = self.folder
        if move and path == source.path:
            raise No("Cannot move messages into the same mailbox", "CANNOT")
        registry = self.factory.registry
        target = registry.folder(self.folders.inbox, path)
        wanted: list[int] = []
        hostname = self.factory.config.hostname

        def locked() -> Deferred:
            def loaded(_: object) -> Any:
                if not target.loaded or not Maildir(path).exists():
                    raise No("No such mailbox", "TRYCREATE")
                rows = [(u, source.name(u)) for u in wanted]
                rows = [(u, n) for u, n in rows if n is not None]
                return registry.blocking.run(
                    mb.transfer_files, source.path, path, rows, list(source.keywords),
                    list(target.keywords), move, hostname, target.uidvalidity, target.next_uid,
                    array("L", target.uids), list(target.names))

            def transferred(result: Any) -> list[tuple[int, int, str]]:
                done, next_uid, keywords = result
                target.keywords = keywords
                target.add([(d, rel) for _, d, rel in done], next_uid)
                target.notify()
                if move:
                    source.remove([s for s, _, _ in done], self)
                    source.notify()
                return done

            return registry.ensure_loaded(target).addCallback(loaded).addCallback(transferred)

        def answer(done: list[tuple[int, int, str]]) -> str:
            if not target.sessions:
                registry.idle(target)
            word = "MOVE" if move else "COPY"
            if not done:
                return f"OK {word} completed (no messages)"
            code = (f"COPYUID {target.uidvalidity} {format_set([s for s, _, _ in done])} "
                    f"{format_set([d for _, d, _ in done])}")
            if move:
                self.untagged(f"OK [{code}] Moved")
                return f"OK {word} completed"
            return f"OK [{code}] {word} completed"

        def chosen(ranges: list[tuple[int, int]]) -> Deferred:
            wanted.extend(self.view[i] for i in self._iter_positions(ranges))
            return source.lock.run(locked)

        return self._ranges(seqset, uid).addCallback(chosen).addCallback(answer)

    def do_MOVE(self, tag: bytes, args: list, uid: bool = False) -> Deferred:
        return self.do_COPY(tag, args, uid, move=True)

    def do_SEARCH(self, tag: bytes, args: list, uid: bool = False) -> Deferred:
        args = list(args)
        charset = "utf-8"
        if args and isinstance(args[0], Atom) and args[0].upper() == "CHARSET":
            if len(args) < 2:
                raise BadCommand("CHARSET needs a name")
            cs = astring(args[1]).decode("ascii", "replace").lower()
            if cs not in ("utf-8", "us-ascii", "utf8"):
                raise No("Unsupported charset", "BADCHARSET (US-ASCII UTF-8)")
            args = args[2:]
        folder = self.folder
        assert folder is not None
        # Only the copies are made here; parsing, simplifying and evaluating
        # the keys (set operations, file reads) is the worker's.
        snap = Snapshot(folder.path, self.view, folder.uids, folder.names, folder.sizes,
                        self.recent, folder.keywords)
        d = self.factory.blocking.run(search_command, args, charset, snap, uid)

        def answer(line: bytes) -> str:
            self.send(line)
            return "OK UID SEARCH completed" if uid else "OK SEARCH completed"

        return d.addCallback(answer)


class IMAPFactory(Factory):
    """Builds IMAP sessions; every IMAP listener of one store shares one folder registry."""

    protocol = IMAPServer
    _registries: "weakref.WeakKeyDictionary[MailStore, Registry]" = weakref.WeakKeyDictionary()

    def __init__(self, *, config: Config, store: MailStore, blocking: Blocking,
                 authenticator: Authenticator, screening: Screening, clock: IReactorTime,
                 tls: Any = None) -> None:
        self.config = config
        self.store = store
        self.blocking = blocking
        self.authenticator = authenticator
        self.screening = screening
        self.clock = clock
        self.tls = tls
        registry = self._registries.get(store)
        if registry is None:
            registry = self._registries[store] = Registry(blocking, clock)
        self.registry = registry
