#!/usr/bin/env python3
"""
What a function-scoped test mail server costs a pytest suite.

1. In this process: start and stop a C{mailserver}-fixture server (SMTP
   bound, the other listeners on demand; fresh data directory) 50 times;
   the median.
2. Two generated suites of 100 tests, each test with its own server,
   sending one message with smtplib and checking it arrived: one uses our
   C{mailserver} (SMTP, submission, POP3, IMAP), the other
   pytest-localserver's C{smtpserver} (SMTP only, aiosmtpd). Each runs
   in its own pytest subprocess, alternately, C{--reps} times; the median
   wall times and their ratio (goal: at most 1.5). A third suite is
   ours with each test also reading the submission, POP3, IMAP and web
   ports, which binds them (a test that reads only C{smtp_port} binds
   one socket: docs/testing.md). All after one
   warm-up run each, with the bytecode cache on (in a temporary
   directory), as on a developer's machine.

    pip install -r bench/requirements.txt     # pytest-localserver
    python bench/plugin_startup.py [--reps 3] [--before DIR]

Each run gets a fresh C{--basetemp} (so no run pays pytest's clean-up of
another run's directories, as the runs of a shared basetemp root do, by
turns), and the removal of that run's own temporary tree is counted in
its time: pytest removes one old run's tree at the end of every later
run, so that is what a suite costs a developer in the steady state.
Two sets of runs: with every pytest plugin installed here (the test
extra's, hypothesis among them: its summary imports hypothesis, ~0.3 s,
in both suites), and with only the plugin under test
(C{PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 -p ...}).

C{--tmp DIR}: the runs' directories (with each run's basetemp) in DIR,
e.g. C{/dev/shm}, for the figure on a tmpfs C{/tmp} (where pytest puts
its basetemp by default), apart from a disk file system's inode
allocator (docs/performance.md, "Session 13").

C{--before DIR}: a further suite, the C{mailserver} of another tree (a
clean export, e.g. C{git archive REV twisted_mail_screen | tar -x -C DIR}),
run in the same rotation, for a before/after from one run.

See docs/performance.md ("The pytest plugin's start-up cost").
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
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

#: The same, each test also reading the other four ports (binding them:
#: a plugin server binds all but SMTP when the test first reads their port).
OURS_ALL_PORTS = OURS.replace(
    "    with smtplib.SMTP(mailserver.host, mailserver.smtp_port) as s:",
    "    assert len(set((mailserver.submission_port, mailserver.pop3_port, mailserver.imap_port,\n"
    "                    mailserver.web_port))) == 4\n"
    "    with smtplib.SMTP(mailserver.host, mailserver.smtp_port) as s:")

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


#: The plugin each suite needs, for the runs with only that plugin loaded.
PLUGINS = {OURS: "twisted_mail_screen.pytest_plugin", OURS_ALL_PORTS: "twisted_mail_screen.pytest_plugin",
           THEIRS: "pytest_localserver.plugin"}


def run_suite(source: str, pycache: str, root: str = ROOT, alone: bool = False,
              tmp: str | None = None) -> tuple[float, float]:
    """
    Wall and CPU (user + sys) seconds of one pytest run of C{source} and
    of removing its temporary directories; C{alone}: with only its plugin;
    C{tmp}: where the run's directory and its basetemp go.
    """
    with tempfile.TemporaryDirectory(dir=tmp) as d:
        with open(os.path.join(d, "test_suite.py"), "w") as f:
            f.write(source.format(n=TESTS))
        # As a user's machine runs it: compiled modules cached (a CI image
        # may set PYTHONDONTWRITEBYTECODE; then every run compiles, and
        # pytest rewrites the asserts of every module of a pytest11
        # plugin's package, ours included, each time). The cache goes to a
        # directory of its own, not into the source tree.
        env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        env.update(PYTHONPATH=root, PYTHONPYCACHEPREFIX=pycache)
        plugins = ["-p", PLUGINS[source]] if alone else []
        if alone:
            env["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"
        basetemp = os.path.join(d, "basetemp")
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        own = time.process_time()
        t = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                               *plugins, f"--basetemp={basetemp}", "test_suite.py"],
                              cwd=d, env=env, capture_output=True, text=True)
        shutil.rmtree(basetemp, ignore_errors=True)
        elapsed = time.perf_counter() - t
        own = time.process_time() - own
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0 or f"{TESTS} passed" not in done.stdout:
        raise SystemExit(f"suite failed:\n{done.stdout[-3000:]}\n{done.stderr[-2000:]}")
    # CPU time (user + sys) as well: on a loaded machine it varies far less than wall time.
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime) + own
    return elapsed, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--before", metavar="DIR",
                        help="also run the mailserver suite of the package tree in DIR")
    parser.add_argument("--tmp", metavar="DIR",
                        help="where each run's directory and basetemp go (default: the "
                             "system's temporary directory, as pytest's own default)")
    args = parser.parse_args()
    median = start_stop()
    print(f"start+stop of a function-scoped mailserver: median {median * 1000:.1f} ms over 50")
    # (set, suite) -> [(wall, cpu)]; the sets and suites interleaved in one rotation
    runs: dict[tuple[bool, str], list[tuple[float, float]]] = {}
    with tempfile.TemporaryDirectory() as pycache, tempfile.TemporaryDirectory() as old_cache:
        suites = [("ours", OURS, pycache, ROOT), ("all-ports", OURS_ALL_PORTS, pycache, ROOT),
                  ("theirs", THEIRS, pycache, ROOT)]
        if args.before:
            suites.insert(0, ("before", OURS, old_cache, args.before))
        for _, source, cache, root in suites:  # warm-up: fills the bytecode caches
            run_suite(source, cache, root, tmp=args.tmp)
        for _ in range(args.reps):
            for alone in (False, True):
                for name, source, cache, root in suites:
                    runs.setdefault((alone, name), []).append(run_suite(source, cache, root, alone, args.tmp))
    print(f"{TESTS} tests, each with its own server (median of {args.reps}, whole pytest run "
          f"and the removal of its temporary directories):")
    names = {"before": "mailserver, --before tree",
             "ours": "mailserver (SMTP+submission+POP3+IMAP+web)",
             "all-ports": "mailserver, each test reading all five ports",
             "theirs": "pytest-localserver smtpserver (SMTP)"}
    for alone in (False, True):
        print("only the plugin under test loaded:" if alone else "every installed pytest plugin loaded:")
        theirs = runs[(alone, "theirs")]
        for what, i in (("wall", 0), ("CPU (user+sys)", 1)):
            t = statistics.median(r[i] for r in theirs)
            print(f" {what}:")
            for name, _, _, _ in suites:
                mine = runs[(alone, name)]
                m = statistics.median(r[i] for r in mine)
                # Each rotation's own ratio too: the machine's speed drifts between rotations.
                paired = statistics.median(r[i] / o[i] for r, o in zip(mine, theirs))
                ratio = "" if name == "theirs" else \
                    f"  ratio {m / t:.2f}x, per rotation {paired:.2f}x (goal <= 1.5x)"
                print(f"  {names[name] + ':':44} {m:.2f} s  ({', '.join(f'{r[i]:.2f}' for r in mine)}){ratio}")


if __name__ == "__main__":
    main()
