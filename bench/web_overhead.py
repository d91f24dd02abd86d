"""
What the web port costs SMTP ingest: N messages sent by a few concurrent
smtplib clients to our server (a subprocess built by C{build_service},
test-host mode, as bench/run.py starts it), once with the web service off
and once with it on and one Server-Sent Events client connected to
C{/api/v1/events} reading every event (a C{message.new} per delivery).
Runs alternate off/on to spread drift over both; the medians are compared.

    python bench/web_overhead.py                    # 2000 messages, 4 clients, 3 rounds
    python bench/web_overhead.py -n 500 --rounds 1  # quick

The issue's goal: "on" within 5% of "off" (ratio >= 0.95).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import smtplib
import socket
import statistics
import sys
import tempfile
import threading
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]  # bench helpers; the package from this tree

from clients import RCPT, message  # noqa: E402
from peers import Ours, free_port, wait_port  # noqa: E402


class WebOurs(Ours):
    """Our server with the web port off (C{web_port=None}) or on that port."""

    def __init__(self, workdir: str, name: str, web_port: int | None) -> None:
        super().__init__(workdir, name)
        self.web_port = web_port

    def overrides(self) -> dict[str, Any]:
        o = super().overrides()
        o["listen.web"] = [] if self.web_port is None else [f"tcp:{self.web_port}:interface=127.0.0.1"]
        return o


class SSEReader(threading.Thread):
    """Reads C{/api/v1/events} until stopped, counting events."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.sock.sendall(f"GET /api/v1/events HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                          "Accept: text/event-stream\r\n\r\n".encode())
        # The answer's head: from here on the server has subscribed this stream.
        self.head = b""
        while b"\r\n\r\n" not in self.head:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError(f"the event stream closed: {self.head!r}")
            self.head += chunk
        if not self.head.startswith(b"HTTP/1.1 200"):
            raise ConnectionError(f"the event stream was refused: {self.head!r}")
        self.events = 0
        self.bytes = 0
        self.error: BaseException | None = None
        self.stopping = False

    def run(self) -> None:
        tail = b""
        try:
            while not self.stopping:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return
                self.bytes += len(chunk)
                data = tail + chunk
                self.events += data.count(b"\nevent: ") + data.startswith(b"event: ")
                tail = data[-8:]
        except OSError as e:
            if not self.stopping:
                self.error = e

    def stop(self) -> None:
        self.stopping = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


def _read_events(port: int, count: Any, ready: Any, stop: Any) -> None:
    """The SSE client's own process (so it takes no GIL from the smtplib clients)."""
    reader = SSEReader(port)
    ready.set()
    reader.start()
    while not stop.wait(0.05):
        count.value = reader.events
    count.value = reader.events
    reader.stop()


class SSEProcess:
    """An L{SSEReader} in a separate process; C{events} is how many it has read."""

    def __init__(self, port: int) -> None:
        context = multiprocessing.get_context("spawn")
        self._count = context.Value("q", 0)
        self._stop = context.Event()
        ready = context.Event()
        self._process = context.Process(target=_read_events,
                                        args=(port, self._count, ready, self._stop), daemon=True)
        self._process.start()
        if not ready.wait(30):
            raise RuntimeError("the SSE client did not connect")

    @property
    def events(self) -> int:
        return int(self._count.value)

    def stop(self) -> None:
        self._stop.set()
        self._process.join(10)


