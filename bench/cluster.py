#!/usr/bin/env python3
"""
Ingest with three nodes against one (issue 16): `twistd -n mailscreen`
processes in site mode on one data directory, screening shared through a
redis-server this bench starts on a UNIX socket (as
bench/screening_redis.py does), behind one set of SMTP clients that sends
each connection to the next node in turn (a round-robin balancer).

Entrants, interleaved and rotated each repetition, each on a fresh data
directory and its own Redis key prefix:

- ``one-node-memory``: one node, ``[screening] backend = "memory"``;
- ``one-node``: one node, ``backend = "redis"``;
- ``three-nodes``: three nodes, ``backend = "redis"``, one data directory.

Every message is fsync'd before its 250 (site mode), every node logs to
its own file as a deployed one does, and connections come from many
loopback addresses with non-zero limits nobody reaches, so screening counts
them (in Redis for the redis entrants). After each run the Maildir's files
are counted against the 250s. On 2 cores three processes cannot ingest
faster than one: the ratio three-nodes / one-node is the price of the
cluster (three interpreters and reactors, the shared directories, Redis
round trips from three clients), and one-node / one-node-memory that of
Redis alone.

    python bench/cluster.py --reps 3 --duration 3     # alone
    python bench/run.py --only cluster                # inside the full bench
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import clients  # noqa: E402
import peers  # noqa: E402
from maildirs import clear_maildir, count_files  # noqa: E402
from screening_redis import start_redis  # noqa: E402

ENTRANTS = ("one-node-memory", "one-node", "three-nodes")
#: Connections come from this many loopback addresses (a site hears from many MTAs).
SOURCES = 1000


class Node:
    """One `twistd -n mailscreen` process of this source tree."""

    def __init__(self, directory: str, name: str, data: str, backend: str, redis: str,
                 prefix: str) -> None:
        self.name = name
        self.log = os.path.join(directory, f"{name}.log")
        config = os.path.join(directory, f"{name}.toml")
        limits = peers.Ours.UNREACHED
        with open(config, "w") as f:
            f.write(f'mode = "site"\ndata_dir = "{data}"\nhostname = "{name}.bench.test"\n'
                    'domains = ["bench.test"]\npostmaster = "r@bench.test"\n'
                    f'control_socket = "{directory}/{name}.ctl"\n'
                    '[listen]\nsmtp = ["tcp:0:interface=127.0.0.1"]\nsubmission = []\n'
                    'pop3 = []\nimap = []\nweb = []\n'
                    '[storage]\nthreads = 16\n[mail_auth]\nenabled = false\n'
                    '[relay]\nenabled = false\n'
                    '[screening]\nwhitelist = []\nnotify_on_block = false\n'
                    f'max_connections = {limits["screening.max_connections"]}\n'
                    f'max_simultaneous = {limits["screening.max_simultaneous"]}\n'
                    f'max_auth_failures = {limits["screening.max_auth_failures"]}\n'
                    + (f'backend = "redis"\nredis = "unix:{redis}"\nkey_prefix = "{prefix}"\n'
                       if backend == "redis" else ""))
        twistd = shutil.which("twistd", path=os.path.dirname(sys.executable)) or "twistd"
        # This source tree, not whatever version was last installed; not run
        # from the tree's directory either (its '' on sys.path would win anyway).
        env = dict(os.environ, PYTHONPATH=ROOT)
        self.proc = subprocess.Popen([twistd, "-n", "--pidfile=", "mailscreen", "--config", config],
                                     cwd=directory, stdout=open(self.log, "w"),
                                     stderr=subprocess.STDOUT, env=env)
        self.shared = backend == "redis"
        self.port = 0

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with open(self.log, errors="replace") as f:
                text = f.read()
            found = re.search(r"SMTP listening: connect to [\d.]+:(\d+)", text)
            if found and (not self.shared or "shares screening" in text):
                self.port = int(found.group(1))
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} did not start: {text[-400:]}")

    def cpu_seconds(self) -> float:
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Entrant:
    """One, or three, nodes on one data directory."""

    def __init__(self, workdir: str, name: str, redis: str) -> None:
        self.name = name
        self.data = os.path.join(workdir, name)
        self.count = 3 if name == "three-nodes" else 1
        self.backend = "memory" if name.endswith("memory") else "redis"
        self.workdir, self.redis = workdir, redis
        self.nodes: list[Node] = []

    def start(self) -> None:
        os.makedirs(self.data, exist_ok=True)
        peers.Ours(self.workdir, self.name, site=True).write_accounts()  # data/users
        self.nodes = [Node(self.workdir, f"{self.name}-{i}", self.data, self.backend, self.redis,
                           f"{self.name}:") for i in range(self.count)]
        for node in self.nodes:
            node.wait_ready()

    @property
    def ports(self) -> list[int]:
        return [n.port for n in self.nodes]

    def maildir(self) -> str:
        return os.path.join(self.data, "mail", "bench.test", "r")

    def cpu_seconds(self) -> float:
        return sum(n.cpu_seconds() for n in self.nodes)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


def run(workdir: str, reps: int, duration: float, concurrency: int = 16, size: int = 2048,
        record: Callable[..., None] | None = None,
        step: Callable[[str], None] = lambda label: None) -> list[dict[str, Any]]:
    """
    The three entrants, C{reps} times each, order rotated; one record per
    run (C{record(workload, params, server, rep, result, unit, better)}
    as bench/run.py's). Returns the records.
    """
    os.makedirs(workdir, exist_ok=True)
    redis, sock = start_redis(workdir)
    entrants = [Entrant(workdir, name, sock) for name in ENTRANTS]
    params = {"concurrency": concurrency, "size": size, "per_conn": 1, "sources": SOURCES}
    out: list[dict[str, Any]] = []
    try:
        for e in entrants:
            e.start()
            clients.smtp_ingest(e.ports, concurrency, size, 1, 0.5, SOURCES)  # warm-up
            clear_maildir(e.maildir())
        for rep in range(reps):
            k = rep % len(entrants)
            for e in entrants[k:] + entrants[:k]:
                step(f"cluster c={concurrency} {e.name}")
                cpu = e.cpu_seconds()
                r = clients.smtp_ingest(e.ports, concurrency, size, 1, duration, SOURCES)
                r["cpu_us"] = (e.cpu_seconds() - cpu) / max(r["ok"], 1) * 1e6
                r["files"] = count_files(e.maildir())
                r["files_match"] = r["files"] == r["ok"]
                clear_maildir(e.maildir())
                out.append({"workload": "cluster_ingest", "params": params, "server": e.name,
                            "rep": rep, "unit": "msg/s", "better": "higher", **r})
                if record is not None:
                    record("cluster_ingest", params, e.name, rep, r, "msg/s", "higher")
    finally:
        for e in entrants:
            e.stop()
        redis.kill()
        redis.wait()
    return out


def ratios(records: list[dict[str, Any]]) -> dict[str, float | None]:
    """Medians of the per-repetition ratios: three/one (redis), one redis/one memory; CPU too."""
    by = {(r["server"], r["rep"]): r for r in records if r["workload"] == "cluster_ingest"}
    reps = sorted({rep for _, rep in by})

    def median(a: str, b: str, field: str = "value") -> float | None:
        xs = [by[(a, rep)][field] / by[(b, rep)][field] for rep in reps
              if (a, rep) in by and (b, rep) in by and by[(b, rep)][field]]
        return statistics.median(xs) if xs else None

    return {"three_over_one": median("three-nodes", "one-node"),
            "redis_over_memory": median("one-node", "one-node-memory"),
            "cpu_three_over_one": median("three-nodes", "one-node", "cpu_us"),
            "cpu_redis_over_memory": median("one-node", "one-node-memory", "cpu_us")}


def note(records: list[dict[str, Any]]) -> str:
    """One line for bench/run.py's notes."""
    rows = []
    for name in ENTRANTS:
        mine = [r for r in records if r["server"] == name]
        if mine:
            rows.append(f"{name} {statistics.median(r['value'] for r in mine):.0f} msg/s "
                        f"({statistics.median(r['cpu_us'] for r in mine):.0f} us CPU/msg)")
    q = ratios(records)
    fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    return ("; ".join(rows) + f"; three/one {fmt(q['three_over_one'])} "
            f"(CPU/msg {fmt(q['cpu_three_over_one'])}x), one redis/one memory "
            f"{fmt(q['redis_over_memory'])} (CPU/msg {fmt(q['cpu_redis_over_memory'])}x)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--duration", type=float, default=3.0, help="seconds per run")
    ap.add_argument("--concurrency", type=int, default=16)
    args = ap.parse_args()
    if shutil.which("redis-server") is None:
        print("redis-server not installed (apt-get install -y redis-server)", file=sys.stderr)
        return 1
    workdir = tempfile.mkdtemp(prefix="clusterbench-", dir=os.environ.get("BENCH_TMP"))
    try:
        records = run(workdir, args.reps, args.duration, args.concurrency,
                      step=lambda label: print(label, file=sys.stderr, flush=True))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    for r in records:
        print(f"rep {r['rep']} {r['server']:<16} {r['value']:7.0f} msg/s  {r['cpu_us']:5.0f} us CPU/msg"
              f"  p50 {r['p50_ms'] or 0:5.1f} ms  errors {r['errors']}"
              f"{'' if r['files_match'] else '  FILES DIFFER'}")
    print(note(records))
    print(f"load average {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
