"""UTF8=ACCEPT (RFC 6855) over real sockets: ENABLE, UTF-8 mailbox names both ways, SEARCH, APPEND UTF8."""

from __future__ import annotations

import imaplib

import pytest

from tests.test_imap import Raw

KINDS = ("smtp", "imap")
CAFE = "Café".encode()
MESSAGE = "From: a@example.org\r\nSubject: Grüße aus Köln\r\n\r\nHallo\r\n".encode()


@pytest.fixture
def server(start_server):
    return start_server(kinds=KINDS)


def session(server, utf8: bool) -> Raw:
    r = Raw(server.port("imap"))
    r.command(b"l", b"LOGIN bob@localhost x")
    if utf8:
        assert r.command(b"e", b"ENABLE UTF8=ACCEPT") == [b"* ENABLED UTF8=ACCEPT", b"e OK ENABLE completed"]
    return r


def ok(r: Raw, command: bytes) -> list[bytes]:
    lines = r.command(b"t", command)
    assert lines[-1].startswith(b"t OK"), lines
    return lines[:-1]


def test_announced(server):
    assert b"UTF8=ACCEPT" in Raw(server.port("imap")).greeting.split()


def test_names_are_utf8_once_enabled(server):
    legacy = session(server, utf8=False)
    ok(legacy, b'CREATE "Caf&AOk-"')
    modern = session(server, utf8=True)
    assert ok(modern, b'LIST "" "Caf*"') == [b'* LIST (\\HasNoChildren) "/" "' + CAFE + b'"']
    # a name made in UTF-8, "&" and all, is the same folder for a modified UTF-7 client
    ok(modern, b'CREATE "K' + "ö".encode() + b'ln & Bonn"')
    assert ok(legacy, b'LIST "" "K*"') == [b'* LIST (\\HasNoChildren) "/" "K&APY-ln &- Bonn"']
    assert ok(modern, b'LIST "" "K*"') == [b'* LIST (\\HasNoChildren) "/" "K' + "ö".encode() + b'ln & Bonn"']
    assert ok(modern, b'STATUS "' + CAFE + b'" (MESSAGES)') == [b'* STATUS "' + CAFE + b'" (MESSAGES 0)']
    listed = ok(modern, b'LIST "" "Caf%" RETURN (STATUS (MESSAGES))')
    assert listed[1] == b'* STATUS "' + CAFE + b'" (MESSAGES 0)'
    assert ok(legacy, b'STATUS "Caf&AOk-" (MESSAGES)') == [b'* STATUS "Caf&AOk-" (MESSAGES 0)']
    assert ok(modern, b'GETQUOTAROOT "' + CAFE + b'"')[0] == b'* QUOTAROOT "' + CAFE + b'" ""'


def test_append_utf8_literal8_then_search(server):
    r = session(server, utf8=True)
    ok(r, b'CREATE "' + CAFE + b'"')
    lines = ok(r, b'APPEND "' + CAFE + b'" (\\Seen) UTF8 (~{%d+}\r\n' % len(MESSAGE) + MESSAGE + b")")
    assert lines == []
    ok(r, b'SELECT "' + CAFE + b'"')
    assert ok(r, 'SEARCH SUBJECT "grüße"'.encode()) == [b"* SEARCH 1"]
    assert ok(r, 'UID SEARCH FROM "a@example.org" SUBJECT "köln"'.encode())[0].startswith(b"* SEARCH ")
    # RFC 6855 3 and erratum 4029: no charset label but UTF-8 once enabled
    assert r.command(b"b", 'SEARCH CHARSET UTF-8 SUBJECT "köln"'.encode())[-1].startswith(b"b BAD")
    assert r.command(b"b", b"SORT (SUBJECT) US-ASCII ALL")[-1].startswith(b"b BAD")
    assert ok(r, b"SORT (SUBJECT) UTF-8 ALL") == [b"* SORT 1"]
    assert r.command(b"b", b"THREAD REFERENCES ISO-8859-1 ALL")[-1].startswith(b"b BAD")
    assert ok(r, b"THREAD REFERENCES UTF-8 ALL") == [b"* THREAD (1)"]
    fetched = r.command(b"f", b"FETCH 1 (BODY.PEEK[])")
    assert fetched[-1].startswith(b"f OK") and MESSAGE.split(b"\r\n")[1] in fetched


def test_rules(server):
    r = session(server, utf8=False)
    reply = r.command(b"a", b"APPEND INBOX UTF8 (~{%d+}\r\n" % len(MESSAGE) + MESSAGE + b")")
    assert reply[-1].startswith(b"a BAD")  # UTF8 data only once enabled
    ok(r, b"SELECT INBOX")
    assert r.command(b"e", b"ENABLE UTF8=ACCEPT")[-1].startswith(b"e BAD")  # not after SELECT
    r2 = session(server, utf8=True)
    assert r2.command(b"a", b"APPEND INBOX UTF8 {3+}\r\nabc")[-1].startswith(b"a BAD")
    assert r2.command(b"c", b'CREATE "\xff"')[-1].startswith(b"c BAD")


def test_imaplib_utf8_mode(server):
    """Python's imaplib: after enable('UTF8=ACCEPT') it sends UTF-8 and reads UTF-8 names."""
    m = imaplib.IMAP4("127.0.0.1", server.port("imap"))
    m.login("bob@localhost", "x")
    assert m.enable("UTF8=ACCEPT")[0] == "OK"
    assert m.create('"Entwürfe alt"')[0] == "OK"
    typ, data = m.list('""', '"Entw*"')
    assert data == ['(\\HasNoChildren) "/" "Entwürfe alt"'.encode()]
    assert m.select('"Entwürfe alt"')[0] == "OK"
    m.logout()
