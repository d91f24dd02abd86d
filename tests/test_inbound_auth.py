"""
Inbound SPF, DKIM and DMARC (mailauth/inbound.py) against an in-process
DNS server on loopback (twisted.names, UDP and TCP) that publishes each
sender domain's records: pass, fail, softfail, none, temperror and
permerror each give the right Authentication-Results header, and with
dmarc_reject the right reply; a forged header in our name is removed.
"""

from __future__ import annotations

import smtplib

import dkim
import pytest
from twisted.internet import defer
from twisted.names import common, dns, server as names_server

from conftest import maildir_files
from twisted_mail_screen.mailauth.keys import generate, load
from twisted_mail_screen.testing import in_reactor

HOST = "mail.example.test"
PEM = generate("rsa")
PRIVATE, PUBLIC = load(PEM, "rsa")


def txt(*values: str) -> list:
    out = []
    for value in values:
        raw = value.encode()
        out.append(dns.Record_TXT(*[raw[i:i + 255] for i in range(0, len(raw), 255)], ttl=60))
    return out


RECORDS = {
    "pass.test": txt("v=spf1 ip4:127.0.0.1 -all"),
    "_dmarc.pass.test": txt("v=DMARC1; p=reject"),
    "s1._domainkey.pass.test": txt(f"v=DKIM1; k=rsa; p={PUBLIC}"),
    "fail.test": txt("v=spf1 ip4:192.0.2.1 -all"),
    "_dmarc.fail.test": txt("v=DMARC1; p=reject"),
    "quarantine.test": txt("v=spf1 ip4:192.0.2.1 -all"),
    "_dmarc.quarantine.test": txt("v=DMARC1; p=quarantine"),
    "soft.test": txt("v=spf1 ~all"),
    "_dmarc.soft.test": txt("v=DMARC1; p=none"),
    "none.test": [dns.Record_A("192.0.2.9", ttl=60)],
    "perm.test": txt("v=spf1 ip4:999.0.0.1 -all"),
    "_dmarc.perm.test": txt("v=DMARC1; p=sometimes"),
}
#: Names the server answers SERVFAIL for: a DNS failure.
SERVFAIL = {"tmp.test"}


class Zone(common.ResolverBase):
    """An authoritative answerer for the records above."""

    def _lookup(self, name, cls, type, timeout):
        key = name.decode().lower().rstrip(".")
        if key in SERVFAIL:
            return defer.fail(RuntimeError("the zone's server is broken"))
        if key not in RECORDS:
            return defer.fail(dns.AuthoritativeDomainError(name))
        answers = [dns.RRHeader(name, r.TYPE, dns.IN, 60, r, auth=True)
                   for r in RECORDS[key] if r.TYPE == type]
        return defer.succeed((answers, [], []))


@pytest.fixture(scope="module")
def nameserver():
    def serve():
        from twisted.internet import reactor
        factory = names_server.DNSServerFactory(authorities=[Zone()])
        udp = reactor.listenUDP(0, dns.DNSDatagramProtocol(factory), interface="127.0.0.1")
        tcp = reactor.listenTCP(udp.getHost().port, factory, interface="127.0.0.1")
        return udp, tcp

    udp, tcp = in_reactor(serve)
    yield f"127.0.0.1:{udp.getHost().port}"
    in_reactor(udp.stopListening)
    in_reactor(tcp.stopListening)


@pytest.fixture
def checking(start_server, accounts, nameserver):
    def start(**more):
        return start_server(site=True, mail_auth__enabled=True, mail_auth__nameservers=[nameserver],
                            mail_auth__dns_timeout=3, **more)
    return start


def message(domain: str, sign: bool = False, extra: bytes = b"") -> bytes:
    body = (f"From: someone@{domain}\r\nTo: bob@example.test\r\nSubject: hi\r\n".encode() + extra
            + b"\r\nhello\r\n")
    if sign:
        body = dkim.sign(body, b"s1", domain.encode(), PRIVATE, canonicalize=(b"relaxed", b"relaxed")) + body
    return body


def send(server, domain: str, body: bytes):
    client = smtplib.SMTP("127.0.0.1", server.port("smtp"), timeout=20)
    client.ehlo(f"client.{domain}")
    try:
        client.sendmail(f"someone@{domain}", ["bob@example.test"], body)
    finally:
        client.close()


def stored(tmp_path) -> bytes:
    [path] = maildir_files(tmp_path / "data", "bob@example.test")
    return path.read_bytes()


def results(data: bytes) -> str:
    """Our Authentication-Results header, unfolded (there must be exactly one)."""
    head = data.split(b"\n\n")[0].decode()
    fields = [f for f in head.replace("\n\t", " ").split("\n")
              if f.lower().startswith(f"authentication-results: {HOST};")]
    assert len(fields) == 1, fields
    return fields[0]


@pytest.mark.parametrize("domain, sign, expected", [
    ("pass.test", True, ["spf=pass", "smtp.mailfrom=someone@pass.test", "dkim=pass header.d=pass.test",
                         "header.s=s1", "dmarc=pass header.from=pass.test policy.dmarc=reject"]),
    ("soft.test", False, ["spf=softfail", "dkim=none", "dmarc=fail header.from=soft.test policy.dmarc=none"]),
    ("none.test", False, ["spf=none", "dkim=none", "dmarc=none"]),
    ("perm.test", False, ["spf=permerror", "dmarc=permerror"]),
    ("fail.test", False, ["spf=fail", "dmarc=fail header.from=fail.test policy.dmarc=reject"]),
])
def test_each_result_is_in_one_header(checking, tmp_path, domain, sign, expected):
    server = checking()
    send(server, domain, message(domain, sign))
    data = stored(tmp_path)
    header = results(data)
    assert header.startswith(f"Authentication-Results: {HOST};")
    for words in expected:
        assert words in header, header
    assert (b"X-Mailscreen-Quarantine" in data) == (domain == "fail.test")


