"""
The benchmark's records turned into results: per-server medians, each
ratio as the median of the per-repetition ratios, the targets met or
missed, the Markdown table and the ratio chart; and the progress bar.
"""

from __future__ import annotations

import statistics
import sys
import time
from typing import Any

import imap_bench

HIGHER, LOWER = "higher", "lower"  # which direction is better, per unit
CEILING = "fsync-ceiling"


class Progress:
    def __init__(self, total: int) -> None:
        self.total, self.done, self.start = max(total, 1), 0, time.monotonic()

    def step(self, label: str) -> None:
        self.done += 1
        frac = min(1.0, self.done / self.total)
        bar = "#" * int(frac * 30)
        eta = (time.monotonic() - self.start) / frac * (1 - frac) if frac else 0
        sys.stderr.write(f"\r[{bar:<30}] {self.done}/{self.total} eta {eta:4.0f}s {label[:48]:<48}")
        sys.stderr.flush()

    def finish(self) -> None:
        sys.stderr.write("\n")


def key(rec: dict[str, Any]) -> str:
    p = rec["params"]
    return rec["workload"] + "".join(f" {k}={v}" for k, v in p.items())


OURS = ("ours", "ours-site")


def pair_ratio(recs: list[dict[str, Any]], other: list[dict[str, Any]]) -> float | None:
    """
    The median over repetitions of C{recs}' value relative to C{other}'s in
    the same repetition (> 1: C{recs} better, whichever way "better" points):
    runs made next to each other are compared, so a swing of the machine
    between repetitions cancels instead of landing on one side.
    """
    theirs = {r["rep"]: r["value"] for r in other}
    ratios = []
    for r in recs:
        o = theirs.get(r["rep"])
        if not o or not r["value"]:
            continue
        ratios.append(r["value"] / o if r["better"] == HIGHER else o / r["value"])
    return statistics.median(ratios) if ratios else None


def summarise(records: list[dict[str, Any]]) -> dict[str, Any]:
    groups: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for r in records:
        groups.setdefault(key(r), {}).setdefault(r["server"], []).append(r)
    out: dict[str, Any] = {}
    for k, by_server in groups.items():
        row: dict[str, Any] = {}
        for server, recs in by_server.items():
            vals = [r["value"] for r in recs]
            row[server] = {"median": statistics.median(vals), "min": min(vals), "max": max(vals),
                           "unit": recs[0]["unit"], "better": recs[0]["better"],
                           "files_match": all(r.get("files_match", True) for r in recs),
                           "errors": sum(r.get("errors", 0) for r in recs)}
            row[server].update(_cpu_medians(recs))
        if CEILING in by_server:  # every entrant against the disk work it was measured next to
            for server in row:
                if server != CEILING:
                    ratio = pair_ratio(by_server[server], by_server[CEILING])
                    if ratio is not None:
                        row[server]["vs_ceiling"] = ratio
        for me in OURS:
            if me not in row:
                continue
            for server in row:
                if server != me:
                    ratio = pair_ratio(by_server[me], by_server[server])
                    if ratio is not None:
                        row[me].setdefault("ratios", {})[server] = ratio
        if "ours-screening-on" in by_server and "ours-screening-off" in by_server:
            row["ours-screening-on"]["ratios"] = {"ours-screening-off": pair_ratio(
                by_server["ours-screening-on"], by_server["ours-screening-off"])}
        out[k] = row
    return out


