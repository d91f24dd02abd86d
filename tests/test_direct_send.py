"""
lineproto.DirectSend, the write-through path of every SMTP/POP3/IMAP
reply: straight to the socket of a plain TCP connection (public APIs
only: ISystemHandle.getHandle), never ahead of anything Twisted's buffer
holds, and never on TLS.
"""

from __future__ import annotations

import socket
import threading

from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport

from twisted_mail_screen.protocols.lineproto import DirectSend
from twisted_mail_screen.runtime.tls import load_server_context
from twisted_mail_screen.testing import in_reactor


def test_partial_send_puts_every_later_reply_behind_twisted_buffer():
    """Once the socket has not taken a whole reply, nothing may overtake the rest of it."""
    ours, peer = socket.socketpair()
    try:
        ours.setblocking(False)
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        transport = StringTransport()
        writer = DirectSend(ours)
        writer.write(transport, b"small\r\n")
        assert peer.recv(100) == b"small\r\n" and transport.value() == b""  # went direct
        big = bytes(range(256)) * 4096  # 1 MiB: more than the socket buffer
        writer.write(transport, big)
        assert 0 < len(transport.value()) < len(big)  # the rest waits in "Twisted's buffer"
        peer.setblocking(False)
        while True:  # the peer reads: the socket could take more again
            try:
                if not peer.recv(1 << 20):
                    break
            except BlockingIOError:
                break
        writer.write(transport, b"next\r\n")
        assert not writer.direct
        assert transport.value().endswith(big[-100:] + b"next\r\n")
    finally:
        ours.close()
        peer.close()


def test_error_on_the_socket_falls_back_to_transport_write():
    ours, peer = socket.socketpair()
    peer.close()
    ours.close()  # send() now fails with EBADF: the reactor's path reports the loss
    transport = StringTransport()
    writer = DirectSend(ours)
    writer.write(transport, b"reply\r\n")
    assert transport.value() == b"reply\r\n" and not writer.direct


def writers_of_a_real_connection(certificate: tuple[str, str] | None) -> list[bool]:
    """C{DirectSend.of(transport).direct} of a real tcp.Server, before and after startTLS."""
    seen: list[bool] = []
    done = threading.Event()

    class Recorder(Protocol):
        def connectionMade(self) -> None:
            seen.append(DirectSend.of(self.transport).direct)
            seen.append(DirectSend.of(self.transport, enabled=False).direct)
            if certificate is not None:
                self.transport.startTLS(load_server_context(*certificate))
                seen.append(DirectSend.of(self.transport).direct)
            done.set()

    from twisted.internet import reactor

    port = in_reactor(reactor.listenTCP, 0, Factory.forProtocol(Recorder), interface="127.0.0.1")
    try:
        with socket.create_connection(("127.0.0.1", port.getHost().port), timeout=5):
            assert done.wait(5)
    finally:
        in_reactor(port.stopListening)
    return seen


def test_direct_only_on_plain_tcp_and_never_after_starttls(certificate):
    assert writers_of_a_real_connection(None) == [True, False]
    assert writers_of_a_real_connection(certificate) == [True, False, False]


def test_not_a_tcp_server_transport_is_never_direct():
    assert not DirectSend.of(StringTransport()).direct
