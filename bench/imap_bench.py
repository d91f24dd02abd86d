"""
The IMAP workloads of the benchmark, ours against Dovecot on copies of one
Maildir (5,000 and 100,000 messages by default), interleaved per
repetition:

- warm (the folder opened and searched before): SELECT + FETCH 1:* (FLAGS
  RFC822.SIZE ENVELOPE), FETCH 1:* BODY.PEEK[], UID SEARCH HEADER Subject,
  UID SEARCH FROM, UID SORT (SUBJECT);
- right after a restart of the server (its files on disk, the page cache
  warm): UID SEARCH HEADER Subject, UID SORT (SUBJECT), and the first FETCH
  1:* ENVELOPE ("cold ENVELOPE"), each after its own restart.

Each figure is the command's time alone (login and SELECT not counted,
except in the SELECT + metadata workload). Targets: ours within 1.5 x
Dovecot's time, the cold ENVELOPE within 2 x.
"""

from __future__ import annotations

import imaplib
import os
import shutil
import time
from typing import Any, Callable

import maildirs

USER = "pop@bench.test"  # an account of ours in site mode too (after the POP3 runs, its box is reused)
SEARCH_FROM = "s7@client.test"  # one sender in 100

WARM = [("imap_select_meta", "SELECT + FETCH 1:* (FLAGS RFC822.SIZE ENVELOPE)", 1.5),
        ("imap_fetch_bodies", "FETCH 1:* BODY.PEEK[]", 1.5),
        ("imap_search_header", "UID SEARCH HEADER Subject", 1.5),
        ("imap_search_from", "UID SEARCH FROM", 1.5),
        ("imap_sort", "UID SORT (SUBJECT)", 1.5)]
RESTART = [("imap_restart_search_header", "UID SEARCH HEADER Subject after a restart", 1.5),
           ("imap_restart_sort", "UID SORT (SUBJECT) after a restart", 1.5),
           ("imap_cold_envelope", "first FETCH 1:* ENVELOPE after a restart", 2.0)]


def imap_header(i: int) -> str:
    """Message C{i} of the IMAP folders: 100 senders, distinct dates, a third of them replies."""
    day, minute = divmod(i * 7 % 40000, 1440)
    return (f"Return-Path: <s@client.test>\nFrom: Sender {i % 100} <s{i % 100}@client.test>\n"
            f"To: <r@bench.test>\nSubject: {'Re: ' if i % 3 == 0 else ''}bench {i}\n"
            f"Date: {1 + day % 28} Jan 2024 {minute // 60:02d}:{minute % 60:02d}:00 +0000\n"
            f"Message-ID: <{i}@client.test>\n\n")


def populate(maildir: str, count: int, size: int = 2048) -> None:
    """The folder the IMAP workloads search and sort (SORT and SEARCH FROM need its senders and subjects)."""
    maildirs.populate(maildir, count, size, imap_header)


def _session(port: int) -> imaplib.IMAP4:
    c = imaplib.IMAP4("127.0.0.1", port, timeout=300)
    c.login(USER, "x")
    return c


def _timed(f: Callable[[], tuple[str, Any]], what: str) -> tuple[float, Any]:
    t = time.monotonic()
    typ, data = f()
    took = time.monotonic() - t
    if typ != "OK":
        raise RuntimeError(f"IMAP {what}: {typ} {str(data)[:200]}")
    return took, data


def warm(port: int, count: int) -> dict[str, float]:
    c = _session(port)
    out: dict[str, float] = {}
    t_sel, data = _timed(lambda: c.select("INBOX"), "SELECT")
    if int(data[0]) < count:
        raise RuntimeError(f"IMAP SELECT: {data[0]!r} messages, expected {count}")
    t_meta, data = _timed(lambda: c.fetch("1:*", "(FLAGS RFC822.SIZE ENVELOPE)"), "FETCH")
    out["imap_select_meta"] = t_sel + t_meta
    out["imap_fetch_bodies"], data = _timed(lambda: c.fetch("1:*", "(BODY.PEEK[])"), "FETCH bodies")
    out["imap_search_header"], data = _timed(
        lambda: c.uid("SEARCH", None, "HEADER", "Subject", f'"bench {count // 2}"'), "SEARCH HEADER")
    if not data[0]:
        raise RuntimeError("IMAP SEARCH HEADER found nothing")
    out["imap_search_from"], data = _timed(lambda: c.uid("SEARCH", None, "FROM", SEARCH_FROM),
                                           "SEARCH FROM")
    if len(data[0].split()) < count // 100:
        raise RuntimeError(f"IMAP SEARCH FROM found {len(data[0].split())}")
    out["imap_sort"], data = _timed(lambda: c.uid("SORT", "(SUBJECT)", "UTF-8", "ALL"), "SORT")
    if len(data[0].split()) != count:
        raise RuntimeError(f"IMAP SORT gave {len(data[0].split())} numbers")
    c.logout()
    return out


