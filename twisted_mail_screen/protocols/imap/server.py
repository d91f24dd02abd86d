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

import re
from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from twisted_mail_screen.faults.seam import guard, imap_reply, imap_subject
from twisted_mail_screen.protocols.imap.account import AccountFolders, FolderError
from twisted_mail_screen.protocols.imap.account_commands import AccountCommands
from twisted_mail_screen.protocols.imap import compress
from twisted_mail_screen.protocols.imap.compress import CompressCommands
from twisted_mail_screen.protocols.imap.condstore_commands import CAPABILITIES as CONDSTORE_CAPS
from twisted_mail_screen.protocols.imap.condstore_commands import CondStoreCommands
from twisted_mail_screen.protocols.imap.core import Gone, No
from twisted_mail_screen.protocols.imap.utf8_accept import CAPABILITIES as UTF8_CAPS, Utf8Accept
from twisted_mail_screen.protocols.imap.list_extended import CAPABILITIES as LIST_CAPS, ExtendedList
from twisted_mail_screen.protocols.imap.message_commands import MessageCommands
from twisted_mail_screen.protocols.imap.parse import Atom, BadCommand, Token, astring, tokenize
from twisted_mail_screen.protocols.imap import quota_commands
from twisted_mail_screen.protocols.imap.quota_commands import QuotaCommands
from twisted_mail_screen.protocols.imap.registry import Registry
from twisted_mail_screen.protocols.imap.sort_commands import CAPABILITIES as SORT_CAPS, SortCommands
from twisted_mail_screen.protocols.session import SASLError, SessionFactory, sasl_plain
from twisted_mail_screen.runtime.workers import Blocking
from twisted_mail_screen.quota.service import QuotaService
from twisted_mail_screen.store.maildir import MailStore

__all__ = ["IMAPFactory", "IMAPServer", "No"]

LITERAL_RE = re.compile(rb"\{(\d+)(\+?)\}$")
HUGE_LITERAL = 10 ** 13  # stands for any size of more than 12 digits (all far over every limit)
TAG_RE = re.compile(rb"^[!#$&'+,\-./0-9:;<=>?@A-Z\[^_`a-z|}~]+$")
SMALL_LITERAL = 64 * 1024
MAX_COMMAND = 1024 * 1024

ANY_STATE = {"CAPABILITY", "NOOP", "LOGOUT", "ID"}
UNAUTH = {"STARTTLS", "AUTHENTICATE", "LOGIN"}
AUTH = {"SELECT", "EXAMINE", "CREATE", "DELETE", "RENAME", "SUBSCRIBE", "UNSUBSCRIBE", "LIST",
        "LSUB", "STATUS", "APPEND", "NAMESPACE", "ENABLE", "IDLE"} | quota_commands.COMMANDS | compress.COMMANDS
SELECTED = {"CHECK", "CLOSE", "UNSELECT", "EXPUNGE", "SEARCH", "FETCH", "STORE", "COPY", "MOVE",
            "UID", "SORT", "THREAD"}
NO_EXPUNGE = {"FETCH", "STORE", "SEARCH", "SORT", "THREAD"}
BASE_CAPS = ["IMAP4rev1", "LITERAL+", "SASL-IR", "ID", "ENABLE", "IDLE", "NAMESPACE", "UNSELECT",
             "UIDPLUS", "MOVE", "SPECIAL-USE", "CHILDREN"] + LIST_CAPS + UTF8_CAPS + quota_commands.CAPABILITIES + SORT_CAPS \
    + CONDSTORE_CAPS


def _pending(d: Deferred) -> Deferred | None:
    """C{d} if it has not fired all the way through yet (so input must wait), else C{None}."""
    done: list[bool] = []
    d.addBoth(lambda r: done.append(True) or r)
    return None if done else d


