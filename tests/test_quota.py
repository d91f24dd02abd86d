"""
Quotas outside IMAP, over real sockets: SMTP's 452 4.2.2 / 552 5.2.2 at RCPT
and at the end of the data (only the full recipients refused), POP3
deletion freeing room, usage right after a restart, the CLI (running
server and offline), GET /api/v1/quota, the [quota] section, and the
usage cache's recount when a change races its first count.
"""

from __future__ import annotations

import imaplib
import json
import poplib
import smtplib
import subprocess
import sys

import pytest
from twisted.internet.defer import Deferred

from tests.conftest import converse, maildir_files
from tests.webclient import basic, call
from twisted_mail_screen.config.base import ConfigError
from twisted_mail_screen.config.settings import parse_config
from twisted_mail_screen.quota import maildirsize
from twisted_mail_screen.quota.config import Limits
from twisted_mail_screen.quota.service import QuotaService
from twisted_mail_screen.quota.state import Usage
from twisted_mail_screen.store.maildir import MailStore
from twisted_mail_screen.testing import InlineWorkers

KINDS = ("smtp", "pop3", "imap")
BOB = "bob@localhost"
CAROL = "carol@localhost"


def body(lines: int = 20) -> bytes:
    return b"From: a@example.org\r\nSubject: hi\r\n\r\n" + (b"x" * 98 + b"\r\n") * lines


def send(server, to=(BOB,), message: bytes | None = None) -> dict:
    with smtplib.SMTP("127.0.0.1", server.port("smtp")) as s:
        return s.sendmail("sender@example.org", list(to), message or body())


def getquota(server, user: str = BOB) -> bytes:
    m = imaplib.IMAP4("127.0.0.1", server.port("imap"))
    m.login(user, "x")
    typ, data = m._simple_command("GETQUOTA", '""')
    assert typ == "OK"
    line = m._untagged_response(typ, data, "QUOTA")[1][0]
    m.logout()
    return line


def cli(data, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "twisted_mail_screen.admin.cli", "--data-dir",
                           str(data), "quota", *args], capture_output=True, text=True, timeout=60)


# SMTP


def test_rcpt_to_a_full_mailbox_is_refused_alone(start_server, tmp_path):
    server = start_server(kinds=KINDS, quota__messages=1)
    send(server)
    refused = send(server, to=(BOB, CAROL))
    assert list(refused) == [BOB]
    code, text = refused[BOB]
    assert code == 452 and text.startswith(b"4.2.2")
    assert len(maildir_files(tmp_path / "data", BOB)) == 1
    assert len(maildir_files(tmp_path / "data", CAROL)) == 1


def test_message_larger_than_the_quota_552_at_rcpt_with_size_and_at_end_of_data(start_server, tmp_path):
    server = start_server(kinds=KINDS, quota__storage_mb=1)
    big = body(11000)  # about 1.1 MB
    with pytest.raises(smtplib.SMTPRecipientsRefused) as e:  # smtplib declares SIZE=
        send(server, message=big)
    assert e.value.recipients[BOB][0] == 552 and e.value.recipients[BOB][1].startswith(b"5.2.2")
    # Without SIZE= the recipient is taken and the end of the data answers.
    replies = converse(server.port("smtp"), b"EHLO c\r\nMAIL FROM:<a@example.org>\r\n"
                       b"RCPT TO:<" + BOB.encode() + b">\r\nDATA\r\n" + big + b".\r\n", 5,
                       finals_only=True)
    assert replies[-1].startswith(b"552 5.2.2")
    assert maildir_files(tmp_path / "data", BOB) == []


def test_mailbox_filled_by_this_message_gets_452_at_end_of_data(start_server, tmp_path):
    server = start_server(kinds=KINDS, quota__storage_mb=1)
    send(server, message=body(7000))  # about 700 KB of the 1 MiB
    replies = converse(server.port("smtp"), b"EHLO c\r\nMAIL FROM:<a@example.org>\r\n"
                       b"RCPT TO:<" + BOB.encode() + b">\r\nDATA\r\n" + body(5000) + b".\r\n", 5,
                       finals_only=True)
    assert replies[2].startswith(b"250 ")  # RCPT: there was room
    assert replies[-1].startswith(b"452 4.2.2")
    assert len(maildir_files(tmp_path / "data", BOB)) == 1


def test_pop3_deletion_makes_room(start_server):
    server = start_server(kinds=KINDS, quota__messages=1)
    send(server)
    with pytest.raises(smtplib.SMTPRecipientsRefused):
        send(server)
    pop = poplib.POP3("127.0.0.1", server.port("pop3"))
    pop.user(BOB)
    pop.pass_("x")
    pop.dele(1)
    pop.quit()
    assert send(server) == {}


