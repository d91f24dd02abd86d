"""
The servers the benchmark starts: ours (a subprocess running the reactor),
aiosmtpd with a Maildir handler (with and without fsync), Postfix and
Dovecot from Debian's packages, each with its own directories and its own
loopback ports, and a trivial banner server for the client's ceiling.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return True
        except OSError:
            time.sleep(0.05)
    return False


def _stop(proc: subprocess.Popen | None, sig: int = signal.SIGTERM) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


OURS = r"""
import json, os, sys
from twisted.internet import reactor
from twisted_mail_screen.config.settings import load_config
from twisted_mail_screen.runtime.service import build_service
config = load_config(None, json.loads(sys.argv[1]))
if "--no-direct-send" in sys.argv[2:]:  # every reply through transport.write (lineproto.DirectSend)
    from twisted_mail_screen.protocols.lineproto import CommandProtocol
    CommandProtocol.direct_send = False
svc = build_service(config, reactor)
svc.privilegedStartService()
svc.startService()
factories = [l.factory for l in svc.listeners]
screening = type(getattr(factories[0], "screening", None)).__name__ if factories else "?"
print(json.dumps({"screening": screening,
                  "ports": {k: svc.ports(k) for k in ("smtp", "pop3", "imap")}}), flush=True)
reactor.addSystemEventTrigger("before", "shutdown", svc.stopService)
profile = os.environ.get("BENCH_PROFILE")  # a path: cProfile the reactor thread into it
if profile:
    import cProfile
    cProfile.run("reactor.run()", profile)
else:
    reactor.run()
