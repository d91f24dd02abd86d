"""
The fault plan's commands (faults/commands.py), the one implementation
behind the web API and the control channel, and the C{mailscreen
faults} command that drives them on a running test host.
"""

from __future__ import annotations

import smtplib
import subprocess
import sys

import pytest

from twisted_mail_screen.faults.commands import FaultCommands, UnknownRule
from twisted_mail_screen.faults.plan import FaultPlan
from twisted_mail_screen.runtime import control


def mailscreen(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "twisted_mail_screen.admin.cli", *args],
                          capture_output=True, text=True, timeout=60)


def test_commands_add_list_remove_clear() -> None:
    commands = FaultCommands(FaultPlan())
    rule = commands.add({"kind": "mailbox_full", "address": "full@x.test", "times": 3})
    assert rule == {"kind": "mailbox_full", "command": "RCPT", "match": "full@x.test",
                    "reply": "452 4.2.2 Mailbox full", "seconds": 0.0, "remaining": 3, "id": 1}
    second = commands.add({"kind": "disconnect", "after": "DATA", "times": None})
    assert [r["id"] for r in commands.list()] == [1, 2] and second["remaining"] is None
    assert commands.remove(1) is True
    with pytest.raises(UnknownRule, match="no active fault rule with id 1"):
        commands.remove(1)
    with pytest.raises(ValueError, match="id must be an integer"):
        commands.remove("2")
    assert commands.clear() == 1 and commands.list() == []
    # ids are never reused: an old id cannot remove a newer rule
    assert commands.add({"kind": "fail_auth", "user": "bob*"})["id"] == 3


def test_control_channel_and_cli_on_a_running_test_host(start_server, tmp_path) -> None:
    server = start_server(kinds=("smtp",))
    data = str(tmp_path / "data")
    result = mailscreen("--data-dir", data, "faults", "add", "tempfail", "--command", "RCPT",
                        "--match", "*@later.test", "--reply", "450 4.2.0 try later", "--times", "2")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "1  tempfail  RCPT  match=*@later.test  reply='450 4.2.0 try later'  2 left\n"
    for _ in range(2):
        with smtplib.SMTP("127.0.0.1", server.port("smtp")) as s:
            with pytest.raises(smtplib.SMTPRecipientsRefused, match="try later"):
                s.sendmail("a@example.test", ["b@later.test"], b"Subject: x\r\n\r\nx\r\n")
    assert mailscreen("--data-dir", data, "faults", "list").stdout == "no fault rules\n"
    assert control.call(data, "faults.add", rule={"kind": "delay", "command": "DATA", "seconds": 2})["id"] == 2
    assert mailscreen("--data-dir", data, "faults", "add", "reject", "--times", "forever").returncode == 0
    listing = mailscreen("--data-dir", data, "faults", "list").stdout
    assert listing == ("2  delay  DATA  seconds=2  1 left\n"
                       "3  reject  RCPT  match=*@bounce.test  reply='550 5.1.1 No such user'  until cleared\n")
    assert mailscreen("--data-dir", data, "faults", "remove", "2").stdout == "removed fault rule 2\n"
    assert mailscreen("--data-dir", data, "faults", "clear").stdout == "removed 1 fault rule(s)\n"


def test_cli_errors_are_readable(start_server, tmp_path) -> None:
    start_server(kinds=("smtp",))
    data = str(tmp_path / "data")
    cases = [
        (["add", "explode"], "kind must be one of reject, tempfail"),
        (["add"], "faults add needs a KIND"),
        (["add", "reject", "--reply", "250 fine"], "reply must be one line of at most 510 characters starting with a 5xx code"),
        (["add", "delay", "--command", "DATA"], "missing a required argument: 'seconds'"),
        (["add", "reject", "--times", "often"], "--times must be a positive number or 'forever'"),
        (["add", "reject", "--seconds", "3"], "unexpected keyword argument 'seconds'"),
        (["remove", "7"], "no active fault rule with id 7"),
        (["remove"], "faults remove needs the rule's ID"),
    ]
    for args, message in cases:
        result = mailscreen("--data-dir", data, "faults", *args)
        assert result.returncode == 1 and message in result.stderr, (args, result.stderr)
    assert control.call(data, "faults.list") == []


def test_site_mode_has_no_fault_commands(start_server, tmp_path) -> None:
    start_server(site=True, kinds=("smtp",))
    data = str(tmp_path / "data")
    with pytest.raises(control.CommandError, match="faults.list"):
        control.call(data, "faults.list")
    result = mailscreen("--data-dir", data, "--config", str(_site_toml(tmp_path)), "faults", "list")
    assert result.returncode == 1
    assert "faults exist only on a test host" in result.stderr


def _site_toml(tmp_path):
    f = tmp_path / "site.toml"
    f.write_text('mode = "site"\ndomains = ["example.test"]\n')
    return f
