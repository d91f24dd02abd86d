"""
TLS certificates reloaded without a restart (runtime/tlsreload.py): when
the [tls] files change, the next check (on the injected clock) loads them
and new STARTTLS and implicit-TLS sessions get the new certificate; a bad
new pair is logged and the old one kept.
"""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import time
from pathlib import Path

import pytest
from twisted.internet.task import Clock

from tests.conftest import log_lines
from test_tls_clients import IMPLICIT, UPGRADE, Session, port
from twisted_mail_screen.runtime.tlsreload import RELOAD_INTERVAL, ReloadingTLS
from twisted_mail_screen.testcert import make_certificate
from twisted_mail_screen.testing import EPHEMERAL, in_reactor


def der(path: str) -> bytes:
    text = Path(path).read_text()
    first = text[:text.index("-----END CERTIFICATE-----") + len("-----END CERTIFICATE-----")]
    return ssl.PEM_cert_to_DER_cert(first)


@pytest.fixture
def pairs(tmp_path):
    """The live [tls] files (a copy of pair one), and pairs one and two."""
    one = make_certificate(str(tmp_path / "one"))
    two = make_certificate(str(tmp_path / "two"))
    live = tmp_path / "live"
    live.mkdir()
    cert, key = str(live / "cert.pem"), str(live / "key.pem")
    shutil.copy(one[0], cert)
    shutil.copy(one[1], key)
    os.chmod(key, 0o600)
    return {"cert": cert, "key": key, "one": one, "two": two}


@pytest.fixture
def server(start_server, pairs):
    clock = Clock()
    return start_server(clock=clock, kinds=("smtp", "pop3"), tls__certificate=pairs["cert"],
                        tls__key=pairs["key"], listen__pop3=[EPHEMERAL, IMPLICIT])


def holder(server) -> ReloadingTLS:
    return next(s for s in server.service if isinstance(s, ReloadingTLS))


def install(source: str, target: str) -> None:
    """Replace C{target} atomically, as a renewal's rename does."""
    tmp = target + ".new"
    shutil.copy(source, tmp)
    os.chmod(tmp, 0o600)
    os.replace(tmp, target)


def wait_for_swap(server, old) -> None:
    """The check the clock started runs in the worker pool: wait for its answer."""
    deadline = time.monotonic() + 10
    while in_reactor(lambda: holder(server).options) is old:
        assert time.monotonic() < deadline, "the new pair was not loaded"
        time.sleep(0.01)


class Unverified(Session):
    """A session that takes whatever certificate it is shown (both pairs name the same host)."""

    def __init__(self, server, kind: str, mode: str) -> None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        sock = socket.create_connection(("127.0.0.1", port(server, kind, mode)), timeout=20)
        if mode == "implicit":
            sock = context.wrap_socket(sock)
        self.sock, self.buf = sock, b""
        self.greeting = self.line()
        if mode == "starttls":
            command, ok = UPGRADE[kind]
            self.send(command)
            self.until(ok)
            self.sock = context.wrap_socket(sock)


def peer(server, kind: str = "smtp", mode: str = "starttls") -> bytes:
    session = Unverified(server, kind, mode)
    try:
        return session.sock.getpeercert(binary_form=True)
    finally:
        session.sock.close()


def test_new_sessions_get_the_renewed_certificate(server, pairs):
    """Files replaced: nothing changes until the check; then new STARTTLS and ssl: sessions see the new pair."""
    assert peer(server) == der(pairs["one"][0])
    running = Unverified(server, "smtp", "starttls")
    old = in_reactor(lambda: holder(server).options)
    install(pairs["two"][1], pairs["key"])
    install(pairs["two"][0], pairs["cert"])
    server.advance(RELOAD_INTERVAL - 1)
    assert peer(server) == der(pairs["one"][0])  # not yet looked at
    with log_lines("tls:") as lines:
        server.advance(1)
        wait_for_swap(server, old)
    assert any("tls: reloaded" in l for l in lines), lines
    assert peer(server) == der(pairs["two"][0])
    assert peer(server, "pop3", "implicit") == der(pairs["two"][0])
    # A session started before the renewal carries on with its own TLS state.
    running.send(b"EHLO c\r\n")
    assert running.until(b"250 ")[-1].startswith(b"250 ")
    running.sock.close()


def test_a_bad_new_pair_is_logged_and_the_old_one_kept(server, pairs):
    """A certificate whose key is not there yet: logged once, old pair kept; the fixed pair is then loaded."""
    old = in_reactor(lambda: holder(server).options)
    install(pairs["two"][0], pairs["cert"])  # the key still belongs to pair one
    with log_lines("tls:") as lines:
        server.advance(RELOAD_INTERVAL)
        deadline = time.monotonic() + 10
        while not lines and time.monotonic() < deadline:
            time.sleep(0.01)
        server.advance(RELOAD_INTERVAL)  # unchanged files: not tried, not logged again
        in_reactor(holder(server).check)
    assert len(lines) == 1 and "cannot reload key" in lines[0] and "keeping the previous" in lines[0], lines
    assert in_reactor(lambda: holder(server).options) is old
    assert peer(server) == der(pairs["one"][0])
    install(pairs["two"][1], pairs["key"])
    server.advance(RELOAD_INTERVAL)
    wait_for_swap(server, old)
    assert peer(server) == der(pairs["two"][0])
