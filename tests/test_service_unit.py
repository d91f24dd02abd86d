"""
Running as a service: the systemd unit (etc/systemd/mailscreen.service) is
valid, and `twistd --uid/--gid` binds privileged ports as root before it
drops to the unprivileged user that then writes the mail.
"""

from __future__ import annotations

import os
import pwd
import grp
import shutil
import smtplib
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest

from test_twistd import EPHEMERAL, TWISTD, _plugin_visible, wait_for_ports

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "etc" / "systemd" / "mailscreen.service"
INSTALLED_TWISTD = "/opt/mailscreen/bin/twistd"


def test_unit_passes_systemd_analyze_verify(tmp_path):
    """systemd-analyze verify finds nothing to say about the unit (no unknown or bad keys)."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        if os.environ.get("MAILSCREEN_REQUIRE_CLIENTS"):
            pytest.fail("systemd-analyze missing (Debian package systemd)", pytrace=False)
        pytest.skip("systemd-analyze not installed (Debian package systemd)")
    assert TWISTD is not None
    text = UNIT.read_text()
    assert INSTALLED_TWISTD in text
    # verify checks that ExecStart's binary exists: point it at this venv's twistd.
    unit = tmp_path / "mailscreen.service"
    unit.write_text(text.replace(INSTALLED_TWISTD, TWISTD))
    out = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert [l for l in out.stderr.splitlines() if str(unit) in l] == []


def test_unit_runs_twistd_with_a_privilege_drop_and_hardening():
    text = UNIT.read_text()
    for line in ("--uid mailscreen --gid mailscreen", "ProtectSystem=strict",
                 "ReadWritePaths=/var/lib/mailscreen", "NoNewPrivileges=yes"):
        assert line in text


def _free_privileged_port() -> int:
    for port in range(1000, 600, -1):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError("no free port below 1024")


def _status_ids(pid: int) -> dict[str, list[int]]:
    ids = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("Uid", "Gid"):
            ids[key] = [int(v) for v in value.split()]
    return ids


@pytest.mark.skipif(os.geteuid() != 0, reason="the privilege drop needs root")
@pytest.mark.skipif(not os.environ.get("MAILSCREEN_REQUIRE_TWISTD") and not _plugin_visible(),
                    reason="twistd mailscreen needs a non-editable install: pip install .")
def test_twistd_binds_a_privileged_port_as_root_then_runs_as_nobody():
    """
    Started as root with --uid nobody --gid nogroup, the server listens on
    a port below 1024, then runs as nobody: every uid of the process is
    nobody's and the delivered message file belongs to nobody.
    """
    nobody = pwd.getpwnam("nobody").pw_uid
    nogroup = grp.getgrnam("nogroup").gr_gid
    # Not under pytest's tmp_path: its parents are root's, mode 700.
    base = Path(tempfile.mkdtemp(prefix="mailscreen-unit-"))
    try:
        os.chmod(base, 0o755)
        data = base / "data"
        data.mkdir(mode=0o750)
        os.chown(data, nobody, nogroup)
        port = _free_privileged_port()
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        assert TWISTD is not None
        config = base / "mailscreen.toml"
        config.write_text(f'data_dir = "{data}"\n[listen]\nsmtp = ["tcp:{port}:interface=127.0.0.1"]\n'
                          f'pop3 = ["{EPHEMERAL}"]\nimap = []\nweb = []\n')
        proc = subprocess.Popen(
            [TWISTD, "-n", "--pidfile=", "--uid", "nobody", "--gid", "nogroup", "mailscreen",
             "--config", str(config)],
            cwd=base, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            ports = wait_for_ports(proc, {"smtp", "pop3"})
            assert ports.get("smtp") == port, "no SMTP listener on the privileged port"
            client = smtplib.SMTP("127.0.0.1", port, timeout=10)
            client.sendmail("app@dev.test", ["someone@example.com"], b"Subject: hi\r\n\r\nhello\r\n")
            client.quit()
            new = data / "mail" / "example.com" / "someone" / "new"
            files = list(new.iterdir())
            assert len(files) == 1
            assert files[0].stat().st_uid == nobody
            # Read after a session: the reactor runs only once privileges are shed.
            ids = _status_ids(proc.pid)
            assert ids["Uid"] == [nobody] * 4 and ids["Gid"] == [nogroup] * 4, ids
            assert proc.poll() is None
        finally:
            proc.terminate()
            out, _ = proc.communicate(timeout=30)
        assert "Traceback" not in out, out
    finally:
        shutil.rmtree(base, ignore_errors=True)