def test_a_changed_body_fails_dkim_but_spf_keeps_dmarc(checking, tmp_path):
    server = checking()
    send(server, "pass.test", message("pass.test", sign=True).replace(b"hello", b"hullo"))
    header = results(stored(tmp_path))
    assert "dkim=fail header.d=pass.test" in header and "dmarc=pass" in header


def test_dmarc_reject_refuses_a_failing_message(checking, tmp_path):
    server = checking(mail_auth__dmarc_reject=True)
    with pytest.raises(smtplib.SMTPDataError) as e:
        send(server, "fail.test", message("fail.test"))
    assert e.value.smtp_code == 550 and e.value.smtp_error.startswith(b"5.7.1 ")
    assert b"DMARC" in e.value.smtp_error
    assert maildir_files(tmp_path / "data", "bob@example.test") == []
    # p=quarantine is never refused: marked for the Junk folder.
    send(server, "quarantine.test", message("quarantine.test"))
    assert b"X-Mailscreen-Quarantine: DMARC policy quarantine of quarantine.test" in stored(tmp_path)


def test_a_dns_failure_is_temporary(checking, tmp_path):
    server = checking(mail_auth__dmarc_reject=True)
    with pytest.raises(smtplib.SMTPDataError) as e:
        send(server, "tmp.test", message("tmp.test"))
    assert e.value.smtp_code == 451 and e.value.smtp_error.startswith(b"4.7.0 ")


def test_a_forged_header_in_our_name_is_removed(checking, tmp_path):
    server = checking()
    forged = (f"Authentication-Results: {HOST.upper()};\r\n\tspf=pass smtp.mailfrom=someone@fail.test\r\n"
              "Authentication-Results: mx.elsewhere.test; spf=pass\r\n").encode()
    send(server, "fail.test", message("fail.test", extra=forged))
    data = stored(tmp_path)
    assert "spf=fail" in results(data)
    assert b"mx.elsewhere.test; spf=pass" in data


def test_authenticated_submissions_are_not_checked(checking, tmp_path):
    server = checking()
    client = smtplib.SMTP("127.0.0.1", server.port("submission"), timeout=20)
    client.login("alice@example.test", "alice-secret")
    client.sendmail("alice@example.test", ["bob@example.test"],
                    b"From: alice@example.test\r\nSubject: hi\r\n\r\nhello\r\n")
    client.quit()
    assert b"Authentication-Results" not in stored(tmp_path)


def test_spf_and_dkim_for_another_domain_do_not_align(checking, tmp_path):
    """SPF passes for the envelope's pass.test and DKIM for d=pass.test, but From is fail.test: DMARC fails."""
    server = checking(mail_auth__dmarc_reject=True)
    body = message("fail.test")
    body = dkim.sign(body, b"s1", b"pass.test", PRIVATE, canonicalize=(b"relaxed", b"relaxed")) + body
    client = smtplib.SMTP("127.0.0.1", server.port("smtp"), timeout=20)
    with pytest.raises(smtplib.SMTPDataError) as e:
        client.sendmail("someone@pass.test", ["bob@example.test"], body)
    client.close()
    assert e.value.smtp_code == 550


@pytest.mark.parametrize("garbage", [
    b"DKIM-Signature: v=1; a=rsa-sha256; d=pass.test; s=s1; h=from; bh=!!!; b=%%%\r\n",
    b"DKIM-Signature: this is not a tag list\r\n",
    b"DKIM-Signature: v=1; a=rsa-sha256; d=pass.test; s=nokey; h=from; bh=AAAA; b=AAAA\r\n",
])
def test_hostile_signatures_are_results_not_errors(checking, tmp_path, garbage):
    server = checking()
    send(server, "soft.test", garbage + message("soft.test"))
    header = results(stored(tmp_path))
    assert "dkim=permerror" in header or "dkim=fail" in header, header


def test_repeated_hard_failures_block_the_client(checking, tmp_path):
    """max_failures hard failures (SPF or DMARC fail) in the window block the client: one decision line."""
    from twisted.internet.task import Clock

    from conftest import log_lines
    from test_screening_sockets import refused_reply

    clock = Clock()
    clock.advance(1764645300)
    server = checking(clock=clock, mail_auth__max_failures=2, mail_auth__failure_window_minutes=10)
    with log_lines("screening:") as decisions:
        send(server, "soft.test", message("soft.test"))  # softfail, DMARC p=none fails: counted
        server.advance(11 * 60)  # the first failure leaves the window
        send(server, "none.test", message("none.test"))  # nothing published: not counted
        send(server, "fail.test", message("fail.test"))
        assert decisions == []
        send(server, "fail.test", message("fail.test"))
    assert len(decisions) == 1, decisions
    assert "action=block client=127.0.0.1 rule=mail_auth_failures count=2/2 window=10m" in decisions[0]
    assert refused_reply(server.port("smtp")).startswith(b"421 4.7.0")