def test_usage_is_right_after_a_restart(start_server):
    server = start_server(kinds=KINDS, quota__messages=10, quota__storage_mb=5)
    for _ in range(3):
        send(server)
    m = imaplib.IMAP4("127.0.0.1", server.port("imap"))
    m.login(BOB, "x")
    m.select("INBOX")
    m.store("1", "+FLAGS", "\\Deleted")
    m.expunge()
    m.copy("1", "Archive")
    m.logout()
    before = getquota(server)
    assert before.endswith(b"MESSAGE 3 10)")
    server.stop()
    again = start_server(kinds=KINDS, quota__messages=10, quota__storage_mb=5)
    assert getquota(again) == before


# the CLI, the control channel, the web API


def test_cli_sets_limits_on_the_running_server_and_shows_usage(start_server, tmp_path):
    server = start_server(kinds=KINDS)
    send(server)
    result = cli(tmp_path / "data", "set", BOB, "--messages", "1", "--storage-mb", "2")
    assert result.returncode == 0, result.stderr
    assert "messages 1 of 1" in result.stdout and "of 2048 KiB" in result.stdout
    saved = json.loads((tmp_path / "data" / "quota.json").read_text())
    assert saved == {"accounts": {BOB: {"messages": 1, "storage_kib": 2048}}}
    with pytest.raises(smtplib.SMTPRecipientsRefused):  # at once, no restart
        send(server)
    shown = cli(tmp_path / "data", "show", BOB)
    assert shown.returncode == 0 and shown.stdout.startswith(f"{BOB}: storage 3 KiB of 2048 KiB,")
    assert cli(tmp_path / "data", "set", BOB, "--default").returncode == 0
    assert send(server) == {}
    assert json.loads((tmp_path / "data" / "quota.json").read_text()) == {"accounts": {}}
    bad = cli(tmp_path / "data", "set", BOB, "--messages", "-1")
    assert bad.returncode == 1 and "messages must be an integer from 0" in bad.stderr
    assert "needs a USER" in cli(tmp_path / "data", "show").stderr


def test_cli_without_a_server_writes_the_file_the_next_start_reads(start_server, tmp_path):
    data = tmp_path / "data"
    result = cli(data, "set", BOB, "--messages", "1")
    assert result.returncode == 0, result.stderr
    assert "applies when it starts" in result.stdout
    server = start_server(kinds=KINDS)
    send(server)
    with pytest.raises(smtplib.SMTPRecipientsRefused):
        send(server)
    server.stop()
    shown = cli(data, "show", BOB)
    assert "messages 1 of 1" in shown.stdout


def test_a_broken_limits_file_stops_the_start(start_server, tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "quota.json").write_text('{"accounts": {"a@b.test": {"messages": -4}}}')
    with pytest.raises(ConfigError, match="messages must be an integer"):
        start_server(kinds=KINDS)


def test_web_api_admin_sees_everyone_a_user_themself(start_server, accounts):
    server = start_server(site=True, kinds=("smtp", "web"), web__admins=["alice@example.test"],
                          quota__messages=5)
    send(server, to=("bob@example.test",))
    admin, bob = basic("alice@example.test", "alice-secret"), basic("bob@example.test", "bob-secret")
    everyone = call(server.port("web"), "GET", "/api/v1/quota", headers=admin)
    assert everyone.status == 200
    rows = {r["account"]: r for r in everyone.json["accounts"]}
    assert set(rows) >= {"alice@example.test", "bob@example.test"}
    assert rows["bob@example.test"]["messages"] == {"used": 1, "limit": 5, "own_limit": False}
    assert rows["alice@example.test"]["storage"]["limit_kib"] is None
    own = call(server.port("web"), "GET", "/api/v1/quota", headers=bob)
    assert [r["account"] for r in own.json["accounts"]] == ["bob@example.test"]
    other = call(server.port("web"), "GET", "/api/v1/quota?account=alice@example.test", headers=bob)
    assert other.status == 403
    bad = call(server.port("web"), "GET", "/api/v1/quota?account=nobody", headers=admin)
    assert bad.status == 400


# configuration


def test_quota_section_is_parsed_and_checked():
    assert parse_config({"quota": {"storage_mb": 3, "messages": 9}}).quota.default == Limits(3072, 9)
    assert parse_config({}).quota.default == Limits(0, 0)
    with pytest.raises(ConfigError, match="quota.storage_mb") as e:
        parse_config({"quota": {"storage_mb": -1}})
    assert "at least 0" in str(e.value)
    with pytest.raises(ConfigError, match="quota.messages"):
        parse_config({"quota": {"messages": "many"}})
    with pytest.raises(ConfigError, match="quota.storage"):
        parse_config({"quota": {"storage": 1}})


