"""
A real sync client against the real server: mbsync (isync) runs a two-way
sync between a local Maildir and an account on the server, with folders,
flags, moves and deletions made on both sides, and both sides must come
out identical (same folders, same message bodies, same flags).

The test is skipped when C{mbsync} is not installed (Debian package
C{isync}).
"""

from __future__ import annotations

import imaplib
import os
import poplib
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import log_lines
from tests.test_imap import Raw, send

KINDS = ("smtp", "pop3", "imap")
USER = "sync@localhost"
MBSYNC = shutil.which("mbsync")
OFFLINEIMAP = shutil.which("offlineimap")

TUID = re.compile(rb"^X-TUID: [^\n]*\n", re.M)

LETTERS = {"\\Draft": "D", "\\Flagged": "F", "\\Answered": "R", "\\Seen": "S", "\\Deleted": "T"}


def message(subject: str, body: str = "") -> bytes:
    return (f"From: Someone <someone@example.org>\r\nTo: {USER}\r\nSubject: {subject}\r\n"
            f"Message-ID: <{subject}@example.org>\r\nDate: Mon, 7 Feb 2022 10:00:00 +0000\r\n\r\n"
            f"{body or subject} body\r\n").encode()


#: The transports each sync client runs over: SSLType for mbsync, (ssl, starttls) for offlineimap.
TRANSPORTS = ("plain", "starttls", "implicit")
IMPLICIT = "ssl:0:interface=127.0.0.1"


def tls_server(start_server, certificate, transport: str):
    """A test host with IMAP in plaintext and, for the TLS transports, STARTTLS and an ssl: listener."""
    if transport == "plain":
        return start_server(kinds=KINDS)
    from twisted_mail_screen.testing import EPHEMERAL

    cert, key = certificate
    return start_server(kinds=KINDS, tls__certificate=cert, tls__key=key, listen__imap=[EPHEMERAL, IMPLICIT])


class Sync:
    """An mbsync channel between C{local} and the server's account C{USER}."""

    def __init__(self, tmp: Path, port: int, transport: str = "plain", ca: str = "",
                 server: object = None) -> None:
        if transport == "implicit":
            port = server.service.ports("imap")[1]  # type: ignore[attr-defined]
        self.transport, self.port, self.ca = transport, port, ca
        self.host = "127.0.0.1" if transport == "plain" else "localhost"  # the certificate's name
        self.home = tmp / "home"
        self.local = tmp / "local"
        self.home.mkdir()
        self.local.mkdir()
        self.rc = self.home / "mbsyncrc"
        self.rc.write_text(f"""\
IMAPAccount server
Host {self.host}
Port {port}
User {USER}
Pass secret
SSLType {dict(plain="None", starttls="STARTTLS", implicit="IMAPS")[transport]}
{f"CertificateFile {ca}" if ca else "# plaintext: no certificate"}
AuthMechs PLAIN
Timeout 30

IMAPStore far
Account server

MaildirStore near
Path {self.local}/
Inbox {self.local}/INBOX
SubFolders Verbatim

Channel both
Far :far:
Near :near:
Patterns *
Create Both
Remove Both
Expunge Both
SyncState *
CopyArrivalDate yes
""")

    def command(self) -> list[str]:
        assert MBSYNC is not None
        return [MBSYNC, "-c", str(self.rc), "-a"]

    def run(self) -> str:
        env = dict(os.environ, HOME=str(self.home))
        p = subprocess.run(self.command(), env=env, capture_output=True, text=True, timeout=120)
        out = p.stdout + p.stderr
        assert p.returncode == 0, out
        for word in ("Error", "ERROR", "Warning", "WARNING", "Fatal", "Traceback"):
            assert word not in out, out
        return out

    # the local Maildir --------------------------------------------------------------

    def folder(self, name: str) -> Path:
        return self.local / name

    def make_folder(self, name: str) -> Path:
        path = self.folder(name)
        for sub in ("cur", "new", "tmp"):
            (path / sub).mkdir(parents=True, exist_ok=True)
        return path

    def put(self, name: str, data: bytes, flags: str = "", n: list[int] = [0]) -> Path:
        n[0] += 1
        path = self.make_folder(name)
        base = f"{int(time.time())}.L{n[0]}P{os.getpid()}.testhost"
        target = path / "cur" / f"{base}:2,{flags}" if flags else path / "new" / base
        target.write_bytes(data.replace(b"\r\n", b"\n"))
        return target

    def add_flags(self, name: str, subject: str, letters: str) -> None:
        p = self.find(name, subject)
        base, _, info = p.name.partition(":2,")
        p.rename(p.parent.parent / "cur" / f"{base}:2,{''.join(sorted(set(info + letters)))}")

    def find(self, name: str, subject: str) -> Path:
        for sub in ("cur", "new"):
            for p in (self.folder(name) / sub).iterdir():
                if f"Subject: {subject}\n".encode() in p.read_bytes():
                    return p
        raise AssertionError(f"{subject} not in local {name}")


