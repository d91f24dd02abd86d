"""
Shared screening through Redis: a real C{redis-server} on a UNIX socket in
a temporary directory and three C{twistd -n mailscreen} nodes on one data
directory, each with its own control socket, driven with smtplib and the
C{mailscreen} command (docs/screening.md, "Several nodes").

Windows and leases are the shortest the configuration allows, so these
tests wait for real time only where a real process has to let something
lapse (a lease of a killed node: 2 s).
"""

from __future__ import annotations

import os
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import require_tool
from tests.test_twistd import TWISTD, _plugin_visible

pytestmark = pytest.mark.skipif(
    not os.environ.get("MAILSCREEN_REQUIRE_TWISTD") and not _plugin_visible(),
    reason="twistd mailscreen needs a non-editable install: pip install .")

MAILSCREEN = shutil.which("mailscreen", path=os.path.dirname(sys.executable)) or "mailscreen"
LIMIT = 6          # max_connections
MOST = 3           # max_simultaneous
AUTHS = 3          # max_auth_failures
LEASE = 2          # lease_seconds
PREFIX = "t16:"
PERIOD = 0.1       # notify_period_minutes (6 s)


class Redis:
    """A redis-server of our own on a UNIX socket; stop() and start() at will."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.socket = os.path.join(directory, "redis.sock")
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [require_tool("redis-server"), "--port", "0", "--unixsocket", self.socket,
             "--save", "", "--appendonly", "no", "--dir", self.directory],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if os.path.exists(self.socket) and self.cli("PING") == "PONG":
                return
            time.sleep(0.02)
        raise AssertionError("redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None
        if os.path.exists(self.socket):
            os.unlink(self.socket)

    def cli(self, *args: str) -> str:
        out = subprocess.run([require_tool("redis-cli"), "-s", self.socket, *args],
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip()


class Node:
    """One twistd mailscreen process; its log goes to a file read on demand."""

    def __init__(self, directory: Path, name: str, data_dir: Path, redis: Redis) -> None:
        self.name = name
        self.config = directory / f"{name}.toml"
        self.log = directory / f"{name}.log"
        self.control = os.path.join(redis.directory, f"{name}.sock")
        self.config.write_text(f"""\
