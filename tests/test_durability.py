"""
Durability order, observed in a real server process.

The server runs as a subprocess (the real C{build_service}, no test
doubles) under C{strace -f}, which records every thread's file writes,
fsyncs, renames and links and every send to a client, each fd with its
path (C{-y}). After real clients have done their work, the log is parsed
and, for every promise of docs/architecture.md ("a 250 after DATA means
the message is fsync'd in every recipient's Maildir; state files are
replaced atomically"), the order is checked:

- the data of a new file is written, then fsync'd, before the file is
  linked or renamed into place;
- after the link or rename, the directory holding the new name is
  fsync'd;
- both complete before the reply that announces the result (SMTP 250,
  IMAP tagged OK) is sent.

An fsync counts from its completion (strace's "resumed" line when another
thread interleaved), a send from its entry, so a reply racing a worker
thread's fsync is caught. Each check is proven able to fail: the same
scenario is run with mutated servers (fsync a no-op, directory fsyncs
skipped, delayed past the reply, file fsyncs moved after the rename),
injected by a C{sitecustomize} module, and the checks must report each.
"""

from __future__ import annotations

import json
import os
import re
import signal
import smtplib
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import LineReader, require_tool
from strace_order import (MOVES, SENDS, SYNCS, Event, atomic_replacements, parse_strace, published,
                          reply, uidlist_durable)
from twisted_mail_screen.runtime import control
from twisted_mail_screen.store.accounts import AccountStore

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.tool("strace")

SYSCALLS = ",".join(sorted(SENDS | SYNCS | MOVES | {"pwrite64"}))
SERVER = r"""
import json, os, sys
from twisted.internet import reactor
import twisted_mail_screen
from twisted_mail_screen.config.settings import load_config
from twisted_mail_screen.runtime.service import build_service
svc = build_service(load_config(None, json.loads(sys.argv[1])), reactor)
svc.privilegedStartService()
svc.startService()
def ready():
    ports = {k: svc.ports(k)[0] for k in ("smtp", "submission", "imap")}
    print(json.dumps({"pid": os.getpid(), "module": twisted_mail_screen.__file__, "ports": ports}),
          flush=True)
reactor.callWhenRunning(ready)
reactor.run()
"""

# Mutations of the server, each a sitecustomize module run before the server's code.
MUTATIONS = {
    "fsync-noop": "import os\nos.fsync = lambda fd: None\n",
    "no-directory-fsync": """
import os, stat
_fsync = os.fsync
def fsync(fd):
    if not stat.S_ISDIR(os.fstat(fd).st_mode):
        _fsync(fd)
os.fsync = fsync
""",
    "directory-fsync-late": """
import os, stat, threading
_fsync = os.fsync
def _later(fd):
    _fsync(fd)
    os.close(fd)
def fsync(fd):
    if stat.S_ISDIR(os.fstat(fd).st_mode):
        threading.Timer(0.3, _later, (os.dup(fd),)).start()
    else:
        _fsync(fd)
os.fsync = fsync
""",
    "file-fsync-after-rename": """
import os, stat, threading
_fsync = os.fsync
_pending = threading.local()
def fsync(fd):
    if stat.S_ISDIR(os.fstat(fd).st_mode):
        _fsync(fd)
    else:
        _pending.fds = getattr(_pending, "fds", []) + [os.dup(fd)]
def _then_fsync(f):
    def run(*args, **kwargs):
        result = f(*args, **kwargs)
        for fd in getattr(_pending, "fds", []):
            _fsync(fd)
            os.close(fd)
        _pending.fds = []
        return result
    return run
os.fsync = fsync
os.rename, os.replace, os.link = _then_fsync(os.rename), _then_fsync(os.replace), _then_fsync(os.link)
""",
}


# the scenario, driven by real clients

@dataclass
class Run:
    """A traced server's log and what the clients learned."""

    data: Path
    events: list[Event] = field(default_factory=list)
    facts: dict = field(default_factory=dict)
    module: str = ""


