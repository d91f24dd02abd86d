"""
IMAPClient's own live test suite (C{imapclient.livetest}, shipped in the
package) run against our IMAP server, as its author runs it against Dovecot:
every test must pass, and the CONDSTORE, SORT and THREAD tests must run
rather than skip whenever the server announces those extensions.
"""

from __future__ import annotations

import imaplib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_imap import Raw

imapclient = pytest.importorskip("imapclient")

KINDS = ("smtp", "imap")

#: Tests the suite skips on any server that is not Gmail, or that needs an
#: extension we do not offer (ACL, XLIST); UID EXPUNGE is tried only in the UID class.
NOT_OURS = {"test_gmail_labels", "test_gmail_search", "test_gmail_xlist", "test_xlist", "test_getacl",
            "test_uid_expunge"}

#: A skipped test whose name holds one of these must not have been skipped
#: while the server announces the capability.
NEEDS = {"modseq": "CONDSTORE", "fetch_modifiers": "CONDSTORE", "sort": "SORT",
         "thread": "THREAD=REFERENCES"}

#: Extensions that have landed: announced, so their tests run.
LANDED = {"SORT", "THREAD=REFERENCES", "CONDSTORE"}

#: Failures that are the suite's (4.1.0) or the loopback's, whatever the
#: server, each with the words of its error: test_fetch compares the
#: Envelope dataclass with assertSequenceEqual; non-UID MOVE asks imaplib for
#: a move() it lacks; the timeout tests expect a 1 ms connect and a 10 us
#: NOOP to time out, which a loopback server beats (they may pass).
SUITE_DEFECTS = {"test_fetch": "First sequence has no length",
                 "TestWithoutUIDs.test_move": "Unknown IMAP4 command: 'move'",
                 "test_small_connection_timeout_fail": "TimeoutError not raised",
                 "test_small_read_timeout_fail": "TimeoutError not raised"}

#: livetest.main() without unittest.main(): the same four classes, results as JSON.
RUNNER = """
import copy, json, sys, unittest
from imapclient import livetest
from imapclient.config import parse_config_file
conf = parse_config_file(sys.argv[1])
conf.namespace = livetest.probe_host(conf)
livetest.TestGeneral.conf = conf
livetest.TestSocketTimeout.conf = copy.copy(conf)
with_uids = livetest.createUidTestClass(conf, use_uid=True)
with_uids.__name__ = "TestWithUIDs"
without_uids = livetest.createUidTestClass(conf, use_uid=False)
without_uids.__name__ = "TestWithoutUIDs"
suite = unittest.TestSuite()
for cls in (livetest.TestGeneral, livetest.TestSocketTimeout, with_uids, without_uids):
    suite.addTests(unittest.defaultTestLoader.loadTestsFromTestCase(cls))
result = unittest.TextTestRunner(stream=sys.stderr, verbosity=2).run(suite)
label = lambda t: type(t).__name__ + "." + t.id().rsplit(".", 1)[-1]
json.dump({"run": result.testsRun,
           "failed": {label(t): tb for t, tb in result.failures + result.errors},
           "skipped": {label(t): why for t, why in result.skipped}}, sys.stdout)
"""


def run_livetest(port: int, tmp_path: Path) -> dict:
    ini = tmp_path / "livetest.ini"
    ini.write_text(f"[DEFAULT]\nhost = 127.0.0.1\nport = {port}\nssl = false\n"
                   "username = live@localhost\npassword = secret\n")
    # Its own process: the suite's blocking client must not share the GIL
    # with the server's reactor thread (the timeout tests measure microseconds).
    done = subprocess.run([sys.executable, "-c", RUNNER, str(ini)], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-5000:]
    return json.loads(done.stdout)


def test_imapclient_livetest(start_server, tmp_path):
    server = start_server(kinds=KINDS)
    results = run_livetest(server.port("imap"), tmp_path)
    caps = set(server_capabilities(server.port("imap")))
    assert LANDED <= caps  # their tests must run, not skip
    for label, trace in results["failed"].items():
        name = label.split(".")[1]
        words = SUITE_DEFECTS.get(label) or SUITE_DEFECTS.get(name)
        assert words is not None and words in trace, f"{label}\n{trace}"
    for label, why in results["skipped"].items():
        name = label.split(".")[1]
        assert name in NOT_OURS or any(word in name and NEEDS[word] not in caps for word in NEEDS), \
            f"{label} skipped: {why}"
    run, failed, skipped = results["run"], len(results["failed"]), len(results["skipped"])
    print(f"imapclient {imapclient.__version__} livetest: ran {run}, passed {run - failed - skipped}, "
          f"skipped {skipped}, suite defects {failed}: {sorted(results['failed'])}; "
          f"skipped: {sorted(results['skipped'])}")


def server_capabilities(port: int) -> list[str]:
    """What the server announces once logged in (CONDSTORE, SORT, ... are not pre-login)."""
    m = imaplib.IMAP4("127.0.0.1", port)
    m.login("live@localhost", "secret")
    caps = m.capability()[1][0].decode().upper().split()
    m.logout()
    return caps


def test_what_the_suites_defective_tests_check(start_server):
    """
    test_fetch and the non-UID test_move fail in the suite whatever the
    server (SUITE_DEFECTS): their checks, done here with IMAPClient the way
    the suite means them (the envelope compared with ==, MOVE by sequence number).
    """
    from datetime import datetime
    from email.utils import make_msgid

    from imapclient import IMAPClient
    from imapclient.fixed_offset import FixedOffset
    from imapclient.livetest import MULTIPART_MESSAGE
    from imapclient.response_types import Address, Envelope

    server = start_server(kinds=KINDS)
    client = IMAPClient("127.0.0.1", port=server.port("imap"), ssl=False)
    client.login("live@localhost", "secret")
    client.enable("CONDSTORE")
    msg_id = make_msgid()
    msg = f"Message-ID: {msg_id}\r\n" + MULTIPART_MESSAGE
    client.append("INBOX", msg)
    for use_uid in (True, False):
        client.use_uid = use_uid
        client.select_folder("INBOX")
        client.normalise_times = False
        n = client.search()[0]
        info = client.fetch(n, ["RFC822", "FLAGS", "INTERNALDATE", "ENVELOPE"])[n]
        assert set(info) == {b"RFC822", b"FLAGS", b"INTERNALDATE", b"ENVELOPE", b"SEQ", b"MODSEQ"}
        assert info[b"SEQ"] == 1 and info[b"RFC822"] == msg.encode()
        bob = Address(b"Bob Smith", None, b"bob", b"smith.com")
        assert info[b"ENVELOPE"] == Envelope(
            datetime(2010, 3, 16, 16, 45, 32, tzinfo=FixedOffset(0)), b"A multipart message",
            (bob,), (bob,), (bob,),
            (Address(b"Some One", None, b"some", b"one.com"), Address(None, None, b"foo", b"foo.com")),
            None, None, None, msg_id.encode())
    client.create_folder("moved")
    raw = Raw(server.port("imap"))  # MOVE by sequence number, what the suite's non-UID move() means
    raw.command(b"l", b"LOGIN live@localhost secret")
    raw.command(b"s", b"SELECT INBOX")
    assert raw.command(b"m", b"MOVE 1 moved")[-1].startswith(b"m OK")
    raw.close()
    assert client.folder_status("moved", ["MESSAGES"])[b"MESSAGES"] == 1
    client.logout()
