# -*- test-case-name: tests.test_smtp -*-
"""
The SMTP server (RFC 5321) for port 25 and for submission (RFC 6409).

It is written on L{CommandProtocol} rather than Twisted's C{ESMTP} because
it must answer pipelined commands in order while deliveries are pending
(Twisted ticket 8126), put an enhanced status code (RFC 3463) on every
reply, and take DATA as bulk bytes instead of line by line. Policy comes
from the collaborators the factory holds: the router, the screening
service, the freeze store and the authenticator.
"""

from __future__ import annotations

import importlib
import re
from typing import TYPE_CHECKING, Any, Callable

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.logger import Logger

from twisted_mail_screen.store.addresses import AddressError, parse_path, valid_sender_path
from twisted_mail_screen.faults.plan import END_OF_DATA
from twisted_mail_screen.faults.seam import guard, smtp_reply, smtp_subject
from twisted_mail_screen.store.delivery import Delivery
from twisted_mail_screen.runtime.deliverylog import logged
from twisted_mail_screen.protocols.headercheck import Refusal, submission
from twisted_mail_screen.screening.interfaces import FreezeStore
from twisted_mail_screen.protocols.session import ScreenedSession, SessionFactory
from twisted_mail_screen.store.maildir import DeliveryError
from twisted_mail_screen.runtime.workers import Workers
from twisted_mail_screen.store.routing import FORWARDING_DISABLED, Router
from twisted_mail_screen.protocols.smtp_auth import Authentication
from twisted_mail_screen.protocols.smtp_bdat import Chunking
from twisted_mail_screen.protocols.smtp_params import Envelope, Refused, mail_params, rcpt_params
from twisted_mail_screen.protocols.smtp_received import HeaderDate, received
from twisted_mail_screen.protocols.smtp_quota import data_refusal, rcpt_refusal
from twisted_mail_screen.quota.service import QuotaService
from twisted_mail_screen.protocols.smtp_data import (BARE, INLINE_STORED_FORM, LINE, SIZE, DataReader,
                                                     stored_form)

if TYPE_CHECKING:
    from twisted_mail_screen.relay.notices import Notices

#: RFC 4954 section 4: AUTH lines may be up to 12288 octets.
COMMAND_LINE_LIMIT = 12288
#: Control characters: never part of an SMTP command (RFC 5321 4.1.2 has no
#: HTAB either, only SP). A bare CR in a HELO name or a path would become a
#: line break in our Received:/Return-Path: headers and in the commands the
#: relay sends on.
_CONTROL = re.compile(rb"[\x00-\x1f\x7f]")
#: RFC 6531 3.7.4.1: a non-ASCII address in a transaction without SMTPUTF8.
NEEDS_SMTPUTF8 = "Non-ASCII address needs the SMTPUTF8 parameter (RFC 6531)"


