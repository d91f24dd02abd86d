"""
SMTP, submission, POP3 and IMAP over STARTTLS and implicit TLS (C{ssl:}
listeners), with the same checks as in plaintext: the server closes the
connection after QUIT/LOGOUT (an orderly TCP close, not a wait for the
client's close_notify), an encrypted session advertises neither STARTTLS
nor plaintext restrictions, pipelined commands are answered in order and in
full across the input and output back-pressure paths, and the TLS profile
refuses ciphers without forward secrecy. Real clients (fetchmail, msmtp,
swaks) run over both kinds of TLS too; mbsync and offlineimap are in
test_imap_sync.py.
"""

from __future__ import annotations

import os
import select
import socket
import ssl
import subprocess
import time
from pathlib import Path

import pytest
from twisted.internet.task import Clock

from tests.conftest import LineReader, maildir_files
from twisted_mail_screen.protocols.lineproto import PENDING_INPUT_LIMIT, TLS_CLOSE_GRACE
from twisted_mail_screen.testing import EPHEMERAL, in_reactor

IMPLICIT = "ssl:0:interface=127.0.0.1"  # the certificate and key come from [tls]
MODES = ("plain", "starttls", "implicit")
UPGRADE = {"smtp": (b"EHLO c\r\nSTARTTLS\r\n", b"220 "), "submission": (b"EHLO c\r\nSTARTTLS\r\n", b"220 "),
           "pop3": (b"STLS\r\n", b"+OK"), "imap": (b"s STARTTLS\r\n", b"s OK")}
ALICE = ("alice@example.test", "alice-secret")


@pytest.fixture
def tls_server(start_server, accounts, certificate):
    """A site whose passwords may only cross TLS, with a STARTTLS and an ssl: listener for each protocol."""
    cert, key = certificate
    return start_server(site=True, kinds=("smtp", "submission", "pop3", "imap"),
                        plaintext_auth="never", tls__certificate=cert, tls__key=key,
                        listen__submission=[EPHEMERAL, IMPLICIT], listen__pop3=[EPHEMERAL, IMPLICIT],
                        listen__imap=[EPHEMERAL, IMPLICIT])


def client_context(certificate: tuple[str, str]) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=certificate[0])


def port(server, kind: str, mode: str) -> int:
    ports = server.service.ports(kind)
    return ports[1] if mode == "implicit" else ports[0]


class Session(LineReader):
    """A raw client of one protocol over plaintext, STARTTLS or implicit TLS."""

    def __init__(self, server, kind: str, mode: str, certificate: tuple[str, str]) -> None:
        sock = socket.create_connection(("127.0.0.1", port(server, kind, mode)), timeout=20)
        context = client_context(certificate)
        if mode == "implicit":
            sock = context.wrap_socket(sock, server_hostname="localhost")
        self.sock, self.buf = sock, b""
        self.greeting = self.line()
        if mode == "starttls":
            command, ok = UPGRADE[kind]
            self.send(command)
            self.until(ok)
            assert not self.buf  # nothing may follow the invitation in the clear
            self.sock = context.wrap_socket(sock, server_hostname="localhost")
        self.tls = mode != "plain"

    def until(self, start: bytes) -> list[bytes]:
        lines = []
        while not lines or not lines[-1].startswith(start):
            lines.append(self.line())
        return lines

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_to_end(self) -> bytes:
        """The rest of the stream, up to the server's close (TLS close_notify or TCP FIN)."""
        rest = self.buf
        while True:
            try:
                chunk = self.sock.recv(65536)
            except (ssl.SSLEOFError, ConnectionResetError):
                break
            if not chunk:
                break
            rest += chunk
        self.buf = b""
        return rest

    def server_closed_tcp(self, within: float) -> bool:
        """
        Whether the server closed the TCP connection in an orderly way (FIN)
        within C{within} seconds, without this client sending its own
        close_notify first: what mbsync waits for after LOGOUT.
        """
        raw = socket.socket(fileno=os.dup(self.sock.fileno()))
        try:
            readable, _, _ = select.select([raw], [], [], within)
            return bool(readable) and raw.recv(1, socket.MSG_PEEK) == b""
        except ConnectionResetError:
            return False  # an abort, not a close
        finally:
            raw.close()

    def close(self) -> None:
        self.sock.close()


