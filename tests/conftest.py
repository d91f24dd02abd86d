"""
Shared fixtures: a real server on loopback ports chosen by the OS, with a
temp-dir data directory, stopped after each test.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
from twisted.logger import formatEvent, globalLogPublisher

from twisted_mail_screen.store.accounts import AccountStore
from twisted_mail_screen.config.settings import load_config
from twisted_mail_screen.testcert import make_certificate
from twisted_mail_screen.testing import RunningServer, ephemeral_overrides, in_reactor

#: The Debian package of each external client tool the tests run.
TOOL_PACKAGES = {"mbsync": "isync", "offlineimap": "offlineimap3", "fetchmail": "fetchmail",
                 "msmtp": "msmtp", "swaks": "swaks", "strace": "strace",
                 "chromium": "chromium", "chromedriver": "chromium-driver",
                 "redis-server": "redis-server", "redis-cli": "redis-tools"}


def require_tool(name: str) -> str:
    """
    The path of the external command C{name}. Where it is missing the test
    is skipped, except under CI (C{MAILSCREEN_REQUIRE_CLIENTS=1}, set by
    .ci/run): there a missing client must not turn its tests into silent
    skips, so it fails.
    """
    path = shutil.which(name)
    if path is None:
        why = f"{name} not installed (Debian package {TOOL_PACKAGES.get(name, name)})"
        if os.environ.get("MAILSCREEN_REQUIRE_CLIENTS"):
            pytest.fail(f"{why}, and MAILSCREEN_REQUIRE_CLIENTS=1 requires it", pytrace=False)
        pytest.skip(why)
    return path


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "tool(name, ...): the test runs these external commands; see require_tool")


def pytest_runtest_setup(item: pytest.Item) -> None:
    for mark in item.iter_markers("tool"):
        for name in mark.args:
            require_tool(name)


SITE = {"mode": "site", "hostname": "mail.example.test", "domains": ["example.test"],
        "postmaster": "postmaster@example.test"}


@pytest.fixture
def start_server(tmp_path: Path) -> Callable[..., RunningServer]:
    """
    C{start_server(site=False, clock=None, kinds=..., **overrides)} starts a
    server whose data lives in C{tmp_path / "data"}; every server started
    is stopped when the test ends.
    """
    started: list[RunningServer] = []

    def start(site: bool = False, clock: Any = None,
              kinds: tuple[str, ...] = ("smtp", "submission", "pop3"), **overrides: Any) -> RunningServer:
        data = str(tmp_path / "data")
        table = dict(SITE) if site else {}
        table.update(ephemeral_overrides(data, kinds))
        table.update({k.replace("__", "."): v for k, v in overrides.items()})
        server = RunningServer(load_config(None, table), clock=clock).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def accounts(tmp_path: Path) -> AccountStore:
    """The account store of the server's data directory, with two users."""
    store = AccountStore(str(tmp_path / "data"))
    os.makedirs(tmp_path / "data", exist_ok=True)
    store.add_user("alice@example.test", "alice-secret")
    store.add_user("bob@example.test", "bob-secret")
    return store


@pytest.fixture(scope="session")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """
    A self-signed certificate and key (PEM paths, key mode 600) for
    'mail.example.test', 'localhost' and 127.0.0.1, so real clients that
    verify it (mbsync, fetchmail, msmtp) can be pointed at it as their CA.
    """
    return make_certificate(str(tmp_path_factory.mktemp("tls")))


def maildir_files(data: Path, address: str) -> list[Path]:
    """Message files of a mailbox's INBOX (new/ and cur/)."""
    local, _, domain = address.partition("@")
    base = data / "mail" / domain / local
    return sorted(p for sub in ("new", "cur") for p in (base / sub).glob("*") if p.is_file())


def queued(tmp_path: Path) -> list[dict]:
    """The envelopes in the outbound queue of the server's data directory."""
    env = tmp_path / "data" / "queue" / "env"
    out = []
    for path in sorted(env.glob("*.json")) if env.exists() else []:
        try:
            out.append(json.loads(path.read_text()))
        except FileNotFoundError:  # delivered meanwhile
            pass
    return out


def queue_settled(server: RunningServer, timeout: float = 10.0) -> None:
    """
    Wait until the outbound queue is idle: the poll that the last clock
    advance started has scanned the queue directory, and every attempt
    it started has ended. A "not retried" assertion made before this
    point could pass while a retry is still on its way; made after it, a
    retry that was going to happen has happened.
    """
    queue = server.service.queue

    deadline = time.monotonic() + timeout
    # Read in the reactor thread, where the queue's state changes.
    while not in_reactor(queue.idle):
        if time.monotonic() > deadline:
            raise AssertionError("the outbound queue did not become idle")
        time.sleep(0.02)


def converse(port: int, data: bytes, replies: int, *, finals_only: bool = False) -> list[bytes]:
    """
    A raw SMTP client: after the greeting, send C{data} in one write (a
    pipeline) and read until C{replies} final reply lines have come. The
    reply lines, empty ones dropped; with C{finals_only}, only the final
    line of each reply.
    """
    def final(line: bytes) -> bool:
        return line[3:4] == b" "

    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.recv(1024)  # greeting
        s.sendall(data)
        got = b""
        while sum(1 for l in got.split(b"\r\n") if final(l)) < replies:
            chunk = s.recv(65536)
            if not chunk:
                break
            got += chunk
    return [l for l in got.split(b"\r\n") if l and (final(l) or not finals_only)]


@contextmanager
def log_lines(*words: str) -> Iterator[list[str]]:
    """The formatted log lines containing any of C{words}, logged while the block runs."""
    lines: list[str] = []

    def observe(event: dict) -> None:
        text = formatEvent(event)
        if text and any(word in text for word in words):
            lines.append(text)

    globalLogPublisher.addObserver(observe)
    try:
        yield lines
    finally:
        globalLogPublisher.removeObserver(observe)


class LineReader:
    """CRLF lines read off C{self.sock} (plain or TLS) into C{self.buf}: the raw clients' reader."""

    sock: socket.socket
    buf: bytes = b""

    def line(self) -> bytes:
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError(self.buf)
            self.buf += chunk
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line


@pytest.fixture
def sink():
    """A capture smarthost (tests/relay_sink.py) on a loopback port."""
    from relay_sink import Sink

    s = Sink().start()
    yield s
    s.stop()


def relay_to(s: Any) -> dict:
    """Server overrides that relay everything to the sink C{s}, without TLS."""
    return {"relay__smarthost": f"tcp:host=127.0.0.1:port={s.port}", "relay__starttls": "none"}
