"""
Compatibility with a real Mailpit client: the npm C{mailpit-api} package
(pinned in tests/js/package.json, installed by C{npm ci} in .ci/run) run
by node against the web port. It lists, searches, opens a message, reads
its headers, source and attachment, marks read and unread, waits, and
deletes, each through the client's own methods.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from test_web_messages import send

JS = Path(__file__).parent / "js"


def _node() -> str:
    node = shutil.which("node")
    if node is None or not (JS / "node_modules" / "mailpit-api").is_dir():
        if os.environ.get("MAILSCREEN_REQUIRE_CLIENTS") == "1":
            pytest.fail("node or tests/js/node_modules missing: run 'npm ci --prefix tests/js'")
        pytest.skip("node or the mailpit-api package is not installed (npm ci --prefix tests/js)")
    return node


def test_the_npm_mailpit_api_client_works_against_us(start_server):
    node = _node()
    server = start_server(kinds=("smtp", "web"))
    send(server, subject="Compat plain", text="first body")
    send(server, subject="Compat attachment", text="second body", attachment=b"attached bytes")
    result = subprocess.run([node, str(JS / "mailpit_client.mjs"), str(server.port("web"))],
                            capture_output=True, text=True, timeout=60, cwd=JS)
    assert result.returncode == 0, result.stderr + result.stdout
    seen = json.loads(result.stdout)
    assert seen["list"] == {"total": 2, "unread": 2,
                            "subjects": ["Compat attachment", "Compat plain"]}
    assert seen["search"] == ["Compat attachment"]
    assert seen["message"] == {"subject": "Compat attachment", "from": "sender@example.org",
                               "text": "second body", "attachments": ["data.bin"]}
    assert seen["headerSubject"] == ["Compat attachment"] and seen["rawHasSubject"] is True
    assert seen["part"] == "attached bytes"
    assert seen["latestText"] == "second body"
    assert (seen["unreadAfterOpen"], seen["unreadAfterUnmark"], seen["unreadAfterAllRead"]) == (1, 2, 0)
    assert seen["setUnread"] == "ok" and seen["waitedCount"] == 2
    assert seen["deleteOne"] == "ok" and seen["afterDelete"] == ["Compat plain"]
    assert seen["deleteBySearch"] == "ok" and seen["afterSearchDelete"] == 0
    assert seen["unknown"] == "404"