LOGIN = {"smtp": (),
         "submission": ((b"EHLO c\r\n", b"250 "),
                        (b"AUTH PLAIN AGFsaWNlQGV4YW1wbGUudGVzdABhbGljZS1zZWNyZXQ=\r\n", b"235 ")),
         "pop3": ((b"USER alice@example.test\r\n", b"+OK"), (b"PASS alice-secret\r\n", b"+OK")),
         "imap": ((b"l LOGIN alice@example.test alice-secret\r\n", b"l OK"),)}


def log_in(s: Session, kind: str) -> None:
    for command, ok in LOGIN[kind]:
        s.send(command)
        assert s.until(ok)[-1].startswith(ok)


GOODBYE = {"smtp": (b"QUIT\r\n", b"221 "), "submission": (b"QUIT\r\n", b"221 "),
           "pop3": (b"QUIT\r\n", b"+OK"), "imap": (b"b LOGOUT\r\n", b"b OK")}


@pytest.mark.parametrize("kind,mode", [(kind, mode) for kind in ("smtp", "submission", "pop3", "imap")
                                       for mode in MODES if (kind, mode) != ("smtp", "implicit")])
def test_server_closes_after_quit_or_logout(tls_server, certificate, kind, mode):
    """RFC 5321 4.1.1.10, 1939 6, 3501 6.1.3: after the goodbye the server closes, over TLS too."""
    s = Session(tls_server, kind, mode, certificate)
    if mode != "plain":
        log_in(s, kind)
    s.send(GOODBYE[kind][0])
    s.until(GOODBYE[kind][1])
    started = time.monotonic()
    assert s.read_to_end() == b""
    assert s.server_closed_tcp(within=TLS_CLOSE_GRACE / 2)
    assert time.monotonic() - started < TLS_CLOSE_GRACE / 2
    s.close()


@pytest.mark.parametrize("mode", ["starttls", "implicit"])
def test_tls_session_dropped_after_grace_if_client_keeps_it_open(start_server, accounts, certificate, mode):
    """
    A TLS client that neither sends its close_notify nor closes after QUIT
    is disconnected TLS_CLOSE_GRACE seconds later on the injected clock:
    the session ends (its screening slot frees) instead of lingering.
    """
    cert, key = certificate
    server = start_server(site=True, clock=Clock(), kinds=("pop3",), plaintext_auth="never",
                          tls__certificate=cert, tls__key=key, listen__pop3=[EPHEMERAL, IMPLICIT],
                          screening__max_simultaneous=1)
    s = Session(server, "pop3", mode, certificate)
    s.send(b"QUIT\r\n")
    s.until(b"+OK")
    assert s.read_to_end() == b""  # the server's close_notify and FIN; this client stays silent

    def greeting() -> bytes:
        with socket.create_connection(("127.0.0.1", port(server, "pop3", "plain")), timeout=10) as other:
            return other.recv(1024)

    assert greeting().startswith(b"-ERR")  # the lingering session still holds the only slot
    server.advance(TLS_CLOSE_GRACE)
    in_reactor(lambda: None)  # the abort's connectionLost runs on the next reactor turn
    in_reactor(lambda: None)
    assert greeting().startswith(b"+OK")
    s.close()


def capabilities(s: Session, kind: str) -> list[bytes]:
    if kind == "imap":
        s.send(b"c CAPABILITY\r\n")
        return s.until(b"c OK")
    if kind == "pop3":
        s.send(b"CAPA\r\n")
        return s.until(b".")
    s.send(b"EHLO c\r\n")
    return s.until(b"250 ")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", ["submission", "pop3", "imap"])
