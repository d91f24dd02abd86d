#!/usr/bin/env python3
"""
Screening with the Redis backend against the in-memory one (issue 16):

  1. core: the connection decision and the event cost in one process, on
     the real reactor, against a real redis-server on a UNIX socket: N
     connections from N distinct addresses (default, non-zero limits) opened
     and closed, then N that also fail a login. "decide" is the time inside
     open() alone (what a connecting client waits for); "event" is open to
     closed plus a PING answered after the counting (which has no replies),
     per connection, wall clock (so it includes Redis's own work); "cpu" is
     this process's CPU for it.
  2. accept: a real twistd node (memory, then redis, order rotated each
     round), C concurrent clients that connect, read the greeting, QUIT,
     from many loopback source addresses; connections accepted a second,
     the ratio per round and its median (goal: >= 0.9); and the node's CPU
     per connection (/proc), whose ratio is the capacity ratio: on this
     2-core machine the clients and redis-server compete with the node for
     the cores, which the raw rate also measures.
  3. window: the two ways of keeping a sliding connection window in Redis,
     a sorted set of times and fixed buckets (12 per window), as scripts
     called pipelined: calls a second and bytes a client costs in Redis.

Usage: python bench/screening_redis.py [--n 20000] [--rounds 3] [--seconds 4]
(needs redis-server on PATH and `pip install .` for twistd mailscreen).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)


def address(i: int) -> str:
    return f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}"


def start_redis(directory: str) -> tuple[subprocess.Popen, str]:
    """A redis-server on a UNIX socket in C{directory}, no persistence (bench/cluster.py too)."""
    sock = os.path.join(directory, "redis.sock")
    proc = subprocess.Popen(["redis-server", "--port", "0", "--unixsocket", sock, "--save", "",
                             "--appendonly", "no", "--dir", directory],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    for _ in range(500):
        if os.path.exists(sock):
            break
        time.sleep(0.01)
    return proc, sock


# 1. core ------------------------------------------------------------------

def core(sock: str, n: int) -> dict[str, float]:
    from twisted.internet import reactor
    from twisted.internet.defer import Deferred, inlineCallbacks
    from twisted.logger import Logger

    from twisted_mail_screen.screening.blocklist import BlockList
    from twisted_mail_screen.screening.config import RedisConfig, ScreeningConfig
    from twisted_mail_screen.screening.redis_backend import RedisScreening
    from twisted_mail_screen.screening.service import ScreeningService

    quiet = Logger(observer=lambda e: None)
    config = ScreeningConfig(whitelist=(), max_tracked_clients=4 * n)
    results: dict[str, float] = {}

    def service() -> ScreeningService:
        return ScreeningService(config, reactor, BlockList(None, reactor, quiet), None, None,
                                log=quiet)

    def rounds(screening: ScreeningService, offset: int, count: int, auth: bool) -> float:
        decide = 0.0
        clock = time.perf_counter
        for i in range(offset, offset + count):
            t0 = clock()
            screen = screening.open(address(i), "smtp")
            decide += clock() - t0
            if auth:
                screen.auth_failed("user@example.com", b"wrong")
            screen.closed()
        return decide

    @inlineCallbacks
    def run() -> object:
        for name in ("memory", "redis"):
            screening = service()
            cluster = None
            if name == "redis":
                cluster = RedisScreening(screening, RedisConfig(endpoint=f"unix:{sock}",
                                                                key_prefix="bench:"),
                                         reactor, reactor, quiet)
                cluster.startService()
                while not cluster.up:
                    d: Deferred = Deferred()
                    reactor.callLater(0.01, d.callback, None)
                    yield d
            for auth, offset in ((False, 0), (True, n)):
                # batches of 200, each followed by its replies, as a busy
                # server handles a few hundred connections per reactor turn
                decide = total = 0.0
                cpu0 = time.process_time()
                for start in range(offset, offset + n, 200):
                    t0 = time.perf_counter()
                    decide += rounds(screening, start, min(200, offset + n - start), auth)
                    if cluster is not None:
                        yield cluster.settled()
                    total += time.perf_counter() - t0
                label = f"{name}_{'auth' if auth else 'connect'}"
                results[label + "_decide_us"] = decide / n * 1e6
                results[label + "_event_us"] = total / n * 1e6
                results[label + "_cpu_us"] = (time.process_time() - cpu0) / n * 1e6
            if cluster is not None:
                yield cluster.stopService()
        reactor.stop()

    reactor.callWhenRunning(run)
    reactor.run()
    return results


# 2. accept ----------------------------------------------------------------

def node(directory: str, backend: str, sock: str) -> tuple[subprocess.Popen, int]:
    data = os.path.join(directory, f"data-{backend}")
    os.makedirs(data, exist_ok=True)
    config = os.path.join(directory, f"{backend}.toml")
    with open(config, "w") as f:
        f.write(f'mode = "site"\ndata_dir = "{data}"\ndomains = ["example.test"]\n'
                f'control_socket = "{directory}/{backend}.ctl"\n'
                '[listen]\nsmtp = ["tcp:0:interface=127.0.0.1"]\nsubmission = []\n'
                'pop3 = []\nimap = []\nweb = []\n[screening]\nwhitelist = []\n'
                'notify_on_block = false\n'
                + (f'backend = "redis"\nredis = "unix:{sock}"\nkey_prefix = "acc:"\n'
                   if backend == "redis" else ""))
    twistd = shutil.which("twistd", path=os.path.dirname(sys.executable)) or "twistd"
    log = open(os.path.join(directory, f"{backend}.log"), "w")
    # the node runs this source tree, not whatever version was last installed
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.Popen([twistd, "-n", "--pidfile=", "mailscreen", "--config", config],
                            cwd=directory, stdout=log, stderr=subprocess.STDOUT, env=env)
    import re
    for _ in range(600):
        text = open(os.path.join(directory, f"{backend}.log")).read()
        found = re.search(r"SMTP listening: connect to [\d.]+:(\d+)", text)
        if found and (backend == "memory" or "shares screening" in text):
            return proc, int(found.group(1))
        time.sleep(0.05)
    raise SystemExit(f"{backend} node did not start")


def cpu_seconds(pid: int) -> float:
    """The node's own CPU time (user + system): what one connection costs it."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def hammer(port: int, seconds: float, clients: int, base: int) -> int:
    """Connections that got a 220 within C{seconds}, from C{clients} threads."""
    done = [0] * clients
    stop = time.monotonic() + seconds

    def client(k: int) -> None:
        i = 0
        while time.monotonic() < stop:
            # a new source address every 40 connections: under the default
            # limit of 60 per 5 minutes, so every connection is served
            j = base + k * 100_000 + i // 40
            source = f"127.{1 + (j >> 16) % 250}.{(j >> 8) & 255}.{j & 255}"
            s = socket.socket()
            s.settimeout(10)
            s.bind((source, 0))
            s.connect(("127.0.0.1", port))
            greeting = s.recv(512)
            s.sendall(b"QUIT\r\n")
            s.recv(512)
            s.close()
            if greeting.startswith(b"220"):
                done[k] += 1
            i += 1

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(done)