# the usage in maildirsize


def _message(tmp_path, name: str) -> str:
    new = tmp_path / "localhost" / "bob" / "new"
    new.mkdir(parents=True, exist_ok=True)
    (new / name).write_bytes(b"x")
    return name


def test_two_services_on_one_maildir_share_its_maildirsize(tmp_path):
    """
    Two processes' quota services (each with its own memory) on one
    Maildir: what one records the other reads, by the file's stale check;
    the file is recalculated when missing, over 5120 octets, unreadable or
    made for other limits; a torn last line is not counted.
    """
    store = MailStore(str(tmp_path))
    limits = str(tmp_path / "q.json")
    one = QuotaService(store, InlineWorkers().run, Limits(0, 10), limits)
    two = QuotaService(store, InlineWorkers().run, Limits(0, 10), limits)
    box = tmp_path / "localhost" / "bob"
    size_file = box / maildirsize.FILENAME
    assert one.usage(BOB).result == Usage()  # no Maildir yet: nothing, and no file made
    assert not box.exists()
    first = _message(tmp_path, "1.M1P1.h,S=90,W=100")
    assert one.usage(BOB).result == Usage(100, 1)  # missing: counted, written
    assert size_file.read_text() == "10C\n100 1\n"
    second = _message(tmp_path, "2.M2P1.h,S=190,W=200")
    assert one.stored(BOB, [second]).called
    assert size_file.read_text() == "10C\n100 1\n200 1\n"
    assert two.usage(BOB).result == Usage(300, 2)
    (box / "new" / first).unlink()
    two.removed(BOB, [first])
    assert one.usage(BOB).result == Usage(200, 1)  # the other's change, by the stale check
    with open(size_file, "a") as f:
        f.write("5000 ")  # an append under way elsewhere: not counted until its line ends
    assert two.usage(BOB).result == Usage(200, 1)
    with open(size_file, "a") as f:
        f.write("7\n")
    assert two.usage(BOB).result == Usage(5200, 8)
    size_file.write_text("10C\n200 1\nbanana\n")  # unreadable: the truth is counted again
    assert one.usage(BOB).result == Usage(200, 1)
    assert size_file.read_text() == "10C\n200 1\n"
    for _ in range(400):  # deltas past 5120 octets are summed into one line
        one.changed(BOB, 5, 1)
        one.changed(BOB, -5, -1)
    assert size_file.stat().st_size <= maildirsize.RECALCULATE_OVER
    assert two.usage(BOB).result == Usage(200, 1)
    other = QuotaService(store, InlineWorkers().run, Limits(1, 0), limits)  # limits changed
    assert other.usage(BOB).result == Usage(200, 1)
    assert size_file.read_text() == "1024S\n200 1\n"
    other.forget(BOB)  # a folder deleted: no delta says what went
    assert not size_file.exists()
    unlimited = QuotaService(store, InlineWorkers().run, Limits(0, 0), limits)
    unlimited.stored(BOB, [second])
    assert not size_file.exists()  # an account without limits keeps no file
    assert unlimited.usage(BOB).result == Usage(200, 1)  # counted when asked


def test_a_check_waits_for_this_process_s_earlier_change(tmp_path):
    """One process's quota jobs for an account run in turn: a check made after a change sees it."""
    jobs: list[tuple[Deferred, object, tuple]] = []

    def run(f, *args):  # the worker pool, stepped by the test
        d: Deferred = Deferred()
        jobs.append((d, f, args))
        return d

    _message(tmp_path, "1.M1P1.h,S=90,W=100")
    quota = QuotaService(MailStore(str(tmp_path)), run, Limits(0, 10), str(tmp_path / "q.json"))
    recorded = quota.changed(BOB, 100, 1)
    checked: list[Usage] = []
    quota.usage(BOB).addCallback(checked.append)
    assert len(jobs) == 1 and jobs[0][1] is maildirsize.add  # the check waits its turn
    d, f, args = jobs[0]
    d.callback(f(*args))
    assert recorded.called and len(jobs) == 2 and jobs[1][1] is maildirsize.current
    d, f, args = jobs[1]
    d.callback(f(*args))
    assert checked == [Usage(100, 1)]


def test_mail_deleted_through_the_web_api_frees_room(start_server):
    server = start_server(kinds=KINDS + ("web",), quota__messages=2)
    send(server)
    send(server)
    assert getquota(server).endswith(b"MESSAGE 2 2)")
    assert call(server.port("web"), "DELETE", "/api/v1/messages").status == 200
    assert getquota(server).endswith(b"MESSAGE 0 2)")
    assert send(server) == {}
