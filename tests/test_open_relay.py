"""
Open-relay probes: every SMTP listener is tried with the standard relay
tricks; all are refused unless the client has authenticated.
"""

from __future__ import annotations

import base64
import socket

import pytest

FOREIGN_TRICKS = [
    "<victim@foreign.example>",
    "<victim%foreign.example@example.test>",
    "<victim%foreign.example@[127.0.0.1]>",
    "<@example.test:victim@foreign.example>",
    "<@example.test,@mail.example.test:victim@foreign.example>",
    '<"victim@foreign.example">',
    '<"victim@foreign.example"@example.test>',
    '<"victim%foreign.example"@example.test>',
    "<victim@foreign.example@example.test>",
    "<foreign.example!victim@example.test>",
    "<foreign.example!victim>",
    "<victim@foreign.example.>",
    "<victim@example.test.foreign.example>",
    "<victim@[192.0.2.1]>",
    "<victim@[IPv6:2001:db8::1]>",
    "<victim@localhost>",
    "<VICTIM@FOREIGN.EXAMPLE>",
    "Alice <victim@foreign.example>",
    '"alice@example.test" <victim@foreign.example>',
    "<alice@example.test> <victim@foreign.example>",
    "victim@foreign.example",
    "<victim@foreign.example> NOTIFY=NEVER",
    "<victim@foreign\x2eexample>",
    "<victim@foreign.example\\@example.test>",
    "<victim\\@foreign.example@example.test>",
]


def session(port: int, lines: list[bytes]) -> list[bytes]:
    """Send each line in lock step; the final reply line of each."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        f = s.makefile("rb")

        def reply() -> bytes:
            while True:
                line = f.readline()
                if not line or line[3:4] != b"-":
                    return line.rstrip(b"\r\n")

        out = [reply()]
        for line in lines:
            s.sendall(line + b"\r\n")
            out.append(reply())
            if out[-1][:3] in (b"421", b"221") or not out[-1]:
                break
        return out


@pytest.fixture
def site(start_server, accounts):
    return start_server(site=True, relay__smarthost="tcp:host=127.0.0.1:port=9",
                        relay__starttls="none", screening__enabled=False)


@pytest.mark.parametrize("kind", ["smtp", "submission"])
def test_unauthenticated_relay_tricks_are_refused(site, kind):
    accepted = []
    for sender in ("<spammer@foreign.example>", "<alice@example.test>", "<>"):
        for rcpt in FOREIGN_TRICKS:
            replies = session(site.port(kind), [b"EHLO probe.example", f"MAIL FROM:{sender}".encode(),
                                                f"RCPT TO:{rcpt}".encode(), b"DATA"])
            assert replies[0][:3] == b"220"
            rcpt_reply = replies[3] if len(replies) > 3 else b""
            data_reply = replies[4] if len(replies) > 4 else b""
            if rcpt_reply[:1] == b"2" or data_reply[:3] == b"354":
                accepted.append((sender, rcpt, replies))
    assert not accepted, f"{kind} relays: {accepted[:5]}"


def test_authenticated_user_may_relay(site):
    """The same listener does relay once authenticated, so the refusals above mean something."""
    token = base64.b64encode(b"\0alice@example.test\0alice-secret")
    for kind in ("smtp", "submission"):
        replies = session(site.port(kind), [b"EHLO c", b"AUTH PLAIN " + token,
                                            b"MAIL FROM:<alice@example.test>",
                                            b"RCPT TO:<victim@foreign.example>"])
        assert [r[:3] for r in replies[2:]] == [b"235", b"250", b"250"], replies


def test_local_delivery_still_works_unauthenticated(site):
    replies = session(site.port("smtp"), [b"EHLO c", b"MAIL FROM:<x@foreign.example>",
                                          b"RCPT TO:<bob@example.test>"])
    assert replies[-1][:3] == b"250"


# the same probes over TLS: encryption is not authentication

@pytest.fixture
def tls_site(start_server, accounts, certificate):
    cert, key = certificate
    return start_server(site=True, relay__smarthost="tcp:host=127.0.0.1:port=9",
                        relay__starttls="none", screening__enabled=False,
                        tls__certificate=cert, tls__key=key,
                        listen__submission=["tcp:0:interface=127.0.0.1",
                                            f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}"])


def _tls_probe(client) -> list:
    accepted = []
    for sender in ("spammer@foreign.example", "alice@example.test", ""):
        for rcpt in FOREIGN_TRICKS:
            code, _ = client.mail(sender)
            if code == 250:
                rcpt_code, _ = client.docmd(f"RCPT TO:{rcpt}")
                if rcpt_code // 100 == 2:
                    accepted.append((sender, rcpt))
            client.rset()
    return accepted


@pytest.mark.parametrize("listener", ["smtp+starttls", "submission+starttls", "submission-implicit-tls"])
def test_unauthenticated_relay_refused_over_tls(tls_site, listener):
    import smtplib
    import ssl
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    kind = listener.split("+")[0].split("-")[0]
    if listener == "submission-implicit-tls":
        port = tls_site.service.ports("submission")[1]
        client = smtplib.SMTP_SSL("127.0.0.1", port, timeout=10, context=context)
        client.ehlo("probe.example")
    else:
        client = smtplib.SMTP("127.0.0.1", tls_site.port(kind), timeout=10)
        client.ehlo("probe.example")
        client.starttls(context=context)
        client.ehlo("probe.example")
    if kind == "submission":
        assert client.mail("alice@example.test")[0] == 530
        client.rset()
    assert _tls_probe(client) == []
    client.quit()