class OfflineIMAP(Sync):
    """The same with offlineimap: local folders nested as C{a/b}, state in C{home}."""

    def __init__(self, tmp: Path, port: int, transport: str = "plain", ca: str = "",
                 server: object = None, compress: bool = False) -> None:
        super().__init__(tmp, port, transport, ca, server)
        port = self.port
        self.rc = self.home / "offlineimaprc"
        self.rc.write_text(f"""\
[general]
accounts = test
metadata = {self.home}/offlineimap
[Account test]
localrepository = near
remoterepository = far
[Repository near]
type = Maildir
localfolders = {self.local}
sep = /
[Repository far]
type = IMAP
remotehost = {self.host}
remoteport = {port}
remoteuser = {USER}
remotepass = secret
ssl = {"yes" if transport == "implicit" else "no"}
starttls = {"yes" if transport == "starttls" else "no"}
usecompression = {"yes" if compress else "no"}
{f"sslcacertfile = {ca}" if ca else ""}
""")

    def command(self) -> list[str]:
        assert OFFLINEIMAP is not None
        return [OFFLINEIMAP, "-c", str(self.rc), "-o", "-u", "basic"]


def append_many(port: int, folder: str, messages: list[tuple[str, bytes]]) -> None:
    """Pipelined APPENDs with LITERAL+, as sync clients upload (imaplib waits for each)."""
    r = Raw(port)
    r.command(b"l", f"LOGIN {USER} secret".encode())
    r.send(b"".join(b"a%d APPEND %s %s{%d+}\r\n%s\r\n" % (i, folder.encode(), flags.encode(), len(data), data)
                    for i, (flags, data) in enumerate(messages)))
    for i in range(len(messages)):
        assert r.until(b"a%d" % i)[-1].startswith(b"a%d OK [APPENDUID " % i)
    r.close()


def normal(data: bytes) -> bytes:
    """Line ends as LF, without the X-TUID header mbsync adds to every copy it makes."""
    return TUID.sub(b"", data.replace(b"\r\n", b"\n"), count=1)


def local_state(root: Path) -> dict[str, list[tuple[bytes, str]]]:
    """Folder name -> sorted (body, flag letters) of a local Maildir tree."""
    out = {}
    for dirpath, dirnames, _ in os.walk(root):
        if not {"cur", "new"} <= set(dirnames):
            continue
        name = os.path.relpath(dirpath, root)
        messages = []
        for sub in ("cur", "new"):
            for entry in os.listdir(os.path.join(dirpath, sub)):
                data = normal(Path(dirpath, sub, entry).read_bytes())
                _, _, info = entry.partition(":2,")
                messages.append((data, "".join(sorted(c for c in info if c in "DFRST"))))
        out[name] = sorted(messages)
    return out


def server_state(port: int) -> dict[str, list[tuple[bytes, str]]]:
    """The same, as an IMAP client sees the server's account."""
    m = imaplib.IMAP4("127.0.0.1", port)
    m.login(USER, "secret")
    typ, listing = m.list()
    assert typ == "OK"
    out = {}
    for line in listing:
        match = re.match(rb'\(([^)]*)\) "/" "?(.*?)"?$', line)
        assert match, line
        if b"\\Noselect" in match.group(1) or b"\\NonExistent" in match.group(1):
            continue
        name = match.group(2).decode()
        typ, data = m.select(f'"{name}"', readonly=True)
        assert typ == "OK", (name, data)
        messages = []
        if int(data[0]):
            typ, data = m.fetch("1:*", "(FLAGS BODY.PEEK[])")
            assert typ == "OK"
            for item in data:
                if not isinstance(item, tuple):
                    continue
                flags = re.search(rb"FLAGS \(([^)]*)\)", item[0]).group(1).decode().split()
                messages.append((normal(item[1]),
                                 "".join(sorted(LETTERS[f] for f in flags if f in LETTERS))))
        out[name] = sorted(messages)
        m.close()
    m.logout()
    return out


