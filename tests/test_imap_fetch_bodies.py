"""
FETCH of whole bodies, checked octet for octet over a real socket: the
literal framing (length, CRLF, octets) of BODY[], BODY.PEEK[] and RFC822,
for LF and CRLF files, and of many messages in one response (chunks joined
once each).
"""

from __future__ import annotations

import os

import pytest

from tests.test_imap import Raw
from tests.test_reactor_budget import ALICE, mailbox


@pytest.fixture
def site(start_server, accounts, tmp_path):
    return start_server(site=True, kinds=("smtp", "pop3", "imap"))


def test_fetch_whole_bodies_exact_octets(site, tmp_path):
    box = mailbox(tmp_path, ALICE[0])
    for sub in ("cur", "new", "tmp"):
        os.makedirs(box / sub, exist_ok=True)
    bodies = []
    for i in range(450):  # more than one chunk of rows
        lf = b"Subject: m%d\nFrom: a@example.org\n\nline one %d\nline two\n" % (i, i)
        data = lf if i % 2 else lf.replace(b"\n", b"\r\n")  # LF and CRLF files
        (box / "cur" / f"{1600000000 + i}.M{i}P1Q1.host,S={len(data)}:2,S").write_bytes(data)
        bodies.append(lf.replace(b"\n", b"\r\n"))
    r = Raw(site.port("imap"))
    r.command(b"l", f"LOGIN {ALICE[0]} {ALICE[1]}".encode())
    r.command(b"s", b"SELECT INBOX")
    got = b"\r\n".join(r.command(b"f", b"FETCH 1:* (UID BODY.PEEK[] RFC822)")) + b"\r\n"
    expected = b"".join(b"* %d FETCH (UID %d BODY[] {%d}\r\n%s RFC822 {%d}\r\n%s FLAGS (\\Seen))\r\n"
                        % (n, n, len(b), b, len(b), b) for n, b in enumerate(bodies, 1))
    assert got == expected + b"f OK FETCH completed\r\n"
    got = b"\r\n".join(r.command(b"g", b"FETCH 3 (BODY[])")) + b"\r\n"
    assert got == (b"* 3 FETCH (BODY[] {%d}\r\n%s FLAGS (\\Seen))\r\n" % (len(bodies[2]), bodies[2])
                   + b"g OK FETCH completed\r\n")
    r.close()