def ingest(port: int, total: int, clients: int, size: int) -> float:
    """Send C{total} messages over C{clients} connections at once; messages per second."""
    payload = message(size)
    errors: list[BaseException] = []
    share = [total // clients + (1 if i < total % clients else 0) for i in range(clients)]
    barrier = threading.Barrier(clients + 1)

    def client(count: int) -> None:
        try:
            with smtplib.SMTP("127.0.0.1", port, timeout=60) as smtp:
                smtp.ehlo("client.bench")
                barrier.wait()
                for _ in range(count):
                    smtp.sendmail("s@client.test", [RCPT], payload)
        except BaseException as e:  # reported after the run
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=client, args=(n,)) for n in share]
    for t in threads:
        t.start()
    barrier.wait()
    started = time.perf_counter()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    if errors:
        raise RuntimeError(f"{len(errors)} client(s) failed: {errors[0]!r}")
    return total / elapsed


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process C{pid} so far (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def one_run(workdir: str, name: str, web: bool, args: argparse.Namespace) -> tuple[float, float, int]:
    server = WebOurs(workdir, name, free_port() if web else None)
    if not server.start():
        raise RuntimeError(f"server did not start: {server.error}")
    reader: SSEProcess | None = None
    try:
        port = server.info["ports"]["smtp"][0]
        if web:
            assert wait_port(server.web_port)  # type: ignore[arg-type]
            reader = SSEProcess(server.web_port)  # type: ignore[arg-type]
        ingest(port, args.warmup, args.clients, args.size)  # warm-up: imports, first files
        cpu = cpu_seconds(server.proc.pid)  # type: ignore[union-attr]
        rate = ingest(port, args.messages, args.clients, args.size)
        cpu = cpu_seconds(server.proc.pid) - cpu  # type: ignore[union-attr]
        seen = 0
        if reader is not None:
            deadline = time.monotonic() + 10
            while reader.events < args.warmup + args.messages and time.monotonic() < deadline:
                time.sleep(0.05)
            seen = reader.events
        return rate, cpu * 1e6 / args.messages, seen
    finally:
        if reader is not None:
            reader.stop()
        server.stop()
        shutil.rmtree(server.data, ignore_errors=True)


def event_cost(events: int = 5000) -> tuple[float, float]:
    """
    Reactor-thread CPU per C{message.new} event (microseconds), without and
    with one SSE client reading: a server in this process, one event
    published per reactor turn, the reactor thread's own CPU time
    (C{time.thread_time}) measured around the run, so other processes on
    the machine do not count.
    """
    from twisted.internet.defer import Deferred
    from twisted_mail_screen.config.settings import load_config
    from twisted_mail_screen.testing import RunningServer, ephemeral_overrides, in_reactor

    def run(server: RunningServer) -> float:
        from twisted.internet import reactor
        bus = server.service.events  # type: ignore[union-attr]
        done: Deferred = Deferred()
        state = {"left": events, "start": time.thread_time()}

        def step() -> None:
            if state["left"] == 0:
                done.callback((time.thread_time() - state["start"]) * 1e6 / events)
                return
            state["left"] -= 1
            bus.publish("message.new", ID=f"{state['left']:032x}", Mailbox="r@bench.test")
            reactor.callLater(0, step)

        def start() -> Deferred:
            state["start"] = time.thread_time()
            step()
            return done
        return in_reactor(start)

    with tempfile.TemporaryDirectory(prefix="web-events-") as data:
        config = load_config(None, ephemeral_overrides(data, ("smtp", "web")))
        server = RunningServer(config).start()
        try:
            run(server)  # warm-up
            alone = run(server)
            reader = SSEReader(server.port("web"))
            reader.start()
            streamed = run(server)
            deadline = time.monotonic() + 10
            while reader.events < 2 * events and time.monotonic() < deadline:
                time.sleep(0.05)
            reader.stop()
            if reader.events < events:
                raise RuntimeError(f"the SSE client read only {reader.events} events")
        finally:
            in_reactor(server.service.stopService)  # type: ignore[union-attr]
    return alone, streamed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", "--messages", type=int, default=2000)
    parser.add_argument("-c", "--clients", type=int, default=4)
    parser.add_argument("--size", type=int, default=2048, help="message size in bytes")
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3, help="off/on pairs")
    parser.add_argument("--events", type=int, default=5000,
                        help="events for the reactor-CPU-per-event measure (0: skip it)")
    args = parser.parse_args()
    rates: dict[str, list[float]] = {"off": [], "on": []}
    cpus: dict[str, list[float]] = {"off": [], "on": []}
    with tempfile.TemporaryDirectory(prefix="web-overhead-") as workdir:
        for r in range(args.rounds):
            order = ("off", "on") if r % 2 == 0 else ("on", "off")
            for mode in order:
                rate, cpu, seen = one_run(workdir, f"{mode}{r}", mode == "on", args)
                rates[mode].append(rate)
                cpus[mode].append(cpu)
                extra = f", SSE client read {seen} events" if mode == "on" else ""
                print(f"round {r + 1} web {mode:>3}: {rate:8.1f} msg/s, server CPU {cpu:6.0f} us/msg"
                      f"{extra}", flush=True)
    off, on = statistics.median(rates["off"]), statistics.median(rates["on"])
    print(f"\n{args.messages} messages of {args.size} B over {args.clients} smtplib clients, "
          f"median of {args.rounds}:")
    print(f"  web off:                 {off:8.1f} msg/s")
    print(f"  web on + 1 SSE reader:   {on:8.1f} msg/s")
    print(f"  ratio on/off:            {on / off:8.3f}  (goal >= 0.95)")
    # CPU per message is steadier than a rate on a shared machine.
    c_off, c_on = statistics.median(cpus["off"]), statistics.median(cpus["on"])
    print(f"  server CPU per message:  {c_off:6.0f} us off, {c_on:6.0f} us on "
          f"(on/off {c_on / c_off:.3f})")
    if args.events:
        alone, streamed = event_cost(args.events)
        print(f"  reactor CPU per event:   {alone:6.1f} us with no stream, {streamed:6.1f} us "
              f"with one SSE client ({args.events} message.new events)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
