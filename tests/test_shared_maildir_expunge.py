"""
EXPUNGE (and UID EXPUNGE, CLOSE's expunge, MOVE's taking from the source)
through servers sharing one Maildir run under the folder's cross-process
lock (dovecot-uidlist.lock), as STORE and COPY do: a flag change another
process makes under that lock happens wholly before or wholly after it.

The lock-order tests play the other process by holding the folder's lock
in the test and watching /proc/locks until the server's worker waits for
it; meanwhile they change the file as another node's STORE would. The
two-node test runs STORE, EXPUNGE, delivery and APPEND through two
`twistd -n mailscreen` processes at once.
"""

from __future__ import annotations

import imaplib
import os
import re
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import pytest

from test_shared_maildir import node, stop
from test_shared_maildir_flags import (  # noqa: F401 (pair is a fixture)
    deliver, flags_seen, inbox, letters_on_disk, login, pair, store)
from test_twistd import pytestmark as twistd_only
from twisted_mail_screen.store.folderlock import LOCK_FILE, folder_lock, try_lock, unlock


def lock_waiters(lock_file: Path) -> int:
    """How many lock requests wait for C{lock_file} (the kernel's /proc/locks lines marked ->)."""
    inode = os.stat(lock_file).st_ino
    with open("/proc/locks") as f:
        return sum(1 for line in f if "->" in line and line.split()[6].endswith(f":{inode}"))


@contextmanager
def held_while(folder: Path, command: Callable[[], object]) -> Iterator[list]:
    """
    Hold C{folder}'s lock, run C{command} (a client's request) in a thread
    and wait until the server waits for the lock; the block runs then,
    and the command's outcome is in the list after the lock is let go.
    """
    outcome: list = []

    def run() -> None:
        try:
            outcome.append(command())
        except BaseException as e:  # reported by the test thread
            outcome.append(e)

    with folder_lock(str(folder)):
        worker = threading.Thread(target=run)
        worker.start()
        deadline = time.monotonic() + 20
        while not lock_waiters(folder / LOCK_FILE):
            assert worker.is_alive(), f"answered while another process held the folder's lock: {outcome}"
            assert time.monotonic() < deadline, "the server never asked for the folder's lock"
            time.sleep(0.005)
        yield outcome
    worker.join(30)
    assert not worker.is_alive()


def base_of_uid(tmp_path: Path, uid: int) -> str:
    """A message's Maildir base name, from INBOX's dovecot-uidlist."""
    for line in (inbox(tmp_path) / "dovecot-uidlist").read_text().splitlines()[1:]:
        number, _, base = line.partition(" :")
        if int(number) == uid:
            return base
    raise AssertionError(f"UID {uid} not in the UID list")


def rename_flags(folder: Path, base: str, letters: str) -> None:
    """Another process's flag change, as a rename (it raises if the file is gone)."""
    (now,) = [p for p in (folder / "cur").iterdir() if p.name.startswith(base + ":")]
    now.rename(folder / "cur" / f"{base}:2,{letters}")


@pytest.mark.parametrize("command", ["EXPUNGE", "UID EXPUNGE", "CLOSE"])
def test_an_expunge_waits_for_the_folder_lock_and_spares_what_was_undeleted_meanwhile(
        pair, tmp_path, command):
    a, b = pair
    deliver(a.port("smtp"), 3)
    ca = login(a)
    store(ca, "1:3", "+FLAGS", "(\\Deleted)")
    kept = base_of_uid(tmp_path, 2)
    run = {"EXPUNGE": lambda: ca.expunge(), "UID EXPUNGE": lambda: ca.uid("EXPUNGE", "1:3"),
           "CLOSE": lambda: ca.close()}[command]
    with held_while(inbox(tmp_path), run) as outcome:
        rename_flags(inbox(tmp_path), kept, "S")  # message 2: \Deleted off, \Seen on
    typ, data = outcome[0]
    assert typ == "OK", data
    assert letters_on_disk(tmp_path) == {kept: "S"}
    cb = login(b)
    assert flags_seen(cb) == {2: {"\\Seen"}}
    if command != "CLOSE":
        assert flags_seen(ca) == {2: {"\\Seen"}}
    ca.logout()
    cb.logout()


def test_a_move_takes_from_the_source_under_its_lock(pair, tmp_path):
    a, b = pair
    deliver(a.port("smtp"), 2)
    ca = login(a)
    assert ca.create("Kept")[0] == "OK"
    flagged, plain = base_of_uid(tmp_path, 1), base_of_uid(tmp_path, 2)
    with held_while(inbox(tmp_path), lambda: ca.uid("MOVE", "1:2", "Kept")) as outcome:
        rename_flags(inbox(tmp_path), flagged, "F")  # another node flags message 1 meanwhile
    typ, data = outcome[0]
    assert typ == "OK", data
    assert letters_on_disk(tmp_path) == {}
    moved = dict(n.split(":2,") for n in os.listdir(inbox(tmp_path) / ".Kept" / "cur"))
    assert moved == {flagged: "F", plain: ""}  # with the flag it had when it moved
    ca.logout()


