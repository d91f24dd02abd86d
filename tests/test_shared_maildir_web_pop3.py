"""
The web port's read marks and deletions (Mailpit's PUT and DELETE
/api/v1/messages) and POP3's deletions at QUIT run under the folder's
cross-process lock (dovecot-uidlist.lock), as IMAP's STORE, EXPUNGE and
MOVE do: a flag rename another node makes under that lock happens wholly
before or wholly after them, so it neither loses the web's read mark nor
brings back a message deleted through the web or POP3.

As in tests/test_shared_maildir_expunge.py, the test plays the other node:
it holds the folder's lock, watches /proc/locks until the server's worker
waits for it, and meanwhile renames the message's file as another node's
STORE would.
"""

from __future__ import annotations

import os
import poplib
import ssl
from pathlib import Path

import pytest
from twisted.internet.task import Clock

from conftest import log_lines
from test_shared_maildir_expunge import held_while
from test_shared_maildir_flags import USER, deliver, inbox, letters_on_disk
from twisted_mail_screen.store.folderlock import try_lock
from twisted_mail_screen.store.message_ids import MessageRef
from webclient import basic, call

KINDS = ("smtp", "pop3", "web")


@pytest.fixture
def server(request, start_server, tmp_path, certificate):
    """
    One server (test-host mode) whose folder polls never run; two messages
    in INBOX's new/. Indirect parameter C{"stls"}: with a certificate, so
    POP3 sessions go inside STLS.
    """
    cert, key = certificate
    tls = {"tls__certificate": cert, "tls__key": key} if getattr(request, "param", "") == "stls" else {}
    running = start_server(kinds=KINDS, clock=Clock(), control_socket=str(tmp_path / "a.sock"), **tls)
    deliver(running.port("smtp"), 2)
    return running


@pytest.fixture(autouse=True)
def nothing_failed_in_the_log():
    """Waiting for the lock is no error: no traceback, no failed job logged."""
    with log_lines("Traceback", "Unhandled", "failed") as lines:
        yield
    assert lines == []


def bases(tmp_path: Path) -> list[str]:
    return sorted(letters_on_disk(tmp_path))


def message_id(base: str) -> str:
    return MessageRef(USER, "", base).id


def rename_to(folder: Path, base: str, letters: str) -> None:
    """Another node's flag change: the file, wherever it is now (new/ or cur/), renamed (raises if gone)."""
    (now,) = [folder / sub / name for sub in ("new", "cur") for name in os.listdir(folder / sub)
              if name == base or name.startswith(base + ":")]
    now.rename(folder / "cur" / f"{base}:2,{letters}")


def listed_ids(port: int) -> set[str]:
    reply = call(port, "GET", "/api/v1/messages")
    assert reply.status == 200, reply.body
    return {m["ID"] for m in reply.json["messages"]}


@pytest.mark.parametrize("scope", ["IDs", "all", "open"])
def test_a_web_read_mark_waits_for_the_folder_lock_and_lands_on_the_other_nodes_flags(
        server, tmp_path, scope):
    """By IDs, all messages, or by opening the message (which marks it read, as Mailpit does)."""
    port = server.port("web")
    marked, other = bases(tmp_path)
    assert listed_ids(port) == {message_id(marked), message_id(other)}
    if scope == "open":
        request = ("GET", f"/api/v1/message/{message_id(marked)}", None)
    else:
        body = {"IDs": [message_id(marked)], "Read": True} if scope == "IDs" else {"Read": True}
        request = ("PUT", "/api/v1/messages", body)
    with held_while(inbox(tmp_path), lambda: call(port, *request, timeout=30)) as outcome:
        rename_to(inbox(tmp_path), marked, "F")  # another node's STORE +FLAGS (\Flagged)
    assert outcome[0].status == 200, outcome[0].body
    want = {marked: "FS", other: "S" if scope == "all" else ""}
    assert letters_on_disk(tmp_path) == want


