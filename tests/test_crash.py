"""
kill -9 the server while 16 clients are sending; after a restart every
message that got 250 is there exactly once and byte-identical, nothing
half-written is in new/ or cur/, and stale tmp/ files are swept.

Long variant (20 kill/restart rounds, each at a random moment):

    CRASH_ROUNDS=20 python -m pytest tests/test_crash.py
"""

from __future__ import annotations

import json
import os
import poplib
import random
import re
import select
import signal
import smtplib
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROUNDS = int(os.environ.get("CRASH_ROUNDS", "1"))
MAILBOXES = [f"box{i}@crash.test" for i in range(4)]

SERVER = r"""
import json, sys
from twisted.internet import reactor
from twisted_mail_screen.config.settings import load_config
from twisted_mail_screen.store.maildir import TmpCleaner
from twisted_mail_screen.runtime.service import build_service
svc = build_service(load_config(None, json.loads(sys.argv[1])), reactor)
svc.privilegedStartService()
svc.startService()
cleaner = next(s for s in svc if isinstance(s, TmpCleaner))
def ready():
    # Ready once the startup tmp/ sweep has finished, so the test can check what it did.
    if not cleaner.sweeps:
        reactor.callLater(0.02, ready)
        return
    print(json.dumps({"smtp": svc.ports("smtp")[0], "pop3": svc.ports("pop3")[0]}), flush=True)
ready()
reactor.run()
"""


def start(data: Path) -> tuple[subprocess.Popen, dict]:
    overrides = {"data_dir": str(data), "listen.smtp": ["tcp:0:interface=127.0.0.1"],
                 "listen.pop3": ["tcp:0:interface=127.0.0.1"], "listen.submission": [],
                 "listen.imap": [], "listen.web": []}
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-c", SERVER, json.dumps(overrides)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    ready, _, _ = select.select([proc.stdout], [], [], 30)
    line = proc.stdout.readline() if ready else ""
    if not line:
        proc.kill()
        raise AssertionError(f"server not ready (or no startup tmp/ sweep): {proc.communicate()[1][-2000:]}")
    return proc, json.loads(line)


def body_for(token: str, rng: random.Random) -> bytes:
    lines = [f"X-Token: {token}", f"Subject: crash test {token}", ""]
    lines += ["".join(rng.choice("abcdefghij .") for _ in range(rng.randrange(0, 200)))
              for _ in range(rng.randrange(1, 60))]
    return ("\r\n".join(lines) + "\r\n").encode()


def sender(port: int, n: int, stop: threading.Event, acked: dict, sent: dict) -> None:
    rng = random.Random(n)
    i = 0
    while not stop.is_set():
        try:
            client = smtplib.SMTP("127.0.0.1", port, timeout=5)
            client.ehlo("crash")
            for _ in range(rng.randrange(1, 5)):
                token = f"t{n}-{i}-{rng.randrange(10**9)}"
                i += 1
                rcpts = rng.sample(MAILBOXES, rng.randrange(1, 3))
                body = body_for(token, rng)
                sent[token] = (body, rcpts)
                client.sendmail("s@crash.test", rcpts, body)
                acked[token] = (body, rcpts)  # only after the 250
            client.quit()
        except (OSError, smtplib.SMTPException):
            if stop.is_set():
                return
            time.sleep(0.01)


TOKEN = re.compile(rb"^X-Token: (\S+)$", re.M)


def check_store(data: Path, acked: dict, sent: dict) -> None:
    seen: dict[tuple[str, str], int] = {}
    for box in MAILBOXES:
        local, _, domain = box.partition("@")
        md = data / "mail" / domain / local
        for sub in ("new", "cur"):
            for f in (md / sub).glob("*") if (md / sub).exists() else []:
                raw = f.read_bytes()
                m = TOKEN.search(raw)
                assert m, f"{f} has no token: half-written or foreign"
                token = m.group(1).decode()
                assert token in sent, f"{f}: unknown token {token}"
                body, rcpts = sent[token]
                expected = body.replace(b"\r\n", b"\n")
                assert raw.endswith(expected) and raw.startswith(b"Return-Path: <s@crash.test>\n"), \
                    f"{f} is not byte-identical to what was sent"
                assert box in rcpts, f"{token} delivered to {box}, not a recipient"
                seen[(token, box)] = seen.get((token, box), 0) + 1
    duplicates = {k: v for k, v in seen.items() if v > 1}
    assert not duplicates, f"delivered more than once: {duplicates}"
    missing = [(t, b) for t, (_, rcpts) in acked.items() for b in rcpts if (t, b) not in seen]
    assert not missing, f"acknowledged with 250 but lost: {missing[:5]} ({len(missing)})"


def test_kill_9_under_load_loses_nothing_acknowledged(tmp_path):
    data = tmp_path / "data"
    acked: dict = {}
    sent: dict = {}
    rng = random.Random()
    proc, ports = start(data)
    try:
        for rnd in range(ROUNDS):
            stop = threading.Event()
            threads = [threading.Thread(target=sender, args=(ports["smtp"], n + 100 * rnd, stop,
                                                             acked, sent), daemon=True)
                       for n in range(16)]
            for t in threads:
                t.start()
            time.sleep(0.8 + rng.random() * 1.2)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            stop.set()
            for t in threads:
                t.join(10)
            assert len(acked) > 0, "no message was acknowledged before the kill"
            check_store(data, acked, sent)
            # Age whatever the crash left in tmp/ past the grace period (a
            # kill often leaves nothing there, so plant one stale file and
            # one fresh one too); the restarted server's startup sweep must
            # remove the stale files and keep the fresh one, which may be a
            # delivery in progress.
            old = time.time() - 37 * 3600
            for f in (data / "mail").glob("*/*/tmp/*"):
                os.utime(f, (old, old))
            tmp = data / "mail" / "crash.test" / "box0" / "tmp"
            for sub in ("tmp", "new", "cur"):
                (tmp.parent / sub).mkdir(parents=True, exist_ok=True)
            stale, fresh = tmp / f"stale-{rnd}", tmp / f"fresh-{rnd}"
            stale.write_bytes(b"half-written by a crash\n")
            os.utime(stale, (old, old))
            fresh.write_bytes(b"being written\n")
            proc, ports = start(data)  # returns after the startup sweep
            left = sorted(f.name for f in (data / "mail").glob("*/*/tmp/*"))
            assert left == [fresh.name], f"after the startup sweep tmp/ holds {left}"
            fresh.unlink()
            check_store(data, acked, sent)
        # The restarted server serves the mail it acknowledged before the crash.
        total = sum(1 for _, rcpts in acked.values() for b in rcpts if b == MAILBOXES[0])
        pop = poplib.POP3("127.0.0.1", ports["pop3"], timeout=10)
        pop.user(MAILBOXES[0])
        pop.pass_("x")
        assert len(pop.list()[1]) >= total
        pop.quit()
        client = smtplib.SMTP("127.0.0.1", ports["smtp"], timeout=10)
        assert client.sendmail("s@crash.test", [MAILBOXES[1]], b"Subject: after\r\n\r\nok\r\n") == {}
        client.quit()
    finally:
        proc.kill()
        proc.wait()
