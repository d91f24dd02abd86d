"""
Limits changed through one node reach every node sharing the data
directory without `quota.reload`: each looks at quota.json's version (one
stat in the worker pool) before a quota decision, at most once a second
by its clock, and reads the file again when it changed. Two servers in
this process on one data directory, each with a clock the test moves; the
limit set through A with `mailscreen quota set` on A's control socket.
"""

from __future__ import annotations

import imaplib
import smtplib
import subprocess
import sys
import time
from pathlib import Path

import pytest
from twisted.internet.task import Clock

from tests.conftest import log_lines
from twisted_mail_screen.testing import RunningServer

KINDS = ("smtp", "imap")
BOB = "bob@localhost"
MESSAGE = b"From: a@example.org\r\nSubject: hi\r\n\r\nbody\r\n"


def quota_set(tmp_path: Path, node: str, *args: str) -> str:
    """`mailscreen quota set` through the control socket of C{node}."""
    result = subprocess.run(
        [sys.executable, "-m", "twisted_mail_screen.admin.cli", "--data-dir", str(tmp_path / "data"),
         "--control-socket", str(tmp_path / f"{node}.sock"), "quota", "set", BOB, *args],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


def send(server: RunningServer) -> None:
    with smtplib.SMTP("127.0.0.1", server.port("smtp"), timeout=30) as s:
        s.sendmail("a@example.org", [BOB], MESSAGE)


def refused(server: RunningServer) -> tuple[int, bytes]:
    with pytest.raises(smtplib.SMTPRecipientsRefused) as e:
        send(server)
    return e.value.recipients[BOB]


def append(server: RunningServer) -> tuple[str, list]:
    m = imaplib.IMAP4("127.0.0.1", server.port("imap"), timeout=30)
    m.login(BOB, "x")
    try:
        return m.append("INBOX", None, None, MESSAGE)
    finally:
        m.logout()


@pytest.fixture
def nodes(start_server, tmp_path):
    return tuple(start_server(kinds=KINDS, clock=Clock(), control_socket=str(tmp_path / f"{n}.sock"))
                 for n in "ab")


def test_a_limit_set_through_one_node_is_enforced_on_the_other_a_second_later(nodes, tmp_path):
    a, b = nodes
    send(b)                                       # B looks at the file (none yet)
    assert "messages 1 of 1" in quota_set(tmp_path, "a", "--messages", "1")
    assert refused(a)[0] == 452                   # A wrote it: at once
    send(b)      # B's clock has not moved: no second look, it still decides with no limit
    b.advance(1)
    code, text = refused(b)                       # no quota.reload, no restart
    assert (code, text[:5]) == (452, b"4.2.2")
    typ, data = append(b)
    assert typ == "NO" and b"[OVERQUOTA]" in data[0]
    # Lifted through A: B takes mail again once its clock moves on.
    quota_set(tmp_path, "a", "--default")
    a.advance(1)
    send(a)
    refused(b)
    b.advance(1)
    send(b)


def test_a_limit_set_before_the_first_decision_and_raised_later(nodes, tmp_path):
    """B's first decision looks at once; a raised limit is seen as the lifted one is."""
    a, b = nodes
    quota_set(tmp_path, "a", "--messages", "2")
    send(b)
    send(b)
    assert refused(b)[0] == 452
    quota_set(tmp_path, "a", "--messages", "3")
    b.advance(0.5)
    refused(b)                                    # half a second: not looked at yet
    b.advance(0.5)
    send(b)
    assert refused(b)[0] == 452


def test_a_limits_file_broken_meanwhile_keeps_the_limits_read_before(nodes, tmp_path):
    a, b = nodes
    quota_set(tmp_path, "a", "--messages", "1")
    send(b)
    limits = tmp_path / "data" / "quota.json"
    good = limits.read_text()
    limits.write_text('{"accounts": {"' + BOB + '": {"messages": -1}}}')
    with log_lines("quota:") as lines:
        b.advance(1)
        assert refused(b)[0] == 452              # not every limit lifted by a bad edit
        b.advance(1)
        refused(b)                                # the same bad version: logged once
    assert len([l for l in lines if "cannot read" in l]) == 1, lines
    assert "messages must be an integer" in lines[0]
    limits.write_text(good.replace('"messages": 1', '"messages": 5'))
    b.advance(1)
    send(b)


def inbox_count(tmp_path: Path) -> int:
    box = tmp_path / "data" / "mail" / "localhost" / "bob"
    return sum(1 for sub in ("new", "cur") for _ in (box / sub).iterdir())


def test_mail_a_node_took_before_it_saw_a_new_limit_is_counted_once_it_sees_it(nodes, tmp_path):
    """
    In the second before B looks again, B stores mail for an account it
    does not know is limited, without recording it in maildirsize; when B
    sees the new limits it has the file recalculated, so neither node
    decides from a usage that misses those messages.
    """
    a, b = nodes
    send(b)                                       # B's look: no limits
    quota_set(tmp_path, "a", "--messages", "3")
    send(a)                                       # 2 messages; A's maildirsize says so
    send(b)
    send(b)                                       # 4 on disk, B recorded none of them
    assert inbox_count(tmp_path) == 4
    b.advance(1)
    assert refused(b)[0] == 452                   # counted: 4 of 3, not the file's 2
    assert refused(a)[0] == 452
    assert inbox_count(tmp_path) == 4


def test_a_node_that_took_such_mail_and_then_nothing_more_still_has_it_counted(nodes, tmp_path):
    """B's next look comes a second after its unrecorded delivery, even with no decision to make."""
    a, b = nodes
    send(b)
    quota_set(tmp_path, "a", "--messages", "3")
    send(a)
    send(b)                                       # 3 on disk; A's maildirsize says 2
    size_file = tmp_path / "data" / "mail" / "localhost" / "bob" / "maildirsize"
    assert size_file.exists()
    b.advance(1)                                  # B's own look: limits changed, the file dropped
    deadline = time.monotonic() + 10
    while size_file.exists():
        assert time.monotonic() < deadline, "B never looked at the limits again"
        time.sleep(0.01)
    assert refused(a)[0] == 452                   # 3 of 3, counted again
    assert inbox_count(tmp_path) == 3
