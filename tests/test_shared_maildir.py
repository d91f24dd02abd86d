"""
Two `twistd -n mailscreen` processes on one data directory (one shared
Maildir volume behind a load balancer): IMAP UIDs stay unique and stable
under concurrent APPEND and EXPUNGE through both, POP3's [IN-USE] holds
across them, and a queued message is sent once when both queues run.

Like tests/test_twistd.py, these need the non-editable install.
"""

from __future__ import annotations

import imaplib
import poplib
import re
import smtplib
import subprocess
import threading
import time
from pathlib import Path

import pytest

from relay_sink import Sink, wait_for
from test_twistd import EPHEMERAL, pytestmark, twistd, wait_for_ports  # noqa: F401
from twisted_mail_screen.relay.spool import QueueDirectory, QueuedMessage, Recipient
from twisted_mail_screen.store.folderlock import try_lock, unlock

USER = "shared@example.com"


def node(tmp_path: Path, name: str, extra: str = "") -> tuple[subprocess.Popen, dict[str, int]]:
    """One server process on the shared C{tmp_path/data}, with its own control socket."""
    config = tmp_path / f"{name}.toml"
    config.write_text(
        f'data_dir = "{tmp_path / "data"}"\n'
        f'control_socket = "{tmp_path / (name + ".sock")}"\n'
        f'[listen]\nsmtp = ["{EPHEMERAL}"]\npop3 = ["{EPHEMERAL}"]\nimap = ["{EPHEMERAL}"]\n'
        'submission = []\nweb = []\n' + extra)
    proc = twistd(tmp_path, "--config", str(config))
    ports = wait_for_ports(proc, {"smtp", "pop3", "imap"})
    if not {"smtp", "pop3", "imap"} <= set(ports):
        proc.kill()
        raise AssertionError(f"node {name} did not start: {proc.communicate()[0][-3000:]}")
    # Keep reading its log so the pipe never fills and blocks the server.
    threading.Thread(target=proc.stdout.read, daemon=True).start()  # type: ignore[union-attr]
    return proc, ports


def stop(*procs: subprocess.Popen) -> None:
    for p in procs:
        p.terminate()
    for p in procs:
        p.wait(30)


def imap_login(port: int) -> imaplib.IMAP4:
    c = imaplib.IMAP4("127.0.0.1", port, timeout=30)
    c.login(USER, "whatever")
    return c