class SMTPServer(Authentication, Chunking, ScreenedSession):
    """One SMTP session."""

    log = Logger()
    factory: "SMTPFactory"

    def __init__(self) -> None:
        super().__init__()
        self.helo: str | None = None
        self.esmtp = False
        self.user: str | None = None
        self.envelope: Envelope | None = None
        self._commands = 0
        self._sasl: Any = None
        self._data: DataReader | None = None

    # session life

    def connectionMade(self) -> None:
        f = self.factory
        self.clock = f.clock
        self.idle_timeout = f.config.smtp.idle_timeout
        self.max_line_length = COMMAND_LINE_LIMIT
        super().connectionMade()
        if self.open_screen(f.screening, f.protocol_name):
            self.send(f"220 {f.config.hostname} ESMTP twisted-mail-screen ready\r\n".encode())

    def refuse(self, reason: str) -> None:
        self.reply(421, "4.7.0", f"{self.factory.config.hostname} {reason}")

    def session_ended(self) -> None:
        self.close_screen()

    def timed_out(self) -> None:
        self.reply(421, "4.4.2", f"{self.factory.config.hostname} Error: timeout exceeded")
        self.close()

    def line_too_long(self) -> None:
        self.reply(500, "5.5.2", "Line too long")

    def internal_error(self) -> None:
        self.reply(421, "4.3.0", f"{self.factory.config.hostname} internal error, closing")
        self.close()

    def reply(self, code: int, status: str, text: str) -> None:
        """Send one reply line; every reply carries its enhanced code."""
        self.send(f"{code} {status} {text}\r\n".encode())

    def close_for_block(self) -> None:
        blocked = self.screen is not None and self.screen.blocked
        self.reply(421, "4.7.0", f"{self.factory.config.hostname} Too many errors from "
                   f"{self.peer_host or 'you'}: {'blocked, ' if blocked else ''}closing")
        self.close()

    # commands

    def line_received(self, line: bytes) -> Deferred | None:
        bad = _CONTROL.search(line) is not None
        step, self._sasl = self._sasl, None  # a SASL response with control characters ends it
        if step is not None and not bad:
            return step(line)
        self._commands += 1
        if self._commands > self.factory.config.smtp.max_commands:
            self.reply(421, "4.7.0", f"{self.factory.config.hostname} Too many commands, closing")
            self.close()
            return None
        if bad:
            return self.reply(501, "5.5.2", "Control character (bare CR, NUL, TAB...) in command line")
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            text = ""
        if not text.isascii() and text[:5].upper() not in ("MAIL ", "RCPT "):
            # UTF-8 only in the paths of MAIL and RCPT (RFC 6531 3.3).
            self.reply(500, "5.5.2", "Command contains non-ASCII bytes")
            return None
        if not text and line:
            self.reply(500, "5.5.2", "Command is not valid UTF-8")
            return None
        verb, _, arg = text.partition(" ")
        handler = getattr(self, "do_" + verb.upper(), None) if verb.isalpha() else None
        if handler is None:
            self.reply(500, "5.5.1", "Command unrecognized")
            return None
        verb, arg = verb.upper(), arg.strip()  # the fault plan (test host) may answer instead
        if verb == "BDAT":  # its chunk is read first; the fault plan answers after it
            return self.do_BDAT(arg)
        self.chunk_failure = None
        faults = self.factory.faults
        if faults is None:  # site mode has no fault plan: no subject to work out per command
            return handler(arg)
        return guard(faults, self, verb, smtp_subject(verb, arg), lambda: handler(arg), smtp_reply)

    def do_HELO(self, arg: str) -> None:
        if not arg:
            return self.reply(501, "5.5.4", "Syntax: HELO hostname")
        self.helo, self.esmtp, self.envelope = arg, False, None
        self.send(f"250 {self.factory.config.hostname}\r\n".encode())

    def do_EHLO(self, arg: str) -> None:
        if not arg:
            return self.reply(501, "5.5.4", "Syntax: EHLO hostname")
        self.helo, self.esmtp, self.envelope = arg, True, None
        f = self.factory
        lines = [f"{f.config.hostname} greets {arg}", "PIPELINING",
                 f"SIZE {f.config.smtp.max_message_size}", "8BITMIME",
                 "ENHANCEDSTATUSCODES", "CHUNKING", "SMTPUTF8", "DSN"]
        if f.tls is not None and not self.secure:
            lines.append("STARTTLS")
        if self.user is None and f.authenticator.plaintext_allowed(self.peer_host, self.secure):
            lines.append("AUTH PLAIN LOGIN")
        out = [f"250-{x}" for x in lines[:-1]] + [f"250 {lines[-1]}"]
        self.send(("\r\n".join(out) + "\r\n").encode())

    def do_NOOP(self, arg: str) -> None:
        self.reply(250, "2.0.0", "Ok")

    def do_RSET(self, arg: str) -> None:
        self.envelope = None
        self.reply(250, "2.0.0", "Ok")
        if self.screen is not None and self.screen.rset():
            self.close_for_block()

    def do_QUIT(self, arg: str) -> None:
        self.reply(221, "2.0.0", "Bye")
        self.close()

    def do_VRFY(self, arg: str) -> None:
        self.reply(252, "2.5.0", "Cannot VRFY user, but will accept message and attempt delivery")

    def do_EXPN(self, arg: str) -> None:
        # Lists are not disclosed (RFC 5321 7.3): a harvester learns nothing.
        self.reply(502, "5.5.1", "EXPN not available")

    def do_HELP(self, arg: str) -> None:
        self.reply(214, "2.0.0", "See RFC 5321")

    def do_STARTTLS(self, arg: str) -> None:
        if self.factory.tls is None:
            return self.reply(454, "4.7.0", "TLS not available")
        if self.secure:
            return self.reply(503, "5.5.1", "TLS already active")
        if arg:
            return self.reply(501, "5.5.4", "Syntax: STARTTLS")
        self.reply(220, "2.0.0", "Ready to start TLS")
        self.start_tls(self.factory.tls)  # RFC 3207 4.2: pre-TLS pipelined input is void
        self.helo, self.esmtp, self.envelope = None, False, None

    # the transaction

    def do_MAIL(self, arg: str) -> None:
        f = self.factory
        if self.helo is None:
            return self.reply(503, "5.5.1", "Send HELO/EHLO first")
        if self.envelope is not None:
            return self.reply(503, "5.5.1", "Nested MAIL command")
        if f.require_auth and self.user is None:
            return self.reply(530, "5.7.0", "Authentication required")
        if self.user is not None and f.freeze.is_frozen(self.user):
            # Frozen after this session authenticated (by the administrator,
            # or by screening from another session): it sends nothing more.
            return self.reply(554, "5.7.1", f"Account {self.user} is frozen: sending is disabled")
        if not arg.upper().startswith("FROM:"):
            return self.reply(501, "5.5.4", "Syntax: MAIL FROM:<address>")
        try:
            sender, params = parse_path(arg[5:])
        except AddressError as e:
            return self.reply(501, "5.1.7", f"Bad sender address syntax: {e}")
        try:
            options = mail_params(params, self.esmtp, f.config.smtp.max_message_size)
        except Refused as e:
            return self.reply(e.code, e.status, e.text)
        if not sender.isascii() and not options.smtputf8:
            return self.reply(553, "5.6.7", NEEDS_SMTPUTF8)
        if sender and not valid_sender_path(sender):
            return self.reply(501, "5.1.7", "Bad sender address syntax")
        if self._submitting() and not f.router.owns(self.user, sender):  # type: ignore[arg-type]
            return self.reply(553, "5.7.1", f"<{sender}>: Sender address not owned by user {self.user}")
        self.envelope = Envelope(sender, options=options)
        self.reply(250, "2.1.0", "Ok")

    def do_RCPT(self, arg: str) -> None:
        f = self.factory
        env = self.envelope
        if env is None:
            return self.reply(503, "5.5.1", "Need MAIL before RCPT")
        if not arg.upper().startswith("TO:"):
            return self.reply(501, "5.5.4", "Syntax: RCPT TO:<address>")
        if len(env.recipients) >= f.config.smtp.max_recipients:
            return self.reply(452, "4.5.3", "Too many recipients")
        try:
            path, params = parse_path(arg[3:])
        except AddressError as e:
            return self.reply(501, "5.1.3", f"Bad recipient address syntax: {e}")
        try:
            request = rcpt_params(params, self.esmtp)
        except Refused as e:
            return self.reply(e.code, e.status, e.text)
        if not path.isascii() and not env.options.smtputf8:
            return self.reply(553, "5.6.7", NEEDS_SMTPUTF8)
        relay = f.delivery.relay is not None
        route = f.router.resolve(path, may_relay=self.user is not None and relay, may_forward=relay)
        if route.refusal == "syntax":
            return self.reply(501, "5.1.3", f"Bad recipient address syntax: {route.reason}")
        if route.refusal == "relay":
            if route.reason == FORWARDING_DISABLED:
                return self.reply(554, "5.7.1", f"<{path}>: {route.reason}")
            return self.reply(554, "5.7.1", f"<{path}>: Relay access denied")
        if route.refusal == "unknown":
            self.reply(550, "5.1.1", f"<{path}>: Recipient address rejected: User unknown")
            if self.screen is not None and self.screen.rcpt_unknown():
                self.close_for_block()
            return None
        if f.quota is not None and route.mailboxes and f.quota.any_limited(route.mailboxes):
            # A full mailbox refuses only its recipient; without limits no usage is asked.
            return rcpt_refusal(f.quota, route.mailboxes, env.options.size, path).addCallback(
                lambda refusal: self.reply(*refusal) if refusal else self._add_rcpt(env, route, request))
        return self._add_rcpt(env, route, request)

    def _add_rcpt(self, env: Envelope, route: Any, request: Any) -> None:
        env.recipients.append(route)
        env.requests.append(request)
        self.reply(250, "2.1.5", "Ok")

    def do_DATA(self, arg: str) -> None:
        if self.envelope is None:
            return self.reply(503, "5.5.1", "Need MAIL command")
        if not self.envelope.recipients:
            return self.reply(554, "5.5.1", "No valid recipients")
        if self.envelope.chunks is not None:
            return self.reply(503, "5.5.1", "DATA not allowed after BDAT in one transaction")
        self.send(b"354 End data with <CR><LF>.<CR><LF>\r\n")
        smtp = self.factory.config.smtp
        self._data = DataReader(smtp.max_line_length, smtp.max_message_size)
        self.set_raw_handler(self._data_received)

    def _data_received(self, buf: bytearray) -> bool:
        """Take DATA bytes from C{buf}; C{False} once the final dot is seen."""
        reader = self._data
        assert reader is not None
        message = reader.feed(buf)
        if message is None:
            return True
        self._data = None
        self.set_raw_handler(None)
        env, self.envelope = self.envelope, None
        assert env is not None
        result = guard(self.factory.faults, self, END_OF_DATA, [r.address for r in env.recipients],
                       lambda: self.end_of_message(env, message, reader.error), smtp_reply)
        if result is not None:
            self.wait_for(result)  # later pipelined commands wait for this answer
        return False

    def end_of_message(self, env: Envelope, raw: bytes, error: str | None,
                       form: Callable[[bytes], bytes] = stored_form) -> Deferred | None:
        """The answer to a whole message (DATA's or BDAT's, with its C{form} maker)."""
        if error == SIZE:
            return self.reply(552, "5.3.4", "Message size exceeds fixed limit")
        if error == LINE:
            return self.reply(500, "5.5.2", "Line too long (RFC 5321 4.5.3.1.6)")
        if error == BARE:  # see smtp_data: never stored, never relayed
            return self.reply(554, "5.5.2", "Bare CR or LF in message, see RFC 5321 2.3.8")
        if len(raw) <= INLINE_STORED_FORM:
            return self._accept(env, form(raw))
        return self.factory.blocking.run(form, raw).addCallback(
            lambda body: self._accept(env, body))

    def _accept(self, env: Envelope, body: bytes) -> Deferred | None:
        """Deliver the message in its stored form (after the submission checks)."""
        if self._submitting():
            try:
                body = self._submission_headers(body)
            except Refusal as e:
                return self.reply(e.code, e.status, e.text)
        mailboxes = tuple(dict.fromkeys(m for r in env.recipients for m in r.mailboxes))
        remote = tuple(dict.fromkeys(a for r in env.recipients for a in r.remote))
        mail_auth = self.factory.mail_auth
        if mail_auth is not None:  # DKIM signing; inbound SPF, DKIM, DMARC (mailauth/)
            d = mail_auth.check(user=self.user, submitting=self._submitting(), peer=self.peer_host,
                                  helo=self.helo, sender=env.sender, body=body)
            return d.addCallback(lambda out: self._deliver(env, out, mailboxes, remote)
                                 if isinstance(out, bytes) else self.reply(*out))
        return self._deliver(env, body, mailboxes, remote)

    def _submitting(self) -> bool:
        """An authenticated client in site mode: message submission (RFC 6409)."""
        return self.user is not None and not self.factory.config.test_host

    def _submission_headers(self, body: bytes) -> bytes:
        """The message as submitted by C{self.user} (L{headercheck.submission})."""
        f = self.factory
        user = self.user
        assert user is not None
        return submission(body, user, lambda address: f.router.owns(user, address),
                          f.config.hostname, f.clock.seconds())

    def _deliver(self, env: Envelope, body: bytes, mailboxes: tuple[str, ...],
                 remote: tuple[str, ...]) -> Deferred:
        f = self.factory
        if f.quota is not None and mailboxes and not remote and f.quota.any_limited(mailboxes):
            return data_refusal(f.quota, f.blocking, mailboxes, body).addCallback(
                lambda refusal: self.reply(*refusal) if refusal else self._store(env, body, mailboxes, remote))
        return self._store(env, body, mailboxes, remote)

    def _store(self, env: Envelope, body: bytes, mailboxes: tuple[str, ...],
               remote: tuple[str, ...]) -> Deferred:
        f = self.factory
        request = env.request()
        d = f.delivery.deliver(env.sender, mailboxes, remote, self.received_header(env) + body,
                               request=request)

        def ok(queue_id: str) -> None:
            self._commands = 0
            if mailboxes and request.recipients:  # NOTIFY=SUCCESS: "delivered" notices, in the background
                ensureDeferred(f.delivered_notices(queue_id.split(",")[0], env.sender, mailboxes,
                                                   request, body))
            self.reply(250, "2.0.0", f"Ok: queued as {queue_id.split(',')[0]}")

        def failed(reason: Any) -> None:
            if not reason.check(DeliveryError):
                self.log.failure("smtp: delivery failed", reason)
            else:
                self.log.error("smtp: delivery failed: {error}", error=reason.value)
            self.reply(451, "4.3.0", "Requested action aborted: local error in processing")

        # The message's one log line (its client's address included): the log's cost per message.
        d = logged(d, sender=env.sender, mailboxes=mailboxes, remote=remote, size=len(body),
                   clock=f.clock, client=self.peer_host or None)
        return d.addCallbacks(ok, failed)

    def received_header(self, env: Envelope) -> bytes:
        f = self.factory
        # RFC 6531 3.7.3: UTF8SMTP[S][A] for a transaction with SMTPUTF8.
        protocol = "UTF8SMTP" if env.options.smtputf8 else "ESMTP" if self.esmtp else "SMTP"
        return received(self.helo or "", self.peer_host, f.config.hostname,
                        protocol + ("S" if self.secure else "") + ("A" if self.user else ""),
                        [r.address for r in env.recipients], f.header_date(f.clock.seconds()))