class IMAPServer(Utf8Accept, CondStoreCommands, ExtendedList, AccountCommands, MessageCommands, QuotaCommands,
                 CompressCommands, SortCommands):
    """
    One IMAP session: the connection, the framing of lines and literals,
    dispatch by state, and the commands of any state and of login. The
    folder and message commands are its bases (see L{SessionCore}).
    """

    log = Logger()
    factory: "IMAPFactory"
    max_line_length = 64 * 1024

    def __init__(self) -> None:
        super().__init__()
        self._reset_command()

    def connectionMade(self) -> None:
        f = self.factory
        self.clock = f.clock
        self.idle_timeout = f.config.imap.idle_timeout
        super().connectionMade()
        if not self.open_screen(f.screening, "imap"):
            return
        self.untagged(f"OK [CAPABILITY {' '.join(self.capabilities())}] "
                      f"{f.config.hostname} IMAP4rev1 ready")

    def refuse(self, reason: str) -> None:
        self.send(f"* BYE [UNAVAILABLE] {reason}\r\n".encode())

    def session_ended(self) -> None:
        self._deselect()
        self.close_screen()

    def timed_out(self) -> None:
        self.untagged("BYE Autologout; idle for too long")
        self.close()

    def internal_error(self) -> None:
        self.untagged("BYE Internal error")
        self.close()

    def line_too_long(self) -> None:
        self._reset_command()
        self.untagged("BAD Command line too long")

    def capabilities(self) -> list[str]:
        caps = list(BASE_CAPS)
        if self.state == "unauth":
            if self.factory.tls is not None and not self.secure:
                caps.append("STARTTLS")
            if self._plaintext_ok():
                caps.append("AUTH=PLAIN")
            else:
                caps.append("LOGINDISABLED")
        else:
            caps += compress.CAPABILITIES
        return caps

    def _plaintext_ok(self) -> bool:
        return self.factory.authenticator.plaintext_allowed(self.peer_host, self.secure)

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
            if name not in ("FETCH", "STORE", "SEARCH", "COPY", "MOVE", "EXPUNGE", "SORT", "THREAD"):
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

        def run() -> Deferred | None:
            d = maybeDeferred(handler, tag, args, uid) if name in SELECTED - {"CHECK", "CLOSE", "UNSELECT"} \
                else maybeDeferred(handler, tag, args)
            d.addCallbacks(self._completed, self._failed, callbackArgs=(tag, expunge_ok),
                           errbackArgs=(tag, expunge_ok))
            return _pending(d)

        return guard(self.factory.faults, self, name, imap_subject(name, args), run, imap_reply(tag))

    def _completed(self, text: str | None, tag: bytes, expunge_ok: bool) -> None:
        if text is None:
            return
        if self.folder is not None:
            self.flush_updates(expunge_ok)
        self.tagged(tag, text)

    def _failed(self, failure: Failure, tag: bytes, expunge_ok: bool = True) -> None:
        if failure.check(Gone):
            return
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
            d = maybeDeferred(self._auth_plain, tag, line, True)
            d.addCallbacks(self._completed, self._failed, callbackArgs=(tag, True),
                           errbackArgs=(tag,))
            return _pending(d)

        self._sasl = response
        self.send(b"+ \r\n")
        return None

    def _auth_plain(self, tag: bytes, response: bytes, continued: bool = False) -> Any:
        try:
            credentials = sasl_plain(response)
        except SASLError as e:
            raise BadCommand(f"Cannot decode response: {e}") from None
        if credentials is None:  # "*": a cancellation in answer to "+", not base64 as an initial response
            if continued:
                return "BAD Authentication cancelled"
            raise BadCommand("Cannot decode response: invalid base64")
        return self._login(tag, *credentials)

    def _login(self, tag: bytes, username: str, password: str) -> Deferred:
        f = self.factory
        d = f.authenticator.authenticate(username, password)

        def checked(address: str | None) -> Any:
            if address is None:
                if self.auth_failed(username, password):
                    self.tagged(tag, "NO [AUTHENTICATIONFAILED] Authentication failed")
                    self.untagged("BYE Too many failures")
                    self.close()
                    return None
                raise No("Authentication failed", "AUTHENTICATIONFAILED")
            self.auth_succeeded(address)
            folders = AccountFolders(f.store.maildir(address).path, f.config.imap.max_folders)
            lock = f.registry.lock(folders.inbox)
            return lock.run(f.blocking.run, folders.setup).addCallback(self._logged_in, address, folders)

        return d.addCallback(checked)

    def _logged_in(self, _: object, address: str, folders: AccountFolders) -> str:
        self.address = address
        self.folders = folders
        self.state = "auth"
        return f"OK [CAPABILITY {' '.join(self.capabilities())}] Logged in"


class IMAPFactory(SessionFactory):
    """Builds IMAP sessions; every IMAP listener of one store shares one folder L{Registry}."""

    protocol = IMAPServer

    def __init__(self, *, store: MailStore, blocking: Blocking, registry: Registry,
                 quota: QuotaService, **services: Any) -> None:
        super().__init__(**services)
        self.quota = quota
        self.store = store
        self.blocking = blocking
        self.registry = registry
