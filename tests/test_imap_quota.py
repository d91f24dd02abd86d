"""
QUOTA (RFC 9208) over real sockets with imaplib: the capabilities, GETQUOTA
and GETQUOTAROOT with the usage SMTP, APPEND, COPY and EXPUNGE make,
APPEND and COPY refused with NO [OVERQUOTA], MOVE allowed, SETQUOTA for
administrators only, over STARTTLS and implicit TLS too.
"""

from __future__ import annotations

import imaplib
import smtplib
import ssl

import pytest

from twisted_mail_screen.testing import EPHEMERAL

KINDS = ("smtp", "imap")
USER = "bob@localhost"
MESSAGE = b"From: a@example.org\r\nSubject: hi\r\n\r\n" + (b"x" * 48 + b"\r\n") * 20


def login(server, user: str = USER, password: str = "x") -> imaplib.IMAP4:
    m = imaplib.IMAP4("127.0.0.1", server.port("imap"))
    m.login(user, password)
    return m


def send(server, to: str = USER, body: bytes = MESSAGE) -> None:
    with smtplib.SMTP("127.0.0.1", server.port("smtp")) as s:
        s.sendmail("sender@example.org", [to], body)


def quota(m: imaplib.IMAP4, root: str = '""') -> bytes:
    typ, data = m._simple_command("GETQUOTA", root)  # imaplib's getquota() sends it unquoted
    assert typ == "OK", data
    return m._untagged_response(typ, data, "QUOTA")[1][0]


def test_capabilities_announce_quota_and_its_resources(start_server):
    server = start_server(kinds=KINDS)
    m = login(server)
    assert {"QUOTA", "QUOTA=RES-STORAGE", "QUOTA=RES-MESSAGE"} <= set(m.capabilities)
    m.logout()


def test_getquotaroot_and_getquota_report_usage_and_limits(start_server):
    server = start_server(kinds=KINDS, quota__storage_mb=1, quota__messages=10)
    send(server)
    send(server)
    m = login(server)
    typ, data = m.getquotaroot("INBOX")
    assert typ == "OK"
    roots, quotas = data
    assert roots == [b'"INBOX" ""']
    used = quotas[0]
    assert used.startswith(b'"" (STORAGE ') and used.endswith(b" 1024 MESSAGE 2 10)")
    kib = int(used.split()[2])
    assert 2 <= kib <= 4  # two messages of about 1.1 KiB with their headers
    assert quota(m) == used
    typ, data = m._simple_command("GETQUOTA", '"elsewhere"')
    assert typ == "NO" and data[0].startswith(b"[NONEXISTENT]")
    typ, data = m._simple_command("GETQUOTAROOT", "Nowhere")
    assert typ == "NO" and data[0].startswith(b"[NONEXISTENT]")
    m.logout()


def test_unlimited_account_lists_no_resources(start_server):
    server = start_server(kinds=KINDS)
    m = login(server)
    assert quota(m) == b'"" ()'
    m.logout()


def test_append_over_the_message_limit_is_refused_until_an_expunge(start_server):
    server = start_server(kinds=KINDS, quota__messages=2)
    m = login(server)
    for _ in range(2):
        assert m.append("INBOX", None, None, MESSAGE)[0] == "OK"
    typ, data = m.append("INBOX", None, None, MESSAGE)
    assert typ == "NO" and data[0].startswith(b"[OVERQUOTA]")
    m.select("INBOX")
    m.store("1", "+FLAGS", "\\Deleted")
    m.expunge()
    assert quota(m).endswith(b"MESSAGE 1 2)")
    assert m.append("INBOX", None, None, MESSAGE)[0] == "OK"
    m.logout()


def test_append_larger_than_the_whole_quota_is_refused(start_server):
    server = start_server(kinds=KINDS, quota__storage_mb=1)
    m = login(server)
    typ, data = m.append("INBOX", None, None, b"Subject: big\r\n\r\n" + (b"y" * 98 + b"\r\n") * 11300)
    assert typ == "NO" and data[0].startswith(b"[OVERQUOTA]")
    assert quota(m) == b'"" (STORAGE 0 1024)'
    m.logout()


