# -*- test-case-name: tests.test_inbound_auth -*-
"""
Inbound message authentication (docs/mailauth.md): for mail from an
unauthenticated client, SPF (pyspf) for the envelope sender (the HELO name
for a null sender), every DKIM signature (dkimpy), and DMARC for the From
domain with alignment; the results go into one C{Authentication-Results:}
header named by our hostname, after any such header claiming our name
that came with the message is removed. The policy: a DNS failure that
leaves SPF or DMARC undecided is a 451 4.7.0; a DMARC failure under
C{p=reject} is refused (550 5.7.1) when C{dmarc_reject} says so, and
otherwise, like C{p=quarantine}, marked with a quarantine header.

Everything here runs in a worker thread: every library call may block on DNS.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import authres
import authres.dmarc
import dkim
import dkim.util
import spf
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from twisted_mail_screen.mailauth.config import MailAuthConfig
from twisted_mail_screen.mailauth.dmarc import RecordError, aligned, find_record
from twisted_mail_screen.mailauth.dnsquery import DNSTemporary, Lookup
from twisted_mail_screen.mailauth.sign import from_domain
from twisted_mail_screen.runtime.workers import Workers

#: Added when DMARC fails under p=quarantine (or p=reject, not refused):
#: a mail client or filter can file the message into Junk.
QUARANTINE_HEADER = "X-Mailscreen-Quarantine"
_AR = re.compile(rb"^authentication-results[ \t]*:", re.I)


@dataclass
class Results:
    spf: str = "none"
    spf_comment: str = ""
    dkim: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    dmarc: str = "none"
    dmarc_domain: str | None = None
    policy: str | None = None
    dmarc_comment: str = ""


class Inbound:
    log = Logger()

    def __init__(self, config: MailAuthConfig, hostname: str, pool: Workers,
                 lookup: Lookup | None = None, rule: Any = None) -> None:
        self._config = config
        self._rule = rule  # screenrule.AuthFailureRule, or None
        self._hostname = hostname
        self._pool = pool
        self._lookup = lookup or Lookup(config.servers, config.dns_timeout)

    def check(self, *, peer: str | None, helo: str | None, sender: str,
              body: bytes) -> "Deferred[Any]":
        def counted(result: tuple[Any, bool]) -> Any:
            outcome, hard_failure = result
            if hard_failure and self._rule is not None:
                self._rule.failed(peer)  # here, on the reactor thread
            return outcome

        return self._pool.run(self.evaluate, peer, helo or "", sender, body).addCallback(counted)

    def evaluate(self, peer: str | None, helo: str, sender: str, body: bytes) -> tuple[Any, bool]:
        """
        In a worker thread: the message to deliver, or a refusal (code,
        status, text); and whether SPF or DMARC failed outright.
        """
        r = Results()
        with self._lookup.active():
            r.spf, r.spf_comment = self._spf(peer, helo, sender)
        r.dkim = self._dkim(body)
        self._dmarc(r, body, sender or helo)
        action = self._action(r)
        self.log.info("mailauth: {peer} from=<{sender}> spf={spf} dkim={dkim} dmarc={dmarc} "
                      "action={action}", peer=peer or "-", sender=sender, spf=r.spf,
                      dkim=",".join(result for result, _ in r.dkim) or "none", dmarc=r.dmarc,
                      action=action if isinstance(action, str) else action[0])
        hard_failure = "fail" in (r.spf, r.dmarc)
        if isinstance(action, tuple):
            return action, hard_failure
        extra = self._header(r, sender, helo)
        if action == "quarantine":
            extra += (f"{QUARANTINE_HEADER}: DMARC policy {r.policy} of {r.dmarc_domain}\n").encode()
        return extra + strip_ours(body, self._hostname), hard_failure

    def _spf(self, peer: str | None, helo: str, sender: str) -> tuple[str, str]:
        if not peer:
            return "none", "no client address"
        try:
            result, explanation = spf.check2(i=peer, s=sender, h=helo or "unknown",
                                             timeout=self._lookup.timeout)
        except Exception as e:  # pyspf on malformed input (a bad HELO or sender)
            return "permerror", str(e)
        return result.lower(), explanation

    def _dkim(self, message: bytes) -> list[tuple[str, dict[str, str]]]:
        try:
            verifier = dkim.DKIM(message)
        except Exception:  # a header block dkimpy cannot parse: no signature to speak of
            return []
        signatures = [v for name, v in verifier.headers if name.lower() == b"dkim-signature"]
        out = []
        for idx, value in enumerate(signatures):
            try:
                tags = {k.decode(): v.decode("ascii", "replace")
                        for k, v in dkim.util.parse_tag_value(value).items()}
            except Exception:
                out.append(("permerror", {}))
                continue
            tags = {k: re.sub(r"\s+", "", v) for k, v in tags.items()}
            missing: list[Any] = []

            def dnsfunc(name: Any, timeout: float = 5) -> bytes | None:
                key = self._lookup.dkim_key(name, timeout)
                if key is None:
                    missing.append(name)
                return key

            try:
                ok = verifier.verify(idx=idx, dnsfunc=dnsfunc)
            except DNSTemporary:
                out.append(("temperror", tags))
                continue
            except Exception:  # dkimpy on hostile input (bad base64, odd tags): not verified
                ok = False
            out.append(("pass" if ok else "permerror" if missing else "fail", tags))
        return out

    def _dmarc(self, r: Results, body: bytes, spf_identity: str) -> None:
        domain = from_domain(body)
        if domain is None:
            r.dmarc_comment = "no single From domain"
            return
        r.dmarc_domain = domain
        try:
            record = find_record(self._lookup, domain)
        except DNSTemporary as e:
            r.dmarc, r.dmarc_comment = "temperror", str(e)
            return
        except RecordError as e:
            r.dmarc, r.dmarc_comment = "permerror", str(e)
            return
        if record is None:
            return
        r.policy = record.policy
        spf_domain = spf_identity.rpartition("@")[2]
        dkim_domains = [(result, tags.get("d", "")) for result, tags in r.dkim]
        if (r.spf == "pass" and spf_domain and aligned(spf_domain, domain, record.aspf)) or any(
                result == "pass" and aligned(d, domain, record.adkim) for result, d in dkim_domains):
            r.dmarc = "pass"
        elif r.spf == "temperror" or any(result == "temperror" and aligned(d, domain, record.adkim)
                                         for result, d in dkim_domains):
            r.dmarc, r.dmarc_comment = "temperror", "an aligned check failed for now"
        else:
            r.dmarc = "fail"

    def _action(self, r: Results) -> str | tuple[int, str, str]:
        if "temperror" in (r.spf, r.dmarc):
            return (451, "4.7.0", "Temporary DNS failure checking the sender (SPF/DMARC); "
                                  "try again later")
        if r.dmarc == "fail" and r.policy == "reject" and self._config.dmarc_reject:
            return (550, "5.7.1", f"Message refused: {r.dmarc_domain} publishes a DMARC reject "
                                  f"policy and neither SPF nor DKIM passed for it")
        if r.dmarc == "fail" and r.policy in ("quarantine", "reject"):
            return "quarantine"
        return "deliver"

    def _header(self, r: Results, sender: str, helo: str) -> bytes:
        results: list[Any] = [authres.SPFAuthenticationResult(
            result=r.spf, result_comment=_comment(r.spf_comment),
            smtp_mailfrom=sender or None, smtp_helo=helo or None)]
        for result, tags in r.dkim or [("none", {})]:
            results.append(authres.DKIMAuthenticationResult(
                result=result, header_d=tags.get("d"), header_s=tags.get("s"),
                header_a=tags.get("a")))
        results.append(authres.dmarc.DMARCAuthenticationResult(
            result=r.dmarc, result_comment=_comment(r.dmarc_comment),
            header_from=r.dmarc_domain, policy=r.policy))
        text = str(authres.AuthenticationResultsHeader(authserv_id=self._hostname, results=results))
        return text.replace("; ", ";\n\t").encode("utf-8", "replace") + b"\n"


def _comment(text: str) -> str | None:
    """A result comment: without parentheses (they would end it), at most 100 characters."""
    text = re.sub(r"[()\\\r\n]", " ", text).strip()
    return text[:100] or None


def strip_ours(message: bytes, hostname: str) -> bytes:
    """
    C{message} without the Authentication-Results headers that claim to be
    ours (RFC 8601 5: a sender could forge our verdict).
    """
    head, sep, rest = message.partition(b"\n\n")
    if not sep:
        head, rest = message, b""
    fields: list[list[bytes]] = []
    for line in head.split(b"\n"):
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1].append(line)
        else:
            fields.append([line])
    ours = hostname.lower()
    kept = [f for f in fields if not (_AR.match(f[0]) and _authserv_id(b"".join(f)) == ours)]
    return b"\n".join(line for f in kept for line in f) + sep + rest


def _authserv_id(field: bytes) -> str:
    """The authserv-id of an Authentication-Results field (its folded lines joined)."""
    value = re.sub(rb"\([^)]*\)", b"", field.split(b":", 1)[1])  # comments may stand before it
    return value.split(b";", 1)[0].strip().decode("ascii", "replace").lower()