def test_a_move_takes_the_two_folders_locks_in_one_order(pair, tmp_path):
    """
    Both ways (INBOX to Kept, Kept to INBOX), the server waits for the
    first lock of the order every node uses while holding neither, so two
    nodes moving mail in opposite directions cannot each hold one.
    """
    a, b = pair
    deliver(a.port("smtp"), 1)
    ca = login(a)
    assert ca.create("Kept")[0] == "OK"
    assert ca.select("Kept")[0] == "OK"  # both folders indexed: the MOVE's job is the first to lock
    first, second = sorted([inbox(tmp_path), inbox(tmp_path) / ".Kept"], key=lambda p: os.stat(p).st_ino)
    for source, target in (("INBOX", "Kept"), ("Kept", "INBOX")):
        assert ca.select(source)[0] == "OK"
        with held_while(first, lambda: ca.uid("MOVE", "1:*", target)) as outcome:
            fd = try_lock(str(second), LOCK_FILE)
            assert fd is not None, f"MOVE {source} to {target} held one lock while waiting for the other"
            unlock(fd)
        typ, data = outcome[0]
        assert typ == "OK", data
    assert len(letters_on_disk(tmp_path)) == 1
    ca.logout()


@twistd_only
def test_store_expunge_and_deliveries_through_two_nodes_at_once(tmp_path):
    """
    A marks messages \\Deleted and expunges; B, at the same time, flags and
    unflags every message (renames of the files A expunges), appends and
    has mail delivered. UIDs stay unique and the same on both nodes, every
    message never marked \\Deleted is kept, and after a last expunge no
    file is left with \\Deleted on disk.
    """
    a, ports_a = node(tmp_path, "a")
    b, ports_b = node(tmp_path, "b")
    try:
        deliver(ports_a["smtp"], 40)
        first = subjects(login(ports_a["imap"]))
        doomed = {uid for uid in first if uid % 3 == 0}
        errors: list[BaseException] = []
        appended: dict[str, int] = {}

        def expunger() -> None:
            try:
                c = login(ports_a["imap"])
                for i, uid in enumerate(sorted(doomed)):
                    store(c, uid, "+FLAGS", "(\\Deleted)")
                    if i % 3 == 2:
                        assert c.expunge()[0] == "OK"
                c.logout()
            except BaseException as e:
                errors.append(e)

        def flagger() -> None:
            try:
                c = login(ports_b["imap"])
                for i in range(4):
                    store(c, "1:*", "+FLAGS" if i % 2 == 0 else "-FLAGS", "(\\Flagged)")
                    typ, data = c.append("INBOX", None, None, f"Subject: b-{i}\r\n\r\nx\r\n".encode())
                    assert typ == "OK", data
                    appended[f"b-{i}"] = int(re.search(rb"APPENDUID \d+ (\d+)", data[0]).group(1))
                    deliver(ports_b["smtp"], 1)
                c.logout()
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=expunger), threading.Thread(target=flagger)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors, errors
        last = login(ports_b["imap"])
        assert last.expunge()[0] == "OK"
        last.logout()
        seen_a, seen_b = subjects(login(ports_a["imap"])), subjects(login(ports_b["imap"]))
        assert seen_a == seen_b
        for uid, subject in first.items():
            if uid not in doomed:
                assert seen_a.get(uid) == subject, f"UID {uid} ({subject}) lost or renumbered"
        assert not doomed & set(seen_a)
        for subject, uid in appended.items():
            assert seen_a.get(uid) == subject
        on_disk = letters_on_disk(tmp_path)
        assert len(on_disk) == len(seen_a) == 40 - len(doomed) + 8
        assert not [info for info in on_disk.values() if "T" in info]
    finally:
        stop(a, b)


def subjects(c: imaplib.IMAP4) -> dict[int, str]:
    """UID -> Subject of every message in INBOX, as this node sees it (UIDs listed once)."""
    assert c.noop()[0] == "OK"
    typ, data = c.uid("FETCH", "1:*", "(UID BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
    assert typ == "OK"
    out: dict[int, str] = {}
    for item in data:
        if isinstance(item, tuple):
            uid = int(re.search(rb"UID (\d+)", item[0]).group(1))
            assert uid not in out, f"UID {uid} listed twice"
            out[uid] = item[1].decode().strip().removeprefix("Subject: ")
    c.logout()
    return out