mode = "site"
data_dir = "{data_dir}"
hostname = "{name}.test"
domains = ["example.test"]
control_socket = "{self.control}"
[listen]
smtp = ["tcp:0:interface=127.0.0.1"]
submission = []
pop3 = []
imap = []
web = []
[screening]
backend = "redis"
redis = "unix:{redis.socket}"
key_prefix = "{PREFIX}"
lease_seconds = {LEASE}
redis_timeout_seconds = 0.5
whitelist = []
max_connections = {LIMIT}
connection_window_minutes = 1
max_simultaneous = {MOST}
max_auth_failures = {AUTHS}
notify_on_block = true
notify_period_minutes = {PERIOD}
""")
        self.proc = subprocess.Popen(
            [TWISTD, "-n", "--pidfile=", "mailscreen", "--config", str(self.config)],
            cwd=directory, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
            stdout=self.log.open("w"), stderr=subprocess.STDOUT)
        self.port = 0

    def wait_ready(self) -> None:
        import re
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            text = self.text()
            found = re.search(r"SMTP listening: connect to [\d.]+:(\d+)", text)
            if found and "shares screening" in text:
                self.port = int(found.group(1))
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"{self.name} did not start:\n{self.text()}")

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def greet(self, source: str = "127.0.0.1") -> tuple[int, str]:
        """
        Connect, EHLO, QUIT: the refusal's code and text, or C{(220, greeting)}.
        A connection that reached its node before the news that its client
        is at the limit is refused one round trip late: 421 to its EHLO.
        """
        client = smtplib.SMTP(timeout=10, source_address=(source, 0))
        code, text = client.connect("127.0.0.1", self.port)
        if code != 220:
            client.close()
            return code, text.decode()
        try:
            code, text = client.ehlo("client.test")
            if code == 421:
                client.close()
                return code, text.decode()
            code, text = client.quit()
            if code == 421:  # the late refusal came after the EHLO's answer
                return code, text.decode()
        except smtplib.SMTPServerDisconnected:
            return 421, "closed"
        return 220, ""

    def over_limit(self, source: str = "127.0.0.1") -> str:
        """
        The connection past a limit, which says nothing and waits: the line
        that refused it, at the greeting or, when it reached this node before
        the news of its client's limit, one round trip later (then 421 too).
        """
        with socket.create_connection(("127.0.0.1", self.port), timeout=5,
                                      source_address=(source, 0)) as s:
            data = b""
            while not data.startswith(b"421") and b"\r\n421 " not in data:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
        return data.decode(errors="replace")

    def hold(self) -> smtplib.SMTP:
        client = smtplib.SMTP(timeout=10)
        code, _ = client.connect("127.0.0.1", self.port)
        assert code == 220
        return client

    def fail_login(self, source: str, password: str) -> None:
        client = smtplib.SMTP(timeout=10, source_address=(source, 0))
        assert client.connect("127.0.0.1", self.port)[0] == 220
        with pytest.raises(smtplib.SMTPAuthenticationError):
            client.login("nobody@example.test", password)
        client.quit()

    def stats(self) -> dict:
        """The control channel's screening.stats: C{up} is what the backend metric shows."""
        from twisted_mail_screen.runtime import control
        return control.call(self.control, "screening.stats")

    def mailscreen(self, *args: str) -> str:
        out = subprocess.run([MAILSCREEN, "--config", str(self.config), *args],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return out.stdout

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@pytest.fixture
def redis() -> Iterator[Redis]:
    # A short directory: AF_UNIX paths are limited to 108 bytes.
    directory = tempfile.mkdtemp(prefix="ms16-", dir="/tmp")
    server = Redis(directory)
    server.start()
    yield server
    server.stop()
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def nodes(tmp_path: Path, redis: Redis) -> Iterator[list[Node]]:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    started = [Node(tmp_path, name, data_dir, redis) for name in ("a", "b", "c")]
    try:
        for node in started:
            node.wait_ready()
        yield started
    finally:
        for node in started:
            node.stop()


def wait_until(predicate, seconds: float) -> float:
    """Poll C{predicate} until true; the seconds it took (fails past C{seconds})."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > seconds:
            raise AssertionError(f"not true within {seconds} s")
        time.sleep(0.01)
    return time.monotonic() - start


def test_connections_spread_over_three_nodes_are_counted_together(nodes):
    """max_connections over the cluster: the limit+1-th is refused on whichever node it reaches."""
    for i in range(LIMIT):
        code, _ = nodes[i % 3].greet()
        assert code == 220, f"connection {i + 1} refused"
    refused = nodes[LIMIT % 3 + 1].over_limit()
    assert "421 4.7.0" in refused and "(connections)" in refused
    # the block it set off is the whole cluster's
    for node in nodes:
        code, text = node.greet()
        assert code == 421 and "blocked" in text


def test_block_on_one_node_refuses_on_the_others_within_a_second(nodes):
    a, b, c = nodes
    assert b.greet()[0] == 220 and c.greet()[0] == 220
    a.mailscreen("block", "add", "127.0.0.1", "--minutes", "5")
    elapsed = wait_until(lambda: b.greet()[0] == 421 and c.greet()[0] == 421, 1.0)
    assert elapsed < 1.0
    assert "127.0.0.1" in c.mailscreen("block", "list")
    a.mailscreen("block", "remove", "127.0.0.1")
    wait_until(lambda: b.greet()[0] == 220 and c.greet()[0] == 220, 1.0)


def test_killed_node_leaves_no_lease_after_its_ttl(nodes, redis):
    a, b, _ = nodes
    held = [b.hold() for _ in range(MOST)]
    key = f"{PREFIX}lease:127.0.0.1"
    wait_until(lambda: redis.cli("ZCARD", key) == str(MOST), 2.0)
    # the cluster is full: the next one is refused on another node
    assert a.greet()[0] == 421
    b.proc.send_signal(signal.SIGKILL)
    b.proc.wait(10)
    for client in held:
        client.close()
    wait_until(lambda: redis.cli("EXISTS", key) == "0", LEASE + 2.0)
    # no counter left behind: a can serve MOST at once again
    more = [a.hold() for _ in range(MOST)]
    for client in more:
        client.close()


def test_redis_down_nodes_serve_alone_and_resume_counting_when_it_returns(nodes, redis):
    key = f"{PREFIX}conn:127.0.0.1"
    assert nodes[0].greet()[0] == 220
    wait_until(lambda: redis.cli("ZCARD", key) == "1", 1.0)
    redis.stop()
    for node in nodes:
        wait_until(lambda n=node: "unreachable" in n.text(), 3.0)
        assert node.greet()[0] == 220
    # a second of outage (the nodes retry at 0.25 s, then 0.5 s): every node
    # goes on serving, counting alone, from many clients
    served, deadline = 0, time.monotonic() + 1.0
    while time.monotonic() < deadline:
        source = f"127.0.1.{served % 250 + 1}"
        assert nodes[served % 3].greet(source)[0] == 220
        served += 1
    redis.start()
    for node in nodes:
        wait_until(lambda n=node: n.text().count("shares screening") == 2, 10.0)
    for node in nodes:
        assert node.greet()[0] == 220
    wait_until(lambda: redis.cli("ZCARD", key) == "3", 1.0)
    for node in nodes:
        # logged once for the whole outage, however many retries it took
        assert node.text().count("unreachable") == 1
        assert "Traceback" not in node.text()


def postmaster_mails(data_dir: Path) -> list[str]:
    return [p.read_text(errors="replace") for p in data_dir.glob("mail/*/postmaster/new/*")]


def test_a_block_storm_over_three_nodes_sends_five_mails_and_one_digest(nodes, redis, tmp_path):
    """The notifier's limit is the cluster's: 8 blocks over 3 nodes, 5 single notices, 3 held."""
    for j in range(8):
        source = f"127.0.0.{10 + j}"
        for i in range(LIMIT):
            assert nodes[(i + j) % 3].greet(source)[0] == 220
        refused = nodes[(LIMIT + j) % 3].over_limit(source)
        assert "421 4.7.0" in refused and "(connections)" in refused
    data_dir = tmp_path / "data"
    wait_until(lambda: len(postmaster_mails(data_dir)) >= 5, 5.0)
    assert redis.cli("LLEN", f"{PREFIX}notify:digest") == "3"
    time.sleep(0.3)  # nothing more arrives: the other three wait for the digest
    mails = postmaster_mails(data_dir)
    assert len(mails) == 5 and all("[mailscreen] blocked 127.0.0." in m for m in mails)
    # when the period ends, one node (the first to look) sends the one digest
    wait_until(lambda: len(postmaster_mails(data_dir)) == 6, PERIOD * 60 + 5.0)
    time.sleep(0.3)
    mails = postmaster_mails(data_dir)
    assert len(mails) == 6
    assert len([m for m in mails if "digest: 3 screening events" in m]) == 1
    assert redis.cli("LLEN", f"{PREFIX}notify:digest") == "0"


def test_resp_framing_and_fail_fast():
    """The client's codec round-trips; while the link is down a command fails at once."""
    from twisted.internet.task import Clock

    from twisted_mail_screen.screening.resp import RedisDown, RedisError, RedisLink, encode, parse

    assert encode(("SET", "k", 1.5, b"\x00")) == b"*4\r\n$3\r\nSET\r\n$1\r\nk\r\n$3\r\n1.5\r\n$1\r\n\x00\r\n"
    reply = b"*3\r\n:7\r\n$-1\r\n*2\r\n+OK\r\n-ERR no\r\n"
    value, end = parse(reply, 0)
    assert end == len(reply) and value[:2] == [7, None] and value[2][0] == "OK"
    assert isinstance(value[2][1], RedisError)
    link = RedisLink(None, Clock(), "unix:/nonexistent", None, "ch", lambda c, d: None,
                     lambda: None, lambda why: None)
    failures = []
    link.call("PING").addErrback(failures.append)
    assert failures and failures[0].check(RedisDown)


def test_whitelist_and_freezes_made_on_one_node_reach_the_others(nodes, redis):
    """The run-time white list and freezes are shared as blocks are: the CLI on C sees A's."""
    a, _, c = nodes
    a.mailscreen("whitelist", "add", "127.0.0.9", "--reason", "office")
    a.mailscreen("frozen", "freeze", "someone@example.test", "--minutes", "5")
    # through Redis (the shared data directory's files would carry them too, later)
    assert "127.0.0.9" in redis.cli("HKEYS", f"{PREFIX}list:white")
    assert "someone@example.test" in redis.cli("HKEYS", f"{PREFIX}list:freeze")
    wait_until(lambda: "127.0.0.9" in c.mailscreen("whitelist", "list"), 5.0)
    wait_until(lambda: "someone@example.test" in c.mailscreen("frozen", "list"), 5.0)
    a.mailscreen("frozen", "thaw", "someone@example.test")
    wait_until(lambda: "someone@example.test" not in c.mailscreen("frozen", "list"), 5.0)
    assert "someone@example.test" not in redis.cli("HKEYS", f"{PREFIX}list:freeze")


def test_failed_logins_spread_over_three_nodes_are_counted_together(nodes):
    """
    max_auth_failures over the cluster: each node sees fewer than the limit;
    Redis's count (published for the node holding the last one) blocks the
    client everywhere.
    """
    source = "127.0.3.1"
    for i in range(AUTHS):
        nodes[i % 3].fail_login(source, f"wrong-{i}")
    for node in nodes:
        wait_until(lambda n=node: n.greet(source)[0] == 421, 2.0)
    listed = nodes[0].mailscreen("block", "list")
    assert source in listed and f"auth_failures: {AUTHS}/{AUTHS}" in listed


def test_a_redis_that_stops_answering_is_found_though_counting_has_no_replies(nodes, redis):
    """
    Counting goes without replies, which say nothing of Redis's health: the
    watchdog's probe finds a stopped Redis, the node says so once, shows it
    in the metric's status and serves alone; when Redis answers again it
    shares screening again.
    """
    a = nodes[0]
    assert a.greet("127.0.4.1")[0] == 220 and a.stats()["up"] is True
    assert redis.proc is not None
    redis.proc.send_signal(signal.SIGSTOP)
    try:
        # a few connections: only counting (with no reply) goes to Redis
        for i in range(3):
            assert a.greet(f"127.0.4.{i + 2}")[0] == 220
        wait_until(lambda: "unreachable" in a.text(), 3.0)
        assert "no reply in 0.5 s" in a.text() and a.stats()["up"] is False
        assert a.greet("127.0.4.9")[0] == 220
    finally:
        redis.proc.send_signal(signal.SIGCONT)
    wait_until(lambda: a.text().count("shares screening") == 2, 10.0)
    assert a.stats()["up"] is True
    assert a.text().count("unreachable") == 1 and "Traceback" not in a.text()


def test_counting_batches_are_sent_without_a_reply(redis):
    """
    A batch goes behind CLIENT REPLY SKIP: Redis counts it and answers
    nothing, so the next command's answer is that command's own.
    """
    from twisted.internet.task import Clock

    from twisted_mail_screen.screening.config import ScreeningConfig
    from twisted_mail_screen.screening.redis_counts import BATCH, BatchedCounts
    from twisted_mail_screen.screening.resp import RedisLink
    from twisted_mail_screen.testing import in_reactor, reactor_thread

    clock = Clock()
    clock.advance(1_800_000_000)
    up: list[bool] = []
    link = RedisLink(reactor_thread(), clock, f"unix:{redis.socket}", None, "u:changes",
                     lambda c, d: None, lambda: up.append(True), lambda why: None)
    in_reactor(link.start)
    wait_until(lambda: up, 5.0)
    counts = BatchedCounts(link.send_quiet, link.call, clock, "u:", "u:changes",
                           ScreeningConfig(max_simultaneous=3), 60)

    def count() -> object:
        def loaded(_: object) -> object:
            counts.connected("192.0.2.1", "n:1:smtp")
            counts.connected("192.0.2.1", "n:2:smtp")
            counts.released("192.0.2.1", "n:1:smtp")
            counts.auth_failed("192.0.2.1", "d1", "n:2:smtp")
            counts.flush()
            return link.call("ECHO", "after")
        return link.call("SCRIPT", "LOAD", BATCH).addCallback(loaded)

    try:
        assert in_reactor(count) == b"after"
    finally:
        in_reactor(link.stop)
    assert redis.cli("ZCARD", "u:conn:192.0.2.1") == "2"
    assert redis.cli("ZRANGE", "u:lease:192.0.2.1", "0", "-1") == "n:2:smtp"
    assert redis.cli("ZRANGE", "u:auth:192.0.2.1", "0", "-1") == "d1"
    assert int(redis.cli("TTL", "u:lease:192.0.2.1")) > 0


def test_the_events_of_a_reactor_turn_go_as_one_batch_in_their_order():
    """
    Connections, closes and failed logins of one turn go together at its
    end, in the order they happened; a close is not held past its turn.
    """
    from twisted.internet.task import Clock

    from twisted_mail_screen.screening.config import ScreeningConfig
    from twisted_mail_screen.screening.redis_counts import BATCH_SHA, BatchedCounts
    from twisted_mail_screen.screening.resp import parse

    clock = Clock()
    sent: list[list[bytes]] = []
    counts = BatchedCounts(lambda data: sent.append(parse(data, 0)[0]) or True, None, clock,
                           "u:", "u:changes", ScreeningConfig(), 60)

    def ops() -> list[tuple[bytes, bytes]]:
        batch = sent.pop(0)
        assert batch[:3] == [b"EVALSHA", BATCH_SHA.encode(), b"0"]
        return [(batch[i], batch[i + 2]) for i in range(13, len(batch), 3)]

    counts.released("192.0.2.1", "n:1:smtp")
    counts.connected("192.0.2.2", "n:2:smtp")
    counts.auth_failed("192.0.2.2", "d1", "n:2:smtp")
    assert sent == []
    clock.advance(0)
    assert ops() == [(b"r", b"n:1:smtp"), (b"c", b"n:2:smtp"), (b"an:2:smtp", b"d1")]
    counts.released("192.0.2.2", "n:2:smtp")
    clock.advance(0)
    assert ops() == [(b"r", b"n:2:smtp")] and sent == []


def test_a_connection_past_a_limit_is_published_for_the_node_that_holds_it(redis):
    """
    The script answers nothing; a connection counted past max_connections
    (one that raced the news of its client's limit) is published as
    'over' with its session's member, after the 'sat' news.
    """
    import json

    from twisted.internet.task import Clock

    from twisted_mail_screen.screening.config import ScreeningConfig
    from twisted_mail_screen.screening.redis_counts import BATCH, BatchedCounts
    from twisted_mail_screen.screening.resp import RedisLink
    from twisted_mail_screen.testing import in_reactor, reactor_thread

    clock = Clock()
    clock.advance(1_800_000_000)
    up: list[bool] = []
    heard: list[dict] = []
    link = RedisLink(reactor_thread(), clock, f"unix:{redis.socket}", None, "v:changes",
                     lambda c, d: heard.append(json.loads(d)), lambda: up.append(True),
                     lambda why: None)
    in_reactor(link.start)
    wait_until(lambda: up, 5.0)
    counts = BatchedCounts(link.send_quiet, link.call, clock, "v:", "v:changes",
                           ScreeningConfig(max_connections=2, max_simultaneous=0), 60)

    def count() -> object:
        def loaded(_: object) -> object:
            for serial in (1, 2, 3):
                counts.connected("192.0.2.7", f"n:{serial}:imap")
            counts.flush()
            return link.call("PING")
        return link.call("SCRIPT", "LOAD", BATCH).addCallback(loaded)

    try:
        in_reactor(count)
        wait_until(lambda: len(heard) == 3, 5.0)
    finally:
        in_reactor(link.stop)
    assert [m["t"] for m in heard] == ["sat", "sat", "over"]
    assert heard[2] == {"t": "over", "k": "192.0.2.7", "m": "n:3:imap", "r": "connections",
                        "c": 3}


def test_a_node_refuses_and_blocks_its_session_that_redis_counted_past_the_limit(nodes, redis):
    """
    The node named in an 'over' message refuses that session (421, already
    greeted) and blocks its client for the whole cluster, as a reply did.
    """
    import json

    a, _, c = nodes
    node = a.stats()["node"]
    held = a.hold()  # the node's first session: member NODE:1:smtp
    redis.cli("PUBLISH", f"{PREFIX}changes", json.dumps(
        {"t": "over", "k": "127.0.0.1", "m": f"{node}:1:smtp", "r": "connections",
         "c": LIMIT + 1}))
    code, text = held.getreply()  # unasked: the refusal comes to the waiting client
    assert code == 421 and b"blocked" in text
    wait_until(lambda: c.greet()[0] == 421, 2.0)
    assert f"connections: {LIMIT + 1}/{LIMIT}" in c.mailscreen("block", "list")