def uid_map(client: imaplib.IMAP4) -> dict[str, int]:
    """Subject -> UID of every message in INBOX, as this server sees it."""
    client.select("INBOX")
    typ, data = client.uid("FETCH", "1:*", "(UID BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
    assert typ == "OK"
    out: dict[str, int] = {}
    for item in data:
        if isinstance(item, tuple):
            uid = int(re.search(rb"UID (\d+)", item[0]).group(1))
            subject = item[1].decode().strip().removeprefix("Subject: ")
            assert subject not in out, f"{subject} listed twice"
            out[subject] = uid
    return out


def test_concurrent_append_and_expunge_through_two_nodes_keep_uids_unique_and_stable(tmp_path):
    a, ports_a = node(tmp_path, "a")
    b, ports_b = node(tmp_path, "b")
    try:
        setup = imap_login(ports_a["imap"])
        setup.append("INBOX", None, None, b"Subject: first\r\n\r\nx\r\n")  # makes the mailbox
        setup.logout()
        appended: dict[str, int] = {}
        errors: list[BaseException] = []

        def writer(port: int, tag: str) -> None:
            try:
                c = imap_login(port)
                c.select("INBOX")
                for i in range(30):
                    subject = f"{tag}-{i}"
                    typ, data = c.append("INBOX", None, None, f"Subject: {subject}\r\n\r\nbody\r\n".encode())
                    assert typ == "OK", data
                    appended[subject] = int(re.search(rb"APPENDUID \d+ (\d+)", data[0]).group(1))
                    if i % 5 == 4:
                        # Expunge one of this writer's own earlier messages.
                        victim = appended[f"{tag}-{i - 2}"]
                        assert c.uid("STORE", str(victim), "+FLAGS", "(\\Deleted)")[0] == "OK"
                        assert c.expunge()[0] == "OK"
                        del appended[f"{tag}-{i - 2}"]
                c.logout()
            except BaseException as e:  # reported by the test thread
                errors.append(e)

        threads = [threading.Thread(target=writer, args=(ports_a["imap"], "a")),
                   threading.Thread(target=writer, args=(ports_b["imap"], "b"))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors, errors
        uids = list(appended.values())
        assert len(set(uids)) == len(uids), "a UID was given to two messages"
        seen_a = uid_map(imap_login(ports_a["imap"]))
        seen_b = uid_map(imap_login(ports_b["imap"]))
        expected = dict(appended, first=seen_a.get("first"))
        # Both nodes show every surviving message under the UID its APPEND announced.
        assert seen_a == expected
        assert seen_b == expected
    finally:
        stop(a, b)


def test_pop3_on_one_node_locks_the_mailbox_on_the_other(tmp_path):
    a, ports_a = node(tmp_path, "a")
    b, ports_b = node(tmp_path, "b")
    try:
        first = poplib.POP3("127.0.0.1", ports_a["pop3"], timeout=10)
        first.user(USER)
        first.pass_("x")
        second = poplib.POP3("127.0.0.1", ports_b["pop3"], timeout=10)
        second.user(USER)
        with pytest.raises(poplib.error_proto, match=r"\[IN-USE\]"):
            second.pass_("x")
        second.quit()
        first.quit()
        third = poplib.POP3("127.0.0.1", ports_b["pop3"], timeout=10)
        third.user(USER)
        assert third.pass_("x").startswith(b"+OK")  # free again once the first session ended
        third.quit()
    finally:
        stop(a, b)


def test_a_crashed_holders_pop3_lock_is_gone_with_it(tmp_path):
    """The lock is an flock: the kernel drops it with its holder, no stale file to take over."""
    maildir = tmp_path / "box"
    maildir.mkdir()
    holder = subprocess.Popen(
        ["python3", "-c", "import fcntl,os,sys,time;fd=os.open(sys.argv[1],os.O_RDWR|os.O_CREAT);"
         "fcntl.flock(fd,fcntl.LOCK_EX);print('locked',flush=True);time.sleep(60)",
         str(maildir / "pop3.lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"  # type: ignore[union-attr]
        assert try_lock(str(maildir)) is None
        holder.kill()
        holder.wait(10)
        fd = try_lock(str(maildir))
        assert fd is not None
        unlock(fd)
    finally:
        holder.kill()


def test_a_queued_message_is_sent_once_when_both_nodes_queues_run(tmp_path):
    sink = Sink().start()
    sink.hold_greeting()  # the first attempt stays in progress, claim held, until the gate opens
    queue = QueueDirectory(str(tmp_path / "data" / "queue"))
    now = time.time()
    queue.store(QueuedMessage(id="00AB", sender="app@dev.test", created=now, next_attempt=0,
                              recipients=[Recipient("friend@remote.example")]),
                b"Subject: once\n\nhello\n")
    relay = (f'[relay]\nenabled = true\nsmarthost = "tcp:host=127.0.0.1:port={sink.port}"\n'
             'starttls = "none"\n')
    a, _ = node(tmp_path, "a", relay)
    b, _ = node(tmp_path, "b", relay)
    try:
        wait_for(lambda: sink.connections >= 1, 20, "a node connects to the smarthost")
        time.sleep(3)  # both nodes' queues poll meanwhile (the claim is held while the greeting waits)
        assert sink.connections == 1
        sink.open_gate()
        wait_for(lambda: len(sink.messages) >= 1, 20, "the message is relayed")
        wait_for(lambda: not (tmp_path / "data/queue/env/00AB.json").exists(), 10, "the envelope is removed")
        time.sleep(3)  # several more polls of both queues
        assert len(sink.messages) == 1
        assert sink.recipients() == ["friend@remote.example"]
    finally:
        stop(a, b)
        sink.stop()


def test_a_crashed_nodes_claim_is_taken_over_and_the_message_sent_once(tmp_path):
    """
    Node A takes a message queued after it started (as if another node had
    accepted it) and dies mid-attempt (kill -9); node B sends it, once.
    """
    sink = Sink().start()
    sink.hold_greeting()  # A's attempt hangs, claim held
    relay = (f'[relay]\nenabled = true\nsmarthost = "tcp:host=127.0.0.1:port={sink.port}"\n'
             'starttls = "none"\n')
    a, _ = node(tmp_path, "a", relay)
    b = None
    try:
        QueueDirectory(str(tmp_path / "data" / "queue")).store(
            QueuedMessage(id="00CD", sender="app@dev.test", created=time.time(), next_attempt=0,
                          recipients=[Recipient("friend@remote.example")]),
            b"Subject: taken over\n\nhello\n")
        wait_for(lambda: sink.connections == 1, 20, "node A picks the message up and connects")
        b, _ = node(tmp_path, "b", relay)
        time.sleep(2)
        assert sink.connections == 1  # B knows the message but A has the claim
        a.kill()
        a.wait(10)
        wait_for(lambda: sink.connections == 2, 20, "node B takes the claim over")
        sink.open_gate()
        wait_for(lambda: len(sink.messages) >= 1, 20, "the message is relayed")
        time.sleep(3)
        assert len(sink.messages) == 1
        assert not (tmp_path / "data/queue/env/00CD.json").exists()
    finally:
        stop(*[p for p in (a, b) if p is not None])
        sink.stop()


def _modseq_of(data: list) -> list[int]:
    return [int(m) for item in data if isinstance(item, bytes)
            for m in re.findall(rb"MODSEQ \((\d+)\)", item)]


def test_concurrent_stores_through_two_nodes_get_unique_rising_modseqs(tmp_path):
    """
    CONDSTORE across processes: each node gives out mod-sequences from its
    memory, caught up under the folder's lock with what the other appended,
    so the values are unique, rise in the file's order, and CHANGEDSINCE on
    either node sees the other's changes.
    """
    a, ports_a = node(tmp_path, "a")
    b, ports_b = node(tmp_path, "b")
    try:
        setup = imap_login(ports_a["imap"])
        for i in range(10):
            assert setup.append("INBOX", None, None, f"Subject: m{i}\r\n\r\nx\r\n".encode())[0] == "OK"
        setup.logout()
        given: dict[str, list[int]] = {"a": [], "b": []}
        errors: list[BaseException] = []

        def writer(port: int, tag: str, uids: range) -> None:
            try:
                c = imap_login(port)
                assert c.enable("CONDSTORE")[0] == "OK"
                c.select("INBOX")
                for i in range(40):
                    mode = "+FLAGS" if (i // len(uids)) % 2 == 0 else "-FLAGS"
                    typ, data = c.uid("STORE", str(uids[i % len(uids)]), mode, "(\\Flagged)")
                    assert typ == "OK", data
                    got = _modseq_of(data)
                    assert len(got) == 1, data
                    given[tag] += got
                c.logout()
            except BaseException as e:  # reported by the test thread
                errors.append(e)

        threads = [threading.Thread(target=writer, args=(ports_a["imap"], "a", range(1, 6))),
                   threading.Thread(target=writer, args=(ports_b["imap"], "b", range(6, 11)))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors, errors
        for tag in "ab":
            assert given[tag] == sorted(set(given[tag])), f"node {tag}'s values do not rise"
        every = given["a"] + given["b"]
        assert len(set(every)) == len(every), "a mod-sequence was given twice"
        # The file's appended lines ascend: each was written above all before it.
        lines = (tmp_path / "data/mail/example.com/shared/mailscreen-modseq").read_text().splitlines()
        written = [int(line.split()[1]) for line in lines[1:]]
        tail = written[-len(every):]
        assert tail == sorted(set(tail))
        assert set(every) <= set(written)

        # CHANGEDSINCE on each node sees a change made through the other.
        for via, seen_on, uid in ((ports_a, ports_b, 1), (ports_b, ports_a, 6)):
            writer_c, reader = imap_login(via["imap"]), imap_login(seen_on["imap"])
            assert writer_c.enable("CONDSTORE")[0] == "OK" and reader.enable("CONDSTORE")[0] == "OK"
            writer_c.select("INBOX")
            reader.select("INBOX")
            mark = max(_modseq_of(reader.uid("FETCH", "1:*", "(MODSEQ)")[1]))
            typ, data = writer_c.uid("STORE", str(uid), "+FLAGS", "(\\Answered)")
            assert typ == "OK"
            assert _modseq_of(data)[0] > mark
            reader.noop()  # the reader's node rescans the folder
            reader.untagged_responses.clear()  # the NOOP's own FETCH of the change
            typ, data = reader.uid("FETCH", "1:*", "(FLAGS)", f"(CHANGEDSINCE {mark})")
            assert typ == "OK"
            changed = [int(m) for item in data if isinstance(item, bytes)
                       for m in re.findall(rb"UID (\d+)", item)]
            assert changed == [uid], data
            writer_c.logout()
            reader.logout()
    finally:
        stop(a, b)


def _rcpt(port: int) -> int:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        s.ehlo()
        s.mail("sender@example.org")
        return s.rcpt(USER)[0]


def _deliver(port: int, subject: str) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        assert s.sendmail("sender@example.org", [USER], f"Subject: {subject}\r\n\r\nx\r\n") == {}


def _append(port: int, subject: str) -> tuple[str, list]:
    c = imap_login(port)
    try:
        return c.append("INBOX", None, None, f"Subject: {subject}\r\n\r\nx\r\n".encode())
    finally:
        c.logout()


def test_quota_usage_changed_on_one_node_decides_on_the_other(tmp_path):
    """
    Three messages allowed. Delivery, APPEND, COPY, EXPUNGE and POP3
    deletion through node A move the usage node B decides with (SMTP 452,
    APPEND NO [OVERQUOTA]), and B's through to A: the account's
    maildirsize, re-read when it changed.
    """
    quota = "[quota]\nmessages = 3\n"
    a, ports_a = node(tmp_path, "a", quota)
    b, ports_b = node(tmp_path, "b", quota)
    try:
        _deliver(ports_a["smtp"], "one")                 # A: delivery, 1 of 3
        assert _rcpt(ports_b["smtp"]) == 250             # B has read the usage (and keeps its version)
        assert _append(ports_a["imap"], "two")[0] == "OK"  # A: APPEND, 2 of 3
        c = imap_login(ports_a["imap"])
        assert c.create("Kept")[0] == "OK"
        c.select("INBOX")
        assert c.copy("1", "Kept")[0] == "OK"           # A: COPY, 3 of 3
        assert _rcpt(ports_b["smtp"]) == 452
        typ, data = _append(ports_b["imap"], "refused")
        assert typ == "NO" and data[0].startswith(b"[OVERQUOTA]"), data
        c.store("1", "+FLAGS", "(\\Deleted)")
        assert c.expunge()[0] == "OK"                    # A: EXPUNGE, 2 of 3
        assert _rcpt(ports_b["smtp"]) == 250
        _deliver(ports_a["smtp"], "three")               # 3 of 3
        c.logout()
        assert _append(ports_b["imap"], "refused")[0] == "NO"
        pop = poplib.POP3("127.0.0.1", ports_a["pop3"], timeout=30)
        pop.user(USER)
        pop.pass_("x")
        pop.dele(1)
        pop.quit()                                       # A: POP3 deletion, 2 of 3
        assert _append(ports_b["imap"], "fits")[0] == "OK"  # B: 3 of 3
        assert _rcpt(ports_a["smtp"]) == 452             # A sees B's APPEND
    finally:
        stop(a, b)
