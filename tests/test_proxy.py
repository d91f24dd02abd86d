"""
PROXY-protocol listeners over real sockets: only the proxies in
C{proxy.trusted} may send a header, the header's client is the session's
peer (screened, written in Received:), and a header without a usable
client address leaves the session on the proxy's own address.

Every address in 127.0.0.0/8 is local on Linux, so the "proxy" is a client
socket bound to 127.0.0.2 (listed) and the "stranger" one bound to
127.0.0.3 (not listed); the trusted list is the thing under test. Time is
a Clock.
"""

from __future__ import annotations

import base64
import socket
import struct
import time
from pathlib import Path

import pytest
from twisted.internet.protocol import Factory
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher

from conftest import maildir_files
from twisted_mail_screen.store.auth import is_loopback
from twisted_mail_screen.config.settings import load_config
from twisted_mail_screen.config.base import ConfigError
from twisted_mail_screen.runtime.proxyproto import V2_SIGNATURE, BadHeader, HeaderReader
from twisted_mail_screen.testing import in_reactor

PROXY, STRANGER = "127.0.0.2", "127.0.0.3"
HAPROXY = "haproxy:tcp:0:interface=127.0.0.1"


def serve(start_server, **overrides):
    """A site whose SMTP listener speaks PROXY and trusts 127.0.0.2 only."""
    clock = Clock()
    clock.advance(time.time() // 1)  # the Maildir tmp/ cleaner compares with file times
    options = {"listen__smtp": [HAPROXY], "proxy__trusted": [f"{PROXY}/32"]}
    options.update(overrides)
    return start_server(site=True, clock=clock, kinds=("smtp",), **options), clock


class Peer:
    """A raw client: binds C{source}, connects, sends C{header} first."""

    def __init__(self, port: int, source: str, header: bytes) -> None:
        self.sock = socket.socket()
        self.sock.settimeout(10)
        self.sock.bind((source, 0))
        self.sock.connect(("127.0.0.1", port))
        if header:
            self.sock.sendall(header)
        self.file = self.sock.makefile("rb")

    def reply(self) -> bytes:
        """One (multi-line) reply, or what came before the server closed."""
        out = b""
        while True:
            line = self.file.readline()
            out += line
            if not line or line[3:4] == b" ":
                return out

    def command(self, line: str) -> bytes:
        self.sock.sendall(line.encode() + b"\r\n")
        return self.reply()

    def rest(self) -> bytes:
        """Everything until the server closes (b"" when it sent nothing)."""
        return self.file.read()

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def v1(source: str = "203.0.113.7", family: str = "TCP4") -> bytes:
    destination = "127.0.0.1" if family == "TCP4" else "::1"
    return f"PROXY {family} {source} {destination} 40000 25\r\n".encode()


def v2(command: int, family: int, block: bytes, transport: int = 1) -> bytes:
    return (V2_SIGNATURE + bytes([0x20 | command, family << 4 | transport])
            + struct.pack("!H", len(block)) + block)


V2_INET = socket.inet_aton("203.0.113.9") + socket.inet_aton("127.0.0.1") + struct.pack("!HH", 5, 25)
V2_INET6 = (socket.inet_pton(socket.AF_INET6, "2001:db8::9") + socket.inet_pton(socket.AF_INET6, "::1")
            + struct.pack("!HH", 5, 25))
V2_UNIX = b"/run/client.sock".ljust(108, b"\0") + b"/run/haproxy.sock".ljust(108, b"\0")


@pytest.fixture
def logged():
    lines: list[str] = []

    def observe(event):
        lines.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    yield lines
    globalLogPublisher.removeObserver(observe)


def send_message(peer: Peer) -> None:
    assert peer.reply().startswith(b"220")
    assert peer.command("EHLO client.example").startswith(b"250")
    assert peer.command("MAIL FROM:<someone@remote.example>").startswith(b"250")
    assert peer.command("RCPT TO:<alice@example.test>").startswith(b"250")
    assert peer.command("DATA").startswith(b"354")
    assert peer.command("Subject: hi\r\n\r\nbody\r\n.").startswith(b"250")
    peer.command("QUIT")
    peer.close()


def received_lines(tmp_path: Path) -> list[str]:
    return [next(line for line in p.read_text().splitlines() if line.startswith("Received:"))
            for p in maildir_files(tmp_path / "data", "alice@example.test")]


def test_spoofed_loopback_header_from_an_untrusted_peer_is_refused(start_server, accounts, logged):
    """The issue's spoof from a peer not in proxy.trusted: closed before anything is served, and logged."""
    server, _ = serve(start_server)
    peer = Peer(server.port("smtp"), STRANGER, b"PROXY TCP4 127.0.0.1 127.0.0.1 1 2\r\nEHLO x\r\n")
    assert peer.rest() == b""
    peer.close()
    refusals = [line for line in logged if "not in proxy.trusted" in line]
    assert len(refusals) == 1 and STRANGER in refusals[0]


def test_loopback_is_decided_by_the_header_of_a_trusted_proxy(start_server, accounts):
    """
    Plaintext AUTH follows the header's client, not the proxy's loopback
    socket: so the refusal above is what stops the spoof.
    """
    server, _ = serve(start_server)
    local = Peer(server.port("smtp"), PROXY, v1("127.0.0.1"))
    assert local.reply().startswith(b"220")
    assert b"AUTH" in local.command("EHLO x")
    remote = Peer(server.port("smtp"), PROXY, v1("203.0.113.7"))
    assert remote.reply().startswith(b"220")
    assert b"AUTH" not in remote.command("EHLO x")
    assert remote.command("AUTH PLAIN").startswith(b"538 5.7.11")
    local.close()
    remote.close()


def test_empty_trusted_list_refuses_every_header(start_server, accounts, logged):
    """proxy.trusted = [] (the default): even loopback gets no hearing."""
    server, _ = serve(start_server, proxy__trusted=[])
    peer = Peer(server.port("smtp"), "127.0.0.1", v1())
    assert peer.rest() == b""
    peer.close()
    assert any("proxy.trusted is empty" in line for line in logged)


def test_trusted_header_sets_the_peer_for_screening_and_received(start_server, accounts, tmp_path):
    """The header's client is screened (a block on it refuses) and named in Received:."""
    server, _ = serve(start_server, listen__pop3=[HAPROXY], listen__imap=[HAPROXY])
    send_message(Peer(server.port("smtp"), PROXY, v1("203.0.113.7")))
    assert "([203.0.113.7])" in received_lines(tmp_path)[0]
    in_reactor(server.service.screening.admin.block, "203.0.113.7", 30, "test")
    for kind, refusal in (("smtp", b"421 4.7.0"), ("pop3", b"-ERR [SYS/TEMP]"),
                          ("imap", b"* BYE [UNAVAILABLE]")):
        blocked = Peer(server.port(kind), PROXY, v1("203.0.113.7"))
        assert blocked.file.readline().startswith(refusal), kind
        blocked.close()
        other = Peer(server.port(kind), PROXY, v1("203.0.113.8"))
        assert other.file.readline()[:4] in (b"220 ", b"+OK ", b"* OK"), kind
        other.close()


def test_empty_source_uses_the_proxys_address_and_is_screened(start_server, accounts, tmp_path):
    """
    PROXY TCP4 with an empty source: the session is the proxy's, Received
    names it, and failed logins block it (they used to count for nobody).
    """
    server, _ = serve(start_server, plaintext_auth="always", screening__max_auth_failures=3)
    empty = b"PROXY TCP4  1.2.3.4 1 2\r\n"
    send_message(Peer(server.port("smtp"), PROXY, empty))
    received = received_lines(tmp_path)[0]
    assert f"([{PROXY}])" in received and "([])" not in received
    replies = []
    for attempt in range(3):  # distinct passwords: a repeated pair is not counted again
        wrong = base64.b64encode(b"\0alice@example.test\0wrong-%d" % attempt).decode()
        peer = Peer(server.port("smtp"), PROXY, empty)
        assert peer.reply().startswith(b"220")
        peer.command("EHLO x")
        replies.append(peer.command(f"AUTH PLAIN {wrong}"))
        peer.close()
    assert all(r.startswith(b"535") or r.startswith(b"421") for r in replies)
    assert [name for name, _, _ in in_reactor(server.service.screening.admin.blocks)] == [PROXY]
    refused = Peer(server.port("smtp"), PROXY, empty)
    assert refused.reply().startswith(b"421 4.7.0")
    refused.close()


@pytest.mark.parametrize("header", [
    v2(1, 3, V2_UNIX),                      # PROXY from an AF_UNIX client
    v2(0, 0, b""),                          # LOCAL (the proxy's own health check)
    v2(0, 1, V2_INET),                      # LOCAL ignores any address block
    v2(1, 1, V2_INET, transport=2),         # a datagram source
    b"PROXY UNKNOWN\r\n",
    b"PROXY UNKNOWN ffff:f...f:ffff ffff:f...f:ffff 65535 65535\r\n",
    v1("1.2.3.4.5"), v1("::1", "TCP4"), v1("203.0.113.7", "TCP6"), v1("fe80::1%eth0", "TCP6"),
    b"PROXY TCP4 203.0.113.7 127.0.0.1 040000 25\r\n",
], ids=["v2-unix", "v2-local", "v2-local-inet", "v2-dgram", "v1-unknown", "v1-unknown-args",
        "v1-bad-ipv4", "v1-ipv6-as-tcp4", "v1-ipv4-as-tcp6", "v1-zone", "v1-leading-zero-port"])
def test_sources_without_a_client_address_use_the_proxys(start_server, accounts, header):
    """LOCAL, UNKNOWN, AF_UNIX, datagram and unparsable sources: screened as the proxy."""
    server, _ = serve(start_server)
    in_reactor(server.service.screening.admin.block, PROXY, 30, "test")
    peer = Peer(server.port("smtp"), PROXY, header)
    assert peer.reply().startswith(b"421 4.7.0")
    peer.close()


@pytest.mark.parametrize("header,client", [
    (v2(1, 1, V2_INET), "203.0.113.9"),
    (v2(1, 2, V2_INET6), "2001:db8::9"),
    (v2(1, 1, V2_INET + b"\x04\x00\x01\x00"), "203.0.113.9"),  # a TLV after the addresses
    (v1("2001:db8::7", "TCP6"), "2001:db8::7"),
], ids=["v2-inet", "v2-inet6", "v2-tlv", "v1-tcp6"])
def test_v2_and_tcp6_headers_give_the_client(start_server, accounts, tmp_path, header, client):
    """v2 IPv4/IPv6 (with TLVs) and v1 TCP6 headers set the peer, and the proxy's block does not apply."""
    server, _ = serve(start_server)
    in_reactor(server.service.screening.admin.block, PROXY, 30, "test")
    send_message(Peer(server.port("smtp"), PROXY, header))
    assert f"([{client}])" in received_lines(tmp_path)[0]


@pytest.mark.parametrize("header", [
    b"EHLO client.example\r\n",
    b"PROXY TCP5 203.0.113.7 127.0.0.1 1 2\r\n",
    b"PROXY TCP4 203.0.113.7 127.0.0.1 1\r\n",
    b"PROXY TCP4 203.0.113.7 127.0.0.1 1 2 3\r\n",
    b"PROXY\r\n",
    b"PROXY TCP4 " + b"1" * 120,
    b"PROXY TCP4 \xff.0.0.1 127.0.0.1 1 2\r\n",
    V2_SIGNATURE[:11] + b"X" + b"\x21\x11\x00\x0c" + V2_INET,
    v2(1, 1, V2_INET)[:12] + b"\x11\x11\x00\x0c" + V2_INET,    # version 1 in a v2 frame
    v2(2, 1, V2_INET),                                          # command 2
    v2(1, 4, V2_INET),                                          # family 4
    v2(1, 1, V2_INET[:8]),                                      # address block too short
    v2(1, 3, V2_UNIX[:100]),
], ids=["no-header", "v1-protocol", "v1-few-fields", "v1-many-fields", "v1-bare", "v1-too-long",
        "v1-not-ascii", "v2-signature", "v2-version", "v2-command", "v2-family", "v2-short",
        "v2-short-unix"])
def test_bad_header_closes_the_connection(start_server, accounts, logged, header):
    """A trusted proxy's malformed header: closed with nothing served, one log line."""
    server, _ = serve(start_server)
    peer = Peer(server.port("smtp"), PROXY, header + b"EHLO x\r\n")
    assert peer.rest() == b""
    peer.close()
    assert any("bad PROXY header" in line and PROXY in line for line in logged)


def test_header_timeout_is_on_the_clock(start_server, accounts):
    """No complete header within 30 s of the injected clock: closed; 29 s is still in time."""
    server, clock = serve(start_server)

    def header_timers() -> int:
        now = clock.seconds()
        return sum(1 for call in clock.getDelayedCalls() if call.getTime() == now + 30)

    before = in_reactor(header_timers)
    slow = Peer(server.port("smtp"), PROXY, b"PROXY TCP4 203.0.113.7")
    late = Peer(server.port("smtp"), PROXY, b"PROXY TCP4 203.0.113.7")
    deadline = time.monotonic() + 10
    while in_reactor(header_timers) < before + 2 and time.monotonic() < deadline:
        time.sleep(0.01)  # waiting for the accepts, not for a window
    server.advance(29)
    slow.sock.sendall(b" 127.0.0.1 1 2\r\n")
    assert slow.reply().startswith(b"220")
    server.advance(1)
    assert late.rest() == b""
    slow.close()
    late.close()


def test_header_split_across_reads_and_pipelined_command(start_server, accounts):
    """The header may arrive a byte at a time; bytes after it reach the mail protocol."""
    server, _ = serve(start_server)
    peer = Peer(server.port("smtp"), PROXY, b"")
    for byte in v1("203.0.113.7"):
        peer.sock.sendall(bytes([byte]))
    assert peer.reply().startswith(b"220")
    peer.close()
    peer = Peer(server.port("smtp"), PROXY, v2(1, 1, V2_INET) + b"EHLO x\r\n")
    assert peer.reply().startswith(b"220")
    assert peer.reply().startswith(b"250")
    peer.close()


def test_starttls_through_a_proxied_listener(start_server, accounts, certificate, tmp_path):
    """STARTTLS runs on the connection behind the header; the session keeps the header's client."""
    import ssl
    cert, key = certificate
    server, _ = serve(start_server, plaintext_auth="never", tls__certificate=cert, tls__key=key)
    peer = Peer(server.port("smtp"), PROXY, v1("203.0.113.7"))
    assert peer.reply().startswith(b"220")
    assert b"STARTTLS" in peer.command("EHLO x")
    assert peer.command("STARTTLS").startswith(b"220")
    context = ssl.create_default_context(cafile=cert)
    tls = context.wrap_socket(peer.sock, server_hostname="mail.example.test")
    secured = Peer.__new__(Peer)
    secured.sock, secured.file = tls, tls.makefile("rb")
    assert b"AUTH" in secured.command("EHLO client.example")
    assert secured.command("MAIL FROM:<someone@remote.example>").startswith(b"250")
    assert secured.command("RCPT TO:<alice@example.test>").startswith(b"250")
    assert secured.command("DATA").startswith(b"354")
    assert secured.command("Subject: hi\r\n\r\nbody\r\n.").startswith(b"250")
    secured.command("QUIT")
    secured.close()
    assert "([203.0.113.7])" in received_lines(tmp_path)[0]


def test_unix_socket_client_is_not_loopback(start_server, accounts, tmp_path):
    """A UNIX-socket client has no address: no plaintext AUTH, and Received: has no empty '([])'."""
    path = tmp_path / "smtp.sock"
    server, _ = serve(start_server, listen__smtp=[f"unix:{path}"])

    def unix_peer() -> Peer:
        peer = Peer.__new__(Peer)
        peer.sock = socket.socket(socket.AF_UNIX)
        peer.sock.settimeout(10)
        peer.sock.connect(str(path))
        peer.file = peer.sock.makefile("rb")
        return peer

    peer = unix_peer()
    assert peer.reply().startswith(b"220")
    assert b"AUTH" not in peer.command("EHLO x")
    peer.close()
    send_message(unix_peer())
    received = received_lines(tmp_path)[0]
    assert "([])" not in received and received.startswith("Received: from client.example")


@pytest.mark.parametrize("host,loopback", [
    ("127.0.0.1", True), ("127.255.0.9", True), ("::1", True), ("::ffff:127.0.0.1", True),
    ("", False), ("127.x", False), ("1270.0.0.1", False), ("::2", False), ("10.0.0.1", False),
])
def test_is_loopback_is_decided_on_a_parsed_address(host, loopback):
    """An empty or unparsable address is never loopback."""
    assert is_loopback(host) is loopback


def test_header_reader_is_incremental_and_strict():
    """Fed a byte at a time, the reader answers once, with the bytes that followed."""
    reader = HeaderReader()
    data = v1("203.0.113.7") + b"EHLO"
    results = [reader.feed(data[i:i + 1]) for i in range(len(data) - 4)]
    assert results[:-1] == [None] * (len(results) - 1)
    header, rest = results[-1]
    assert header.source.host == "203.0.113.7" and header.source.port == 40000 and rest == b""
    reader = HeaderReader()
    assert reader.feed(b"PRO") is None
    with pytest.raises(BadHeader):
        reader.feed(b"Z")


@pytest.mark.parametrize("value,problem", [
    (["10.0.0.0/33"], "proxy.trusted = '10.0.0.0/33': not an IP address or CIDR network"),
    ([""], "proxy.trusted = '': not an IP address or CIDR network"),
    ("10.0.0.0/8", "proxy.trusted = '10.0.0.0/8': must be a list"),
    ([10], "must be a list of strings"),
])
def test_trusted_key_is_validated(tmp_path, value, problem):
    with pytest.raises(ConfigError) as e:
        load_config(None, {"data_dir": str(tmp_path), "proxy.trusted": value})
    assert problem in str(e.value) and e.value.key == "proxy.trusted"


def test_trusted_key_parses_networks(tmp_path):
    config = load_config(None, {"data_dir": str(tmp_path),
                                "proxy.trusted": ["10.1.2.3/8", "[2001:db8::1]", "::ffff:192.0.2.1"]})
    assert [str(n) for n in config.proxy.trusted] == ["10.0.0.0/8", "2001:db8::1/128", "192.0.2.1/32"]
    with pytest.raises(ConfigError, match="proxy.header_timeout"):
        load_config(None, {"data_dir": str(tmp_path), "proxy.header_timeout": 5})


# the ssl: strings read by runtime/endpoints.py (with or without haproxy:)

@pytest.mark.parametrize("description, message", [
    ("ssl:interface=127.0.0.1", "needs a port first"),
    ("ssl:993:interface", "'interface' is not name=value"),
    ("ssl:993:sslmethod=TLSv1_METHOD", "'sslmethod' is not supported"),
    ("haproxy:ssl:993:extraCertChain=x.pem", "'extraCertChain' is not supported"),
])
def test_ssl_endpoint_string_errors(description, message):
    from twisted.internet import reactor
    from twisted_mail_screen.runtime.endpoints import EndpointError, server_endpoint

    with pytest.raises(EndpointError, match=message):
        server_endpoint(reactor, description, Clock(), tls=object())


def test_ssl_endpoint_files_with_escaped_colons(tmp_path, certificate):
    """certKey=/privateKey= paths are unescaped like Twisted's own: a '\\:' in them is a ':'."""
    import shutil
    from twisted.internet import reactor
    from twisted.internet.endpoints import quoteStringArgument
    from twisted_mail_screen.runtime.endpoints import server_endpoint

    cert, key = tmp_path / "c:ert.pem", tmp_path / "k:ey.pem"
    shutil.copy(certificate[0], cert)
    shutil.copy(certificate[1], key)
    description = (f"ssl:0:interface=127.0.0.1:certKey={quoteStringArgument(str(cert))}"
                   f":privateKey={quoteStringArgument(str(key))}")
    assert server_endpoint(reactor, description, Clock()) is not None


def test_ssl_endpoint_on_an_ipv6_interface(certificate):
    """An escaped IPv6 interface (interface=\\:\\:1) reaches the TCP listener intact."""
    from twisted.internet import reactor
    from twisted_mail_screen.runtime.endpoints import server_endpoint
    from twisted_mail_screen.runtime.tls import load_server_context

    endpoint = server_endpoint(reactor, r"ssl:0:interface=\:\:1", Clock(),
                               tls=load_server_context(*certificate))
    port = in_reactor(lambda: endpoint.listen(Factory()))
    try:
        assert port.getHost().host == "::1"
    finally:
        in_reactor(port.stopListening)