def _cpu_medians(recs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over repetitions of the CPU per message (server, client, and by process)."""
    out: dict[str, Any] = {}
    for k in ("cpu_us", "cpu_user_us", "cpu_sys_us", "client_cpu_us", "kernel_cpu_us", "busy",
              "iowait"):
        vals = [r[k] for r in recs if r.get(k) is not None]
        if vals:
            out[k] = statistics.median(vals)
    labels = {label for r in recs for label in r.get("cpu_by", {})}
    if labels:
        by = {label: statistics.median(r.get("cpu_by", {}).get(label, 0.0) for r in recs)
              for label in labels}
        out["cpu_by"] = dict(sorted(by.items(), key=lambda kv: -kv[1]))
    return out


def _median(summary: dict[str, Any], k: str, server: str) -> float | None:
    return summary.get(k, {}).get(server, {}).get("median")


def _ratio(summary: dict[str, Any], k: str | None, server: str, peer: str) -> float | None:
    return summary.get(k or "", {}).get(server, {}).get("ratios", {}).get(peer)


def evaluate(summary: dict[str, Any], notes: dict[str, Any],
             imap_counts: list[int]) -> list[dict[str, Any]]:
    out = []
    smtp = "smtp_ingest concurrency=16 size=2048 per_conn=1"

    def target(name: str, value: float | None, goal: float, why_missing: str,
               at_most: bool = False) -> None:
        met = None if value is None else (value <= goal if at_most else value >= goal)
        out.append({"target": name, "goal": goal, "value": value, "met": met, "at_most": at_most,
                    "note": why_missing if value is None else ""})

    for me in OURS:
        target(f"SMTP fsync'd ingest / fsync ceiling ({me})", _ratio(summary, smtp, me, CEILING),
               0.85, "no ceiling measured")
        for peer, goal in (("postfix", 1.3), ("aiosmtpd-fsync", 1.4)):
            target(f"SMTP ingest / {peer} ({me})", _ratio(summary, smtp, me, peer), goal,
                   notes.get(peer, "not measured"))
        k = next((x for x in summary if x.startswith("pop3_list_retr")), None)
        # within 1.5x Dovecot's time: dovecot_time / our_time >= 1/1.5
        target(f"POP3 LIST+RETR: Dovecot time / ours (>= 1/1.5) ({me})",
               _ratio(summary, k, me, "dovecot"), round(1 / 1.5, 3), notes.get("dovecot", "not measured"))
        imap_bench.targets(summary, imap_counts, target, notes.get("imap", notes.get("dovecot", "not measured")),
                           me, lambda k, me=me: _ratio(summary, k, me, "dovecot"))
    accept = next((x for x in summary if x.startswith("accept ")), None)
    target("accept rate screening on / off, 10^4 source addresses (>= 0.95)",
           _ratio(summary, accept, "ours-screening-on", "ours-screening-off")
           if "screening" not in notes else None, 0.95, notes.get("screening", "not measured"))
    core = notes.get("screening_core")
    rows = core if isinstance(core, list) else []
    million = next((r for r in rows if r["n"] == 1_000_000 and r.get("kind") == "one"), None)
    hostile = next((r for r in rows if r["n"] == 1_000_000 and r.get("kind") == "hostile"), None)
    target("screening core: RSS with 10^6 hostile clients, a failure each (MB)",
           hostile["rss_mb"] if hostile else None, 200, "10^6 not measured", at_most=True)
    target("screening core: decision with 10^6 tracked (us)",
           million["decide_us"] if million else None, 5, "10^6 not measured", at_most=True)
    return out


def fmt(v: float, unit: str) -> str:
    if unit == "s":
        return f"{v:.3f}"
    if v >= 100:
        return f"{v:,.0f}"
    return f"{v:.2f}"


def markdown(meta: dict[str, Any], summary: dict[str, Any], targets: list[dict[str, Any]],
             notes: dict[str, str]) -> str:
    lines = [f"# Benchmark results ({meta['when']})", "",
             f"{meta['machine']}; Python {meta['python']}; {meta['reps']} repetitions, "
             f"{meta['duration_s']} s per SMTP/accept run, interleaved. Median (min-max). "
             "Server order rotated each repetition. Ratios are ours (test-host mode) and "
             "ours-site (site mode) relative to the peer, each the median of the per-repetition "
             "ratios; > 1 = ours better (rates: ours/peer; times: peer/ours). "
             "`!` = Maildir file count differed from the 250s counted. "
             "/ ceiling: this entrant's rate relative to the fsync ceiling's in the same "
             "repetition (median). CPU: microseconds per message of the server's process tree, "
             "and of the load client; for the ceiling, its threads' per delivery. "
             "`postfix-delivered`: Postfix's rate into the Maildir (start to the last file in "
             "new/), its CPU including delivery. Machine busy: the share of all cores busy "
             "during the run, anyone's work (other processes included); kernel threads: the CPU "
             "per message of the kernel's own threads (journal commits, writeback, softirqs) "
             "during the run, which a process's fsync leaves to them.", "",
             "| workload | server | median | min-max | unit | ours vs this | ours-site vs this "
             "| / ceiling | CPU us/msg | client CPU us/msg |",
             "| --- | --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    for k, row in summary.items():
        cols = []
        for me in OURS:
            cols.append(row.get(me, {}).get("ratios", {}))
        if "ours-screening-on" in row and "ours" not in row:
            cols[0] = row["ours-screening-on"].get("ratios", {})
        for server, s in row.items():
            flag = "" if s["files_match"] else " !"
            rs = [f"{c[server]:.2f}x" if c.get(server) else "" for c in cols]
            extra = [f"{s['vs_ceiling']:.2f}" if s.get("vs_ceiling") else "",
                     f"{s['cpu_us']:,.0f}" if s.get("cpu_us") is not None else "",
                     f"{s['client_cpu_us']:,.0f}" if s.get("client_cpu_us") is not None else ""]
            lines.append(f"| {k} | {server}{flag} | {fmt(s['median'], s['unit'])} | "
                         f"{fmt(s['min'], s['unit'])}-{fmt(s['max'], s['unit'])} | {s['unit']} | "
                         f"{rs[0]} | {rs[1]} | {' | '.join(extra)} |")
    cpu_rows = [(k, server, s) for k, row in summary.items() for server, s in row.items()
                if s.get("cpu_by") or s.get("cpu_sys_us") is not None]
    if cpu_rows:
        lines += ["", "## CPU per message, where it goes (medians, us)", "",
                  "| workload | server | user | system | by process (and thread) "
                  "| kernel threads | machine busy | iowait |",
                  "| --- | --- | ---: | ---: | --- | ---: | ---: | ---: |"]
        for k, server, s in cpu_rows:
            by = ", ".join(f"{label} {v:,.0f}" for label, v in s.get("cpu_by", {}).items()
                           if abs(v) >= 0.5)
            share = [f"{s[x]:.0%}" if s.get(x) is not None else "" for x in ("busy", "iowait")]
            kern = f"{s['kernel_cpu_us']:,.0f}" if s.get("kernel_cpu_us") is not None else ""
            lines.append(f"| {k} | {server} | {s.get('cpu_user_us', 0):,.0f} | "
                         f"{s.get('cpu_sys_us', 0):,.0f} | {by} | {kern} | {share[0]} | "
                         f"{share[1]} |")
    lines += ["", "## Targets (2 cores, 2 KB, concurrency 16)", "",
              "| target | goal | measured | met |", "| --- | ---: | ---: | --- |"]
    for t in targets:
        met = "pending" if t["met"] is None else ("yes" if t["met"] else "**MISSED**")
        val = "-" if t["value"] is None else f"{t['value']:.2f}"
        goal = f"<= {t['goal']}" if t.get("at_most") else t["goal"]
        lines.append(f"| {t['target']} | {goal} | {val} | {met} {t['note']} |")
    core = notes.get("screening_core")
    if isinstance(core, list):
        lines += ["", "## Screening core", "",
                  "| addresses | insert us | decide us | auth us | RSS MB | RSS after auth MB | B/client |",
                  "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r in core:
            if r.get("kind", "one") != "one":
                continue
            lines.append(f"| {r['n']:,} | {r['insert_us']:.2f} | {r['decide_us']:.2f} | "
                         f"{r['auth_us']:.2f} | {r['rss_mb']:.1f} | {r['rss_end_mb']:.1f} | "
                         f"{r['bytes_per_client']:.0f} |")
        lines += ["", "Hostile clients: every address connected twice and failed a login "
                  "(default, non-zero limits), so each holds a full record.", "",
                  "| addresses | us per client | RSS MB | empty MB | B/client |",
                  "| ---: | ---: | ---: | ---: | ---: |"]
        for r in core:
            if r.get("kind") == "hostile":
                lines.append(f"| {r['n']:,} | {r['us_per_client']:.2f} | {r['rss_mb']:.1f} | "
                             f"{r['rss_before_mb']:.1f} | {r['bytes_per_client']:.0f} |")
    lines += ["", "## Notes", ""]
    for k, v in notes.items():
        if k != "screening_core" or not isinstance(v, list):
            lines.append(f"- {k}: {v}")
    return "\n".join(lines) + "\n"


def chart(summary: dict[str, Any], path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    labels, values, colours = [], [], []
    for k, row in summary.items():
        for peer, ratio in row.get("ours", {}).get("ratios", {}).items():
            labels.append(f"{k.replace('smtp_ingest ', '').replace('concurrency=', 'c')} vs {peer}")
            values.append(ratio)
            colours.append("tab:green" if ratio >= 1 else "tab:red")
    if not labels:
        return
    fig, ax = plt.subplots(figsize=(10, max(3, 0.28 * len(labels))))
    ax.barh(range(len(labels)), values, color=colours)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xlabel("ours relative to peer (>1 = ours better)")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
