"""
Storage failures (ENOSPC, EIO) at the Maildir layer: the message that hit
one gets 451 4.3.0, nothing partial becomes visible (to POP3 or in the
Maildir), and the server goes on serving.
"""

from __future__ import annotations

import errno
import os
import poplib
import smtplib
import threading
from pathlib import Path

import pytest

from twisted_mail_screen.config.settings import load_config
from twisted_mail_screen.store.maildir import MailStore
from twisted_mail_screen.runtime.service import build_service
from twisted_mail_screen.testing import ephemeral_overrides, in_reactor, reactor_thread


class FaultyStore(MailStore):
    """A MailStore whose disk fails on demand, at one chosen step."""

    def __init__(self, root: str) -> None:
        super().__init__(root)
        self.fail_write: int | None = None  # errno for the message file write
        self.fail_dir_sync: int | None = None  # errno for the new/ directory fsync
        self.lock = threading.Lock()

    def _write(self, path: str, data: bytes) -> None:
        if self.fail_write is not None:
            # Half the message reaches the disk, then the device fills up.
            with open(path, "wb") as f:
                f.write(data[: len(data) // 2])
            raise OSError(self.fail_write, os.strerror(self.fail_write), path)
        super()._write(path, data)

    def _sync_dir(self, path: str) -> None:
        if self.fail_dir_sync is not None:
            raise OSError(self.fail_dir_sync, os.strerror(self.fail_dir_sync), path)
        super()._sync_dir(path)


@pytest.fixture
def faulty(tmp_path: Path):
    data = str(tmp_path / "data")
    config = load_config(None, ephemeral_overrides(data, ("smtp", "pop3")))
    store = FaultyStore(os.path.join(config.data_dir, "mail"))
    reactor = reactor_thread()

    def start():
        service = build_service(config, reactor, store=store)
        service.privilegedStartService()
        service.startService()
        return service

    service = in_reactor(start)
    yield service, store, Path(data)
    in_reactor(service.stopService)


def send(service, body: bytes, rcpts=("r@x.test",)) -> tuple[int, bytes]:
    client = smtplib.SMTP("127.0.0.1", service.ports("smtp")[0], timeout=10)
    try:
        client.ehlo("c")
        client.mail("s@x.test")
        for r in rcpts:
            assert client.rcpt(r)[0] == 250
        return client.data(body)
    finally:
        client.quit()


def pop_count(service, user: str = "r@x.test") -> int:
    pop = poplib.POP3("127.0.0.1", service.ports("pop3")[0], timeout=10)
    pop.user(user)
    pop.pass_("x")
    n = len(pop.list()[1])
    pop.quit()
    return n


def files(data: Path, address: str, sub: str) -> list[Path]:
    local, _, domain = address.partition("@")
    d = data / "mail" / domain / local / sub
    return sorted(d.iterdir()) if d.exists() else []


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EIO])
def test_failed_write_is_451_and_leaves_nothing(faulty, err):
    service, store, data = faulty
    assert send(service, b"Subject: ok 1\r\n\r\nfirst\r\n")[0] == 250
    store.fail_write = err
    code, text = send(service, (b"Subject: doomed\r\n\r\n" + b"z" * 70 + b"\r\n") * 700)
    assert (code, text.split()[0]) == (451, b"4.3.0")
    for sub in ("new", "cur", "tmp"):
        for f in files(data, "r@x.test", sub):
            assert b"doomed" not in f.read_bytes(), f"partial message left in {sub}/"
    assert files(data, "r@x.test", "tmp") == [], "the failed write's temp file is removed"
    assert pop_count(service) == 1
    store.fail_write = None
    assert send(service, b"Subject: ok 2\r\n\r\nsecond\r\n")[0] == 250
    assert pop_count(service) == 2


def test_failed_directory_fsync_unlinks_every_recipient_copy(faulty):
    """All or nothing across recipients: a failure after linking removes the links."""
    service, store, data = faulty
    store.fail_dir_sync = errno.EIO
    code, _ = send(service, b"Subject: multi\r\n\r\nx\r\n", rcpts=("a@x.test", "b@x.test"))
    assert code == 451
    for who in ("a@x.test", "b@x.test"):
        assert files(data, who, "new") == [] and files(data, who, "tmp") == []
    store.fail_dir_sync = None
    assert send(service, b"Subject: multi\r\n\r\ny\r\n", rcpts=("a@x.test", "b@x.test"))[0] == 250
    assert pop_count(service, "a@x.test") == 1 and pop_count(service, "b@x.test") == 1


def test_pipelined_session_survives_a_failed_delivery(faulty):
    """The 451 ends only that transaction; the next one on the same session is served."""
    service, store, data = faulty
    client = smtplib.SMTP("127.0.0.1", service.ports("smtp")[0], timeout=10)
    client.ehlo("c")
    store.fail_write = errno.ENOSPC
    with pytest.raises(smtplib.SMTPDataError) as e:
        client.sendmail("s@x.test", ["r@x.test"], b"Subject: one\r\n\r\n1\r\n")
    assert e.value.smtp_code == 451
    store.fail_write = None
    assert client.sendmail("s@x.test", ["r@x.test"], b"Subject: two\r\n\r\n2\r\n") == {}
    client.quit()
    assert pop_count(service) == 1