class SMTPFactory(SessionFactory):
    """
    Builds SMTP sessions for one kind of listener, holding everything they
    ask for policy and storage. C{protocol_name} is C{"smtp"} (port 25) or
    C{"submission"}; submission sessions must authenticate before MAIL.
    """

    protocol = SMTPServer

    def __init__(self, *, router: Router, delivery: Delivery, freeze: FreezeStore, blocking: Workers,
                 protocol_name: str = "smtp", require_auth: bool = False, mail_auth: Any = None,
                 quota: QuotaService | None = None, **services: Any) -> None:
        super().__init__(**services)
        self.quota = quota
        self.mail_auth = mail_auth
        self.router = router
        self.delivery = delivery
        self.blocking = blocking
        self.freeze = freeze
        self.protocol_name = protocol_name
        self.require_auth = require_auth
        self.header_date = HeaderDate()
        self.notices: Notices | None = None

    async def delivered_notices(self, queue_id: str, sender: str, mailboxes: tuple[str, ...],
                                request: Any, message: bytes) -> None:
        """L{Notices.delivered}, the DSN modules imported on the first notice asked for."""
        if self.notices is None:
            # Most servers (every test host of the pytest plugin) never see
            # NOTIFY=SUCCESS: the DSN, spool and notice modules wait for the
            # first, and are imported in a worker thread, not the reactor's.
            module = await self.blocking.run(importlib.import_module,
                                             "twisted_mail_screen.relay.notices")
            if self.notices is None:
                self.notices = module.Notices(self.config.hostname, None, self.router,
                                              self.delivery.deliver, self.clock,
                                              Logger(namespace="smtp"))
        await self.notices.delivered(queue_id, sender, mailboxes, request, message)