class IMAP(LineReader):
    """A raw IMAP client: exact tags, so each tagged reply is found in the trace."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.buf = b""
        self.line()

    def command(self, tag: str, text: str, literal: bytes | None = None) -> list[bytes]:
        if literal is None:
            self.sock.sendall(f"{tag} {text}\r\n".encode())
        else:
            self.sock.sendall(f"{tag} {text} {{{len(literal)}}}\r\n".encode())
            assert self.line().startswith(b"+")
            self.sock.sendall(literal + b"\r\n")
        lines = []
        while True:
            lines.append(self.line())
            if lines[-1].startswith(tag.encode() + b" "):
                assert lines[-1].startswith(tag.encode() + b" OK"), lines
                return lines


def messages(folder: Path) -> set[str]:
    return {str(p) for sub in ("new", "cur") for p in (folder / sub).glob("*")}


def scenario(data: Path, ports: dict[str, int]) -> dict:
    facts: dict = {}
    # Local delivery to two mailboxes over SMTP.
    smtp = smtplib.SMTP("127.0.0.1", ports["smtp"], timeout=30)
    smtp.ehlo("client.example")
    smtp.mail("someone@remote.example")
    for rcpt in ("alice@example.test", "bob@example.test"):
        assert smtp.rcpt(rcpt)[0] == 250
    code, text = smtp.data(b"Subject: local\r\n\r\nfor two local mailboxes\r\n")
    assert code == 250, text
    facts["local"] = name = text.decode().split("queued as ")[1]
    facts["local files"] = [f for box in ("alice", "bob")
                            for f in messages(data / "mail" / "example.test" / box)
                            if os.path.basename(f).startswith(name)]
    smtp.quit()
    # A relayed message: into the outbound queue.
    sub = smtplib.SMTP("127.0.0.1", ports["submission"], timeout=30)
    sub.ehlo("client.example")
    sub.login("alice@example.test", "alice-secret")
    sub.mail("alice@example.test")
    assert sub.rcpt("carol@remote.example")[0] == 250
    code, text = sub.data(b"Subject: out\r\n\r\nfor the queue\r\n")
    assert code == 250, text
    facts["queue"] = text.decode().split("queued as ")[1]
    sub.quit()
    # IMAP APPEND, COPY and MOVE.
    inbox = data / "mail" / "example.test" / "alice"
    imap = IMAP(ports["imap"])
    imap.command("L1", "LOGIN alice@example.test alice-secret")
    imap.command("S1", "SELECT INBOX")
    before = messages(inbox)
    done = imap.command("APP1", "APPEND INBOX (\\Seen)", b"Subject: appended\r\n\r\nx\r\n")
    uid = re.search(rb"\[APPENDUID \d+ (\d+)\]", done[-1]).group(1).decode()
    (facts["append"],) = messages(inbox) - before
    imap.command("C1", "CREATE Projects")
    imap.command("CPY1", f"UID COPY {uid} Projects")
    (facts["copy"],) = messages(inbox / ".Projects")
    imap.command("MOV1", f"UID MOVE {uid} Trash")
    (facts["move"],) = messages(inbox / ".Trash")
    imap.command("LO", "LOGOUT")
    imap.sock.close()
    # State files: the block list and the frozen accounts, changed through the control socket.
    control.call(str(data), "block.add", address="192.0.2.7", minutes=60)
    control.call(str(data), "frozen.freeze", user="bob@example.test")
    deadline = time.monotonic() + 20
    while not ((data / "blocklist.txt").exists() and "192.0.2.7" in (data / "blocklist.txt").read_text()
               and (data / "frozen.txt").exists() and "bob@" in (data / "frozen.txt").read_text()):
        assert time.monotonic() < deadline, "block list / frozen accounts not written"
        time.sleep(0.05)
    return facts


def traced_run(base: Path, mutation: str | None = None) -> Run:
    strace = require_tool("strace")
    data = base / "data"
    data.mkdir(parents=True)
    accounts = AccountStore(str(data))
    accounts.add_user("alice@example.test", "alice-secret")
    accounts.add_user("bob@example.test", "bob-secret")
    with socket.socket() as closed:  # a port nobody listens on: the message stays queued
        closed.bind(("127.0.0.1", 0))
        nowhere = closed.getsockname()[1]
    config = {"mode": "site", "hostname": "mail.example.test", "domains": ["example.test"],
              "postmaster": "postmaster@example.test", "data_dir": str(data),
              "listen.smtp": ["tcp:0:interface=127.0.0.1"],
              "listen.submission": ["tcp:0:interface=127.0.0.1"],
              "listen.imap": ["tcp:0:interface=127.0.0.1"], "listen.pop3": [], "listen.web": [],
              "relay.smarthost": f"tcp:host=127.0.0.1:port={nowhere}", "relay.starttls": "none"}
    path = [ROOT]
    if mutation is not None:
        site = base / "site"
        site.mkdir()
        (site / "sitecustomize.py").write_text(MUTATIONS[mutation])
        path.insert(0, str(site))
    # Inherited PYTHONPATH entries stay (after ours): a mutation applied to
    # the whole test run (a sitecustomize there) reaches this server too.
    inherited = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path + inherited))
    log, errors = base / "strace.log", base / "server.err"
    proc = subprocess.Popen([strace, "-f", "-qq", "--seccomp-bpf", "-y", "-s", "400",
                             "-e", f"trace={SYSCALLS}", "-o", str(log),
                             sys.executable, "-c", SERVER, json.dumps(config)],
                            stdout=subprocess.PIPE, stderr=errors.open("w"), env=env, text=True)
    run = Run(data)
    try:
        line = proc.stdout.readline()
        assert line, f"server did not start: {errors.read_text()[-3000:]}"
        ready = json.loads(line)
        run.module = ready["module"]
        try:
            run.facts = scenario(data, ready["ports"])
        except Exception as e:
            raise AssertionError(f"scenario failed; server stderr: {errors.read_text()[-3000:]}") from e
        os.kill(ready["pid"], signal.SIGTERM)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    run.events = parse_strace(log.read_text())
    return run


def violations(run: Run) -> dict[str, list[str]]:
    """Every promise's violations, by what was promised."""
    events, facts = run.events, run.facts
    mail = str(run.data / "mail" / "example.test")
    out: dict[str, list[str]] = {}

    name = facts["local"]
    sent = reply(events, f"Ok: queued as {name}")
    files = facts["local files"]
    out["local delivery"] = ["no 250 for the local delivery in the trace"] if sent is None else [
        problem for final in files for problem in published(events, final, sent.seq, final)]
    if len(files) != 2:
        out["local delivery"].append(f"expected one file per recipient, found {files}")

    queue_id = facts["queue"]
    sent = reply(events, f"Ok: queued as {queue_id}")
    queue = run.data / "queue"
    out["outbound queue"] = ["no 250 for the relayed message in the trace"] if sent is None else (
        published(events, str(queue / "msg" / queue_id), sent.seq, "queued message")
        + published(events, str(queue / "env" / f"{queue_id}.json"), sent.seq, "queued envelope"))

    inbox = os.path.join(mail, "alice")
    for what, tag, final, folder, new_data, also in (
            ("IMAP APPEND", "APP1", facts["append"], inbox, True, ()),
            ("IMAP COPY", "CPY1", facts["copy"], os.path.join(inbox, ".Projects"), False, ()),
            ("IMAP MOVE", "MOV1", facts["move"], os.path.join(inbox, ".Trash"), False,
             (os.path.join(inbox, "cur"),))):
        sent = reply(events, f"{tag} OK")
        if sent is None:
            out[what] = [f"no tagged OK for {tag} in the trace"]
            continue
        moves = [e for e in events if e.call in MOVES and e.target == final]
        placed = moves[0].seq if moves else sent.seq
        out[what] = (published(events, final, sent.seq, what, new_data, also)
                     + uidlist_durable(events, folder, placed, sent.seq, what))

    replaced, problems = atomic_replacements(events)
    names = {os.path.basename(p) for p in replaced}
    missing = {"blocklist.txt", "frozen.txt", "dovecot-uidlist"} - names
    out["state files"] = problems + ([f"no atomic replacement of {sorted(missing)} seen"]
                                     if missing else [])
    return out