def assert_identical(sync: Sync, port: int) -> dict[str, list[tuple[bytes, str]]]:
    here, there = local_state(sync.local), server_state(port)
    assert sorted(here) == sorted(there)
    for name in here:
        assert here[name] == there[name], name
    return there


def subjects(state: dict[str, list[tuple[bytes, str]]], name: str) -> dict[str, str]:
    out = {}
    for data, flags in state[name]:
        out[re.search(rb"^Subject: (.*)$", data, re.M).group(1).decode()] = flags
    return out


@pytest.mark.tool("mbsync")
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_two_way_sync_with_mbsync(start_server, certificate, tmp_path, transport):
    server = tls_server(start_server, certificate, transport)
    mbsync_scenario(server, tmp_path, transport, certificate[0])


class Twistd:
    """C{twistd -n mailscreen} from the installed package, as a new user runs it."""

    def __init__(self, tmp_path: Path) -> None:
        from tests.test_twistd import EPHEMERAL, twistd, wait_for_ports

        self.proc = twistd(tmp_path, "--data-dir", str(tmp_path / "data"), "--smtp", EPHEMERAL,
                           "--pop3", EPHEMERAL, "--imap", EPHEMERAL, "--web", EPHEMERAL)
        self.ports = wait_for_ports(self.proc, {"smtp", "pop3", "imap"})
        if set(self.ports) != {"smtp", "pop3", "imap"}:
            self.stop()
            raise AssertionError(f"twistd did not listen: {self.ports}")

    def port(self, kind: str) -> int:
        return self.ports[kind]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def _twistd_usable() -> bool:
    from tests.test_twistd import _plugin_visible

    return bool(os.environ.get("MAILSCREEN_REQUIRE_TWISTD")) or _plugin_visible()


@pytest.mark.tool("mbsync")
def test_two_way_sync_with_mbsync_against_twistd(tmp_path):
    if not _twistd_usable():
        pytest.skip("twistd mailscreen needs a non-editable install: pip install .")
    server = Twistd(tmp_path)
    try:
        mbsync_scenario(server, tmp_path)
    finally:
        server.stop()