def exactly(octets: int, tag: str = "m") -> bytes:
    """A message of exactly C{octets} as IMAP counts it (CRLF line ends: what the literal is)."""
    head = f"Subject: {tag}\r\n\r\n".encode()
    return head + b"z" * (octets - len(head) - 2) + b"\r\n"


def test_a_message_landing_exactly_at_the_storage_limit_is_taken_one_octet_more_is_not(start_server,
                                                                                        tmp_path):
    """
    The boundary, to the octet: 2 KiB of storage; 1000 + 1048 octets fill it
    exactly and are accepted, then nothing more fits (APPEND: NO [OVERQUOTA],
    SMTP RCPT: 452 4.2.2); with 1000 stored, 1049 octets are one too many.
    """
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "quota.json").write_text('{"accounts": {"%s": {"storage_kib": 2}}}' % USER)
    server = start_server(kinds=KINDS)
    m = login(server)
    assert m.append("INBOX", None, None, exactly(1000, "first"))[0] == "OK"
    typ, data = m.append("INBOX", None, None, exactly(1049, "over"))
    assert typ == "NO" and data[0].startswith(b"[OVERQUOTA]"), data
    typ, data = m.append("INBOX", None, None, exactly(1048, "fits"))
    assert typ == "OK", data
    m.select("INBOX")
    typ, data = m.fetch("1:*", "(RFC822.SIZE)")
    assert [int(x.split()[-1].rstrip(b")")) for x in data] == [1000, 1048]
    assert quota(m) == b'"" (STORAGE 2 2)'
    typ, data = m.append("INBOX", None, None, b"x")  # one octet past the limit
    assert typ == "NO" and data[0].startswith(b"[OVERQUOTA]"), data
    with smtplib.SMTP("127.0.0.1", server.port("smtp")) as s:
        s.ehlo()
        s.mail("sender@example.org")
        code, text = s.rcpt(USER)
    assert code == 452 and text.startswith(b"4.2.2")
    m.store("2", "+FLAGS", "\\Deleted")
    m.expunge()
    with smtplib.SMTP("127.0.0.1", server.port("smtp")) as s:  # SIZE= declared: exactly what is left
        s.ehlo()
        s.mail("sender@example.org", ["SIZE=1048"])
        assert s.rcpt(USER)[0] == 250
        s.rset()
        s.mail("sender@example.org", ["SIZE=1049"])
        assert s.rcpt(USER)[0] == 452
    m.logout()


def test_copy_over_quota_is_refused_and_move_is_not(start_server):
    server = start_server(kinds=KINDS, quota__messages=3)
    send(server)
    send(server)
    m = login(server)
    m.select("INBOX")
    typ, data = m.copy("1:2", "Trash")
    assert typ == "NO" and data[0].startswith(b"[OVERQUOTA]")
    assert m.copy("1", "Trash")[0] == "OK"
    assert quota(m).endswith(b"MESSAGE 3 3)")
    # Full, the account can still move mail to Trash (no usage changes) and expunge it there.
    typ, _ = m._simple_command("MOVE", "1:2", "Trash")
    assert typ == "OK"
    assert quota(m).endswith(b"MESSAGE 3 3)")
    m.select("Trash")
    m.store("1:*", "+FLAGS", "\\Deleted")
    m.expunge()
    assert quota(m).endswith(b"MESSAGE 0 3)")
    m.logout()


def test_delete_of_a_folder_frees_its_messages(start_server):
    server = start_server(kinds=KINDS, quota__messages=5)
    m = login(server)
    m.create("Old")
    for _ in range(3):
        m.append("Old", None, None, MESSAGE)
    assert quota(m).endswith(b"MESSAGE 3 5)")
    assert m.delete("Old")[0] == "OK"
    assert quota(m).endswith(b"MESSAGE 0 5)")
    m.logout()


