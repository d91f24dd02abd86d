# -*- test-case-name: tests.test_pytest_plugin -*-
"""
The object the C{mailserver} fixtures hand a test: a started
L{RunningServer} on loopback ports, plus what a test asks of a mail host
(which messages arrived, wait for one, forget them all, add an account,
settings for the code under test).

Imported only when a fixture is used: this is where Twisted comes in.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from email.message import EmailMessage
from typing import TYPE_CHECKING, Any, Callable

from twisted.internet.task import Clock

from twisted_mail_screen.config.settings import MAX_SOCKET_PATH
from twisted_mail_screen.pytest_plugin.configcache import host_config
from twisted_mail_screen.runtime.control import SOCKET_NAME
from twisted_mail_screen.pytest_plugin import mailbox
from twisted_mail_screen.pytest_plugin.controls import FaultsProxy, ScreeningControl
from twisted_mail_screen.runtime.lazyfactory import import_listener
from twisted_mail_screen.testing import RunningServer, ephemeral_overrides, in_reactor

if TYPE_CHECKING:
    from twisted_mail_screen.testing_sink import Sink

KINDS = ("smtp", "submission", "pop3", "imap", "web")
#: Listeners whose factory is built on the first connection, and those
#: (with the control socket) bound when the test first reads their port:
#: most tests talk SMTP only (docs/performance.md, the plugin's start-up cost).
LAZY = ("pop3", "imap", "web")
ON_DEMAND = ("submission", "pop3", "imap", "web", "control")
SITE = {"mode": "site", "hostname": "mail.example.test", "domains": ["example.test"],
        "postmaster": "postmaster@example.test"}
#: The longest wait_for sleeps between two looks when no event comes.
POLL = 0.25


class MailServer:
    """
    A test host (or, with C{site=True}, a site for C{example.test}) on
    127.0.0.1, SMTP, submission, POP3, IMAP and the web port on ports the
    OS chose: SMTP's at the start, each other one when the test first
    reads it (a test cannot connect to a port it has not read).
    """

    host = "127.0.0.1"

    def __init__(self, data_dir: str, site: bool = False, certificate: tuple[str, str] | None = None,
                 timeout: float = 5.0, overrides: dict[str, Any] | None = None,
                 relay_sink: bool = False) -> None:
        # A test host's mail lives as long as the test's tmp_path: no fsyncs
        # (five per first delivery into a mailbox, milliseconds each on a busy disk).
        table: dict[str, Any] = dict(SITE) if site else {"storage.fsync": False}
        self._socket_dir = _socket_dir(data_dir)
        table.update(ephemeral_overrides(data_dir, KINDS))
        if self._socket_dir is not None:
            table["control_socket"] = os.path.join(self._socket_dir, "control.sock")
        if certificate is not None:
            table["tls.certificate"], table["tls.key"] = certificate
        self.sink: Sink | None = None
        if relay_sink:
            from twisted_mail_screen.testing_sink import Sink

            self.sink = Sink().start()
        table.update(_relay_settings(self.sink, site))
        table.update({k.replace("__", "."): v for k, v in (overrides or {}).items()})
        self.data_dir = data_dir
        self.site = site
        self.certificate = certificate[0] if certificate else None
        self.timeout = timeout
        # Screening, the queue, idle timeouts and fault delays read this
        # clock: it moves only with screening.advance() (docs/testing.md).
        self.clock = Clock()
        self.clock.advance(time.time())
        try:
            self.server = RunningServer(host_config(table), clock=self.clock,
                                        shared_pools=True, lazy=LAZY, on_demand=ON_DEMAND)
        except BaseException:  # a bad marker key: no stop() will come to clean up
            self._remove_socket_dir()
            if self.sink is not None:
                self.sink.stop()
            raise
        self.faults = FaultsProxy(self)
        self.screening = ScreeningControl(self)

    def start(self) -> "MailServer":
        self.server.start()
        self.smtp_port = self.server.port("smtp")
        return self

    def _port(self, kind: str) -> int:
        """
        The port of a listener bound on demand (by the first read), its
        modules imported in the test's thread, rather than on the reactor
        thread when the client connects.
        """
        import_listener(kind)
        return self.server.port(kind)

    @property
    def control_socket(self) -> str:
        """
        Where C{mailscreen --control-socket ...} reaches this server: bound
        when a test first asks (a socket file and its lock file are most of
        what a server start writes to the disk, and few tests use them).
        """
        return self.server.listen_control()

    @property
    def submission_port(self) -> int:
        return self._port("submission")

    @property
    def pop3_port(self) -> int:
        return self._port("pop3")

    @property
    def imap_port(self) -> int:
        return self._port("imap")

    @property
    def web_port(self) -> int:
        return self._port("web")

    @property
    def web_url(self) -> str:
        return f"http://{self.host}:{self.web_port}"

    def stop(self) -> None:
        try:
            self.server.stop()
        finally:
            self._remove_socket_dir()
            if self.sink is not None:
                self.sink.stop()

    @property
    def relayed(self) -> list[EmailMessage]:
        """
        The messages the relay delivered to the capture sink (C{relay_sink=True}),
        in arrival order, with C{envelope_from} and C{envelope_to} as the sink saw them.
        """
        if self.sink is None:
            raise RuntimeError("mailserver.relayed needs a relay sink: mark the test with "
                               "@pytest.mark.mailserver(relay_sink=True)")
        return [mailbox.parse(m.data.replace(b"\r\n", b"\n"), m.sender, m.recipients)
                for m in list(self.sink.messages)]

    def _remove_socket_dir(self) -> None:
        if self._socket_dir is not None:
            shutil.rmtree(self._socket_dir, ignore_errors=True)

    @property
    def service(self) -> Any:
        """The running L{MailService} (touch it only through L{in_reactor})."""
        return self.server.service

    @property
    def mail_root(self) -> str:
        return os.path.join(self.data_dir, "mail")

    def messages(self, query: str | None = None) -> list[EmailMessage]:
        """Delivered messages, oldest first, that match C{query} (docs/testing.md)."""
        return mailbox.read_messages(self.mail_root, query)

    def wait_for(self, query: str | None = None, count: int = 1,
                 timeout: float | None = None) -> list[EmailMessage]:
        """
        Wait until at least C{count} messages match C{query}; return them.

        @raise AssertionError: on timeout, listing what did arrive.
        """
        __tracebackhide__ = True  # the failure is the test's, not this loop's
        mailbox.parse_query(query)  # a bad query fails now, not after the timeout
        return self._wait(lambda: self.messages(query), count, timeout, lambda found, limit: (
            f"wait_for({query!r}, count={count}): {len(found)} of {count} matching "
            f"message(s) within {limit:g} s; {mailbox.summary(self.messages())}"))

    def wait_for_relayed(self, count: int = 1, timeout: float | None = None) -> list[EmailMessage]:
        """
        Wait until the capture sink got at least C{count} messages; return them all.

        @raise AssertionError: on timeout.
        """
        __tracebackhide__ = True
        return self._wait(lambda: self.relayed, count, timeout, lambda found, limit: (
            f"wait_for_relayed(count={count}): {len(found)} of {count} relayed message(s) "
            f"within {limit:g} s; {self._queue_summary()}"))

    def _queue_summary(self) -> str:
        """What is still queued, with each recipient's last reply, for a failed wait."""
        queue = self.service.queue
        queued = in_reactor(queue.list) if queue is not None else []
        if not queued:
            return "the queue is empty"
        lines = [f"{len(queued)} message(s) still queued:"]
        for entry in queued[:20]:
            for r in entry.get("recipients", []):
                reply = f": {r['reply']}" if r.get("reply") else ""
                lines.append(f"  - {entry.get('id')} from <{entry.get('sender')}> to "
                             f"{r.get('address')} ({r.get('state')}{reply}); "
                             f"attempts {entry.get('attempts')}")
        return "\n".join(lines)

    def _wait(self, fetch: Callable[[], list[EmailMessage]], count: int, timeout: float | None,
              explain: Callable[[list[EmailMessage], float], str]) -> list[EmailMessage]:
        """
        Look again at each event of the server's bus (a delivery, a queue
        change: the web API's wait wakes on the same events), and at least
        every L{POLL} seconds for what publishes none (the sink's messages).
        """
        __tracebackhide__ = True
        limit = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        found = fetch()  # smtplib returns after the 250, when the message is stored
        if len(found) >= count:
            return found
        changed = threading.Event()
        unsubscribe = in_reactor(self.service.events.subscribe, lambda event: changed.set())
        try:
            while True:
                changed.clear()
                found = fetch()
                if len(found) >= count:
                    return found
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(explain(found, limit))
                changed.wait(min(left, POLL))
        finally:
            in_reactor(unsubscribe)

    def purge(self) -> int:
        """Delete every delivered message; the number deleted."""
        return mailbox.purge(self.mail_root)

    def add_user(self, address: str, password: str) -> None:
        """Add an account (site mode: in test-host mode any password opens any mailbox)."""
        if not self.site:
            raise RuntimeError("mailserver.add_user needs site mode: mark the test with "
                               "@pytest.mark.mailserver(site=True) (or --mailscreen-mode=site)")
        from twisted_mail_screen.store.accounts import AccountStore

        # In the test's thread: hashing is slow, and the server rereads the
        # users file when it changes, as it does after `mailscreen user add`.
        AccountStore(self.data_dir).add_user(address, password)

    def smtp_settings(self, port: str = "smtp") -> dict[str, Any]:
        """Settings for Django, Flask-Mail and smtplib, for the C{smtp} or C{submission} port."""
        number = {"smtp": self.smtp_port, "submission": self.submission_port}[port]
        tls = self.certificate is not None
        return {"EMAIL_HOST": self.host, "EMAIL_PORT": number, "EMAIL_USE_TLS": tls,
                "MAIL_SERVER": self.host, "MAIL_PORT": number, "MAIL_USE_TLS": tls,
                "host": self.host, "port": number}


