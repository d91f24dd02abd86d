"""
Load generators and the machine's ceilings. Every client speaks the same
way to every server: SMTP in lock step (no pipelining, which aiosmtpd does
not offer), POP3 and IMAP with the commands each workload names.
"""

from __future__ import annotations

import asyncio
import imaplib
import itertools
import os
import socket
import subprocess
import threading
import time
from typing import Any, Callable, Sequence

RCPT = "r@bench.test"


def message(size: int, n: int = 0) -> bytes:
    """A message of about C{size} bytes, CRLF lines of 76 characters."""
    head = (f"From: <s@client.test>\r\nTo: <{RCPT}>\r\nSubject: bench {n}\r\n"
            f"Message-ID: <{n}.{time.time_ns()}@client.test>\r\n\r\n").encode()
    line = b"x" * 74 + b"\r\n"
    body = line * max(1, (size - len(head)) // len(line))
    return head + body


async def _reply(reader: asyncio.StreamReader) -> bytes:
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("closed")
        if line[3:4] != b"-":
            return line


def source_address(i: int) -> str:
    """The C{i}-th of many loopback source addresses (Linux routes all of 127/8 to lo)."""
    i = i % (250 * 250 * 250)
    return f"127.{1 + i // 62500}.{1 + i // 250 % 250}.{1 + i % 250}"


async def _connect(port: int, source: str | None,
                   stats: dict[str, Any]) -> tuple[Any, Any] | None:
    """A connection to the server, or C{None} (counted as an error) after a short pause."""
    try:
        if source is not None:
            return await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
        return await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        stats["errors"] += 1
        await asyncio.sleep(0.01)
        return None


async def _smtp_worker(target: Callable[[], tuple[int, str | None]], payload: bytes,
                       per_conn: int, deadline: float, stats: dict[str, Any]) -> None:
    data = payload + b".\r\n"
    while time.monotonic() < deadline:
        conn = await _connect(*target(), stats)
        if conn is None:
            continue
        reader, writer = conn
        try:
            await _reply(reader)
            writer.write(b"EHLO client.bench\r\n")
            await _reply(reader)
            for _ in range(per_conn):
                writer.write(b"MAIL FROM:<s@client.test>\r\n")
                if (await _reply(reader))[:1] != b"2":
                    stats["errors"] += 1
                    break
                writer.write(f"RCPT TO:<{RCPT}>\r\n".encode())
                if (await _reply(reader))[:1] != b"2":
                    stats["errors"] += 1
                    break
                writer.write(b"DATA\r\n")
                if (await _reply(reader))[:3] != b"354":
                    stats["errors"] += 1
                    break
                t0 = time.monotonic()
                writer.write(data)
                reply = await _reply(reader)
                if reply[:3] == b"250":
                    stats["ok"] += 1
                    stats["last"] = time.monotonic()
                    stats["lat"].append(stats["last"] - t0)
                else:
                    stats["errors"] += 1
                    stats["replies"].add(reply[:40])
            writer.write(b"QUIT\r\n")
            await _reply(reader)
        except (OSError, ConnectionError, asyncio.IncompleteReadError):
            stats["errors"] += 1
        finally:
            writer.close()
            try:
                await writer.wait_closed()
            except OSError:
                pass


def smtp_ingest(port: int | Sequence[int], concurrency: int, size: int, per_conn: int,
                duration: float, sources: int = 0) -> dict[str, Any]:
    """
    Messages a second that got 250 after DATA, over C{duration} seconds.
    With several ports (the nodes of a cluster), each connection goes to
    the next port in turn, as a round-robin load balancer sends them; with
    C{sources}, each comes from the next of that many loopback addresses.
    """
    payload = message(size)
    stats: dict[str, Any] = {"ok": 0, "errors": 0, "lat": [], "replies": set(), "last": 0.0}
    ports = [port] if isinstance(port, int) else list(port)
    counter = itertools.count()

    def target() -> tuple[int, str | None]:
        i = next(counter)
        return ports[i % len(ports)], source_address(i % sources) if sources else None

    async def run() -> float:
        start = time.monotonic()
        await asyncio.gather(*(_smtp_worker(target, payload, per_conn, start + duration, stats)
                               for _ in range(concurrency)))
        return start

    start = asyncio.run(run())
    elapsed = max(stats["last"] - start, 1e-9)
    lat = sorted(stats["lat"])
    return {"value": stats["ok"] / elapsed, "ok": stats["ok"], "errors": stats["errors"],
            "p50_ms": lat[len(lat) // 2] * 1000 if lat else None,
            "p99_ms": lat[int(len(lat) * 0.99)] * 1000 if lat else None,
            "bad_replies": sorted(r.decode("latin-1") for r in stats["replies"])[:3]}


SMTP_SOURCE = "/usr/sbin/smtp-source"  # Postfix's load generator, in C (the postfix package)


def smtp_source(port: int, concurrency: int, size: int, per_conn: int,
                messages: int) -> dict[str, Any]:
    """
    The same load from Postfix's C{smtp-source}, whose CPU per message is
    a fraction of this module's Python client's: C{messages} messages from
    C{concurrency} sessions in parallel, lock step (it does not pipeline),
    one message a connection (C{per_conn} > 1: every session's messages
    over one connection, C{-d}). The rate is the messages over the
    program's wall time; its CPU is read by the caller as a child's.
    """
    body = max(1, size - 160)  # it adds From, To, Date, Message-Id (about 160 octets)
    args = [SMTP_SOURCE, "-4", "-s", str(concurrency), "-m", str(messages), "-l", str(body),
            "-f", "s@client.test", "-t", RCPT, "-M", "client.bench", "-C", "5"]
    if per_conn > 1:
        args.append("-d")
    t0 = time.monotonic()
    p = subprocess.run(args + [f"127.0.0.1:{port}"], capture_output=True, text=True, timeout=600)
    elapsed = time.monotonic() - t0
    ok = messages if p.returncode == 0 else 0
    return {"value": ok / elapsed, "ok": ok, "errors": 0 if p.returncode == 0 else 1,
            "elapsed_s": elapsed, "bad_replies": [p.stderr.strip()[-200:]] if p.returncode else []}


def accept_rate(port: int, concurrency: int, duration: float, sources: int = 0) -> dict[str, Any]:
    """
    connect, greeting, QUIT, 221, close: sessions a second. With C{sources},
    each connection comes from the next of that many loopback addresses, so
    the server's screening tracks that many clients.
    """
    stats = {"ok": 0, "errors": 0}
    counter = iter(range(1 << 62))

    async def worker(deadline: float) -> None:
        while time.monotonic() < deadline:
            source = source_address(next(counter) % sources) if sources else None
            conn = await _connect(port, source, stats)
            if conn is None:
                continue
            reader, writer = conn
            try:
                greeting = await _reply(reader)
                writer.write(b"QUIT\r\n")
                await _reply(reader)
                stats["ok" if greeting[:3] == b"220" else "errors"] += 1
            except (OSError, ConnectionError):
                stats["errors"] += 1
            finally:
                writer.close()

    async def run() -> float:
        start = time.monotonic()
        await asyncio.gather(*(worker(start + duration) for _ in range(concurrency)))
        return time.monotonic() - start

    elapsed = asyncio.run(run())
    return {"value": stats["ok"] / elapsed, "ok": stats["ok"], "errors": stats["errors"]}


# POP3


def _recv_until(sock: socket.socket, buf: bytearray, marker: bytes, start: int = 0) -> int:
    while True:
        i = buf.find(marker, start)
        if i >= 0:
            return i
        start = max(0, len(buf) - len(marker))
        chunk = sock.recv(1 << 20)
        if not chunk:
            raise ConnectionError("closed")
        buf += chunk


def pop3_list_retr(port: int, user: str, count: int, window: int = 64) -> dict[str, Any]:
    """Login, LIST, RETR 1..count (pipelined in windows); seconds from LIST to the last byte."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    buf = bytearray()

    def line() -> bytes:
        i = _recv_until(sock, buf, b"\r\n")
        out = bytes(buf[:i])
        del buf[:i + 2]
        return out

    def multiline() -> bytes:
        first = line()
        if not first.startswith(b"+OK"):
            raise RuntimeError(f"POP3: {first!r}")
        i = _recv_until(sock, buf, b"\r\n.\r\n", 0) if not buf.startswith(b".\r\n") else -2
        out = bytes(buf[:i + 2]) if i >= 0 else b""
        del buf[:i + 5]
        return out

    line()
    sock.sendall(f"USER {user}\r\nPASS x\r\n".encode())
    line()
    if not line().startswith(b"+OK"):
        raise RuntimeError("POP3 login failed")
    t0 = time.monotonic()
    sock.sendall(b"LIST\r\n")
    listing = multiline()
    n = listing.count(b"\r\n")
    if n < count:
        raise RuntimeError(f"POP3: {n} messages listed, {count} expected")
    t_list = time.monotonic() - t0
    size = 0
    for first in range(1, count + 1, window):
        last = min(count, first + window - 1)
        sock.sendall(b"".join(b"RETR %d\r\n" % i for i in range(first, last + 1)))
        for _ in range(first, last + 1):
            size += len(multiline())
    elapsed = time.monotonic() - t0
    sock.sendall(b"QUIT\r\n")
    line()
    sock.close()
    return {"value": elapsed, "list_s": t_list, "bytes": size}


def imap_workload(port: int, user: str, count: int) -> dict[str, Any]:
    """SELECT; FETCH 1:* (FLAGS RFC822.SIZE ENVELOPE); FETCH all bodies; UID SEARCH header."""
    c = imaplib.IMAP4("127.0.0.1", port, timeout=120)
    c.login(user, "x")
    out: dict[str, Any] = {}
    t0 = time.monotonic()
    typ, data = c.select("INBOX")
    out["select_s"] = time.monotonic() - t0
    if typ != "OK" or int(data[0]) < count:
        raise RuntimeError(f"IMAP SELECT: {typ} {data}")
    t = time.monotonic()
    typ, data = c.fetch("1:*", "(FLAGS RFC822.SIZE ENVELOPE)")
    out["fetch_meta_s"] = time.monotonic() - t
    if typ != "OK" or len(data) < count:
        raise RuntimeError(f"IMAP FETCH: {typ} {len(data)}")
    t = time.monotonic()
    typ, data = c.fetch("1:*", "(BODY.PEEK[])")
    out["fetch_bodies_s"] = time.monotonic() - t
    if typ != "OK":
        raise RuntimeError(f"IMAP FETCH bodies: {typ}")
    t = time.monotonic()
    typ, data = c.uid("SEARCH", None, "HEADER", "Subject", f'"bench {count // 2}"')
    out["uid_search_s"] = time.monotonic() - t
    if typ != "OK" or not data[0]:
        raise RuntimeError(f"IMAP UID SEARCH: {typ} {data}")
    c.logout()
    out["value"] = out["select_s"] + out["fetch_meta_s"]
    return out


# ceilings


def fsync_ceiling(directory: str, threads: int = 16, duration: float = 2.0,
                  size: int = 2048) -> dict[str, Any]:
    """
    What a delivery does to the disk, from C{threads} threads, per second:
    create and write C{size} bytes in tmp/, fsync the file, rename it into
    new/, fsync new/ (as store/maildir.py does before the 250).
    """
    tmp, new = os.path.join(directory, "tmp"), os.path.join(directory, "new")
    os.makedirs(tmp, exist_ok=True)
    os.makedirs(new, exist_ok=True)
    data = os.urandom(size)
    counts = [0] * threads
    deadline = time.monotonic() + duration

    def work(t: int) -> None:
        i = 0
        while time.monotonic() < deadline:
            name = f"{t}.{i}"
            p = os.path.join(tmp, name)
            fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.write(fd, data)
            os.fsync(fd)
            os.close(fd)
            os.rename(p, os.path.join(new, name))
            dfd = os.open(new, os.O_RDONLY | os.O_DIRECTORY)
            os.fsync(dfd)
            os.close(dfd)
            i += 1
        counts[t] = i

    start = time.monotonic()
    ts = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for th in ts:
        th.start()
    for th in ts:
        th.join()
    elapsed = time.monotonic() - start
    for name in os.listdir(new):
        os.unlink(os.path.join(new, name))
    return {"value": sum(counts) / elapsed, "ok": sum(counts)}
