"""
Large folders: opening one reads no bodies (sizes are in the file names),
FETCH of FLAGS/UID for all messages streams in bounded memory.
"""

from __future__ import annotations

import os
import time
import tracemalloc

from tests.test_imap import Raw

KINDS = ("smtp", "pop3", "imap")


def fill(box, n: int, body_size: int) -> None:
    """C{n} messages written straight into cur/; bodies are sparse when large."""
    for sub in ("cur", "new", "tmp"):
        os.makedirs(box / sub, exist_ok=True)
    head = b"Subject: x\nFrom: a@example.org\n\n"
    for i in range(n):
        size = max(body_size, len(head))
        name = f"{1600000000 + i}.M{i}P1Q1.host,S={size},W={size + 3}:2,S"
        with open(box / "cur" / name, "wb") as f:
            f.write(head)
            if body_size > len(head):
                f.truncate(body_size)
    for sub in ("cur", "new"):  # as if written a while ago: the once-a-second check stays cheap
        os.utime(box / sub, (time.time() - 60, time.time() - 60))


def open_and_list(port: int) -> tuple[float, float, int]:
    """SELECT time, FETCH 1:* (UID FLAGS) time and its line count, reading as a client would."""
    r = Raw(port)
    r.command(b"l", b"LOGIN bob@localhost x")
    t = time.perf_counter()
    lines = r.command(b"s", b"SELECT INBOX")
    select = time.perf_counter() - t
    assert lines[-1].startswith(b"s OK")
    t = time.perf_counter()
    r.send(b"f FETCH 1:* (UID FLAGS)\r\n")
    count = 0
    while not r.line().startswith(b"f OK"):
        count += 1
    fetch = time.perf_counter() - t
    r.command(b"o", b"LOGOUT")
    r.close()
    return select, fetch, count


def test_select_time_does_not_depend_on_body_size(start_server, tmp_path):
    n = 20000
    fill(tmp_path / "data/mail/localhost/small", n, 0)
    fill(tmp_path / "data/mail/localhost/huge", n, 50 * 1024 * 1024)  # 1 TB apparent, sparse
    server = start_server(kinds=KINDS)
    port = server.port("imap")

    def timed(user: str) -> tuple[float, float, int]:
        r = Raw(port)
        r.command(b"l", b"LOGIN " + user.encode() + b"@localhost x")
        t = time.perf_counter()
        lines = r.command(b"s", b"SELECT INBOX")
        select = time.perf_counter() - t
        assert lines[-1].startswith(b"s OK") and f"* {n} EXISTS".encode() in lines
        lines = r.command(b"f", b"FETCH 20000 (RFC822.SIZE)")
        size = int(lines[0].split(b"RFC822.SIZE ")[1].rstrip(b")"))
        r.command(b"o", b"LOGOUT")
        r.close()
        return select, 0.0, size

    small, _, small_size = timed("small")
    huge, _, huge_size = timed("huge")
    assert huge_size == 50 * 1024 * 1024 + 3 and small_size < 100
    print(f"SELECT of {n}: tiny bodies {small:.2f}s, 50 MB bodies {huge:.2f}s")
    assert huge < 3 * small + 1.0  # reading 1 TB of bodies would take minutes


def test_fetch_all_flags_streams_in_bounded_memory(start_server, tmp_path):
    box = tmp_path / "data/mail/localhost/bob"
    fill(box, 20000, 0)
    server = start_server(kinds=KINDS)
    port = server.port("imap")
    open_and_list(port)  # index built and uidlist written once
    tracemalloc.start()
    try:
        r = Raw(port)
        r.command(b"l", b"LOGIN bob@localhost x")
        r.command(b"s", b"SELECT INBOX")
        tracemalloc.reset_peak()
        before, _ = tracemalloc.get_traced_memory()
        r.send(b"f FETCH 1:* (UID FLAGS)\r\n")
        count = 0
        while not r.line().startswith(b"f OK"):
            count += 1
        _, peak = tracemalloc.get_traced_memory()
        r.close()
    finally:
        tracemalloc.stop()
    assert count == 20000
    growth = peak - before
    print(f"FETCH 1:* (UID FLAGS) of 20000: peak growth {growth / 1e6:.2f} MB")
    # the whole response is ~0.9 MB; streaming keeps well under that
    assert growth < 2_000_000


def test_many_chunks_of_bodies_arrive_in_order(start_server, tmp_path):
    """Chunks are rendered one ahead of the one being written; the order never changes."""
    box = tmp_path / "data/mail/localhost/bob"
    for sub in ("cur", "new", "tmp"):
        os.makedirs(box / sub, exist_ok=True)
    n = 650  # several chunks of 200 bodies, and of 500 header blocks
    for i in range(n):
        data = f"Subject: number {i}\nFrom: a@example.org\n\n{'x' * (i % 97)}\n".encode()
        (box / "cur" / f"{1600000000 + i}.M{i}P1.host,S={len(data)}:2,S").write_bytes(data)
    server = start_server(kinds=KINDS)
    r = Raw(server.port("imap"))
    r.command(b"l", b"LOGIN bob@localhost x")
    r.command(b"s", b"SELECT INBOX")
    for query, rounds in ((b"(UID BODY.PEEK[])", 1), (b"(UID ENVELOPE)", 2)):  # ENVELOPE: disk, then cache
        for _ in range(rounds):
            r.send(b"f FETCH 1:* " + query + b"\r\n")
            seen = []
            while True:
                line = r.line()
                if line.startswith(b"f "):
                    assert line.startswith(b"f OK")
                    break
                if line.startswith(b"* ") and b" FETCH " in line:
                    seen.append(int(line.split()[1]))
                if b"{" in line and line.endswith(b"}"):
                    size = int(line.rsplit(b"{", 1)[1][:-1])
                    while len(r.buf) < size:
                        r.buf += r.sock.recv(65536)
                    body, r.buf = r.buf[:size], r.buf[size:]
                    assert f"Subject: number {seen[-1] - 1}\r\n".encode() in body
                elif b"ENVELOPE" in line:
                    assert f'"number {seen[-1] - 1}"'.encode() in line
            assert seen == list(range(1, n + 1))
    r.close()
