"""
One message for a local mailbox and a remote address is stored all or
nothing (issue 10): whichever step fails (the local write, the queue
entry, the move of the local copy into new/), the client gets 451, no
local copy is visible, nothing is queued or sent, and the client's retry
delivers exactly one copy everywhere.

Faults are real: a directory of the data directory replaced by a file
(root ignores permission bits, so chmod would not stop the writes).
"""

from __future__ import annotations

import shutil
import smtplib
from pathlib import Path

import pytest

from conftest import log_lines, maildir_files, queued
from relay_sink import Sink, wait_for

MESSAGE = b"From: alice@example.test\r\nSubject: once\r\n\r\nhello\r\n"


@pytest.fixture
def queue_log():
    with log_lines("queue:", "delivery") as lines:
        yield lines


def start(start_server, sink: Sink):
    server = start_server(site=True, relay__smarthost=f"tcp:host=127.0.0.1:port={sink.port}",
                          relay__starttls="none")
    # The queue makes its directories in a worker thread after the start
    # (msg/ first, hold/ last): a fault planted in them before that races
    # with os.makedirs (seen: IsADirectoryError in break_dir).
    wait_for((Path(server.config.data_dir) / "queue" / "hold").is_dir,
             what="the queue directories")
    return server


def send(server, message: bytes = MESSAGE) -> tuple[int, bytes]:
    client = smtplib.SMTP("127.0.0.1", server.port("submission"), timeout=10)
    client.ehlo("client.example")
    client.login("alice@example.test", "alice-secret")
    client.mail("alice@example.test")
    assert client.rcpt("bob@example.test")[0] == 250
    assert client.rcpt("carol@remote.example")[0] == 250
    reply = client.data(message)
    assert client.noop()[0] == 250
    client.quit()
    return reply


def break_dir(path: Path) -> None:
    """Replace a directory by a file: every write into it fails (ENOTDIR), even for root."""
    shutil.rmtree(path, ignore_errors=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("not a directory")


def mend_dir(path: Path) -> None:
    path.unlink()
    path.mkdir()


def bob_files(data: Path) -> list[Path]:
    """Every file of bob's Maildir, tmp/ included: a staged copy must not linger either."""
    base = data / "mail" / "example.test" / "bob"
    return sorted(p for sub in ("new", "cur", "tmp") if (base / sub).is_dir()
                  for p in (base / sub).iterdir())


def retry_delivers_once(server, sink: Sink, data: Path) -> None:
    """The client's retry gets 250; bob and the smarthost each have exactly one copy."""
    code, text = send(server)
    assert code == 250, text
    wait_for(lambda: sink.messages, what="the retried message at the smarthost")
    wait_for(lambda: queued(data.parent) == [], what="an empty queue")
    assert len(maildir_files(data, "bob@example.test")) == 1
    assert [m.recipients for m in sink.messages] == [["carol@remote.example"]]


def prepare_bob(server, data: Path) -> None:
    """bob's Maildir exists (a first local message), so a fault can be put inside it."""
    client = smtplib.SMTP("127.0.0.1", server.port("submission"), timeout=10)
    client.login("alice@example.test", "alice-secret")
    client.sendmail("alice@example.test", ["bob@example.test"], b"Subject: first\r\n\r\nx\r\n")
    client.quit()
    for path in maildir_files(data, "bob@example.test"):
        path.unlink()


def test_queue_failure_after_the_local_copy_is_written(start_server, accounts, sink, tmp_path,
                                                       queue_log):
    """The local copy (already fsync'd in tmp/) is dropped when the queue entry cannot be made."""
    data = tmp_path / "data"
    server = start(start_server, sink)
    break_dir(data / "queue" / "msg")
    assert send(server) == (451, b"4.3.0 Requested action aborted: local error in processing")
    assert bob_files(data) == []
    assert queued(tmp_path) == []
    mend_dir(data / "queue" / "msg")
    retry_delivers_once(server, sink, data)
    assert sum(l.startswith("queue:") and " queued " in l for l in queue_log) == 1


def test_local_write_failure_queues_nothing(start_server, accounts, sink, tmp_path, queue_log):
    """The local write fails first: no queue entry is made, so nothing is sent."""
    data = tmp_path / "data"
    server = start(start_server, sink)
    prepare_bob(server, data)
    break_dir(data / "mail" / "example.test" / "bob" / "tmp")
    assert send(server) == (451, b"4.3.0 Requested action aborted: local error in processing")
    assert queued(tmp_path) == [] and not any("queued" in l for l in queue_log)
    assert maildir_files(data, "bob@example.test") == []
    mend_dir(data / "mail" / "example.test" / "bob" / "tmp")
    retry_delivers_once(server, sink, data)


def test_local_failure_after_the_queue_entry_is_durable(start_server, accounts, sink, tmp_path,
                                                        queue_log):
    """
    The queue entry is on disk (logged as queued) when moving the local
    copy into new/ fails: the entry is removed before it was ever sent.
    """
    data = tmp_path / "data"
    server = start(start_server, sink)
    prepare_bob(server, data)
    break_dir(data / "mail" / "example.test" / "bob" / "new")
    assert send(server) == (451, b"4.3.0 Requested action aborted: local error in processing")
    assert sum(l.startswith("queue:") and " queued " in l for l in queue_log) == 1  # it was durable before the failure
    assert queued(tmp_path) == []
    assert bob_files(data) == []  # nothing in tmp/ or cur/ (new/ is the planted file)
    mend_dir(data / "mail" / "example.test" / "bob" / "new")
    retry_delivers_once(server, sink, data)  # only the retry reached the smarthost
    assert not any("not removed" in l for l in queue_log)
