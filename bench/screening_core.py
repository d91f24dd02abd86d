#!/usr/bin/env python3
# -*- test-case-name: tests.test_screening -*-
"""
Micro-benchmark of the screening core: how many connection decisions a
second, and how much memory, with 10^4, 10^5 and 10^6 distinct addresses
tracked. Targets: 10^6 addresses in at most 200 MB RSS; a decision in at
most 5 microseconds.

Each size runs in a fresh interpreter so the RSS figures do not include
the previous run. Per size it measures:

  - insert: first connections from N new addresses (open + closed);
  - decide: N further connections from already-tracked addresses, each
    within the window (open + closed), i.e. the common steady-state path;
  - auth: an authentication failure on a tracked address (open +
    auth_failed + closed), which adds the keyed hash;
  - RSS after all N addresses are tracked, minus nothing (the whole
    process, interpreter and Twisted included);
  - hostile: in a second fresh interpreter, N addresses that each connect
    twice and fail a login (open + auth_failed + closed, then open +
    closed), so every one holds a full record (connection times, a failed
    pair, an event) under the default, non-zero limits; its RSS is the
    figure the 200 MB goal is about.

The service is made on a clock 100 days before the measure (a server up
that long: the records' times count from the service's start). The
address strings are made 10,000 at a time outside the timed loops and
not kept, as a transport's host string is dropped with its connection:
what stays in RSS is what the service keeps. Times are wall (perf_counter)
and CPU (process_time) microseconds; on a loaded machine only the CPU
figures compare.

Usage: python bench/screening_core.py [--sizes 10000,100000,1000000]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def address(i: int) -> str:
    return f"{10 + (i >> 24)}.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}"


UPTIME = 100 * 86_400.0
CHUNK = 10_000


def chunks(n: int, step: int = 1) -> Iterator[list[str]]:
    """The addresses 0..n (every C{step}-th), made a chunk at a time."""
    for start in range(0, n, CHUNK * step):
        yield [address(i) for i in range(start, min(n, start + CHUNK * step), step)]


class Timer:
    """Wall and CPU seconds of the timed blocks only."""

    def __init__(self) -> None:
        self.wall = self.cpu = 0.0

    def __enter__(self) -> "Timer":
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *_: object) -> None:
        self.wall += time.perf_counter() - self._wall
        self.cpu += time.process_time() - self._cpu


def quiet_service(n: int, whitelist: tuple[str, ...]) -> tuple[Any, Any]:
    """A screening service with default limits, tracking up to C{n} clients, logging nothing, on a Clock."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from twisted.internet.task import Clock
    from twisted.logger import Logger

    from twisted_mail_screen.screening.blocklist import BlockList
    from twisted_mail_screen.screening.config import ScreeningConfig
    from twisted_mail_screen.screening.service import ScreeningService

    clock = Clock()
    clock.advance(1_800_000_000)
    quiet = Logger(observer=lambda e: None)
    config = ScreeningConfig(max_tracked_clients=max(n, 100), whitelist=whitelist)
    service = ScreeningService(config, clock, BlockList(None, clock, quiet), None, None, log=quiet)
    clock.advance(UPTIME)
    return service, clock


def run_hostile(n: int) -> dict[str, float]:
    """N hostile clients, each with a failure recorded, default limits (a fresh process)."""
    service, clock = quiet_service(n, whitelist=())
    assert service.config.max_connections and service.config.max_auth_failures
    gc.collect()
    base = rss_mb()
    gc.disable()
    timer = Timer()
    for hosts in chunks(n):
        with timer:
            for host in hosts:
                screen = service.open(host, "imap")
                screen.auth_failed("user@example.com", b"wrong")
                screen.closed()
    clock.advance(1)
    for hosts in chunks(n):
        with timer:
            for host in hosts:
                service.open(host, "smtp").closed()
    del hosts
    gc.enable()
    gc.collect()
    rss = rss_mb()
    return {"n": n, "tracked": service.admin.stats()["tracked"], "rss_mb": rss,
            "rss_before_mb": base, "bytes_per_client": (rss - base) * 1024 * 1024 / n,
            "us_per_client": timer.wall / n * 1e6, "cpu_us_per_client": timer.cpu / n * 1e6}