def mbsync_scenario(server, tmp_path: Path, transport: str = "plain", ca: str = "") -> None:
    port = server.port("imap")
    sync = Sync(tmp_path, port, transport, ca if transport != "plain" else "", server)

    # The server side: mail delivered by SMTP, a nested folder with flagged mail.
    for subject in ("m1", "m2", "m3", "m4", "m6"):
        send(server, to=USER, subject=subject, body=f"{subject} body\r\n")
    m = imaplib.IMAP4("127.0.0.1", port)
    m.login(USER, "secret")
    assert m.create("Projects/2024")[0] == "OK"
    assert m.append("Projects/2024", "(\\Seen)", None, message("p1"))[0] == "OK"
    assert m.append("Projects/2024", "(\\Flagged \\Answered)", None, message("p2"))[0] == "OK"
    for name in ("Entw&APw-rfe", '"lists.debian"'):  # "Entwürfe", and a dot inside a name
        assert m.create(name)[0] == "OK"
        assert m.append(name, "(\\Seen)", None, message(f"x-{len(name)}"))[0] == "OK"
    assert m.create("Bulk")[0] == "OK"
    append_many(port, "Bulk", [("(\\Seen) " if i % 3 else "", message(f"b{i}", "x" * i))
                               for i in range(150)])
    m.select("INBOX")
    m.store("2", "+FLAGS", "(\\Seen)")
    m.logout()

    # The local side: mail of its own in INBOX and in folders the server lacks.
    sync.put("INBOX", message("l1"), "S")
    sync.put("Local", message("l2"))
    sync.put("Local/Deep", message("l3"), "F")
    sync.make_folder("Empty")

    sync.run()
    state = assert_identical(sync, port)
    assert subjects(state, "INBOX") == {"m1": "", "m2": "S", "m3": "", "m4": "", "m6": "", "l1": "S"}
    assert len(state["Bulk"]) == 150
    assert subjects(state, "Entw&APw-rfe") == {"x-12": "S"}
    assert subjects(state, "lists.debian") == {"x-14": "S"}
    assert subjects(state, "Projects/2024") == {"p1": "S", "p2": "FR"}
    assert subjects(state, "Local/Deep") == {"l3": "F"}
    for name in ("Sent", "Drafts", "Trash", "Junk", "Archive", "Empty"):
        assert state[name] == []

    # Changes on the server: flags, a MOVE, a deletion, a new folder, a folder removed.
    m = imaplib.IMAP4("127.0.0.1", port)
    m.login(USER, "secret")
    m.select("INBOX")
    typ, data = m.search(None, "SUBJECT", "m1")
    m.store(data[0].decode(), "+FLAGS", "(\\Flagged)")
    typ, data = m.uid("SEARCH", "SUBJECT", "m3")
    assert m.uid("MOVE", data[0].decode(), "Archive")[0] == "OK"
    m.select("Projects/2024")
    typ, data = m.search(None, "SUBJECT", "p1")
    m.store(data[0].decode(), "+FLAGS", "(\\Deleted)")
    m.expunge()
    assert m.create("Remote")[0] == "OK"
    assert m.append("Remote", "(\\Draft)", None, message("r1"))[0] == "OK"
    assert m.delete("Empty")[0] == "OK"
    m.select("Bulk")
    m.store("1:40", "+FLAGS", "(\\Flagged)")
    m.store("41:60", "+FLAGS.SILENT", "(\\Deleted)")
    m.expunge()
    m.logout()
    send(server, to=USER, subject="m5", body="m5 body\r\n")
    pop = poplib.POP3("127.0.0.1", server.port("pop3"))
    pop.user(USER)
    pop.pass_("secret")
    for i in range(1, len(pop.list()[1]) + 1):
        if b"Subject: m6" in pop.top(i, 0)[1]:
            pop.dele(i)
    pop.quit()

    # Changes on the local side: flags, a move between folders, a deletion, new mail.
    sync.add_flags("INBOX", "l1", "F")
    sync.add_flags("INBOX", "m1", "R")  # while the server adds \\Flagged
    p = sync.find("Local", "l2")
    moved = re.sub(r",U=\d+", "", p.name)  # as a MUA moving a file does, under a new name
    p.rename(sync.folder("INBOX") / "cur" / (moved if ":2," in moved else moved + ":2,S"))
    sync.find("INBOX", "m2").unlink()
    sync.add_flags("INBOX", "m4", "T")
    for i in range(100, 110):
        sync.find("Bulk", f"b{i}").unlink()
    for i in range(110, 120):
        sync.add_flags("Bulk", f"b{i}", "FS")
    sync.put("INBOX", message("l4"))
    sync.put("NewLocal", message("l5"), "RS")
    # An empty folder deleted locally goes on the server too (mbsync's way to
    # mark a Maildir deleted when its sync state lives inside it: remove cur/).
    shutil.rmtree(sync.folder("Junk") / "cur")

    sync.run()
    sync.run()  # a second run propagates nothing new
    state = assert_identical(sync, port)
    assert subjects(state, "INBOX") == {"m1": "FR", "l1": "FS", "l2": "S", "l4": "", "m5": ""}
    bulk = subjects(state, "Bulk")
    assert len(bulk) == 120 and "b40" not in bulk and "b100" not in bulk
    assert bulk["b0"] == "F" and bulk["b1"] == "FS" and bulk["b60"] == "" and bulk["b110"] == "FS"
    assert subjects(state, "Archive") == {"m3": ""}
    assert subjects(state, "Projects/2024") == {"p2": "FR"}
    assert subjects(state, "Local") == {}
    assert subjects(state, "Remote") == {"r1": "D"}
    assert subjects(state, "NewLocal") == {"l5": "RS"}
    assert "Empty" not in state and "Junk" not in state
    assert not sync.folder("Empty").exists()


