"""
COMPRESS=DEFLATE (RFC 4978) over real sockets: imaplib with a deflate
layer (tests/deflate_client.py) on plain, STARTTLS and implicit TLS
sessions; the RFC's rules (after login only, COMPRESSIONACTIVE); and the
bounds: a decompression bomb neither grows memory nor holds the reactor,
and a large FETCH is deflated a slice per reactor turn.
"""

from __future__ import annotations

import hashlib
import os
import resource
import ssl
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from tests.deflate_client import DeflateIMAP4, DeflateIMAP4_SSL
from tests.test_imap import Raw
from tests.test_reactor_budget import LIMIT, Probe
from twisted_mail_screen.testing import EPHEMERAL

KINDS = ("smtp", "imap")
IMPLICIT = "ssl:0:interface=127.0.0.1"
MESSAGE = (b"From: a@example.org\r\nTo: bob@localhost\r\nSubject: compressed\r\n\r\n"
           + b"line of text that compresses well\r\n" * 2000)


@pytest.fixture
def server(start_server):
    return start_server(kinds=KINDS)


def exercise(m) -> None:
    """A session's usual work, all of it through the deflate layer."""
    assert m.compress()[0] == "OK"
    assert m.select("INBOX")[0] == "OK"
    assert m.append("INBOX", None, None, MESSAGE)[0] == "OK"
    typ, data = m.fetch("1", "(BODY.PEEK[])")
    assert typ == "OK" and data[0][1] == MESSAGE
    assert m.search(None, "SUBJECT", "compressed") == ("OK", [b"1"])
    assert m.wire_in < len(MESSAGE) // 10  # it really came deflated
    assert m._simple_command("COMPRESS", "DEFLATE")[0] == "NO"  # COMPRESSIONACTIVE
    m.noop()
    assert m.logout()[0] == "BYE"


def test_announced_after_login_only(server):
    m = DeflateIMAP4("127.0.0.1", server.port("imap"))
    assert "COMPRESS=DEFLATE" not in m.capabilities
    r = Raw(server.port("imap"))
    assert r.command(b"a1", b"COMPRESS DEFLATE")[-1] == b"a1 BAD COMPRESS not allowed now"
    r.close()
    m.login("bob@localhost", "x")
    assert b"COMPRESS=DEFLATE" in m.capability()[1][0].split()
    m.logout()


def logged_in(server) -> DeflateIMAP4:
    m = DeflateIMAP4("127.0.0.1", server.port("imap"))
    m.login("bob@localhost", "x")
    return m


def test_plain_session_compressed(server):
    exercise(logged_in(server))


def test_second_compress_and_bad_mechanism(server):
    r = Raw(server.port("imap"))
    r.command(b"l", b"LOGIN bob@localhost x")
    assert r.command(b"a", b"COMPRESS FOO")[-1].startswith(b"a BAD Unknown compression mechanism")
    assert r.command(b"b", b"COMPRESS")[-1].startswith(b"b BAD")
    assert r.command(b"c", b"COMPRESS DEFLATE") == [b"c OK DEFLATE active"]
    z, inflate = zlib.compressobj(6, zlib.DEFLATED, -15), zlib.decompressobj(-15)
    r.send(z.compress(b"d COMPRESS DEFLATE\r\n") + z.flush(zlib.Z_SYNC_FLUSH))
    got = b""
    while not got.endswith(b"\r\n"):
        got += inflate.decompress(r.sock.recv(4096))
    assert got == b"d NO [COMPRESSIONACTIVE] DEFLATE is active already\r\n"
    r.close()


@pytest.mark.parametrize("mode", ["starttls", "implicit"])
def test_compressed_inside_tls(start_server, certificate, mode):
    cert, key = certificate
    server = start_server(kinds=KINDS, tls__certificate=cert, tls__key=key, 
                          listen__imap=[EPHEMERAL, IMPLICIT])
    ctx = ssl.create_default_context(cafile=cert)
    ctx.check_hostname = False
    plain, implicit = server.service.ports("imap")
    if mode == "implicit":
        m = DeflateIMAP4_SSL("127.0.0.1", implicit, ssl_context=ctx)
    else:
        m = DeflateIMAP4("127.0.0.1", plain)
        m.starttls(ssl_context=ctx)
    m.login("bob@localhost", "x")
    exercise(m)


