"""
What keeps a function-scoped C{mailserver} cheap (bench/plugin_startup.py,
docs/performance.md): no fsyncs on a test host, DKIM's libraries imported
only when a key is configured (zoneinfo when a query names a zone), the web page's files read once per process,
plain C{tcp:} listen strings and the control socket built without the strports parser;
POP3, IMAP and the web port built on first use, what is not configured not imported (nor
imported on the reactor thread), the process's thread pools borrowed, no start sweep of a
new data directory; no C{twisted.mail.smtp} (dates by C{email.utils}), the DSN modules
imported, in a worker thread, on the first NOTIFY=SUCCESS.
"""

from __future__ import annotations

import imaplib
import os
import poplib
import smtplib
import ssl
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Callable

import pytest
from twisted.internet.endpoints import quoteStringArgument, serverFromString
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactor

from twisted_mail_screen.config.settings import load_config
from twisted_mail_screen.pytest_plugin.server import build
from twisted_mail_screen.runtime.endpoints import control_endpoint, server_endpoint
from twisted_mail_screen.runtime.service import build_service
from twisted_mail_screen.runtime.sharedpool import SharedPools
from twisted_mail_screen.store.maildir import MailStore, TmpCleaner
from twisted_mail_screen.testcert import make_certificate
from twisted_mail_screen.testing import InlineWorkers, RunningServer, ephemeral_overrides, in_reactor
from twisted_mail_screen.web.ui import load_static

ROOT = Path(__file__).resolve().parent.parent