def test_a_web_unread_mark_keeps_a_flag_another_node_set_meanwhile(server, tmp_path):
    port = server.port("web")
    marked, other = bases(tmp_path)
    rename_to(inbox(tmp_path), marked, "S")
    body = {"IDs": [message_id(marked)], "Read": False}
    with held_while(inbox(tmp_path), lambda: call(port, "PUT", "/api/v1/messages", body, timeout=30)) as outcome:
        rename_to(inbox(tmp_path), marked, "FS")
    assert outcome[0].status == 200, outcome[0].body
    assert letters_on_disk(tmp_path) == {marked: "F", other: ""}


@pytest.mark.parametrize("scope,meanwhile", [("IDs", "renamed"), ("all", "renamed"), ("IDs", "expunged")])
def test_a_web_delete_waits_for_the_folder_lock_and_removes_the_renamed_file(
        server, tmp_path, scope, meanwhile):
    port = server.port("web")
    doomed, other = bases(tmp_path)
    body = {"IDs": [message_id(doomed)]} if scope == "IDs" else None
    with held_while(inbox(tmp_path), lambda: call(port, "DELETE", "/api/v1/messages", body, timeout=30)) as outcome:
        if meanwhile == "renamed":
            rename_to(inbox(tmp_path), doomed, "FS")  # another node's STORE: the name the web listed is gone
        else:
            (inbox(tmp_path) / "new" / doomed).unlink()  # another node's EXPUNGE (or POP3 deletion)
    assert outcome[0].status == 200, outcome[0].body
    assert letters_on_disk(tmp_path) == ({} if scope == "all" else {other: ""})
    assert listed_ids(port) == (set() if scope == "all" else {message_id(other)})


def pop3_session(server) -> poplib.POP3:
    """A POP3 connection, inside STLS when the server has TLS (verifying its certificate)."""
    c = poplib.POP3("127.0.0.1", server.port("pop3"), timeout=30)
    if server.config.tls.enabled:
        context = ssl.create_default_context(cafile=server.config.tls.certificate)
        context.check_hostname = False
        c.stls(context)
    return c


def pop3_login(server) -> poplib.POP3:
    c = pop3_session(server)
    c.user(USER)
    c.pass_("whatever")
    return c


@pytest.mark.parametrize("server", ["plain", "stls"], indirect=True)
@pytest.mark.parametrize("meanwhile", ["renamed", "expunged"])
def test_pop3_deletions_at_quit_wait_for_the_folder_lock_and_keep_the_mailbox_in_use(
        server, tmp_path, meanwhile):
    """
    While QUIT waits for the folder's lock the session still holds the
    mailbox: its pop3.lock is held (another node's session would get
    [IN-USE]) and a second POP3 session here gets [IN-USE]. A file another node
    renamed meanwhile is removed by its new name; one it expunged is simply gone.
    """
    c = pop3_login(server)
    uidls = dict(line.decode().split() for line in c.uidl()[1])
    doomed = next(b for b in bases(tmp_path) if uidls["1"] in b)
    (other,) = set(bases(tmp_path)) - {doomed}
    assert c.dele(1).startswith(b"+OK")
    with held_while(inbox(tmp_path), c.quit) as outcome:
        if meanwhile == "renamed":
            rename_to(inbox(tmp_path), doomed, "S")  # another node's SELECT and read of it
        else:
            (inbox(tmp_path) / "new" / doomed).unlink()
        assert try_lock(str(inbox(tmp_path))) is None  # pop3.lock, as another node would try it
        second = pop3_session(server)
        second.user(USER)
        with pytest.raises(poplib.error_proto, match=r"\[IN-USE\]"):
            second.pass_("whatever")
        second.close()
    assert outcome[0].startswith(b"+OK"), outcome[0]
    assert letters_on_disk(tmp_path) == {other: ""}
    again = pop3_login(server)  # the session's lock went with it
    assert again.stat()[0] == 1
    again.quit()


def test_web_changes_for_a_mailbox_with_no_maildir_yet_do_nothing(start_server, accounts, tmp_path):
    """No folder, no lock file to take: a read mark or a deletion of everything is a plain 200."""
    server = start_server(site=True, kinds=("web",))
    port = server.port("web")
    bob = basic("bob@example.test", "bob-secret")
    assert call(port, "PUT", "/api/v1/messages", {"Read": True}, headers=bob).status == 200
    assert call(port, "DELETE", "/api/v1/messages", headers=bob).status == 200
    assert not (tmp_path / "data/mail/example.test/bob").exists()