def run_one(n: int) -> dict[str, float]:
    service, clock = quiet_service(n, whitelist=("127.0.0.0/8", "::1"))
    gc.collect()
    base = rss_mb()
    gc.disable()

    insert = Timer()
    for hosts in chunks(n):
        with insert:
            for host in hosts:
                service.open(host, "smtp").closed()
    del hosts
    rss_tracked = rss_mb()

    clock.advance(1)
    sample = [h for c in chunks(n, max(1, n // 100_000)) for h in c]  # up to 10^5 decisions
    decide = Timer()
    with decide:
        for host in sample:
            service.open(host, "imap").closed()

    auth = Timer()
    with auth:
        for host in sample:
            screen = service.open(host, "imap")
            screen.auth_failed("user@example.com", b"wrong")
            screen.closed()
    gc.enable()
    return {
        "n": n,
        "tracked": service.admin.stats()["tracked"],
        "insert_us": insert.wall / n * 1e6,
        "decide_us": decide.wall / len(sample) * 1e6,
        "auth_us": auth.wall / len(sample) * 1e6,
        "insert_cpu_us": insert.cpu / n * 1e6,
        "decide_cpu_us": decide.cpu / len(sample) * 1e6,
        "auth_cpu_us": auth.cpu / len(sample) * 1e6,
        "rss_mb": rss_tracked,
        "sample": len(sample),
        "rss_before_mb": base,
        "rss_end_mb": rss_mb(),
        "bytes_per_client": (rss_tracked - base) * 1024 * 1024 / n,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--hostile", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one)))
        return
    if args.hostile:
        print(json.dumps(run_hostile(args.hostile)))
        return
    rows = []
    for n in (int(s) for s in args.sizes.split(",")):
        out = subprocess.run([sys.executable, __file__, "--one", str(n)],
                             check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out))
    print(f"{'addresses':>10} {'insert µs':>10} {'decide µs':>10} {'auth µs':>9} "
          f"{'RSS MB':>8} {'empty MB':>9} {'B/client':>9} {'RSS end MB':>11}")
    for r in rows:
        print(f"{r['n']:>10,} {r['insert_us']:>10.2f} {r['decide_us']:>10.2f} "
              f"{r['auth_us']:>9.2f} {r['rss_mb']:>8.1f} {r['rss_before_mb']:>9.1f} "
              f"{r['bytes_per_client']:>9.0f} {r['rss_end_mb']:>11.1f}")
        print(f"{'(CPU)':>10} {r['insert_cpu_us']:>10.2f} {r['decide_cpu_us']:>10.2f} "
              f"{r['auth_cpu_us']:>9.2f}")
    print("insert: first connection of a new address; decide: a tracked address "
          "connecting again (open+closed); auth: open+auth_failed+closed.")
    print("RSS: whole process once all addresses are tracked; empty: before; "
          "RSS end: after the decide and auth rounds (up to 10^5 upgraded records).")
    print(f"\n{'hostile':>10} {'us/client':>10} {'CPU us':>8} {'RSS MB':>8} {'empty MB':>9} "
          f"{'B/client':>9}")
    for n in (int(s) for s in args.sizes.split(",")):
        out = subprocess.run([sys.executable, __file__, "--hostile", str(n)],
                             check=True, capture_output=True, text=True).stdout
        r = json.loads(out)
        print(f"{r['n']:>10,} {r['us_per_client']:>10.2f} {r['cpu_us_per_client']:>8.2f} "
              f"{r['rss_mb']:>8.1f} "
              f"{r['rss_before_mb']:>9.1f} {r['bytes_per_client']:>9.0f}")
    print("hostile: every address connected twice and failed a login (default limits), "
          "each holds a full record.")


if __name__ == "__main__":
    main()