def run_script(script: str, *args: str) -> list[str]:
    """The lines a fresh interpreter running C{script} printed (imports are what these tests watch)."""
    done = subprocess.run([sys.executable, "-c", script, *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


@pytest.fixture
def fsyncs(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Every os.fsync of this process (the real call still happens), by fd."""
    calls: list[int] = []
    real: Callable[[int], None] = os.fsync

    def counted(fd: int) -> None:
        calls.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fsync", counted)
    return calls


def _send_and_read(options: dict[str, Any], data_dir: Path, fsyncs: list[int]) -> int:
    """Deliver one message to b@example.test; the fsyncs of the delivery."""
    server = build(str(data_dir), options, 5.0, lambda: ("", ""))
    try:
        if server.site:
            server.add_user("b@example.test", "secret")
        del fsyncs[:]
        with smtplib.SMTP(server.host, server.smtp_port) as client:
            client.sendmail("a@example.test", ["b@example.test"], b"Subject: hi\r\n\r\nx\r\n")
        found = server.wait_for("addressed:b@example.test")
        assert [m["Subject"] for m in found] == ["hi"]
        return len(fsyncs)
    finally:
        server.stop()


def test_a_test_host_delivers_without_fsync(tmp_path: Path, fsyncs: list[int]) -> None:
    assert _send_and_read({}, tmp_path / "host", fsyncs) == 0


def test_site_mode_and_the_marker_keep_every_fsync(tmp_path: Path, fsyncs: list[int]) -> None:
    """The file, the three new directories up to mail/, and new/ after the rename."""
    assert _send_and_read({"site": True}, tmp_path / "site", fsyncs) == 5
    assert _send_and_read({"storage__fsync": True}, tmp_path / "durable", fsyncs) == 5


def test_dkim_and_dnspython_are_imported_only_for_a_key(tmp_path: Path) -> None:
    """
    A server with no [dkim] keys and no [mail_auth] never imports them;
    zoneinfo waits for a query that names a time zone; a server without
    TLS listeners, a relay or Redis never imports Twisted's endpoints
    module (8 ms).
    """
    script = (
        "import sys\n"
        "from twisted_mail_screen.pytest_plugin.server import build\n"
        f"build({str(tmp_path / 'data')!r}, {{}}, 5.0, lambda: ('', '')).stop()\n"
        "print(sorted(m for m in ('dkim', 'dns.resolver', 'twisted_mail_screen.mailauth.sign',"
        " 'zoneinfo', 'twisted.internet.endpoints')"
        " if m in sys.modules))\n")
    assert run_script(script) == ["[]"]


@pytest.mark.parametrize("description", [
    "tcp:0:interface=127.0.0.1", "tcp:2525", "tcp:port=25:interface=0.0.0.0",
    "tcp:0:interface=\\:\\:1", "tcp:0:backlog=7:interface=127.0.0.1",
])
def test_plain_tcp_strings_listen_as_the_strports_parser_would(description: str) -> None:
    """The shortcut for the commonest strings asks the reactor for exactly the same listen."""
    ours, theirs = MemoryReactor(), MemoryReactor()
    server_endpoint(ours, description, Clock()).listen(object())  # type: ignore[arg-type]
    serverFromString(theirs, description).listen(object())  # type: ignore[arg-type]
    assert [(port, backlog, interface) for port, _, backlog, interface in ours.tcpServers] == \
        [(port, backlog, interface) for port, _, backlog, interface in theirs.tcpServers]


@pytest.mark.parametrize("path", ["/run/mailscreen/control.sock", "/tmp/a:b\\d/control.sock"])
def test_control_socket_listens_as_its_strports_string_would(path: str) -> None:
    """Same path, backlog, mode 0600 and PID lock file as C{unix:PATH:mode=600:lockfile=1}."""
    ours, theirs = MemoryReactor(), MemoryReactor()
    control_endpoint(ours, path).listen(object())  # type: ignore[arg-type]
    description = f"unix:{quoteStringArgument(path)}:mode=600:lockfile=1"
    serverFromString(theirs, description).listen(object())  # type: ignore[arg-type]
    assert [(a, backlog, mode, pid) for a, _, backlog, mode, pid in ours.unixServers] == \
        [(a, backlog, mode, pid) for a, _, backlog, mode, pid in theirs.unixServers]
    assert ours.unixServers[0][0] == path and ours.unixServers[0][3] == 0o600


def test_a_started_server_control_socket_is_0600_with_its_pid_lock(tmp_path: Path) -> None:
    """Bound when the test first asks for it, answering then, gone after the stop."""
    server = build(str(tmp_path / "data"), {}, 5.0, lambda: ("", ""))
    path = str(tmp_path / "data" / "control.sock")
    try:
        assert not os.path.lexists(path) and not os.path.lexists(path + ".lock")
        assert server.control_socket == path
        assert os.stat(path).st_mode & 0o777 == 0o600
        assert os.path.lexists(path + ".lock")
        assert server.control_socket == path  # asked again: the same socket, no second bind
        from twisted_mail_screen.runtime.control import call

        assert call(path, "faults.list") == []
    finally:
        server.stop()
    assert not os.path.lexists(path) and not os.path.lexists(path + ".lock")


def test_page_files_read_once_but_each_site_gets_its_own_answers() -> None:
    first, second = load_static(), load_static()
    assert "index.html" in first and first["index.html"].body == second["index.html"].body
    first["index.html"].headers["x-test"] = "changed"
    assert "x-test" not in second["index.html"].headers


LAZY_SCRIPT = '''
import imaplib, json, poplib, smtplib, sys, urllib.request
from twisted_mail_screen.pytest_plugin.server import build
from twisted_mail_screen.testing import in_reactor

LATER = ("twisted_mail_screen.protocols.imap.server", "twisted_mail_screen.protocols.pop3",
         "twisted_mail_screen.web.site", "twisted.web.server", "twisted_mail_screen.relay.queue",
         "twisted_mail_screen.screening.redis_backend", "twisted_mail_screen.runtime.proxyproto",
         "twisted_mail_screen.runtime.tlsreload", "twisted_mail_screen.mailauth.gate",
         "prometheus_client")
server = build(sys.argv[1], {}, 5.0, lambda: ("", ""))
try:
    with smtplib.SMTP(server.host, server.smtp_port) as client:
        client.sendmail("a@example.test", ["b@example.test"], b"Subject: hi\\r\\n\\r\\nx\\r\\n")
    server.wait_for("addressed:b@example.test")
    in_reactor(server.service.events.publish, "screening.decision", time=1.0, action="refuse",
               client="192.0.2.7", rule="connections")
    print("after SMTP:", sorted(m for m in LATER if m in sys.modules))
    port = server.imap_port
    print("imap port read:", "twisted_mail_screen.protocols.imap.server" in sys.modules)
    imap = imaplib.IMAP4(server.host, port)
    imap.login("b@example.test", "any")
    print("imap:", imap.select("INBOX")[1])
    imap.logout()
    pop = poplib.POP3(server.host, server.pop3_port)
    pop.user("b@example.test")
    pop.pass_("any")
    print("pop3:", pop.stat()[0])
    pop.quit()
    with urllib.request.urlopen(server.web_url + "/api/v1/screening/decisions") as reply:
        print("web:", [d["client"] for d in json.load(reply)["decisions"]])
finally:
    server.stop()
'''


def test_imap_pop3_and_web_are_built_on_first_use_and_then_work(tmp_path: Path) -> None:
    """
    A test that only sends over SMTP imports none of IMAP, POP3, the web
    site, the relay queue, the Redis client, the PROXY protocol, the TLS
    files' reloader (no [tls] configured), the mail-auth gate (no DKIM key,
    no inbound checks) or prometheus_client (nothing scraped); reading a port imports its
    modules (in the test's thread), and each then answers as before; the
    web port lists a screening decision made before it was first asked.
    """
    done = subprocess.run([sys.executable, "-c", LAZY_SCRIPT, str(tmp_path / "data")], cwd=ROOT,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "after SMTP: []", "imap port read: True", "imap: [b'1']", "pop3: 1", "web: ['192.0.2.7']"]


def test_a_lazy_listener_connected_to_without_its_port_read_still_answers(tmp_path: Path) -> None:
    """A client that found the port otherwise: the factory's modules are imported at its connection."""
    script = (
        "import poplib, sys\n"
        "from twisted_mail_screen.config.settings import load_config\n"
        "from twisted_mail_screen.testing import RunningServer, ephemeral_overrides\n"
        "config = load_config(None, ephemeral_overrides(sys.argv[1]))\n"
        "with RunningServer(config, lazy=('pop3',)) as server:\n"
        "    print('twisted_mail_screen.protocols.pop3' in sys.modules)\n"
        "    pop = poplib.POP3('127.0.0.1', server.port('pop3'))\n"
        "    print(pop.getwelcome()[:3], 'twisted_mail_screen.protocols.pop3' in sys.modules)\n"
        "    pop.quit()\n")
    assert run_script(script, str(tmp_path / "data")) == ["False", "b'+OK' True"]


@pytest.mark.parametrize("tls", [False, True])
def test_a_plugin_server_binds_a_listener_when_the_test_first_reads_its_port(
        tmp_path: Path, tls: bool) -> None:
    """
    Only SMTP listens after the start; the first read of the submission,
    POP3, IMAP or web port binds that listener (later reads give the same
    port, one listener each), and it answers as one bound at start would,
    STLS and STARTTLS included on a server with a certificate.
    """
    certificate = make_certificate(str(tmp_path / "tls"))
    server = build(str(tmp_path / "data"), {"tls": tls}, 5.0, lambda: certificate)
    context = ssl.create_default_context(cafile=certificate[0])
    try:
        def bound() -> list[str]:
            return in_reactor(lambda: sorted(l.kind for l in server.service.listeners))

        assert bound() == ["smtp"]
        port = server.pop3_port
        assert (server.pop3_port, bound()) == (port, ["pop3", "smtp"])
        pop = poplib.POP3(server.host, port, timeout=10)
        assert pop.getwelcome().startswith(b"+OK")
        if tls:
            pop.stls(context=context)
        pop.quit()
        with smtplib.SMTP(server.host, server.submission_port, timeout=10) as client:
            if tls:
                client.starttls(context=context)
            assert client.ehlo()[0] == 250
        imap = imaplib.IMAP4(server.host, server.imap_port, timeout=10)
        if tls:
            imap.starttls(ssl_context=context)
        imap.logout()
        assert server.web_url.endswith(f":{server.web_port}")
        assert bound() == ["imap", "pop3", "smtp", "submission", "web"]
    finally:
        server.stop()


def test_a_restarted_running_server_binds_its_on_demand_ports_anew(tmp_path: Path) -> None:
    """The port a stopped server bound on demand is not given out again after a new start."""
    config = load_config(None, ephemeral_overrides(str(tmp_path / "data"), ("smtp", "pop3")))
    server = RunningServer(config, on_demand=("pop3",))
    for _ in range(2):
        server.start()
        try:
            pop = poplib.POP3("127.0.0.1", server.port("pop3"), timeout=10)
            assert pop.getwelcome().startswith(b"+OK")
            pop.quit()
        finally:
            server.stop()


GC_SUITE = """
import gc

def test_first(mailserver):
    print("frozen:", gc.get_freeze_count() > 0)
"""


@pytest.mark.parametrize("args, ini, frozen", [
    ((), "", True),
    (("--mailscreen-no-gc-freeze",), "", False),
    ((), "[pytest]\nmailscreen_gc_freeze = false\n", False),
])
def test_the_first_server_freezes_the_heap_unless_told_not_to(
        tmp_path: Path, args: tuple[str, ...], ini: str, frozen: bool) -> None:
    """gc.freeze() once the server's modules are in (docs/testing.md, "Options"), with an opt-out."""
    (tmp_path / "test_gc.py").write_text(GC_SUITE)
    (tmp_path / "pytest.ini").write_text(ini or "[pytest]\n")
    done = subprocess.run([sys.executable, "-m", "pytest", "-s", "-q", "-p", "no:cacheprovider",
                           *args, "test_gc.py"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"frozen: {frozen}" in done.stdout


def test_plugin_servers_start_no_threads_of_their_own(tmp_path: Path) -> None:
    """Five servers in turn, each delivering: the storage threads are the process's, reused."""
    def storage_threads() -> set[threading.Thread]:
        return {t for t in threading.enumerate() if t.name.startswith("mailscreen-io")}

    seen: set[threading.Thread] = set()
    for n in range(5):
        server = build(str(tmp_path / str(n)), {}, 5.0, lambda: ("", ""))
        try:
            with smtplib.SMTP(server.host, server.smtp_port) as client:
                client.sendmail("a@example.test", ["b@example.test"], b"Subject: hi\r\n\r\nx\r\n")
            server.wait_for("addressed:b@example.test")
            seen |= storage_threads()
        finally:
            server.stop()
    # An own pool's threads are joined when its server stops; these serve the next server.
    assert 1 <= len(seen) <= load_config(None, {}).storage.threads
    assert all(t.is_alive() for t in seen)


def test_a_borrowed_pool_stops_when_its_own_calls_are_done() -> None:
    """
    A server's stop waits for the calls it made (nothing of a stopped
    server still runs), not for the pool, which runs on.
    """
    from twisted.internet import reactor as global_reactor

    pools = SharedPools(global_reactor)
    first, second = in_reactor(pools.borrow, "mailscreen-test", 2), \
        in_reactor(pools.borrow, "mailscreen-test", 2)
    release, ran, done = threading.Event(), threading.Event(), threading.Event()
    stopped: list[Any] = []

    def begin() -> None:
        first.startService()
        second.startService()
        first.run(release.wait, 10)
        second.run(lambda: None)
        first.stopService().addCallback(stopped.append).addCallback(lambda _: done.set())

    in_reactor(begin)
    in_reactor(lambda: second.stopService())  # nothing of its own in flight: at once
    assert stopped == []
    in_reactor(lambda: second.run(ran.set))  # the pool still serves the others
    assert ran.wait(5)
    assert stopped == []
    release.set()
    assert done.wait(5)
    assert stopped == [None]


def test_a_data_directory_the_start_makes_is_not_swept_an_existing_one_is(tmp_path: Path) -> None:
    """
    The start's tmp/ sweep needs no worker call on a data directory the
    start creates (nothing there can be stale); on an existing one it runs
    and removes a tmp/ file untouched for 36 hours.
    """
    def start(data: Path) -> tuple[Any, InlineWorkers, TmpCleaner]:
        workers = InlineWorkers()
        config = load_config(None, {**ephemeral_overrides(str(data), ()), "relay.enabled": False})
        service = build_service(config, MemoryReactor(), Clock(), workers=workers)
        service.privilegedStartService()
        service.startService()
        return service, workers, next(s for s in service if isinstance(s, TmpCleaner))

    service, workers, cleaner = start(tmp_path / "data")
    assert (cleaner.sweeps, workers.calls) == (1, 0)
    service.stopService()
    box = Path(MailStore(str(tmp_path / "data" / "mail")).maildir("b@example.test").path)
    for sub in ("cur", "new", "tmp"):
        (box / sub).mkdir(parents=True)
    tmp = box / "tmp"
    (tmp / "stale").write_bytes(b"x")
    os.utime(tmp / "stale", (0, 0))
    service, workers, cleaner = start(tmp_path / "data")
    assert (cleaner.sweeps, workers.calls) == (1, 1)
    assert not (tmp / "stale").exists()
    service.stopService()


def test_a_running_server_imports_what_its_config_needs_before_the_reactor_thread_builds_it(
        tmp_path: Path) -> None:
    """The relay queue, an eager web site, the TLS reloader: imported in the starting thread."""
    script = (
        "import sys, threading\n"
        "from twisted_mail_screen.config.settings import load_config\n"
        "from twisted_mail_screen.testing import RunningServer, ephemeral_overrides, reactor_thread\n"
        "from twisted_mail_screen.testcert import make_certificate\n"
        "seen = []\n"
        "class Spy:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        seen.append((threading.current_thread().name, name))\n"
        "config = load_config(None, {**ephemeral_overrides(sys.argv[1], tuple(sys.argv[2:])),\n"
        "    'relay.enabled': True, 'relay.starttls': 'none', 'domains': ['example.test'],\n"
        "    'relay.smarthost': 'tcp:host=127.0.0.1:port=9', 'postmaster': 'postmaster@example.test',\n"
        "    **dict(zip(('tls.certificate', 'tls.key'), make_certificate(sys.argv[1] + '-tls')))})\n"
        "reactor_thread()\n"
        "sys.meta_path.insert(0, Spy())\n"
        "with RunningServer(config):\n"
        "    pass\n"
        "print(sorted({n for t, n in seen if t == 'reactor' and n.startswith('twisted_mail_screen')}))\n"
        "print('twisted_mail_screen.web.site' in sys.modules)\n")
    for listeners in (("smtp", "web"), ("smtp",)):  # the web site's modules import the queue's
        lines = run_script(script, str(tmp_path / "-".join(listeners)), *listeners)
        assert lines == ["[]", str("web" in listeners)]


def test_smtp_imports_no_twisted_mail_and_the_dsn_modules_only_for_a_notice(tmp_path: Path) -> None:
    """
    A test host that takes a plain message has not imported C{twisted.mail.smtp}
    (nor C{twisted.cred}) nor the DSN, spool and notice modules; the first
    NOTIFY=SUCCESS imports those, in a worker thread, and its notice arrives.
    """
    script = (
        "import smtplib, sys, threading\n"
        "from twisted_mail_screen.pytest_plugin.server import build\n"
        "LAZY = ('twisted.mail.smtp', 'twisted.cred', 'twisted_mail_screen.relay.notices',\n"
        "        'twisted_mail_screen.relay.dsn', 'twisted_mail_screen.relay.spool')\n"
        "seen = []\n"
        "class Spy:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        seen.append((threading.current_thread().name, name))\n"
        "sys.meta_path.insert(0, Spy())\n"
        "server = build(sys.argv[1], {}, 5.0, lambda: ('', ''))\n"
        "try:\n"
        "    with smtplib.SMTP(server.host, server.smtp_port) as client:\n"
        "        client.sendmail('a@example.test', ['b@example.test'], b'Subject: one\\r\\n\\r\\nx\\r\\n')\n"
        "        server.wait_for('addressed:b@example.test')\n"
        "        print(sorted(m for m in LAZY if m in sys.modules))\n"
        "        client.sendmail('a@example.test', ['c@example.test'], b'Subject: two\\r\\n\\r\\nx\\r\\n',\n"
        "                        rcpt_options=['NOTIFY=SUCCESS'])\n"
        "    [notice] = server.wait_for('addressed:a@example.test')\n"
        "    print(notice['Subject'])\n"
        "finally:\n"
        "    server.stop()\n"
        "print(sorted(m for m in LAZY if m not in sys.modules))\n"
        "print(sorted({n for t, n in seen if t == 'reactor' and n.startswith('twisted_mail_screen.relay')}))\n")
    assert run_script(script, str(tmp_path / "data")) == ["[]", "Successful Mail Delivery Report",
                                        "['twisted.cred', 'twisted.mail.smtp']", "[]"]


def test_the_local_part_pattern_takes_every_non_ascii_character_without_a_range_to_expand() -> None:
    """Every process compiles it at import: a class with the range U+0080-U+10FFFF took 5 ms of
    each start (the range is expanded), the "not ASCII" branch 0.2 ms, for the same characters."""
    import re

    from twisted_mail_screen.store import addresses

    assert "\\U0010ffff" not in addresses._LOCAL.pattern
    atext = r"[a-z0-9#$&'*+=?^_`{|}~\u0080-\U0010ffff-]"
    reference = re.compile(rf"{atext}+(?:\.{atext}+)*\Z")
    for point in [*range(0x800), *range(0x800, 0x110000, 97), 0x10FFFF]:
        c = chr(point)
        for local in (c, f"a.{c}", f"{c}{c}"):
            assert bool(addresses._LOCAL.match(local)) == bool(reference.match(local)), hex(point)
    for local in ("", ".", "a..b", "a.", ".a", "A", "a b", "é.ü"):
        assert bool(addresses._LOCAL.match(local)) == bool(reference.match(local)), local
