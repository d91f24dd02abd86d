#!/usr/bin/env python3
"""
What a function-scoped test mail server costs a pytest suite.

1. In this process: start and stop a C{mailserver}-fixture server (four
   listeners, fresh data directory) 50 times; the median.
2. Two generated suites of 100 tests, each test with its own server,
   sending one message with smtplib and checking it arrived: one uses our
   C{mailserver} (SMTP, submission, POP3, IMAP), the other
   pytest-localserver's C{smtpserver} (SMTP only, aiosmtpd). Each runs
   in its own pytest subprocess, alternately, C{--reps} times; the median
   wall times and their ratio (goal: at most 1.5). Both after one
   warm-up run each, with the bytecode cache on (in a temporary
   directory), as on a developer's machine.

    pip install -r bench/requirements.txt     # pytest-localserver
    python bench/plugin_startup.py [--reps 3] [--before DIR]

C{--before DIR}: a third suite, the C{mailserver} of another tree (a
clean export, e.g. C{git archive REV twisted_mail_screen | tar -x -C DIR}),
run in the same rotation, for a before/after from one run.

See docs/performance.md ("The pytest plugin's start-up cost").
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = 100

OURS = '''
import smtplib, pytest

@pytest.mark.parametrize("n", range({n}))
def test_send(mailserver, n):
    with smtplib.SMTP(mailserver.host, mailserver.smtp_port) as s:
        s.sendmail("a@example.test", ["b@example.test"], b"Subject: hi\\r\\n\\r\\nx\\r\\n")
    assert len(mailserver.wait_for("addressed:b@example.test")) == 1
'''

THEIRS = '''
import smtplib, pytest

@pytest.mark.parametrize("n", range({n}))
def test_send(smtpserver, n):
    host, port = smtpserver.addr
    with smtplib.SMTP(host, port) as s:
        s.sendmail("a@example.test", ["b@example.test"], b"Subject: hi\\r\\n\\r\\nx\\r\\n")
    assert len(smtpserver.outbox) == 1
'''


def start_stop(runs: int = 50) -> float:
    """Median seconds for one function-scoped server's start and stop."""
    sys.path.insert(0, ROOT)
    from twisted_mail_screen.pytest_plugin.server import build

    times = []
    with tempfile.TemporaryDirectory() as d:
        build(os.path.join(d, "warm"), {}, 5.0, lambda: ("", "")).stop()  # imports, reactor thread
        for i in range(runs):
            t = time.perf_counter()
            build(os.path.join(d, str(i)), {}, 5.0, lambda: ("", "")).stop()
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def run_suite(source: str, pycache: str, root: str = ROOT) -> tuple[float, float]:
    """Wall and CPU (user + sys) seconds of one pytest run of C{source}."""
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "test_suite.py"), "w") as f:
            f.write(source.format(n=TESTS))
        # As a user's machine runs it: compiled modules cached (a CI image
        # may set PYTHONDONTWRITEBYTECODE; then every run compiles, and
        # pytest rewrites the asserts of every module of a pytest11
        # plugin's package, ours included, each time). The cache goes to a
        # directory of its own, not into the source tree.
        env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        env.update(PYTHONPATH=root, PYTHONPYCACHEPREFIX=pycache)
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                               "test_suite.py"], cwd=d, env=env, capture_output=True, text=True)
        elapsed = time.perf_counter() - t
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0 or f"{TESTS} passed" not in done.stdout:
        raise SystemExit(f"suite failed:\n{done.stdout[-3000:]}\n{done.stderr[-2000:]}")
    # CPU time (user + sys) as well: on a loaded machine it varies far less than wall time.
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return elapsed, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--before", metavar="DIR",
                        help="also run the mailserver suite of the package tree in DIR")
    args = parser.parse_args()
    median = start_stop()
    print(f"start+stop of a function-scoped mailserver: median {median * 1000:.1f} ms over 50")
    ours: list[tuple[float, float]] = []
    theirs: list[tuple[float, float]] = []
    before: list[tuple[float, float]] = []
    with tempfile.TemporaryDirectory() as pycache, tempfile.TemporaryDirectory() as old_cache:
        run_suite(OURS, pycache)  # warm-up: fills the bytecode cache
        run_suite(THEIRS, pycache)
        if args.before:
            run_suite(OURS, old_cache, args.before)
        for _ in range(args.reps):
            if args.before:
                before.append(run_suite(OURS, old_cache, args.before))
            ours.append(run_suite(OURS, pycache))
            theirs.append(run_suite(THEIRS, pycache))
    print(f"{TESTS} tests, each with its own server (median of {args.reps}, whole pytest run):")
    for what, i in (("wall", 0), ("CPU (user+sys)", 1)):
        t = statistics.median(r[i] for r in theirs)
        print(f" {what}:")
        rows = [("mailserver, --before tree", before)] if before else []
        rows += [("mailserver (SMTP+submission+POP3+IMAP+web)", ours),
                 ("pytest-localserver smtpserver (SMTP)", theirs)]
        for name, runs in rows:
            m = statistics.median(r[i] for r in runs)
            # Each rotation's own ratio too: the machine's speed drifts between rotations.
            paired = statistics.median(r[i] / o[i] for r, o in zip(runs, theirs))
            ratio = "" if runs is theirs else \
                f"  ratio {m / t:.2f}x, per rotation {paired:.2f}x (goal <= 1.5x)"
            print(f"  {name + ':':44} {m:.2f} s  ({', '.join(f'{r[i]:.2f}' for r in runs)}){ratio}")


if __name__ == "__main__":
    main()