"""


class Ours:
    """Our server as a subprocess built by C{build_service}."""

    kind = "ours"

    #: Limits the benchmark never reaches, but not 0 (0 switches the bookkeeping off).
    UNREACHED = {"screening.max_connections": 10**9, "screening.max_simultaneous": 10**6,
                 "screening.max_auth_failures": 10**6}

    def __init__(self, workdir: str, name: str = "ours", screening: bool | None = None,
                 threads: int = 16, direct_send: bool = True, site: bool = False,
                 root: str = ROOT) -> None:
        self.name = name
        self.root = root  # the source tree it runs (another one: a baseline to compare with)
        self.site = site
        self.direct_send = direct_send
        self.data = os.path.join(workdir, name)
        self.ports = {k: free_port() for k in ("smtp", "pop3", "imap")}
        self.screening = screening
        self.threads = threads
        self.proc: subprocess.Popen | None = None
        self.info: dict[str, Any] = {}
        self.error: str | None = None

    def overrides(self) -> dict[str, Any]:
        o: dict[str, Any] = {"data_dir": self.data, "storage.threads": self.threads,
                             "listen.submission": [], "listen.web": []}
        for k, p in self.ports.items():
            o[f"listen.{k}"] = [f"tcp:{p}:interface=127.0.0.1"]
        if self.screening is not None:
            o["screening.enabled"] = self.screening
            if self.screening:
                # Screen loopback too (test-host mode whitelists it), counting
                # against limits the benchmark never reaches: the bookkeeping's cost.
                o["screening.whitelist"] = []
                o.update(self.UNREACHED)
        if self.site:
            # A site: its domain and accounts file, routing and screening as
            # deployed (loopback not whitelisted, every connection counted).
            # SPF/DKIM/DMARC are off: the bench has no DNS, and a lookup that
            # times out would measure the resolver, not the server.
            o.update({"mode": "site", "hostname": "mail.bench.test", "domains": ["bench.test"],
                      "postmaster": "r@bench.test", "screening.whitelist": [],
                      "mail_auth.enabled": False, "relay.enabled": False, **self.UNREACHED})
        return o

    def write_accounts(self) -> None:
        """The site's users file: the bench's recipient and mailbox, password "x"."""
        from twisted_mail_screen.store.passwords import hash_password
        digest = hash_password("x")
        path = os.path.join(self.data, "users")
        with open(path, "w") as f:
            f.write("".join(f"{a}:{digest}\n" for a in ("r@bench.test", "pop@bench.test")))
        os.chmod(path, 0o600)

    def start(self) -> bool:
        os.makedirs(self.data, exist_ok=True)
        if self.site:
            self.write_accounts()
        env = dict(os.environ, PYTHONPATH=self.root + os.pathsep + os.environ.get("PYTHONPATH", ""))
        flags = [] if self.direct_send else ["--no-direct-send"]
        # Run from the data directory: "python -c" puts the working directory
        # first on sys.path, which would shadow self.root with the cwd's tree.
        self.proc = subprocess.Popen([sys.executable, "-c", OURS, json.dumps(self.overrides())] + flags,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                                     text=True, cwd=self.data)
        line = self.proc.stdout.readline()  # type: ignore[union-attr]
        if not line:
            self.error = (self.proc.stderr.read() or "exited")[-400:]  # type: ignore[union-attr]
            return False
        self.info = json.loads(line)
        return True

    def has(self, kind: str) -> bool:
        return bool(self.info.get("ports", {}).get(kind))

    def maildir(self, address: str) -> str:
        local, _, domain = address.partition("@")
        return os.path.join(self.data, "mail", domain, local)

    def peak_rss_kb(self) -> int | None:
        return _status_field(self.proc.pid, "VmHWM") if self.proc else None

    def rss_kb(self) -> int | None:
        return _status_field(self.proc.pid, "VmRSS") if self.proc else None

    def stop(self) -> None:
        _stop(self.proc)


def _status_field(pid: int, field: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class AioSMTPD:
    """aiosmtpd with a Maildir handler; C{fsync} makes it durable before 250."""

    kind = "aiosmtpd"

    def __init__(self, workdir: str, fsync: bool) -> None:
        self.name = "aiosmtpd-fsync" if fsync else "aiosmtpd"
        self.fsync = fsync
        self.data = os.path.join(workdir, self.name)
        self.ports = {"smtp": free_port()}
        self.proc: subprocess.Popen | None = None
        self.error: str | None = None

    def start(self) -> bool:
        try:
            import aiosmtpd  # noqa: F401
        except ImportError:
            self.error = "aiosmtpd not installed (pip install -r bench/requirements.txt)"
            return False
        os.makedirs(self.data, exist_ok=True)
        args = [sys.executable, os.path.join(HERE, "aiosmtpd_maildir.py"),
                str(self.ports["smtp"]), self.data] + (["--fsync"] if self.fsync else [])
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if not wait_port(self.ports["smtp"]):
            self.error = "did not start"
            return False
        return True

    def maildir(self, address: str) -> str:
        return os.path.join(self.data, address.partition("@")[0])

    def stop(self) -> None:
        _stop(self.proc)


def _debian_user(name: str) -> tuple[int, int] | None:
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        return None
    return pw.pw_uid, pw.pw_gid


class Postfix:
    """
    Postfix with its own C{config_directory}, queue and data directories,
    virtual Maildir delivery of every recipient into one Maildir, smtpd on
    its own loopback port. Its 250 means "queued and fsync'd"; delivery
    into the Maildir follows asynchronously, so the file count is checked
    once the queue has drained.
    """

    kind = "postfix"
    MASTER = "/usr/lib/postfix/sbin/master"

    def __init__(self, workdir: str) -> None:
        self.name = "postfix"
        self.base = os.path.join(workdir, "postfix")
        self.ports = {"smtp": free_port()}
        self.proc: subprocess.Popen | None = None
        self.error: str | None = None

    def start(self) -> bool:
        ids = _debian_user("postfix")
        if not os.path.exists(self.MASTER) or ids is None:
            self.error = "not installed (apt-get install -y postfix)"
            return False
        if os.geteuid() != 0:
            self.error = "needs root to start"
            return False
        uid, gid = ids
        conf, queue, data = (os.path.join(self.base, d) for d in ("conf", "queue", "data"))
        self.vmail = os.path.join(self.base, "vmail")
        for d in (conf, queue, data, self.vmail):
            os.makedirs(d, exist_ok=True)
        for d in (data, self.vmail):
            os.chown(d, uid, gid)
        with open(os.path.join(conf, "main.cf"), "w") as f:
            f.write(f"""compatibility_level = 3.6
