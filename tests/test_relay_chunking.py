"""
The relay sends BDAT (RFC 3030) to a next hop that offers CHUNKING: the
chunks as made from the stored message, and a whole relay through our own
server's BDAT (with its DATA refused, so only BDAT can carry the message).
"""

from __future__ import annotations

import random
import smtplib

import pytest
from relay_sink import make_ca_and_leaf, wait_for
from twisted_mail_screen.protocols.pop3_wire import to_wire as stuffed
from twisted_mail_screen.relay.client import bdat_chunks
from twisted_mail_screen.testing import in_reactor


def unstuffed(message: bytes) -> bytes:
    """What DATA carries, without its dot-stuffing and final dot: the CHUNKING content."""
    wire = stuffed(message)
    return (wire[1:] if wire.startswith(b"..") else wire).replace(b"\r\n..", b"\r\n.")


def test_chunks_join_to_the_crlf_message_without_dot_stuffing():
    rng = random.Random(7)
    samples = [b"", b"x", b".\n", b"a\nb", b"a\r\nb\r\n", b"\r\n\r\n.\r\n", b"Subject: s\n\n.dot\n..two\n"]
    samples += [bytes(rng.choice(b"ab.\n\r") for _ in range(rng.randrange(1, 300))) for _ in range(300)]
    for message in samples:
        if b"\r" in message.replace(b"\r\n", b""):
            continue  # a bare CR is no stored line end: not this function's input
        for size in (1, 2, 3, 7, 64, 1 << 20):
            pieces = list(bdat_chunks(message, size))
            assert b"".join(pieces) == unstuffed(message), (message, size)
            assert all(b"\r\r" not in p for p in pieces)
            assert len(pieces) == max(1, -(-len(message) // size)) or b"\r" in message


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "starttls"])
def test_relay_to_our_own_server_goes_by_bdat_octet_for_octet(start_server, accounts, tmp_path, tls):
    """
    The next hop is a second server of ours (it offers CHUNKING), told to
    refuse DATA: the message arrives through BDAT, in several chunks, dots
    at line starts left as they are, the body unchanged; in the clear, and
    inside STARTTLS verified against a test CA, as relays to a real MX go.
    """
    tls_hop: dict[str, str] = {}
    tls_relay: dict[str, str] = {"relay__starttls": "none"}
    if tls:
        (tmp_path / "pki").mkdir()
        pki = make_ca_and_leaf(tmp_path / "pki", ("mail.example.test",))
        tls_hop = {"tls__certificate": pki["cert"], "tls__key": pki["key"]}
        tls_relay = {"relay__starttls": "required", "relay__tls_hostname": "mail.example.test",
                     "relay__ca_file": pki["ca"]}
    nexthop = start_server(kinds=("smtp",), data_dir=str(tmp_path / "nexthop"), **tls_hop)
    in_reactor(nexthop.service.faults.tempfail, "DATA", None, "451 4.3.0 DATA refused (test)", None)
    sender = start_server(site=True, kinds=("smtp", "submission"),
                          relay__smarthost=f"tcp:host=127.0.0.1:port={nexthop.port('smtp')}",
                          **tls_relay)
    body = b"".join(b".line %d starts with a dot\r\n..and two\r\nplain %d\r\n" % (i, i) for i in range(40000))
    message = b"From: alice@example.test\r\nSubject: chunked\r\n\r\n" + body
    assert len(message) > 2 * (1 << 20)  # three chunks at least
    client = smtplib.SMTP("127.0.0.1", sender.port("submission"), timeout=30)
    client.ehlo("client.example")
    client.login("alice@example.test", "alice-secret")
    assert client.sendmail("alice@example.test", ["carol@remote.example"], message) == {}
    client.quit()
    box = tmp_path / "nexthop" / "mail" / "remote.example" / "carol"
    wait_for(lambda: any((box / d).exists() and any((box / d).iterdir()) for d in ("new", "cur")), 30,
             "the message reaches the next hop")
    stored = next(p for d in ("new", "cur") for p in (box / d).iterdir()).read_bytes()
    assert stored.endswith(body.replace(b"\r\n", b"\n"))
    assert b"\nSubject: chunked\n" in stored
    assert (b" with ESMTPS" in stored) == tls