def after_restart(server: Any, port: int, count: int, workload: str) -> float:
    server.stop()
    if not server.start():
        raise RuntimeError(f"{server.name} did not restart: {server.error}")
    from peers import wait_port
    wait_port(port)
    c = _session(port)
    c.select("INBOX")
    if workload == "imap_restart_search_header":
        took, _ = _timed(lambda: c.uid("SEARCH", None, "HEADER", "Subject", f'"bench {count // 3}"'),
                         "SEARCH HEADER")
    elif workload == "imap_restart_sort":
        took, _ = _timed(lambda: c.uid("SORT", "(SUBJECT)", "UTF-8", "ALL"), "SORT")
    else:
        took, _ = _timed(lambda: c.fetch("1:*", "(ENVELOPE)"), "FETCH ENVELOPE")
    c.logout()
    return took


def steps(counts: list[int], reps: int, servers: int) -> int:
    return len(counts) * reps * servers * (1 + len(RESTART))


def fixture(fixtures: str, count: int) -> str:
    """
    The folder of C{count} messages kept in C{fixtures} (made once: 100,000
    files take minutes to write on a busy machine); copies are hard links.
    Message files are never written in place (flag changes rename the
    link in the copy), so the fixture stays as made.
    """
    src = os.path.join(fixtures, f"imap-{count}")
    if not os.path.exists(os.path.join(src, "complete")):
        shutil.rmtree(src, ignore_errors=True)
        populate(os.path.join(src, "box"), count)
        open(os.path.join(src, "complete"), "w").close()
    return os.path.join(src, "box")


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system
        shutil.copy2(src, dst)


def run(ours: list[Any], dovecot: Any | None, counts: list[int], reps: int,
        record: Callable[..., None], notes: dict[str, Any], step: Callable[[str], None],
        fixtures: str | None = None) -> None:
    """
    Every IMAP workload for each folder size, on each of our servers and
    Dovecot (one copy of the folder each); records are (workload,
    {messages}, server). With C{fixtures}, the folders are made there once
    and linked, not written anew each run.
    """
    servers = list(ours) + ([dovecot] if dovecot is not None else [])
    if not ours:
        return
    for count in counts:
        box = ours[0].maildir(USER)
        shutil.rmtree(box, ignore_errors=True)
        copy: Callable[..., Any] = shutil.copy2
        if fixtures:
            copy = _link_or_copy
            os.makedirs(os.path.dirname(box), exist_ok=True)
            shutil.copytree(fixture(fixtures, count), box, copy_function=copy)
        else:
            populate(box, count)
        for other in ours[1:]:
            shutil.rmtree(other.maildir(USER), ignore_errors=True)
            shutil.copytree(box, other.maildir(USER), copy_function=copy)
        if dovecot is not None:
            shutil.rmtree(dovecot.mail, ignore_errors=True)
            shutil.copytree(box, dovecot.mail, copy_function=copy)
            dovecot.chown()
            dovecot.stop()
            dovecot.start()
        failed: set[str] = set()
        for server in servers:  # warm-up: indexes built, page cache filled
            try:
                warm(server.ports["imap"], count)
            except Exception as e:  # noqa: BLE001
                notes[f"imap-{server.name}-{count}"] = f"failed: {e}"[:200]
                failed.add(server.name)
        for rep in range(reps):
            for server in servers:
                step(f"imap {count} warm {server.name}")
                if server.name in failed:
                    continue
                try:
                    for wl, value in warm(server.ports["imap"], count).items():
                        record(wl, {"messages": count}, server.name, rep, {"value": value}, "s", "lower")
                    for wl, _, _ in RESTART:
                        step(f"imap {count} {wl[5:]} {server.name}")
                        value = after_restart(server, server.ports["imap"], count, wl)
                        record(wl, {"messages": count}, server.name, rep, {"value": value}, "s", "lower")
                except Exception as e:  # noqa: BLE001
                    notes[f"imap-{server.name}-{count}"] = f"failed: {e}"[:200]
                    failed.add(server.name)
        for server in ours:
            shutil.rmtree(server.maildir(USER), ignore_errors=True)


