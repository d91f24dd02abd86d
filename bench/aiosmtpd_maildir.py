"""
The aiosmtpd peer: a Maildir handler in the usual shape (write to tmp/,
rename into new/, reply 250). With C{--fsync} it fsyncs the file and new/
before replying, in the event loop's default thread pool (16 threads) so
concurrent sessions' fsyncs overlap, which is the fair way to write it.

Usage: python bench/aiosmtpd_maildir.py PORT DATA_DIR [--fsync]
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import os
import socket
import sys
import time

from aiosmtpd.smtp import SMTP

PORT, ROOT, FSYNC = int(sys.argv[1]), sys.argv[2], "--fsync" in sys.argv
COUNTER = itertools.count()
HOST = socket.gethostname()


def store(mailbox: str, data: bytes) -> None:
    box = os.path.join(ROOT, mailbox)
    for sub in ("tmp", "new", "cur"):
        os.makedirs(os.path.join(box, sub), exist_ok=True)
    now = time.time()
    name = f"{int(now)}.M{int(now % 1 * 1e6)}P{os.getpid()}Q{next(COUNTER)}.{HOST}"
    tmp = os.path.join(box, "tmp", name)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, data)
        if FSYNC:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, os.path.join(box, "new", name))
    if FSYNC:
        dfd = os.open(os.path.join(box, "new"), os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


class MaildirHandler:
    async def handle_DATA(self, server, session, envelope):  # noqa: N802
        data = envelope.original_content
        boxes = {r.partition("@")[0].lower() for r in envelope.rcpt_tos}
        loop = asyncio.get_running_loop()
        for box in boxes:
            if FSYNC:
                await loop.run_in_executor(None, store, box, data)
            else:
                store(box, data)
        return "250 2.0.0 Ok: queued"


async def main() -> None:
    loop = asyncio.get_running_loop()
    loop.set_default_executor(concurrent.futures.ThreadPoolExecutor(16))
    handler = MaildirHandler()
    server = await loop.create_server(
        lambda: SMTP(handler, hostname="aiosmtpd.bench", data_size_limit=50 * 1024 * 1024,
                     enable_SMTPUTF8=False, decode_data=False),
        "127.0.0.1", PORT, backlog=1024)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