def accept(directory: str, sock: str, rounds: int, seconds: float,
           clients: int, redis_pid: int) -> list[dict[str, float]]:
    rows = []
    base = 0
    for r in range(rounds):
        order = ("memory", "redis") if r % 2 == 0 else ("redis", "memory")
        rates = {}
        for backend in order:
            proc, port = node(directory, backend, sock)
            try:
                base += 1000
                cpu, server = cpu_seconds(proc.pid), cpu_seconds(redis_pid)
                served = hammer(port, seconds, clients, base)
                rates[backend] = served / seconds
                rates[backend + "_cpu_us"] = (cpu_seconds(proc.pid) - cpu) / served * 1e6
                # redis-server's share of the same two cores (what the rate also pays)
                rates[backend + "_server_us"] = (cpu_seconds(redis_pid) - server) / served * 1e6
            finally:
                proc.terminate()
                proc.wait(30)
        rates["ratio"] = rates["redis"] / rates["memory"]
        rates["cpu_ratio"] = rates["memory_cpu_us"] / rates["redis_cpu_us"]
        rows.append(rates)
    return rows


# 3. window ----------------------------------------------------------------

ZSET = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', tonumber(ARGV[1]) - tonumber(ARGV[2]))
redis.call('ZADD', KEYS[1], ARGV[1], ARGV[3])
redis.call('PEXPIRE', KEYS[1], math.ceil(tonumber(ARGV[2]) * 1000))
return redis.call('ZCARD', KEYS[1])
"""
BUCKETS = """
local width = tonumber(ARGV[2]) / 12
local now = tonumber(ARGV[1])
local bucket = math.floor(now / width)
redis.call('HINCRBY', KEYS[1], bucket, 1)
redis.call('PEXPIRE', KEYS[1], math.ceil(tonumber(ARGV[2]) * 1000 + width * 1000))
local total = 0
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  local b = tonumber(all[i])
  if b <= bucket - 12 then redis.call('HDEL', KEYS[1], all[i])
  else total = total + tonumber(all[i + 1]) end
