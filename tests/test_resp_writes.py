"""
The Redis client's writes go straight to the socket while the transport
holds nothing of ours, and keep their order when the socket is full: what
the kernel does not take waits in the transport, and every later write
waits behind it until Redis has answered the last command queued there.

A plain UNIX socket plays Redis: the test decides when it reads and what it
answers, which a real redis-server cannot be made to do (stop reading with a
full buffer, then go on).
"""

from __future__ import annotations

import socket
import time
from pathlib import Path


from twisted_mail_screen.screening.resp import SKIP, RESPProtocol, encode
from twisted_mail_screen.testing import in_reactor, reactor_thread


def read_exactly(conn: socket.socket, n: int, timeout: float = 10.0) -> bytes:
    conn.settimeout(timeout)
    chunks, got = [], 0
    while got < n:
        chunk = conn.recv(min(1 << 20, n - got))
        assert chunk, f"connection closed after {got} of {n} bytes"
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def connected(path: Path) -> tuple[RESPProtocol, socket.socket, socket.socket]:
    """A client protocol on the reactor, connected to a listening socket the test holds."""
    from twisted.internet.endpoints import UNIXClientEndpoint, connectProtocol

    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)
    reactor = reactor_thread()
    protocol = RESPProtocol(reactor)
    in_reactor(lambda: connectProtocol(UNIXClientEndpoint(reactor, str(path)), protocol))
    conn, _ = server.accept()
    return protocol, server, conn


def on_the_wire_at_once(protocol: RESPProtocol, conn: socket.socket, data: bytes) -> bytes:
    """On the reactor thread: send C{data} quietly and read what reached the peer before this turn ends."""
    protocol.send_quiet(data)
    conn.setblocking(False)
    try:
        return conn.recv(1 << 16)
    except BlockingIOError:
        return b""
    finally:
        conn.setblocking(True)


def drain(conn: socket.socket, most: int) -> bytes:
    """Read what is there, up to C{most} bytes, without waiting."""
    conn.setblocking(False)
    chunks, got = [], 0
    try:
        while got < most:
            chunk = conn.recv(min(1 << 16, most - got))
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
    except BlockingIOError:
        pass
    finally:
        conn.setblocking(True)
    return b"".join(chunks)


def test_writes_keep_their_order_through_a_full_socket_and_go_direct_again(tmp_path: Path) -> None:
    protocol, server, conn = connected(tmp_path / "redis.sock")
    answers: list[object] = []
    quiet = b"*1\r\n$4\r\nPING\r\n"
    try:
        # Straight to the socket: on the wire before the reactor's turn ends.
        assert in_reactor(on_the_wire_at_once, protocol, conn, quiet) == SKIP + quiet
        # 2 MB of counting batches while the peer reads nothing: the kernel's
        # buffer fills and the rest waits in the transport.
        batches = [encode(("EVALSHA", "x", "0", str(i).encode() * 2000)) for i in range(200)]

        def burst() -> None:
            for b in batches[:150]:
                protocol.send_quiet(b)
            protocol.call("PING").addCallback(answers.append)  # behind the batches, not ahead
            for b in batches[150:]:
                protocol.send_quiet(b)

        in_reactor(burst)
        want = b"".join(SKIP + b for b in batches[:150]) + encode(("PING",)) + \
            b"".join(SKIP + b for b in batches[150:])
        # Redis answers the PING before it has read the batches after it (as
        # the test plays it): they may still wait in the transport, so the
        # next write must wait behind them even where the kernel has room.
        conn.sendall(b"+PONG\r\n")
        deadline = time.monotonic() + 10
        while not answers and time.monotonic() < deadline:
            time.sleep(0.01)
        assert answers == ["PONG"]
        marker = encode(("EVALSHA", "marker", "0"))

        def room_then_write() -> bytes:
            early = drain(conn, 256 * 1024)  # room in the kernel, the transport still full
            protocol.send_quiet(marker)
            return early

        early = in_reactor(room_then_write)
        want += SKIP + marker
        assert early + read_exactly(conn, len(want) - len(early)) == want
        # A command answered after every queued write: the transport holds
        # nothing of ours (the link's watchdog asks one every tick while
        # batches go out), so a write goes out at once again.
        in_reactor(lambda: protocol.call("ECHO", "z").addCallback(answers.append) and None)
        echo = encode(("ECHO", "z"))
        assert read_exactly(conn, len(echo)) == echo
        conn.sendall(b"$1\r\nz\r\n")
        while len(answers) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert answers == ["PONG", b"z"]
        assert in_reactor(on_the_wire_at_once, protocol, conn, quiet) == SKIP + quiet
    finally:
        in_reactor(lambda: protocol.abort())
        conn.close()
        server.close()