def test_setquota_only_for_administrators(start_server, accounts):
    server = start_server(site=True, kinds=KINDS, web__admins=["alice@example.test"])
    bob = login(server, "bob@example.test", "bob-secret")
    typ, data = bob.setquota('""', "(STORAGE 10)")
    assert typ == "NO" and data[0].startswith(b"[NOPERM]")
    bob.logout()
    alice = login(server, "alice@example.test", "alice-secret")
    typ, data = alice.setquota('""', "(STORAGE 10 MESSAGE 5)")
    assert typ == "OK", data
    assert quota(alice) == b'"" (STORAGE 0 10 MESSAGE 0 5)'
    assert alice.setquota('""', "(BOGUS 1)")[0] == "NO"
    with pytest.raises(imaplib.IMAP4.error, match="BAD.*number"):
        alice._simple_command("SETQUOTA", '""', "(STORAGE x)")
    alice.logout()


@pytest.mark.parametrize("mode", ["starttls", "implicit"])
def test_getquota_over_tls(start_server, accounts, certificate, mode):
    cert, key = certificate
    server = start_server(site=True, kinds=KINDS, plaintext_auth="never", tls__certificate=cert,
                          tls__key=key, listen__imap=[EPHEMERAL, "ssl:0:interface=127.0.0.1"],
                          quota__messages=7)
    context = ssl.create_default_context(cafile=cert)
    ports = server.service.ports("imap")
    if mode == "implicit":
        m = imaplib.IMAP4_SSL("127.0.0.1", ports[1], ssl_context=context)
    else:
        m = imaplib.IMAP4("127.0.0.1", ports[0])
        m.starttls(context)
    m.login("alice@example.test", "alice-secret")
    assert quota(m) == b'"" (MESSAGE 0 7)'
    m.logout()


def test_first_count_of_a_big_account_does_not_hold_the_reactor(start_server, accounts, tmp_path):
    """20,000 messages in INBOX and a folder: the first GETQUOTA counts them in the pool, NOOPs flow."""
    from tests.test_reactor_budget import LIMIT, Client, fill, mailbox, measured

    fill(mailbox(tmp_path, "alice@example.test"), 10000)
    fill(mailbox(tmp_path, "alice@example.test", "Archive"), 10000)
    server = start_server(site=True, kinds=KINDS, quota__messages=50000)
    client = Client(server.port("imap"))
    worst, lines = measured(server.port("imap"), lambda: client.command(b"q", b'GETQUOTA ""'))
    assert lines == [b'* QUOTA "" (MESSAGE 20000 50000)', b"q OK GETQUOTA completed"]
    print(f"first GETQUOTA of 20,000 messages: slowest NOOP {worst * 1000:.1f} ms")
    assert worst < LIMIT


def test_malformed_quota_commands_get_bad_or_no(start_server, accounts):
    from tests.test_imap import Raw

    server = start_server(site=True, kinds=KINDS, web__admins=["alice@example.test"])
    raw = Raw(server.port("imap"))
    assert raw.command(b"a", b"GETQUOTA \"\"")[-1].startswith(b"a BAD")  # before login
    raw.command(b"l", b"LOGIN alice@example.test alice-secret")
    for command, answer in ((b"GETQUOTA", b"BAD"), (b"GETQUOTA (x)", b"BAD"),
                            (b'GETQUOTA "" ""', b"BAD"), (b"GETQUOTAROOT", b"BAD"),
                            (b"GETQUOTAROOT ../etc", b"NO [NONEXISTENT]"),
                            (b'SETQUOTA ""', b"BAD"), (b'SETQUOTA "" STORAGE', b"BAD"),
                            (b'SETQUOTA "" (STORAGE)', b"BAD"),
                            (b'SETQUOTA "" (STORAGE 99999999999999999999999)', b"BAD"),
                            (b'SETQUOTA "" ((STORAGE) 1)', b"BAD"),
                            (b'SETQUOTA other (STORAGE 1)', b"NO [NONEXISTENT]")):
        lines = raw.command(b"t", command)
        assert lines[-1].startswith(b"t " + answer), (command, lines)
    assert raw.command(b"n", b"NOOP") == [b"n OK NOOP completed"]
