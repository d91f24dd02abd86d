"""
The users and aliases files are looked at (one stat each) at most once a
second by the server's clock, not at every RCPT: an account or alias added
by another process is accepted once the clock has moved a second, and not
before; one added through an AccountStore in the server's own process
(the pytest plugin's add_user) at once. The server's clock is a
task.Clock the test moves.
"""

from __future__ import annotations

import smtplib
import subprocess
import sys
from pathlib import Path

import pytest
from twisted.internet.task import Clock

from twisted_mail_screen.runtime.atomic import write_atomically
from twisted_mail_screen.store.accounts import AccountStore
from twisted_mail_screen.store.passwords import hash_password


def rcpt(server, address: str) -> int:
    with smtplib.SMTP("127.0.0.1", server.port("smtp"), timeout=30) as s:
        s.ehlo("client.example.org")
        assert s.mail("someone@example.org")[0] == 250
        return s.rcpt(address)[0]


def append_line(path: Path, line: str) -> None:
    """An edit by another program: the file replaced, as an editor or the CLI does."""
    text = path.read_text() if path.exists() else ""
    write_atomically(str(path), (text + line + "\n").encode(), 0o600)


@pytest.fixture
def site(start_server, accounts):
    return start_server(site=True, clock=Clock())


def test_a_user_added_by_another_process_is_accepted_a_second_later(site, tmp_path):
    users = tmp_path / "data" / "users"
    assert rcpt(site, "carol@example.test") == 550
    append_line(users, f"carol@example.test:{hash_password('pw')}")
    site.advance(0.9)
    assert rcpt(site, "carol@example.test") == 550  # the file's version looked at less than 1 s ago
    site.advance(0.1)
    assert rcpt(site, "carol@example.test") == 250
    # Taken away the same way.
    write_atomically(str(users), b"".join(l.encode() + b"\n" for l in users.read_text().splitlines()
                                          if not l.startswith("carol@")), 0o600)
    assert rcpt(site, "carol@example.test") == 250
    site.advance(1)
    assert rcpt(site, "carol@example.test") == 550


def test_an_alias_added_by_the_cli_is_accepted_a_second_later(site, tmp_path):
    assert rcpt(site, "team@example.test") == 550
    result = subprocess.run([sys.executable, "-m", "twisted_mail_screen.admin.cli", "--data-dir",
                             str(tmp_path / "data"), "alias", "set", "team@example.test",
                             "alice@example.test"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert rcpt(site, "team@example.test") == 550
    site.advance(1)
    assert rcpt(site, "team@example.test") == 250


def test_a_user_added_in_the_server_s_own_process_is_accepted_at_once(site, tmp_path):
    assert rcpt(site, "dave@example.test") == 550
    AccountStore(str(tmp_path / "data")).add_user("dave@example.test", "pw")
    assert rcpt(site, "dave@example.test") == 250
