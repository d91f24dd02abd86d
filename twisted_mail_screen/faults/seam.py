# -*- test-case-name: tests.test_faults -*-
"""
Where a session asks the fault plan: L{guard} wraps one command's
handler, and the dialects turn an injected reply into each protocol's own
answer. A session without a plan (site mode) runs the handler directly.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Iterable, Protocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater

from twisted_mail_screen.faults.plan import Decision, FaultPlan
from twisted_mail_screen.store.auth import SASLError, decode_base64, parse_sasl_plain

#: The SMTP code and enhanced status code POP3 and IMAP replies leave out.
_SMTP_CODES = re.compile(r"[2-5][0-9]{2}(?: [245]\.[0-9]{1,3}\.[0-9]{1,3})? ?")
_PATH = re.compile(r"^(?:FROM|TO):\s*<?([^<>\s]*)>?", re.IGNORECASE)


class Session(Protocol):
    clock: IReactorTime

    @property
    def closing(self) -> bool: ...

    def send(self, data: bytes) -> None: ...

    def close(self) -> None: ...


#: Renders an injected reply (SMTP text) and whether it is temporary as wire bytes.
Render = Callable[[str, bool], bytes]


def guard(plan: FaultPlan | None, session: Session, command: str,
          subjects: str | Iterable[str], proceed: Callable[[], Deferred | None],
          render: Render) -> Deferred | None:
    """
    Run C{proceed} (the command's handler) as the plan says: after a delay
    on the session's clock, replaced by an injected reply, and followed by
    a close. The result is C{proceed}'s, so the session's in-order command
    loop waits for a delayed or pending answer as for any other.
    """
    if plan is None:
        return proceed()
    decision = plan.take(command, subjects)
    if decision is None:
        return proceed()
    if decision.delay > 0:
        return deferLater(session.clock, decision.delay, _act, decision, session, proceed, render)
    return _act(decision, session, proceed, render)


def _act(decision: Decision, session: Session, proceed: Callable[[], Deferred | None],
         render: Render) -> Deferred | None:
    if session.closing:  # the client left while the reply was held
        return None
    result = proceed() if decision.reply is None else \
        session.send(render(decision.reply, decision.temporary))
    if not decision.disconnect:
        return result
    if isinstance(result, Deferred):
        return result.addCallback(lambda _: session.close())
    session.close()
    return None


def smtp_reply(reply: str, temporary: bool) -> bytes:
    return reply.encode("utf-8") + b"\r\n"


def pop3_reply(reply: str, temporary: bool) -> bytes:
    text = _SMTP_CODES.sub("", reply, count=1) or "Failed"
    return f"-ERR {'[SYS/TEMP] ' if temporary else ''}{text}\r\n".encode("utf-8")


def imap_reply(tag: bytes) -> Render:
    def render(reply: str, temporary: bool) -> bytes:
        text = _SMTP_CODES.sub("", reply, count=1) or "Failed"
        return tag + f" NO {'[UNAVAILABLE] ' if temporary else ''}{text}\r\n".encode("utf-8")
    return render


def smtp_subject(verb: str, arg: str) -> str:
    """
    What a rule's C{match} is compared with: the address of MAIL/RCPT, the
    user of AUTH when its initial response names one, else the argument.
    """
    if verb in ("MAIL", "RCPT"):
        found = _PATH.match(arg)
        return found.group(1) if found else arg
    if verb == "AUTH":
        return _sasl_user(arg)
    return arg


def _sasl_user(arg: str) -> str:
    """
    The user in C{AUTH PLAIN <initial>} or C{AUTH LOGIN <initial>}, read
    as the session reads it; C{""} if none.
    """
    mechanism, _, initial = arg.partition(" ")
    mechanism = mechanism.upper()
    try:
        decoded = decode_base64(initial.strip())
        if mechanism == "PLAIN":
            return parse_sasl_plain(decoded)[0]
    except SASLError:
        return ""
    return decoded.decode("utf-8", "replace") if mechanism == "LOGIN" else ""


def imap_subject(name: str, args: list[Any]) -> str:
    """
    The user of LOGIN, or of AUTHENTICATE with an initial response (RFC
    4959); else the first argument, as text.
    """
    if name == "AUTHENTICATE":
        return _sasl_user(" ".join(str(a) for a in args))
    if not args:
        return ""
    value = args[0]
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)