end
return total
"""


def window(sock: str, calls: int) -> dict[str, float]:
    from twisted.internet import reactor
    from twisted.internet.defer import gatherResults, inlineCallbacks
    from twisted.internet.endpoints import UNIXClientEndpoint
    from twisted.internet.protocol import Factory

    from twisted_mail_screen.screening.resp import RESPProtocol

    results: dict[str, float] = {}

    @inlineCallbacks
    def run() -> object:
        protocol = RESPProtocol(reactor)
        yield UNIXClientEndpoint(reactor, sock).connect(Factory.forProtocol(lambda: protocol))
        for name, script in (("zset", ZSET), ("buckets", BUCKETS)):
            sha = yield protocol.call("SCRIPT", "LOAD", script)
            t0 = time.perf_counter()
            batch = []
            for i in range(calls):
                # 200 clients, each at 60 connections in the 300 s window
                batch.append(protocol.call("EVALSHA", sha, 1, f"w:{name}:{i % 200}",
                                           1_800_000_000 + i * 0.02, 300, f"m{i}"))
                if len(batch) == 1000:
                    yield gatherResults(batch)
                    batch = []
            yield gatherResults(batch)
            results[f"{name}_calls_per_s"] = calls / (time.perf_counter() - t0)
            results[f"{name}_bytes_per_client"] = yield protocol.call(
                "MEMORY", "USAGE", f"w:{name}:0")
            results[f"{name}_entries"] = yield protocol.call(
                "ZCARD" if name == "zset" else "HLEN", f"w:{name}:0")
        protocol.transport.loseConnection()
        reactor.stop()

    reactor.callWhenRunning(run)
    reactor.run()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--part", choices=("core", "window"), help=argparse.SUPPRESS)
    parser.add_argument("--sock", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.part == "core":
        print(json.dumps(core(args.sock, args.n)))
        return
    if args.part == "window":
        print(json.dumps(window(args.sock, args.n)))
        return
    directory = tempfile.mkdtemp(prefix="msbench-", dir="/tmp")
    redis, sock = start_redis(directory)
    try:
        def part(name: str) -> dict[str, float]:
            out = subprocess.run([sys.executable, __file__, "--part", name, "--sock", sock,
                                  "--n", str(args.n)], check=True, capture_output=True, text=True)
            return json.loads(out.stdout)

        c = part("core")
        print(f"core, {args.n} addresses (µs per connection; decide = inside open())")
        for what in ("connect", "auth"):
            m, r = c[f"memory_{what}_event_us"], c[f"redis_{what}_event_us"]
            print(f"  {what:<8} memory decide {c[f'memory_{what}_decide_us']:6.2f} "
                  f"event {m:6.2f} cpu {c[f'memory_{what}_cpu_us']:6.2f} | redis decide "
                  f"{c[f'redis_{what}_decide_us']:6.2f} event {r:6.2f} "
                  f"cpu {c[f'redis_{what}_cpu_us']:6.2f}")
        w = part("window")
        print(f"window scripts, {args.n} calls pipelined")
        for name in ("zset", "buckets"):
            print(f"  {name:<8} {w[f'{name}_calls_per_s']:8.0f} calls/s  "
                  f"{w[f'{name}_bytes_per_client']:6d} B per client at "
                  f"{int(w[f'{name}_entries'])} entries")
        rows = accept(directory, sock, args.rounds, args.seconds, args.clients, redis.pid)
        print(f"accept, {args.clients} clients, {args.seconds:g} s per run, order rotated")
        for row in rows:
            print(f"  memory {row['memory']:7.0f}/s {row['memory_cpu_us']:5.0f} µs CPU/conn  "
                  f"redis {row['redis']:7.0f}/s {row['redis_cpu_us']:5.0f} µs CPU/conn  "
                  f"rate ratio {row['ratio']:.2f}  capacity ratio {row['cpu_ratio']:.2f}  "
                  f"redis-server {row['redis_server_us']:4.0f} µs CPU/conn")
        print(f"  median rate ratio {statistics.median(r['ratio'] for r in rows):.2f}, "
              f"median capacity ratio (memory CPU/conn over redis CPU/conn) "
              f"{statistics.median(r['cpu_ratio'] for r in rows):.2f} (goal >= 0.9)")
    finally:
        redis.kill()
        redis.wait()
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