@pytest.fixture(scope="module")
def real_run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    return traced_run(tmp_path_factory.mktemp("durability"))


PROMISES = ("local delivery", "outbound queue", "IMAP APPEND", "IMAP COPY", "IMAP MOVE", "state files")


@pytest.mark.parametrize("promise", PROMISES)
def test_written_fsynced_placed_and_directory_fsynced_before_the_reply(real_run, promise):
    assert violations(real_run)[promise] == []


def test_the_traced_server_is_the_real_one(real_run):
    """The subprocess ran this tree's package, and the trace saw its threads write and send."""
    assert real_run.module == os.path.join(ROOT, "twisted_mail_screen", "__init__.py")
    assert len({e.pid for e in real_run.events if e.call in SYNCS}) >= 2  # worker pools
    assert any(e.call in SENDS and e.path.startswith("socket:") for e in real_run.events)


@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
def test_checks_catch_a_server_that_skips_or_reorders_fsyncs(tmp_path, mutation):
    """The same scenario against a broken server: every promise it breaks is reported."""
    found = violations(traced_run(tmp_path, mutation))
    assert {promise for promise, problems in found.items() if problems} == set(PROMISES), found
    for state_file in ("blocklist.txt", "frozen.txt", "dovecot-uidlist"):
        assert any(f"state file {state_file}:" in p for p in found["state files"]), state_file


@pytest.mark.parametrize("reply_first", [True, False])
def test_parser_orders_an_interrupted_fsync_by_its_completion(reply_first):
    """A directory fsync begun before the reply but completed after it does not count."""
    send = '3 sendto(9<socket:[1]>, "250 2.0.0 Ok: queued as m\\r\\n", 27, 0, NULL, 0) = 27\n'
    log = ('7 write(5</d/tmp/m>, "x", 1) = 1\n'
           '7 fsync(5</d/tmp/m>) = 0\n'
           '7 rename("/d/tmp/m", "/d/new/m") = 0\n'
           '7 fsync(6</d/new> <unfinished ...>\n'
           + (send if reply_first else "")
           + '7 <... fsync resumed>) = 0\n'
           + ("" if reply_first else send))
    events = parse_strace(log)
    assert [e.call for e in events] == ["write", "fsync", "rename", "fsync", "sendto"][:len(events)]
    sent = reply(events, "queued as m")
    problems = published(events, "/d/new/m", sent.seq, "m")
    assert problems == (["m: directory /d/new not fsync'd between placing m and the reply"]
                        if reply_first else [])
