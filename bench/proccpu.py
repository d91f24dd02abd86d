"""
CPU time of a server's whole process tree, from /proc, split by process
name (and, for a multi-threaded process, its main thread against the
others), so a run can say where each server spends its CPU per message.

A snapshot holds, per live process of the tree, its user and system
seconds, its main thread's, and its reaped children's (cutime, cstime).
The difference of two snapshots charges a process alive in both its own
growth, one born since its whole life, and one that exited since nothing
under its name: what it used after the first snapshot reaches its parent's
reaped-children time, which is counted under "reaped" less what the exited
processes had already used at the first snapshot. The total is then exact
for a tree whose processes are reaped inside it (Postfix's master reaps
its smtpd after max_use sessions), and each label is never negative.
"""

from __future__ import annotations

import collections
import os
from typing import Any, NamedTuple

TICK = os.sysconf("SC_CLK_TCK")


class Proc(NamedTuple):
    comm: str
    user: float
    system: float
    main_user: float    # the main thread's (tid == pid); the rest is the other threads'
    main_system: float
    threads: int
    reaped_user: float  # children this process waited for
    reaped_system: float
    start: int  # clock ticks after boot: tells a reused pid (a kworker's name changes as it works)


def _stat(path: str) -> tuple[str, list[str]] | None:
    try:
        with open(path) as f:
            s = f.read()
    except OSError:
        return None
    return s[s.index("(") + 1:s.rindex(")")], s[s.rindex(")") + 2:].split()


def _tree(root: int) -> list[int]:
    """C{root} and its descendants (one pass over /proc)."""
    children: dict[int, list[int]] = collections.defaultdict(list)
    for d in os.listdir("/proc"):
        if d.isdigit():
            st = _stat(f"/proc/{d}/stat")
            if st:
                children[int(st[1][1])].append(int(d))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


def snapshot(root: int) -> dict[int, Proc]:
    """The CPU seconds of C{root}'s process tree, per process."""
    snap = {}
    for pid in _tree(root):
        st = _stat(f"/proc/{pid}/stat")
        main = _stat(f"/proc/{pid}/task/{pid}/stat")
        if not st or not main:
            continue
        f, m = st[1], main[1]
        # fields after the name: 11 utime, 12 stime, 13 cutime, 14 cstime, 17 num_threads,
        # 19 starttime
        name = st[0].split("-")[0] if st[0].startswith("kworker/") else st[0]
        snap[pid] = Proc(name, int(f[11]) / TICK, int(f[12]) / TICK,
                         int(m[11]) / TICK, int(m[12]) / TICK, int(f[17]), int(f[13]) / TICK,
                         int(f[14]) / TICK, int(f[19]))
    return snap


def delta(before: dict[int, Proc], after: dict[int, Proc]) -> dict[str, tuple[float, float]]:
    """
    (user, system) seconds used between two snapshots, per label: a
    process's name, "NAME main" and "NAME threads" for a multi-threaded
    one, "reaped" for processes that exited in between.
    """
    out: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0.0])
    empty = Proc("", 0, 0, 0, 0, 1, 0, 0, 0)
    for pid, a in after.items():
        b = before.get(pid, empty)
        if b.start != a.start:  # a reused pid: the new process's whole life
            b = empty
        if a.threads > 1 or b.threads > 1:
            parts = [(f"{a.comm} main", a.main_user - b.main_user, a.main_system - b.main_system),
                     (f"{a.comm} threads", (a.user - a.main_user) - (b.user - b.main_user),
                      (a.system - a.main_system) - (b.system - b.main_system))]
        else:
            parts = [(a.comm, a.user - b.user, a.system - b.system)]
        parts.append(("reaped", a.reaped_user - b.reaped_user, a.reaped_system - b.reaped_system))
        for label, u, s in parts:
            out[label][0] += u
            out[label][1] += s
    for pid, b in before.items():
        if pid not in after or after[pid].start != b.start:  # exited: what it had used before is already in the first snapshot
            out["reaped"][0] -= b.user
            out["reaped"][1] -= b.system
    return {k: (u, s) for k, (u, s) in out.items() if abs(u) + abs(s) > 0}


def per_message(used: dict[str, tuple[float, float]], n: int) -> dict[str, float]:
    """Microseconds per message: the total, its user and system parts, and each label's total."""
    n = max(n, 1)
    u = sum(x for x, _ in used.values())
    s = sum(y for _, y in used.values())
    out = {"cpu_us": (u + s) / n * 1e6, "cpu_user_us": u / n * 1e6, "cpu_sys_us": s / n * 1e6}
    out["cpu_by"] = {k: round((x + y) / n * 1e6, 1) for k, (x, y) in
                     sorted(used.items(), key=lambda kv: -(kv[1][0] + kv[1][1]))}
    return out


def machine() -> tuple[float, float, float]:
    """The whole machine's busy, iowait and total CPU seconds so far (every process, every core)."""
    with open("/proc/stat") as f:
        f_ = [int(x) for x in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal (guest is inside user)
    idle, iowait = f_[3], f_[4]
    total = sum(f_[:8])
    return (total - idle - iowait) / TICK, iowait / TICK, total / TICK


def machine_share(before: tuple[float, float, float]) -> dict[str, float]:
    """The share of all cores busy (anyone's work) and in iowait since C{before}."""
    now = machine()
    span = max(now[2] - before[2], 1e-9)
    return {"busy": (now[0] - before[0]) / span, "iowait": (now[1] - before[1]) / span}


KTHREADD = 2  # the kernel's threads (journal commits, writeback, softirqs) descend from it


def kernel() -> dict[int, Proc]:
    """A snapshot of the kernel's threads: the disk work a process's fsync leaves to them."""
    return snapshot(KTHREADD)


def kernel_us(before: dict[int, Proc], n: int) -> dict[str, Any]:
    """The kernel threads' CPU since C{before}, per message, and its three largest users."""
    used = delta(before, kernel())
    n = max(n, 1)
    top = sorted(used.items(), key=lambda kv: -(kv[1][0] + kv[1][1]))[:3]
    return {"kernel_cpu_us": sum(u + s for u, s in used.values()) / n * 1e6,
            "kernel_by": {k: round((u + s) / n * 1e6, 1) for k, (u, s) in top}}