def test_encrypted_sessions_offer_passwords_and_no_starttls(tls_server, certificate, kind, mode):
    """Implicit TLS is as STARTTLS: no STARTTLS/STLS, no LOGINDISABLED, AUTH offered."""
    s = Session(tls_server, kind, mode, certificate)
    words = b" ".join(capabilities(s, kind)).split()
    if kind == "imap" and mode != "starttls":  # the greeting before STARTTLS offers it, rightly
        assert s.greeting.startswith(b"* OK [CAPABILITY ")
        words += s.greeting.split()
    starttls = {b"STARTTLS", b"STLS"} & set(words)
    offered = {b"AUTH=PLAIN", b"PLAIN", b"USER"} & set(words)
    if mode == "plain":
        assert starttls and not offered
        assert kind != "imap" or b"LOGINDISABLED" in words
    else:
        assert not starttls and offered and b"LOGINDISABLED" not in words and b"LOGINDISABLED]" not in words
        log_in(s, kind)
    s.close()


@pytest.mark.parametrize("mode", ["starttls", "implicit"])
def test_tls_profile_has_forward_secrecy_only(tls_server, certificate, mode):
    """TLS 1.2 offers ECDHE with AEAD only (no AES128-SHA, no CBC); TLS 1.1 is refused; TLS 1.3 works."""
    def handshake(**settings):
        context = client_context(certificate)
        if "ciphers" in settings:
            context.set_ciphers(settings["ciphers"])
        context.maximum_version = settings.get("version", ssl.TLSVersion.TLSv1_3)
        context.minimum_version = min(context.maximum_version, ssl.TLSVersion.TLSv1_2)
        if context.maximum_version < ssl.TLSVersion.TLSv1_2:
            context.minimum_version = context.maximum_version
            context.set_ciphers("ALL:@SECLEVEL=0")
        sock = socket.create_connection(("127.0.0.1", port(tls_server, "imap", mode)), timeout=10)
        try:
            if mode == "starttls":
                sock.recv(4096)
                sock.sendall(b"s STARTTLS\r\n")
                sock.recv(4096)
            with context.wrap_socket(sock, server_hostname="localhost") as tls:
                return tls.version(), tls.cipher()[0]
        except (ssl.SSLError, ConnectionResetError) as e:
            return None, str(e)

    assert handshake()[0] == "TLSv1.3"
    assert handshake(version=ssl.TLSVersion.TLSv1_2, ciphers="ECDHE-ECDSA-AES128-GCM-SHA256") == (
        "TLSv1.2", "ECDHE-ECDSA-AES128-GCM-SHA256")
    for weak in ("AES128-SHA", "ECDHE-ECDSA-AES128-SHA", "ECDHE-ECDSA-AES256-SHA384"):
        assert handshake(version=ssl.TLSVersion.TLSv1_2, ciphers=weak)[0] is None, weak
    assert handshake(version=ssl.TLSVersion.TLSv1_1)[0] is None


@pytest.mark.parametrize("kind", ["smtp", "pop3", "imap"])
def test_nothing_arrives_after_starttls_until_the_client_speaks(tls_server, certificate, kind):
    """
    After a STARTTLS handshake the server holds its TLS 1.3 session tickets
    until the client's first command has arrived (see
    CommandProtocol.handshakeCompleted): a client reading in one thread
    while its other thread writes that command must not see them first.
    """
    s = Session(tls_server, kind, "starttls", certificate)
    assert s.sock.version() == "TLSv1.3"
    readable, _, _ = select.select([s.sock], [], [], 0.1)  # the kernel would release a hold at 0.2 s
    assert not readable and s.sock.pending() == 0
    s.send({"smtp": b"NOOP\r\n", "pop3": b"NOOP\r\n", "imap": b"n NOOP\r\n"}[kind])
    assert s.until({"smtp": b"250 ", "pop3": b"-ERR", "imap": b"n OK"}[kind])
    s.close()