@pytest.mark.tool("offlineimap")
@pytest.mark.parametrize("transport,compress", [pytest.param(t, False, id=t) for t in TRANSPORTS] + [
    pytest.param("plain", True, id="plain-compress"), pytest.param("implicit", True, id="implicit-compress")])
def test_two_way_sync_with_offlineimap(start_server, certificate, tmp_path, transport, compress):
    """Also with COMPRESS=DEFLATE (offlineimap's usecompression), in the clear and inside TLS."""
    server = tls_server(start_server, certificate, transport)
    port = server.port("imap")
    sync = OfflineIMAP(tmp_path, port, transport, certificate[0] if transport != "plain" else "", server,
                       compress=compress)
    for subject in ("m1", "m2", "m3", "m4"):
        send(server, to=USER, subject=subject, body=f"{subject} body\r\n")
    m = imaplib.IMAP4("127.0.0.1", port)
    m.login(USER, "secret")
    assert m.create("Projects/2024")[0] == "OK"
    assert m.append("Projects/2024", "(\\Flagged)", None, message("p1"))[0] == "OK"
    assert m.create("Bulk")[0] == "OK"
    append_many(port, "Bulk", [("(\\Seen) " if i % 2 else "", message(f"b{i}")) for i in range(120)])
    m.logout()
    sync.put("INBOX", message("l1"), "S")
    sync.put("Local", message("l2"), "F")
    with log_lines("COMPRESS=DEFLATE active") as compressed:
        sync.run()
    assert bool(compressed) == compress
    state = assert_identical(sync, port)
    assert subjects(state, "INBOX") == {"m1": "", "m2": "", "m3": "", "m4": "", "l1": "S"}
    assert subjects(state, "Local") == {"l2": "F"}
    assert len(state["Bulk"]) == 120

    m = imaplib.IMAP4("127.0.0.1", port)
    m.login(USER, "secret")
    m.select("INBOX")
    typ, data = m.search(None, "SUBJECT", "m1")
    m.store(data[0].decode(), "+FLAGS", "(\\Answered)")
    typ, data = m.uid("SEARCH", "SUBJECT", "m2")
    assert m.uid("MOVE", data[0].decode(), "Archive")[0] == "OK"
    typ, data = m.search(None, "SUBJECT", "m3")
    m.store(data[0].decode(), "+FLAGS", "(\\Deleted)")
    m.expunge()
    assert m.create("Remote")[0] == "OK"
    assert m.append("Remote", "(\\Seen)", None, message("r1"))[0] == "OK"
    m.logout()
    sync.add_flags("INBOX", "l1", "F")
    sync.add_flags("INBOX", "m1", "S")
    sync.find("INBOX", "m4").unlink()
    sync.find("Local", "l2").unlink()
    sync.put("Local", message("l3"))
    sync.put("NewLocal", message("l4"), "D")
    sync.run()
    sync.run()
    state = assert_identical(sync, port)
    assert subjects(state, "INBOX") == {"m1": "RS", "l1": "FS"}
    assert subjects(state, "Archive") == {"m2": ""}
    assert subjects(state, "Local") == {"l3": ""}
    assert subjects(state, "Remote") == {"r1": "S"}
    assert subjects(state, "NewLocal") == {"l4": "D"}


@pytest.mark.tool("offlineimap")
def test_offlineimap_starttls_connection_repeated(start_server, certificate, tmp_path):
    """
    Twenty offlineimap runs over STARTTLS, each under a hard timeout: none may
    hang at connection set-up (before the ticket hold in lineproto, 6 of 60
    runs hung there).
    """
    server = tls_server(start_server, certificate, "starttls")
    for subject in ("m1", "m2"):
        send(server, to=USER, subject=subject, body=f"{subject} body\r\n")
    sync = OfflineIMAP(tmp_path, server.port("imap"), "starttls", certificate[0], server)
    env = dict(os.environ, HOME=str(sync.home))
    for attempt in range(20):
        try:
            p = subprocess.run(sync.command(), env=env, capture_output=True, text=True, timeout=20)
        except subprocess.TimeoutExpired as e:
            raise AssertionError(f"run {attempt + 1} of 20 hung:\n{e.stdout}\n{e.stderr}") from None
        assert p.returncode == 0, p.stdout + p.stderr
    assert subjects(local_state(sync.local), "INBOX") == {"m1": "", "m2": ""}
