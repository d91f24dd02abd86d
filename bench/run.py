#!/usr/bin/env python3
"""
Benchmark twisted-mail-screen against its peers in one run.

Starts our server twice (test-host mode, and site mode: a domain, an
accounts file, loopback not whitelisted so screening counts every
connection) and, in the same run, aiosmtpd (Maildir handler, without and
with fsync before 250), Postfix (SMTP) and Dovecot (POP3/IMAP) when
installed, each on its own loopback port, and runs every workload
interleaved for several repetitions, the order of the servers rotated each
repetition (A B C, B C A, C A B). The fsync ceiling (what a delivery does to
the disk: file fsync, rename, directory fsync) runs as one more entrant in
every SMTP cell, so it is measured next to the runs it is compared with.
Reports medians with min-max, and each ratio as the median of the per-pair
ratios of the same repetition (not a ratio of medians), the machine's
ceilings, and the targets met or missed.

    pip install -r bench/requirements.txt      # aiosmtpd, matplotlib
    apt-get install -y postfix dovecot-pop3d dovecot-imapd   # optional peers (root)
    python bench/run.py                         # full run, ~10 minutes on 2 cores
    python bench/run.py --quick                 # one repetition, short runs

Results go to bench/results/ (results.json, results.md, ratios.png). The
modules: clients.py (load and ceilings), peers.py (the servers),
maildirs.py, report.py (ratios, targets, table, chart), imap_bench.py.
See docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import clients  # noqa: E402
import imap_bench  # noqa: E402
import cluster  # noqa: E402
import peers  # noqa: E402
import proccpu  # noqa: E402
import sink_fsync  # noqa: E402
from maildirs import clear_maildir, count_files, populate, wait_delivered  # noqa: E402
# Progress, summarise and markdown are imap_bench's too (it runs alone with them).
from report import (CEILING, HIGHER, LOWER, Progress, chart, evaluate, markdown,  # noqa: E402,F401
                    summarise)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 repetition, 1 s runs, fewer cells")
    ap.add_argument("--reps", type=int, default=None, help="repetitions (3; --quick: 1)")
    ap.add_argument("--duration", type=float, default=None,
                    help="seconds per SMTP run (2.5; --quick: 1)")
    ap.add_argument("--messages", type=int, default=5000, help="POP3 maildrop size")
    ap.add_argument("--imap-messages", default="",
                    help="IMAP folder sizes, comma list (5000,100000; --quick: 5000)")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--workdir", default=None, help="data directories (default: a temp dir)")
    ap.add_argument("--only", default="",
                    help="comma list: smtp,accept,pop3,imap,core,ceiling,cluster")
    ap.add_argument("--no-direct-send", action="store_true",
                    help="also run ours with every reply through transport.write (SMTP, POP3)")
    ap.add_argument("--baseline-tree", default="",
                    help="also run ours from this source tree (e.g. `git archive` of an older "
                         "commit), both modes, as ours-baseline and ours-site-baseline (SMTP)")
    ap.add_argument("--servers", default="",
                    help="SMTP entrants to run, comma list of names (ours, ours-site, aiosmtpd, "
                         "aiosmtpd-fsync, postfix, sink-fsync: the trivial sink plus the "
                         "ceiling's disk work, only when named); default: every peer that starts")
    ap.add_argument("--client", choices=("asyncio", "smtp-source"), default="asyncio",
                    help="SMTP load generator: this bench's Python client (runs for --duration), "
                         "or Postfix's smtp-source in C (sends --source-messages per run)")
    ap.add_argument("--source-messages", type=int, default=1000,
                    help="messages per SMTP run with --client smtp-source")
    ap.add_argument("--cells", default="",
                    help="SMTP cells to run, comma list of CONCURRENCY:SIZE:PER_CONN "
                         "(e.g. 16:2048:1); default: the full grid (--quick: a subset)")
    args = ap.parse_args()
    args.reps = args.reps or (1 if args.quick else 3)
    args.duration = args.duration or (1.0 if args.quick else 2.5)
    imap_counts = [int(x) for x in
                   (args.imap_messages or ("5000" if args.quick else "5000,100000")).split(",")]
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # stop the servers on the way out
    only = set(filter(None, args.only.split(","))) or {"smtp", "accept", "pop3", "imap", "core",
                                                       "ceiling", "cluster"}
    workdir = args.workdir or tempfile.mkdtemp(prefix="mailbench-", dir=os.environ.get("BENCH_TMP"))
    os.makedirs(workdir, exist_ok=True)
    os.chmod(workdir, 0o755)
    os.makedirs(args.out, exist_ok=True)

    ours = peers.Ours(workdir, "ours")
    ours_site = peers.Ours(workdir, "ours-site", site=True)
    smtp_peers: list[Any] = [peers.AioSMTPD(workdir, False), peers.AioSMTPD(workdir, True),
                             peers.Postfix(workdir)]
    dovecot = peers.Dovecot(workdir)
    screen_on = peers.Ours(workdir, "ours-screening-on", screening=True)
    screen_off = peers.Ours(workdir, "ours-screening-off", screening=False)
    banner = peers.Banner(workdir)
    started: list[Any] = []
    notes: dict[str, str] = {}
    records: list[dict[str, Any]] = []

    def start(server: Any) -> bool:
        ok = server.start()
        started.append(server)
        if not ok:
            notes[server.name] = f"not run: {server.error}"
        return ok

    if not start(ours):
        print(f"our server did not start: {ours.error}", file=sys.stderr)
        return 1
    wanted = set(filter(None, args.servers.split(",")))
    if wanted:  # ours still starts: its data directory holds the ceiling's, POP3 and IMAP use it
        if "sink-fsync" in wanted:  # a yardstick, not a peer: only when asked for
            smtp_peers.append(sink_fsync.SinkFsync(workdir))
        smtp_peers = [p for p in smtp_peers if p.name in wanted]
        if "ours-site" not in wanted:
            ours_site = None
    smtp_servers = [ours] + [p for p in [ours_site] + smtp_peers if p is not None and start(p)]
    if wanted and "ours" not in wanted:
        smtp_servers.remove(ours)
    no_direct = peers.Ours(workdir, "ours-no-direct-send", direct_send=False)
    if args.no_direct_send and start(no_direct):
        smtp_servers.insert(1, no_direct)
    if args.baseline_tree:  # the same cells, the same moment: before/after a change
        root = os.path.abspath(args.baseline_tree)
        for base in (peers.Ours(workdir, "ours-baseline", root=root),
                     peers.Ours(workdir, "ours-site-baseline", site=True, root=root)):
            if start(base):
                smtp_servers.append(base)
    have_dovecot = start(dovecot) if {"pop3", "imap"} & only else False

    # the grid
    concs = [1, 16, 64]
    sizes = [2048, 100 * 1024]
    per_conns = [1, 10]
    cells = [(c, s, k) for c in concs for s in sizes for k in per_conns]
    if args.quick:
        cells = [(1, 2048, 1), (16, 2048, 1), (16, 2048, 10), (64, 2048, 10), (16, 102400, 1)]
    if args.cells:
        cells = [tuple(int(x) for x in c.split(":")) for c in args.cells.split(",")]  # type: ignore[misc]
    steps = 0
    if "ceiling" in only:
        steps += args.reps
    if "smtp" in only:
        steps += len(smtp_servers) + len(cells) * args.reps * (len(smtp_servers) + 1)
    if "accept" in only:
        steps += args.reps * (len(smtp_servers) + 2)
    if "pop3" in only:
        steps += args.reps * 3
    if "imap" in only:
        steps += imap_bench.steps(imap_counts, args.reps, 3)
    if "core" in only:
        steps += 1
    if "cluster" in only:
        steps += args.reps * len(cluster.ENTRANTS)
    progress = Progress(steps)

    def record(workload: str, params: dict[str, Any], server: str, rep: int, result: dict[str, Any],
               unit: str, better: str) -> None:
        records.append({"workload": workload, "params": params, "server": server, "rep": rep,
                        "unit": unit, "better": better, **result})

    try:
        if "ceiling" in only:
            banner_ok = start(banner)
            for rep in range(args.reps):
                progress.step("ceiling: client accept")
                if banner_ok:
                    r = clients.accept_rate(banner.ports["smtp"], 16, min(args.duration, 2.0))
                    record("accept_ceiling", {"concurrency": 16}, "machine", rep, r,
                           "conn/s", HIGHER)
                    if args.client == "smtp-source":
                        cpu = os.times()
                        r = clients.smtp_source(banner.ports["smtp"], 16, 2048, 1,
                                                args.source_messages)
                        r.update({"client_" + k: v for k, v in
                                  own_cpu(cpu, r["ok"], child=True).items()})
                    else:
                        cpu = os.times()
                        r = clients.smtp_ingest(banner.ports["smtp"], 16, 2048, 1,
                                                min(args.duration, 2.0))
                        r.update({"client_" + k: v for k, v in own_cpu(cpu, r["ok"]).items()})
                    record("smtp_client_ceiling", {"concurrency": 16, "size": 2048}, "machine",
                           rep, r, "msg/s", HIGHER)
            banner.stop()

        if "smtp" in only:
            ceiling_dir = os.path.join(ours.data, "fsync-ceiling")
            for server in smtp_servers:  # warm-up: imports, Postfix's processes spawned
                progress.step(f"smtp warm-up {server.name}")
                smtp_run(server, 16, 2048, 1, min(args.duration, 0.5), args.client, 200)
                clear_maildir(server.maildir(clients.RCPT))
            # The process's first ceiling run read 1.5-5x the later ones (session 12, cause
            # not found): one run, not recorded, before those that are.
            clients.fsync_ceiling(ceiling_dir, 16, args.duration, 2048)
            for conc, size, per_conn in cells:
                params = {"concurrency": conc, "size": size, "per_conn": per_conn}
                for rep in range(args.reps):
                    for server in rotated(smtp_servers + [CEILING], rep):
                        progress.step(f"smtp c={conc} {size // 1024}K x{per_conn} "
                                      f"{getattr(server, 'name', CEILING)}")
                        if server is CEILING:
                            # The disk work of as many deliveries at once as there are clients.
                            cpu, busy, kern = os.times(), proccpu.machine(), proccpu.kernel()
                            r = clients.fsync_ceiling(ceiling_dir, conc, args.duration, size)
                            r.update(own_cpu(cpu, r["ok"]))
                            r.update(proccpu.machine_share(busy))
                            r.update(proccpu.kernel_us(kern, r["ok"]))
                            record("smtp_ingest", params, CEILING, rep, r, "msg/s", HIGHER)
                            continue
                        box = server.maildir(clients.RCPT)
                        clear_maildir(box)
                        r, delivered = smtp_run(server, conc, size, per_conn, args.duration,
                                                args.client, args.source_messages)
                        if server is ours and conc == 64:
                            r["rss_kb"] = ours.rss_kb()
                        record("smtp_ingest", params, server.name, rep, r, "msg/s", HIGHER)
                        if delivered:
                            record("smtp_ingest", params, server.name + "-delivered", rep,
                                   delivered, "msg/s", HIGHER)
                        clear_maildir(box)
            notes["peak_rss"] = f"{(ours.peak_rss_kb() or 0) / 1024:.1f} MB (VmHWM of our " \
                                f"server after the SMTP runs, concurrency 64 included)"
            records.append({"workload": "peak_rss", "params": {}, "server": "ours", "rep": 0,
                            "unit": "MB", "better": LOWER,
                            "value": (ours.peak_rss_kb() or 0) / 1024})

        if "accept" in only:
            accept_servers = list(smtp_servers)
            sources = 10_000
            for s in (screen_on, screen_off):
                if start(s):
                    accept_servers.append(s)
            if screen_on in accept_servers and screen_on.info.get("screening") in (
                    "NullScreening", "?", None):
                notes["screening"] = ("pending: the [screening] keys are accepted but the "
                                      "service is not wired into build_service yet "
                                      f"(factory screening = {screen_on.info.get('screening')})")
            for rep in range(args.reps):
                for server in rotated(accept_servers, rep):
                    progress.step(f"accept c=16 {server.name}")
                    # From many addresses: screening tracks (and counts) each of them.
                    r = clients.accept_rate(server.ports["smtp"], 16, min(args.duration, 2.0),
                                            sources)
                    record("accept", {"concurrency": 16, "sources": sources}, server.name, rep, r,
                           "conn/s", HIGHER)
            for s in (screen_on, screen_off):
                s.stop()

        pop_box = ours.maildir("pop@bench.test")
        site_ok = ours_site in smtp_servers
        if {"pop3", "imap"} & only:
            populate(pop_box, args.messages, 2048)
            if site_ok:
                populate(ours_site.maildir("pop@bench.test"), args.messages, 2048)
            if have_dovecot:
                shutil.rmtree(dovecot.mail, ignore_errors=True)
                shutil.copytree(pop_box, dovecot.mail)
                dovecot.chown()
        pop_servers = [(ours, ours.ports["pop3"])] + ([(dovecot, dovecot.ports["pop3"])]
                                                      if have_dovecot and dovecot.has("pop3") else [])
        if have_dovecot and not dovecot.has("pop3"):
            notes["dovecot"] = "POP3 not run: dovecot-pop3d not installed"
        if site_ok:
            pop_servers.insert(1, (ours_site, ours_site.ports["pop3"]))
        if no_direct in smtp_servers and "pop3" in only:
            populate(no_direct.maildir("pop@bench.test"), args.messages, 2048)
            pop_servers.insert(1, (no_direct, no_direct.ports["pop3"]))
        if "pop3" in only:
            for server, port in pop_servers:  # warm-up: indexes, page cache
                clients.pop3_list_retr(port, "pop@bench.test", args.messages)
            for rep in range(args.reps):
                for server, port in rotated(pop_servers, rep):
                    progress.step(f"pop3 LIST+RETR {args.messages} {server.name}")
                    r = clients.pop3_list_retr(port, "pop@bench.test", args.messages)
                    record("pop3_list_retr", {"messages": args.messages}, server.name, rep, r,
                           "s", LOWER)

        if "imap" in only:  # every IMAP workload, warm and after restarts (bench/imap_bench.py)
            mine = [o for o in (ours, ours_site) if o is not None and o.has("imap")
                    and peers.wait_port(o.ports["imap"], 1)]
            if ours not in mine:
                notes["imap"] = "ours pending: no IMAP listener in this build"
            imap_bench.run(mine, dovecot if have_dovecot and dovecot.has("imap") else None,
                           imap_counts, args.reps, record, notes, progress.step)

        if "core" in only:
            progress.step("screening core")
            notes["screening_core"] = run_screening_core(args.quick)

        if "cluster" in only:  # three twistd nodes sharing Redis and a data directory, against one
            if shutil.which("redis-server") is None:
                notes["cluster"] = "not run: redis-server not installed"
            else:
                done = cluster.run(os.path.join(workdir, "cluster"), args.reps, args.duration,
                                   record=record, step=progress.step)
                notes["cluster"] = cluster.note(done)
    finally:
        progress.finish()
        for s in started:
            s.stop()

    summary = summarise(records)
    targets = evaluate(summary, notes, imap_counts)
    meta = {"when": time.strftime("%Y-%m-%d %H:%M:%S"), "python": platform.python_version(),
            "machine": f"{os.cpu_count()} CPUs, {platform.platform()}", "reps": args.reps,
            "duration_s": args.duration, "quick": args.quick, "workdir": workdir}
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"meta": meta, "records": records, "summary": summary, "targets": targets,
                   "notes": notes}, f, indent=1, default=str)
    md = markdown(meta, summary, targets, notes)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(md)
    chart(summary, os.path.join(args.out, "ratios.png"))
    print(md)
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


def own_cpu(before: Any, n: int, child: bool = False) -> dict[str, float]:
    """
    This process's CPU since C{before} (os.times()), per message: the
    client's, or the ceiling's; with C{child}, its waited-for children's
    (smtp-source).
    """
    now = os.times()
    if child:
        u, s = (now.children_user - before.children_user,
                now.children_system - before.children_system)
    else:
        u, s = now.user - before.user, now.system - before.system
    n = max(n, 1)
    return {"cpu_us": (u + s) / n * 1e6, "cpu_user_us": u / n * 1e6, "cpu_sys_us": s / n * 1e6}


def smtp_run(server: Any, conc: int, size: int, per_conn: int, duration: float,
             client: str = "asyncio",
             messages: int = 1000) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """
    One SMTP run: the 250 rate, the files counted against the 250s, the
    server's CPU per message (its whole process tree, by process and
    thread) and the client's (this process). For a queueing server
    (Postfix), whose 250 comes before delivery, also the rate into the
    Maildir: the messages over the time from the start until the last of
    them was in new/, and the CPU up to then, delivery included.
    """
    pid = server.proc.pid
    cpu0, client0, busy, kern = (proccpu.snapshot(pid), os.times(), proccpu.machine(),
                                 proccpu.kernel())
    t0 = time.monotonic()
    if client == "smtp-source":
        r = clients.smtp_source(server.ports["smtp"], conc, size, per_conn, messages)
        duration = r["elapsed_s"]
    else:
        r = clients.smtp_ingest(server.ports["smtp"], conc, size, per_conn, duration)
    r.update(proccpu.machine_share(busy))
    r.update(proccpu.kernel_us(kern, r["ok"]))
    r.update({"client_" + k: v for k, v in
              own_cpu(client0, r["ok"], client == "smtp-source").items()})
    r.update(proccpu.per_message(proccpu.delta(cpu0, proccpu.snapshot(pid)), r["ok"]))
    if server.kind != "postfix":
        r["files"] = count_files(server.maildir(clients.RCPT))
        r["files_match"] = r["files"] == r["ok"]
        return r, None
    files, t_end = wait_delivered(server, r["ok"])
    r["files"] = files
    r["files_match"] = files == r["ok"]
    d = {"value": files / max(t_end - t0, 1e-9), "ok": files, "files": files,
         "files_match": files == r["ok"], "drain_s": t_end - t0 - duration}
    d.update(proccpu.per_message(proccpu.delta(cpu0, proccpu.snapshot(pid)), files))
    return r, d


def rotated(entrants: list[Any], rep: int) -> list[Any]:
    """The order of repetition C{rep}: A B C, then B C A, then C A B, ..."""
    k = rep % len(entrants) if entrants else 0
    return entrants[k:] + entrants[:k]


def run_screening_core(quick: bool) -> Any:
    script = os.path.join(HERE, "screening_core.py")
    if not os.path.exists(script):
        return "pending: bench/screening_core.py not present"
    sizes = [10_000] if quick else [10_000, 100_000, 1_000_000]
    rows = []
    for n in sizes:
        for mode in ("--one", "--hostile"):
            p = subprocess.run([sys.executable, script, mode, str(n)], capture_output=True,
                               text=True, timeout=600)
            try:
                row = json.loads(p.stdout.strip().splitlines()[-1])
            except (ValueError, IndexError):
                return f"failed: {p.stderr[-300:]}"
            row["kind"] = mode[2:]
            rows.append(row)
    return rows


if __name__ == "__main__":
    sys.exit(main())