# pipelining over every transport --------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
def test_smtp_pipelined_transactions_beyond_the_input_limit(start_server, tmp_path, certificate, mode):
    """
    Three transactions in one write, each message larger than the pending-input
    limit: reading pauses while a delivery is pending and resumes after it, and
    over TLS, too, no decrypted input is left undelivered.
    """
    cert, key = certificate
    server = start_server(tls__certificate=cert, tls__key=key, listen__smtp=[EPHEMERAL, IMPLICIT])
    s = Session(server, "smtp", mode, certificate)
    big = b"".join(b"line %07d of a long message\r\n" % i for i in range(PENDING_INPUT_LIMIT // 20))
    batch = b"EHLO c\r\n"
    for i in range(3):
        batch += (b"MAIL FROM:<s@x.test>\r\nRCPT TO:<p@x.test>\r\nRCPT TO:<q@x.test>\r\nDATA\r\n"
                  b"Subject: %d\r\n\r\n%s.\r\n" % (i, big))
    s.send(batch + b"NOOP\r\nQUIT\r\n")
    finals = [l[:3] for l in s.until(b"221 ") if l[3:4] == b" "]
    assert finals == [b"250"] + [b"250", b"250", b"250", b"354", b"250"] * 3 + [b"250", b"221"]
    files = maildir_files(tmp_path / "data", "p@x.test")
    assert len(files) == 3 and all(f.read_bytes().endswith(big.replace(b"\r\n", b"\n")) for f in files)
    s.close()


@pytest.mark.parametrize("mode", MODES)
def test_pop3_pipelined_retrs_under_output_back_pressure(start_server, tmp_path, certificate, mode):
    """200 pipelined RETRs of 40 KB each, read only after all are sent: byte-identical, in order."""
    cert, key = certificate
    server = start_server(tls__certificate=cert, tls__key=key, listen__pop3=[EPHEMERAL, IMPLICIT])
    bodies = [b"Subject: %d\r\n\r\n" % i + (b"%05d " % i + b"y" * 70 + b"\r\n") * 500 for i in range(200)]
    import smtplib
    client = smtplib.SMTP("127.0.0.1", server.port("smtp"))
    for body in bodies:
        client.sendmail("a@x.test", ["u@x.test"], body)
    client.quit()
    s = Session(server, "pop3", mode, certificate)
    s.send(b"USER u@x.test\r\nPASS any\r\n")
    s.until(b"+OK")
    s.until(b"+OK")
    s.send(b"".join(b"RETR %d\r\n" % i for i in range(1, 201)) + b"QUIT\r\n")
    time.sleep(0.3)  # let the server fill every buffer and stop, before anything is read
    for i, body in enumerate(bodies):
        assert s.line().startswith(b"+OK")
        lines = []
        while (line := s.line()) != b".":
            lines.append(line)
        assert b"\r\n".join(lines).endswith(body.rstrip(b"\r\n")), i
    assert s.line().startswith(b"+OK")
    s.close()


@pytest.mark.parametrize("mode", MODES)
def test_imap_pipelined_commands_and_large_fetch(start_server, tmp_path, certificate, mode):
    """Pipelined IMAP commands, one a FETCH of 3 MB, answered in order over every transport."""
    cert, key = certificate
    server = start_server(kinds=("smtp", "imap"), tls__certificate=cert, tls__key=key,
                          listen__imap=[EPHEMERAL, IMPLICIT])
    import smtplib
    body = b"z" * 76 + b"\r\n"
    client = smtplib.SMTP("127.0.0.1", server.port("smtp"))
    for i in range(3):
        client.sendmail("a@x.test", ["u@x.test"], b"Subject: %d\r\n\r\n" % i + body * 13_000)
    client.quit()
    s = Session(server, "imap", mode, certificate)
    s.send(b"a1 LOGIN u@x.test pw\r\na2 SELECT INBOX\r\na3 FETCH 1:* (UID BODY.PEEK[])\r\n"
           b"a4 STORE 1 +FLAGS (\\Seen)\r\na5 NOOP\r\na6 LOGOUT\r\n")
    time.sleep(0.3)
    data = b""
    while b"\r\na6 OK" not in data:
        chunk = s.sock.recv(1 << 20)
        assert chunk, data[-200:]
        data += chunk
    tags = [line.split(b" ")[0] for line in data.split(b"\r\n") if line[:1] == b"a"]
    assert tags == [b"a1", b"a2", b"a3", b"a4", b"a5", b"a6"]
    assert data.count(body * 13_000) == 3
    s.close()


# real clients ------------------------------------------------------------------------------

def run(command: list[str], timeout: float = 60, **kwargs) -> subprocess.CompletedProcess:
    """A client run under a hard timeout (killed, so a hang fails the test instead of CI)."""
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, **kwargs)


@pytest.mark.tool("swaks")
@pytest.mark.parametrize("mode", ["starttls", "implicit"])
def test_swaks_submits_over_tls(tls_server, tmp_path, certificate, mode):
    tls = ["--tls"] if mode == "starttls" else ["--tlsc"]
    p = run(["swaks", "--server", f"127.0.0.1:{port(tls_server, 'submission', mode)}", *tls,
             "--tls-verify", "--tls-ca-path", certificate[0], "--tls-sni", "localhost",
             "--auth", "PLAIN", "--auth-user", ALICE[0], "--auth-password", ALICE[1],
             "--from", ALICE[0], "--to", "bob@example.test", "--header", f"Subject: swaks {mode}"])
    assert p.returncode == 0, p.stdout + p.stderr
    assert "221 " in p.stdout
    [stored] = maildir_files(tmp_path / "data", "bob@example.test")
    assert f"Subject: swaks {mode}".encode() in stored.read_bytes()


@pytest.mark.tool("msmtp")
@pytest.mark.parametrize("mode", ["starttls", "implicit"])
def test_msmtp_submits_over_tls(tls_server, tmp_path, certificate, mode):
    rc = tmp_path / "msmtprc"
    rc.write_text(f"""account default
host localhost
port {port(tls_server, 'submission', mode)}
tls on
tls_starttls {'on' if mode == 'starttls' else 'off'}
tls_trust_file {certificate[0]}
auth plain
user {ALICE[0]}
password {ALICE[1]}
from {ALICE[0]}
""")
    rc.chmod(0o600)
    message = f"From: {ALICE[0]}\nTo: bob@example.test\nSubject: msmtp {mode}\n\nhello\n"
    p = run(["msmtp", "-C", str(rc), "bob@example.test"], input=message)
    assert p.returncode == 0, p.stdout + p.stderr
    [stored] = maildir_files(tmp_path / "data", "bob@example.test")
    assert f"Subject: msmtp {mode}".encode() in stored.read_bytes()


@pytest.mark.tool("fetchmail")
@pytest.mark.parametrize("mode", ["starttls", "implicit"])
def test_fetchmail_retrieves_over_tls(tls_server, tmp_path, certificate, mode):
    """fetchmail with sslcertck: STLS on the POP3 port, and POP3S; the mail is fetched and deleted."""
    import smtplib
    client = smtplib.SMTP("127.0.0.1", tls_server.port("smtp"))
    for i in range(3):
        client.sendmail("a@x.example", [ALICE[0]], f"Subject: fetch {i}\r\n\r\nbody {i}\r\n")
    client.quit()
    home = tmp_path / "home"
    home.mkdir()
    out = tmp_path / "fetched.mbox"
    rc = home / ".fetchmailrc"
    tls = "sslproto tls1.2+" if mode == "starttls" else "ssl"
    rc.write_text(f"""set no bouncemail
poll localhost protocol pop3 port {port(tls_server, 'pop3', mode)}
  user "{ALICE[0]}" password "{ALICE[1]}"
  {tls} sslcertck sslcertfile "{certificate[0]}"
  mda "/bin/sh -c 'cat >> {out}'"
""")
    rc.chmod(0o600)
    p = run(["fetchmail", "-f", str(rc), "--nosyslog", "-v"], env=dict(os.environ, HOME=str(home)))
    assert p.returncode == 0, p.stdout + p.stderr
    text = out.read_text()
    assert all(f"Subject: fetch {i}" in text for i in range(3))
    assert maildir_files(tmp_path / "data", ALICE[0]) == []
    log = p.stdout + p.stderr
    assert "STLS" in log if mode == "starttls" else "SSL connection" in log or "TLS" in log