def targets(summary: dict[str, Any], counts: list[int], target: Callable[..., None],
            why_missing: str, me: str = "ours",
            ratio: Callable[[str], float | None] | None = None) -> None:
    """
    One target row per workload and size: Dovecot's time / ours >= 1 /
    goal (C{ratio} of a summary key, else from the medians).
    """
    for count in counts:
        for wl, label, goal in WARM + RESTART:
            k = f"{wl} messages={count}"
            if ratio is not None:
                value = ratio(k)
            else:
                row = summary.get(k, {})
                mine, dv = row.get(me, {}).get("median"), row.get("dovecot", {}).get("median")
                value = dv / mine if mine and dv else None
            target(f"IMAP {label}, {count:,}: Dovecot time / ours (>= 1/{goal}) ({me})",
                   value, round(1 / goal, 3), why_missing)


def main() -> int:
    """Run the IMAP workloads alone (python bench/imap_bench.py); results as bench/run.py writes them."""
    import argparse
    import json
    import platform
    import sys
    import tempfile

    here = os.path.dirname(os.path.abspath(__file__))
    sys.path.insert(0, here)
    import peers
    import run as bench_run

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", default="5000,100000", help="folder sizes, comma list")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(here, "results-imap"))
    ap.add_argument("--fixtures", default=os.environ.get("IMAP_BENCH_FIXTURES"),
                    help="a directory where each folder size is made once and hard-linked from "
                         "(default $IMAP_BENCH_FIXTURES; unset: written anew each run)")
    args = ap.parse_args()
    counts = [int(x) for x in args.messages.split(",")]
    workdir = tempfile.mkdtemp(prefix="imapbench-", dir=os.environ.get("BENCH_TMP"))
    os.chmod(workdir, 0o755)
    os.makedirs(args.out, exist_ok=True)
    class Ours(peers.Ours):
        def overrides(self) -> dict[str, Any]:
            return {**super().overrides(), "listen.web": []}  # the web port is not measured here

    ours, dovecot = Ours(workdir, "ours"), peers.Dovecot(workdir)
    notes: dict[str, Any] = {}
    records: list[dict[str, Any]] = []

    def record(workload: str, params: dict[str, Any], server: str, rep: int, result: dict[str, Any],
               unit: str, better: str) -> None:
        records.append({"workload": workload, "params": params, "server": server, "rep": rep,
                        "unit": unit, "better": better, **result})

    progress = bench_run.Progress(steps(counts, args.reps, 2))
    if not ours.start():
        print(f"our server did not start: {ours.error}", file=sys.stderr)
        return 1
    have_dovecot = dovecot.start() and dovecot.has("imap")
    if not have_dovecot:
        notes["dovecot"] = f"not run: {dovecot.error}"
    try:
        run([ours], dovecot if have_dovecot else None, counts, args.reps, record, notes, progress.step,
            args.fixtures)
    finally:
        progress.finish()
        ours.stop()
        dovecot.stop()
    summary = bench_run.summarise(records)
    rows: list[dict[str, Any]] = []

    def target(name: str, value: float | None, goal: float, why_missing: str) -> None:
        rows.append({"target": name, "goal": goal, "value": value, "at_most": False,
                     "met": None if value is None else value >= goal,
                     "note": why_missing if value is None else ""})

    # as bench/run.py: the median of the per-repetition ratios
    targets(summary, counts, target, notes.get("dovecot", "not measured"), "ours",
            lambda k: summary.get(k, {}).get("ours", {}).get("ratios", {}).get("dovecot"))
    meta = {"when": time.strftime("%Y-%m-%d %H:%M:%S"), "python": platform.python_version(),
            "machine": f"{os.cpu_count()} CPUs, {platform.platform()}", "reps": args.reps,
            "duration_s": "-", "quick": False, "workdir": workdir}
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"meta": meta, "records": records, "summary": summary, "targets": rows,
                   "notes": notes}, f, indent=1, default=str)
    md = bench_run.markdown(meta, summary, rows, notes)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(md)
    print(md)
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