def _socket_dir(data_dir: str) -> str | None:
    """
    A short temporary directory for the control socket when its default
    path in C{data_dir} would pass the AF_UNIX limit (pytest's tmp_path
    for a long test name does); the data stays in C{data_dir}.
    """
    if len(os.fsencode(os.path.join(os.path.abspath(data_dir), SOCKET_NAME))) <= MAX_SOCKET_PATH:
        return None
    return tempfile.mkdtemp(prefix="mailscreen-")


def _relay_settings(sink: Sink | None, site: bool) -> dict[str, Any]:
    """
    Relaying of a plugin server: none (a test never sends mail into the
    world, in site mode either), or to the capture C{sink} only, keeping
    C{example.test} local on a test host.
    """
    if sink is None:
        return {"relay.enabled": False}
    table: dict[str, Any] = {"relay.enabled": True, "relay.starttls": "none",
                             "relay.smarthost": f"tcp:host=127.0.0.1:port={sink.port}"}
    if not site:
        table.update({"domains": ["example.test"], "postmaster": "postmaster@example.test"})
    return table


def build(data_dir: str, options: dict[str, Any], timeout: float,
          certificate: Callable[[], tuple[str, str]]) -> MailServer:
    """A started L{MailServer} for the marker/fixture C{options} (site, tls, overrides)."""
    options = dict(options)
    site = bool(options.pop("site", False))
    tls = bool(options.pop("tls", False))
    relay_sink = bool(options.pop("relay_sink", False))
    server = MailServer(data_dir, site=site, certificate=certificate() if tls else None,
                        timeout=timeout, overrides=options, relay_sink=relay_sink)
    try:
        return server.start()
    except BaseException:  # a port that cannot be bound: the fixture's teardown never runs
        server.stop()
        raise

