"""
The plugin parses a test host's settings once per process for each
distinct set and moves the frozen result to each test's own data
directory (twisted_mail_screen/pytest_plugin/configcache.py).
"""

from __future__ import annotations

import dataclasses
import os
import smtplib
from pathlib import Path

import pytest

from twisted_mail_screen.config.base import ConfigError
from twisted_mail_screen.pytest_plugin.configcache import host_config
from twisted_mail_screen.pytest_plugin.server import build
from twisted_mail_screen.screening.netmatch import shared_matcher


def _table(data_dir: Path, **extra: object) -> dict[str, object]:
    return {"storage.fsync": False, "data_dir": str(data_dir), **extra}


def test_one_parse_per_settings_each_test_its_own_data_dir_and_socket(tmp_path: Path) -> None:
    first = host_config(_table(tmp_path / "a"))
    second = host_config(_table(tmp_path / "b"))
    assert second.screening is first.screening  # parsed once, reused
    assert first.data_dir == str(tmp_path / "a") and second.data_dir == str(tmp_path / "b")
    assert second.control_socket == os.path.join(str(tmp_path / "b"), "control.sock")
    given = host_config(_table(tmp_path / "c", control_socket=str(tmp_path / "s.sock")))
    assert given.control_socket == str(tmp_path / "s.sock") and given.data_dir == str(tmp_path / "c")
    with pytest.raises(dataclasses.FrozenInstanceError):
        second.data_dir = "elsewhere"  # type: ignore[misc]


def test_an_override_does_not_leak_into_the_next_settings(tmp_path: Path) -> None:
    default = host_config(_table(tmp_path / "a")).smtp.max_recipients
    assert host_config(_table(tmp_path / "b", **{"smtp.max_recipients": 3})).smtp.max_recipients == 3
    assert host_config(_table(tmp_path / "c")).smtp.max_recipients == default
    # True and 1 are equal in Python but not as settings: the second is still refused.
    assert not host_config(_table(tmp_path / "d", **{"screening.enabled": False})).screening.enabled
    with pytest.raises(ConfigError):
        host_config(_table(tmp_path / "e", **{"screening.enabled": 0}))


def test_a_reused_parse_still_checks_the_data_dir(tmp_path: Path) -> None:
    host_config(_table(tmp_path / "a"))
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(ConfigError, match="data_dir"):
        host_config(_table(tmp_path / "file" / "below"))


def test_a_white_list_is_parsed_once_and_a_bad_one_refused_each_time() -> None:
    first = shared_matcher(("127.0.0.1", "10.0.0.0/8"), "screening.whitelist")
    assert shared_matcher(("127.0.0.1", "10.0.0.0/8"), "screening.whitelist") is first
    assert first.matches("10.1.2.3") and not first.matches("192.0.2.1")
    for _ in range(2):
        with pytest.raises(ConfigError, match="screening.whitelist"):
            shared_matcher(("no such network",), "screening.whitelist")


def test_servers_from_one_parse_keep_their_mail_apart(tmp_path: Path) -> None:
    servers = [build(str(tmp_path / name), {}, 5.0, lambda: ("", "")) for name in ("one", "two")]
    try:
        assert servers[1].server.config.screening is servers[0].server.config.screening
        rules = [server.server.service.screening.rules for server in servers]
        assert rules[1].whitelist is rules[0].whitelist  # the configured list parsed once
        for i, server in enumerate(servers):
            with smtplib.SMTP(server.host, server.smtp_port) as client:
                client.sendmail("a@example.org", ["b@example.org"], f"Subject: n{i}\r\n\r\nbody\r\n")
            server.wait_for(f"subject:n{i}")
        for i, server in enumerate(servers):
            assert server.server.config.data_dir == str(tmp_path / ("one", "two")[i])
            assert [m["Subject"] for m in server.messages()] == [f"n{i}"]
    finally:
        for server in servers:
            server.stop()


pytest_plugins = ["pytester"]

MARKERS = '''
import pytest

@pytest.mark.mailserver(hostname="mx.marker.test", smtp__max_recipients=2)
def test_a_marker(mailserver):
    assert mailserver.server.config.hostname == "mx.marker.test"
    assert mailserver.server.config.smtp.max_recipients == 2

def test_b_default_after(mailserver):
    assert mailserver.server.config.hostname == "localhost"
    assert mailserver.server.config.smtp.max_recipients > 2

@pytest.mark.mailserver(hostname="mx.marker.test", smtp__max_recipients=2)
def test_c_marker_again(mailserver, tmp_path):
    assert mailserver.server.config.hostname == "mx.marker.test"
    assert mailserver.data_dir == str(tmp_path / "mailscreen")
    assert mailserver.server.config.data_dir == mailserver.data_dir
'''


def test_a_marker_does_not_leak_into_the_next_test_in_the_process(
        pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).resolve().parent.parent))
    pytester.makepyfile(MARKERS)
    pytester.runpytest_subprocess("-p", "no:cacheprovider").assert_outcomes(passed=3)