def test_commands_pipelined_behind_compress(server):
    """Input sent right after COMPRESS, before its OK, is already deflated: it is read as such."""
    r = Raw(server.port("imap"))
    r.command(b"l", b"LOGIN bob@localhost x")
    z = zlib.compressobj(6, zlib.DEFLATED, -15)
    r.send(b"c COMPRESS DEFLATE\r\n" + z.compress(b"n NOOP\r\n") + z.flush(zlib.Z_SYNC_FLUSH))
    assert r.line() == b"c OK DEFLATE active"
    inflate = zlib.decompressobj(-15)
    got = inflate.decompress(r.buf)  # what followed the OK in the same read
    while b"n OK" not in got:
        got += inflate.decompress(r.sock.recv(4096))
    assert got == b"n OK NOOP completed\r\n"
    r.close()


def test_corrupt_stream_ends_session_with_bye(server):
    r = Raw(server.port("imap"))
    r.command(b"l", b"LOGIN bob@localhost x")
    assert r.command(b"c", b"COMPRESS DEFLATE") == [b"c OK DEFLATE active"]
    r.send(b"\xff" * 64)  # not a deflate block
    data = r.buf
    while True:
        chunk = r.sock.recv(4096)
        if not chunk:
            break
        data += chunk
    assert zlib.decompressobj(-15).decompress(data).startswith(b"* BYE ")
    r.close()


def test_decompression_bomb_bounded(server):
    """
    256 MiB of one line, deflated to a quarter of a megabyte: the session
    discards it as too long a line, a slice at a time, and answers the next
    command; memory does not grow by the bomb and another session's NOOPs
    keep their answer time.
    """
    port = server.port("imap")
    r = Raw(port)
    r.command(b"l", b"LOGIN bob@localhost x")
    assert r.command(b"c", b"COMPRESS DEFLATE") == [b"c OK DEFLATE active"]
    z = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = b"a" * (1 << 20)
    bomb = b"".join(z.compress(block) for _ in range(256)) + z.compress(b"\r\nn NOOP\r\n") \
        + z.flush(zlib.Z_SYNC_FLUSH)
    assert len(bomb) < 1 << 20
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    probe = Probe(port)
    probe.start()
    r.send(bomb)
    inflate = zlib.decompressobj(-15)
    got = b""
    r.sock.settimeout(60)
    while b"n OK" not in got:
        got += inflate.decompress(r.sock.recv(4096))
    probe.stop.set()
    probe.join()
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert got == b"* BAD Command line too long\r\nn OK NOOP completed\r\n"
    assert grown_mib < 64, grown_mib
    assert probe.error is None and probe.count > 5
    assert probe.worst < LIMIT, probe.worst
    r.close()


FETCHER = """
import hashlib, sys
from tests.deflate_client import DeflateIMAP4
m = DeflateIMAP4("127.0.0.1", int(sys.argv[1]))
m.login("bob@localhost", "x")
assert m.compress()[0] == "OK"
m.select("INBOX")
typ, data = m.fetch("1", "(BODY.PEEK[])")
print(hashlib.sha256(data[0][1]).hexdigest(), m.wire_in)
m.logout()
"""


def test_large_fetch_deflated_in_slices(server):
    """
    A 20 MB body of hex text, fetched compressed by a client in its own
    process (so only the server shares this process's GIL with the probe):
    another session's NOOPs stay quick.
    """
    body = os.urandom(15 * 1024 * 1024).hex().encode()[:20 * 1024 * 1024]
    lines = b"\r\n".join(body[i:i + 76] for i in range(0, len(body), 76))
    message = b"Subject: big\r\n\r\n" + lines + b"\r\n"
    m = logged_in(server)
    m.append("INBOX", None, None, message)
    m.logout()
    probe = Probe(server.port("imap"))
    probe.start()
    done = subprocess.run([sys.executable, "-c", FETCHER, str(server.port("imap"))], capture_output=True,
                          text=True, timeout=120, cwd=Path(__file__).parent.parent)
    probe.stop.set()
    probe.join()
    assert done.returncode == 0, done.stderr
    digest, wire = done.stdout.split()
    assert digest == hashlib.sha256(message).hexdigest()
    assert int(wire) < len(message) * 0.7  # deflated (hex text: about 58%)
    assert probe.error is None and probe.worst < LIMIT, probe.worst
