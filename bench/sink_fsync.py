"""
The least an SMTP server can do and still store durably: the trivial sink's
dialogue (a fixed reply to every command, no parsing, no checks) plus the
fsync ceiling's disk work for each message (write it in tmp/, fsync, rename
into new/, fsync new/) in a 16-thread executor, the 250 after it. Not a
mail server: a yardstick between the ceiling (disk work, no dialogue) and
real servers (disk work and their dialogue), entrant `sink-fsync` of the
SMTP cells (`bench/run.py --servers ...,sink-fsync`).

Without MAILDIR it stores nothing: the trivial sink (`banner` in
bench/peers.py) whose rates are the load client's own ceilings.

Usage: python bench/sink_fsync.py PORT [MAILDIR]
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import os
import subprocess
import sys
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))


def store(box: str, name: str, data: bytes) -> None:
    tmp, new = os.path.join(box, "tmp", name), os.path.join(box, "new")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, os.path.join(new, name))
    dfd = os.open(new, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


async def main(port: int, box: str | None) -> None:
    for sub in ("tmp", "new", "cur") if box else ():
        os.makedirs(os.path.join(box, sub), exist_ok=True)  # type: ignore[arg-type]
    loop = asyncio.get_running_loop()
    pool = concurrent.futures.ThreadPoolExecutor(16)
    names = itertools.count()
    prefix = f"{os.getpid()}.sink."

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 sink ESMTP\r\n")
        try:
            while True:
                line = await reader.readline()
                if not line:
                    break
                verb = line[:4].upper()
                if verb == b"QUIT":
                    writer.write(b"221 2.0.0 Bye\r\n")
                    break
                if verb == b"DATA":
                    writer.write(b"354 go\r\n")
                    data = await reader.readuntil(b"\r\n.\r\n")
                    if box:
                        await loop.run_in_executor(pool, store, box, prefix + str(next(names)), data)
                writer.write(b"250 2.0.0 Ok\r\n")
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", port, backlog=1024, limit=1 << 20)
    async with server:
        await server.serve_forever()


class SinkFsync:
    """The entrant: this script as a subprocess, its one Maildir under the bench's workdir."""

    kind = "sink"

    def __init__(self, workdir: str) -> None:
        import peers
        self.name = "sink-fsync"
        self.box = os.path.join(workdir, self.name, "box")
        self.ports = {"smtp": peers.free_port()}
        self.proc: subprocess.Popen[Any] | None = None
        self.error: str | None = None

    def start(self) -> bool:
        import peers
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__),
                                      str(self.ports["smtp"]), self.box])
        if not peers.wait_port(self.ports["smtp"]):
            self.error = "did not start"
            return False
        return True

    def maildir(self, address: str) -> str:
        return self.box

    def stop(self) -> None:
        import peers
        peers._stop(self.proc)


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else None))