queue_directory = {queue}
data_directory = {data}
command_directory = /usr/sbin
daemon_directory = /usr/lib/postfix/sbin
meta_directory = /etc/postfix
shlib_directory = /usr/lib/postfix
mail_owner = postfix
myhostname = bench.localhost
mydestination =
inet_interfaces = loopback-only
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject
virtual_mailbox_domains = bench.test
virtual_mailbox_base = {self.vmail}
virtual_mailbox_maps = static:box/
virtual_uid_maps = static:{uid}
virtual_gid_maps = static:{gid}
virtual_destination_concurrency_limit = 64
virtual_destination_recipient_limit = 1
default_process_limit = 200
smtpd_client_connection_rate_limit = 0
smtpd_client_connection_count_limit = 0
smtpd_client_message_rate_limit = 0
smtpd_peername_lookup = no
message_size_limit = 52428800
virtual_mailbox_limit = 0
maillog_file_prefixes = {self.base}
maillog_file = {data}/maillog
alias_maps =
local_recipient_maps =
biff = no
""")
        with open("/etc/postfix/master.cf") as f:
            lines = f.read().splitlines()
        out = []
        for line in lines:
            if line.startswith("smtp ") and " inet " in line:
                line = f"127.0.0.1:{self.ports['smtp']} inet n - n - - smtpd"
            out.append(line)
        with open(os.path.join(conf, "master.cf"), "w") as f:
            f.write("\n".join(out) + "\n")
        subprocess.run(["postfix", "-c", conf, "check"], capture_output=True, timeout=60)
        env = dict(os.environ, MAIL_CONFIG=conf)
        self.proc = subprocess.Popen([self.MASTER, "-c", conf, "-d"], env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     start_new_session=True)
        if not wait_port(self.ports["smtp"]):
            self.error = "did not start: " + (open(f"{data}/maillog").read()[-300:]
                                              if os.path.exists(f"{data}/maillog") else "")
            self.stop()
            return False
        return True

    def maildir(self, address: str) -> str:
        return os.path.join(self.vmail, "box")

    def queue_empty(self) -> bool:
        queue = os.path.join(self.base, "queue")
        for sub in ("incoming", "active", "deferred", "maildrop"):
            for _, _, files in os.walk(os.path.join(queue, sub)):
                if files:
                    return False
        return True

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


class Dovecot:
    """Dovecot with its own C{base_dir}, ports, a static user and one Maildir."""

    kind = "dovecot"

    def __init__(self, workdir: str) -> None:
        self.name = "dovecot"
        self.base = os.path.join(workdir, "dovecot")
        self.ports = {"pop3": free_port(), "imap": free_port()}
        self.proc: subprocess.Popen | None = None
        self.error: str | None = None
        self.mail = os.path.join(self.base, "mail")
        # Debian ships each protocol in its own package: configure only those installed
        # (a listed protocol without its binary is fatal at start-up).
        self.protocols = [p for p in ("pop3", "imap") if os.path.exists(f"/usr/lib/dovecot/{p}")]

    def start(self) -> bool:
        ids = _debian_user("dovecot")
        if shutil.which("dovecot") is None or ids is None or not self.protocols:
            self.error = "not installed (apt-get install -y dovecot-pop3d dovecot-imapd)"
            return False
        if os.geteuid() != 0:
            self.error = "needs root to start"
            return False
        uid, gid = ids
        run = os.path.join(self.base, "run")
        os.makedirs(os.path.join(run, "state"), exist_ok=True)
        for sub in ("new", "cur", "tmp"):
            os.makedirs(os.path.join(self.mail, sub), exist_ok=True)
        home = os.path.join(self.base, "home")
        os.makedirs(home, exist_ok=True)
        self.chown()
        os.chown(home, uid, gid)
        self.conf = os.path.join(self.base, "dovecot.conf")
        services = {p: f"""service {p}-login {{
  inet_listener {p} {{
    address = 127.0.0.1
    port = {self.ports[p]}
  }}
  inet_listener {p}s {{
    port = 0
  }}
}}
""" for p in self.protocols}
        with open(self.conf, "w") as f:
            f.write(f"""base_dir = {run}
state_dir = {run}/state
protocols = {" ".join(self.protocols)}
listen = 127.0.0.1
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain
log_path = {self.base}/dovecot.log
mail_location = maildir:{self.mail}
mail_uid = {uid}
mail_gid = {gid}
first_valid_uid = 1
pop3_uidl_format = %f
passdb {{
  driver = static
  args = nopassword=y
}}
userdb {{
  driver = static
  args = uid={uid} gid={gid} home={home}
}}
""" + "".join(services.values()))
        self.proc = subprocess.Popen(["dovecot", "-c", self.conf, "-F"], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        if not all(wait_port(self.ports[p]) for p in self.protocols):
            self.error = "did not start: " + self._log_tail()
            self.stop()
            return False
        return True

    def _log_tail(self) -> str:
        try:
            with open(os.path.join(self.base, "dovecot.log")) as f:
                return f.read()[-300:].strip()
        except OSError:
            return "no log"

    def chown(self) -> None:
        ids = _debian_user("dovecot")
        if ids is None:
            return
        for dirpath, dirnames, filenames in os.walk(self.mail):
            os.chown(dirpath, *ids)
            for n in filenames:
                os.chown(os.path.join(dirpath, n), *ids)

    def has(self, kind: str) -> bool:
        return kind in self.protocols

    def stop(self) -> None:
        _stop(self.proc)
        self.proc = None


class Banner:
    """A trivial SMTP sink: greeting, 250 to everything, 221 to QUIT; stores nothing."""

    kind = "banner"

    def __init__(self, workdir: str) -> None:
        self.name = "banner"
        self.ports = {"smtp": free_port()}
        self.proc: subprocess.Popen | None = None
        self.error: str | None = None

    def start(self) -> bool:
        # bench/sink_fsync.py without a Maildir: the same dialogue as the sink-fsync entrant.
        self.proc = subprocess.Popen([sys.executable, os.path.join(HERE, "sink_fsync.py"),
                                      str(self.ports["smtp"])])
        return wait_port(self.ports["smtp"])

    def stop(self) -> None:
        _stop(self.proc)
