"""
`twistd mailscreen` from the installed package, as a subprocess.

The dropin is only visible to twistd from a non-editable install
(`pip install .`); where it is not (an editable install), these tests are
skipped, unless MAILSCREEN_REQUIRE_TWISTD=1 (set by .ci/run) makes that a
failure.
"""

from __future__ import annotations

import os
import poplib
import re
import shutil
import smtplib
import subprocess
import sys
import time
from pathlib import Path

import pytest

TWISTD = shutil.which("twistd", path=os.path.dirname(sys.executable)) or shutil.which("twistd")


def _plugin_visible() -> bool:
    if TWISTD is None:
        return False
    out = subprocess.run([TWISTD, "--help"], capture_output=True, text=True, cwd="/", timeout=60)
    return "mailscreen" in out.stdout


pytestmark = pytest.mark.skipif(
    not os.environ.get("MAILSCREEN_REQUIRE_TWISTD") and not _plugin_visible(),
    reason="twistd mailscreen needs a non-editable install: pip install .")

EPHEMERAL = "tcp:0:interface=127.0.0.1"


def twistd(tmp_path: Path, *args: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.Popen([TWISTD, "-n", "--pidfile=", "mailscreen", *args],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def wait_for_ports(proc: subprocess.Popen, kinds: set[str]) -> dict[str, int]:
    ports: dict[str, int] = {}
    deadline = time.monotonic() + 60
    assert proc.stdout is not None
    while not kinds <= set(ports) and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        m = re.search(r"(SMTP|POP3|IMAP|Submission) listening: connect to [\d.]+:(\d+)", line)
        if m:
            ports[m.group(1).lower()] = int(m.group(2))
    return ports


def test_twistd_mailscreen_runs_from_the_installed_package(tmp_path):
    """The plugin is discoverable; the server logs its listeners and delivers mail to POP3."""
    proc = twistd(tmp_path, "--data-dir", str(tmp_path / "data"), "--smtp", EPHEMERAL,
                  "--pop3", EPHEMERAL, "--imap", EPHEMERAL, "--web", EPHEMERAL)
    try:
        ports = wait_for_ports(proc, {"smtp", "pop3"})
        assert {"smtp", "pop3"} <= set(ports), "no listener lines in the log"
        client = smtplib.SMTP("127.0.0.1", ports["smtp"], timeout=10)
        client.sendmail("app@dev.test", ["someone@example.com"], b"Subject: hi\r\n\r\nhello\r\n")
        client.quit()
        pop = poplib.POP3("127.0.0.1", ports["pop3"], timeout=10)
        pop.user("someone@example.com")
        pop.pass_("whatever")
        assert pop.retr(1)[1][-1] == b"hello"
        pop.quit()
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.mark.parametrize("config, key", [
    ('colour = "blue"\n', "colour"),
    ('[smtp]\nmax_recipients = "ten"\n', "smtp.max_recipients"),
    ('[listen]\npop3 = ["tcp:notaport"]\n', "listen.pop3"),
    ('[tls]\ncertificate = "/nonexistent.pem"\n', "tls.certificate"),
])
def test_bad_config_exits_non_zero_naming_the_key(tmp_path, config, key):
    """A bad config file stops twistd before it binds anything, naming the key."""
    f = tmp_path / "bad.toml"
    text = f'data_dir = "{tmp_path / "data"}"\n' + config
    text += ("" if "[listen]" in config else "[listen]\n") + f'smtp = ["{EPHEMERAL}"]\nimap = []\nweb = []\n'
    f.write_text(text)
    proc = twistd(tmp_path, "--config", str(f))
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert key in out
    assert "listening" not in out
