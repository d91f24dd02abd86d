"""POP3 over real sockets with poplib, on mail delivered by SMTP."""

from __future__ import annotations

import os
import poplib
import smtplib
import socket
import ssl

import pytest

from conftest import maildir_files


def deliver(server, rcpt: str, *bodies: bytes) -> None:
    client = smtplib.SMTP("127.0.0.1", server.port("smtp"), timeout=10)
    for body in bodies:
        client.sendmail("sender@x.test", [rcpt], body)
    client.quit()


def login(server, user: str = "u@x.test", password: str = "any") -> poplib.POP3:
    pop = poplib.POP3("127.0.0.1", server.port("pop3"), timeout=10)
    pop.user(user)
    pop.pass_(password)
    return pop


def login_when_unlocked(server) -> poplib.POP3:
    """Log in once the server has noticed a dropped session and released its lock."""
    import time
    deadline = time.monotonic() + 5
    while True:
        try:
            return login(server)
        except poplib.error_proto as e:
            if b"IN-USE" not in e.args[0] or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def test_retrieve_is_byte_identical(start_server):
    """RETR returns exactly what SMTP accepted (after our two trace headers), dots included."""
    server = start_server()
    sent = b"Subject: t\r\n\r\n.starts with a dot\r\n\r\n..two\r\nend\r\n"
    deliver(server, "u@x.test", sent)
    pop = login(server)
    _, lines, octets = pop.retr(1)
    got = b"\r\n".join(lines) + b"\r\n"
    assert got.endswith(sent)
    assert pop.list()[1] == [b"1 %d" % pop.stat()[1]]
    pop.quit()


def test_list_sizes_match_retrieved_octets(start_server):
    """LIST reports the size with CRLF line endings, as RFC 1939 requires."""
    server = start_server()
    deliver(server, "u@x.test", b"Subject: a\r\n\r\n" + b"line\r\n" * 100)
    pop = login(server)
    size = int(pop.list(1).split()[2])
    _, lines, _ = pop.retr(1)
    assert size == sum(len(l) + 2 for l in lines)
    pop.quit()


def test_dele_then_dropped_connection_deletes_nothing(start_server, tmp_path):
    """DELE marks only; a connection that drops without QUIT deletes nothing."""
    server = start_server()
    deliver(server, "u@x.test", b"Subject: 1\r\n\r\n1\r\n", b"Subject: 2\r\n\r\n2\r\n")
    pop = login(server)
    pop.dele(1)
    assert pop.stat()[0] == 1
    pop.file.close()
    pop.sock.close()
    pop = login_when_unlocked(server)
    assert pop.stat()[0] == 2
    pop.quit()
    assert len(maildir_files(tmp_path / "data", "u@x.test")) == 2


def test_dele_then_quit_deletes(start_server, tmp_path):
    """DELE then QUIT removes the message files in the UPDATE state."""
    server = start_server()
    deliver(server, "u@x.test", b"Subject: 1\r\n\r\n1\r\n", b"Subject: 2\r\n\r\n2\r\n")
    pop = login(server)
    pop.dele(1)
    assert pop.quit().startswith(b"+OK")
    [left] = maildir_files(tmp_path / "data", "u@x.test")
    assert b"Subject: 2" in left.read_bytes()


def test_rset_undeletes(start_server):
    """RSET clears the deletion marks."""
    server = start_server()
    deliver(server, "u@x.test", b"Subject: 1\r\n\r\n1\r\n")
    pop = login(server)
    pop.dele(1)
    pop.rset()
    pop.quit()
    assert login(server).stat()[0] == 1


def test_uidl_is_stable_across_sessions_and_restarts(start_server):
    """UIDLs do not change between sessions, after another message is deleted, or after a restart."""
    server = start_server()
    deliver(server, "u@x.test", *(b"Subject: %d\r\n\r\nx\r\n" % i for i in range(3)))
    pop = login(server)
    first = pop.uidl()[1]
    pop.dele(1)
    pop.quit()
    pop = login(server)
    second = pop.uidl()[1]
    pop.quit()
    assert [l.split()[1] for l in second] == [l.split()[1] for l in first[1:]]
    server.stop()
    server = start_server()
    pop = login(server)
    assert [l.split()[1] for l in pop.uidl()[1]] == [l.split()[1] for l in second]
    pop.quit()


def test_second_session_gets_in_use(start_server):
    """Only one POP3 session per mailbox: the second gets -ERR [IN-USE]."""
    server = start_server()
    deliver(server, "u@x.test", b"Subject: 1\r\n\r\n1\r\n")
    first = login(server)
    with pytest.raises(poplib.error_proto, match=r"IN-USE"):
        login(server)
    first.quit()
    login(server).quit()


def test_top_returns_headers_and_n_lines(start_server):
    """TOP msg n gives the header, the blank line and n body lines."""
    server = start_server()
    deliver(server, "u@x.test", b"Subject: t\r\n\r\nl1\r\nl2\r\nl3\r\n")
    pop = login(server)
    _, lines, _ = pop.top(1, 2)
    assert lines[-3:] == [b"", b"l1", b"l2"]
    pop.quit()


def test_capa_and_auth_plain(start_server, accounts):
    """CAPA lists UIDL, TOP, USER, SASL PLAIN, PIPELINING; AUTH PLAIN logs in; bad passwords fail."""
    server = start_server(site=True)
    pop = poplib.POP3("127.0.0.1", server.port("pop3"), timeout=10)
    caps = pop.capa()
    for cap in ("UIDL", "TOP", "USER", "PIPELINING"):
        assert cap in caps
    assert caps["SASL"] == ["PLAIN"]
    import base64
    pop._putcmd("AUTH PLAIN " + base64.b64encode(b"\0alice@example.test\0alice-secret").decode())
    assert pop._getresp().startswith(b"+OK")
    pop.quit()
    pop = poplib.POP3("127.0.0.1", server.port("pop3"), timeout=10)
    pop.user("alice@example.test")
    with pytest.raises(poplib.error_proto, match=r"\[AUTH\]"):
        pop.pass_("wrong")
    pop.quit()


def test_auth_plain_cancel_and_decoding_errors(start_server, accounts):
    """AUTH PLAIN: '*' (with spaces around it) cancels; undecodable responses get -ERR naming why."""
    import base64
    server = start_server(site=True)
    with socket.create_connection(("127.0.0.1", server.port("pop3")), timeout=10) as s:
        f = s.makefile("rb")
        f.readline()
        s.sendall(b"AUTH PLAIN\r\n *  \r\nAUTH PLAIN !!!\r\n"
                  b"AUTH PLAIN " + base64.b64encode(b"\0\xff\0x") + b"\r\n"
                  b"AUTH PLAIN\r\n " + base64.b64encode(b"\0alice@example.test\0alice-secret") + b" \r\n")
        assert [f.readline() for _ in range(6)] == [
            b"+ \r\n", b"-ERR Authentication cancelled\r\n",
            b"-ERR Cannot decode response: invalid base64\r\n",
            b"-ERR Cannot decode response: PLAIN response is not UTF-8\r\n",
            b"+ \r\n", b"+OK Logged in, 0 messages (0 octets)\r\n"]


def test_stls_with_certificate(start_server, accounts, certificate):
    """With a certificate, CAPA offers STLS; plaintext login is refused until STLS."""
    cert, key = certificate
    server = start_server(site=True, plaintext_auth="never", tls__certificate=cert, tls__key=key)
    pop = poplib.POP3("127.0.0.1", server.port("pop3"), timeout=10)
    caps = pop.capa()
    assert "STLS" in caps and "USER" not in caps
    with pytest.raises(poplib.error_proto):
        pop.user("alice@example.test")
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    pop.stls(context)
    pop.user("alice@example.test")
    pop.pass_("alice-secret")
    pop.quit()


def test_bad_input_gets_err(start_server):
    """Unknown commands, bad numbers and overlong lines get -ERR; the session survives."""
    server = start_server()
    deliver(server, "u@x.test", b"Subject: 1\r\n\r\n1\r\n")
    with socket.create_connection(("127.0.0.1", server.port("pop3")), timeout=10) as s:
        f = s.makefile("rb")
        f.readline()
        s.sendall(b"XYZZY\r\nUSER u@x.test\r\nPASS p\r\nRETR 99\r\nRETR abc\r\n" + b"A" * 5000 + b"\r\nSTAT\r\n")
        replies = [f.readline() for _ in range(7)]
    assert replies[0].startswith(b"-ERR")
    assert replies[2].startswith(b"+OK")
    assert all(r.startswith(b"-ERR") for r in replies[3:6])
    assert replies[6].startswith(b"+OK 1 ")


# Read-ahead, streaming and the wire transform (docs/performance.md).

from hypothesis import given, settings, strategies as st  # noqa: E402

from twisted_mail_screen.protocols import pop3_drop as pop3_module  # noqa: E402
from twisted_mail_screen.protocols.pop3_wire import WireStream, lf_to_wire, to_wire, top_of  # noqa: E402


def raw_session(server, commands: bytes, replies: int) -> list[bytes]:
    """Log in, send C{commands} in one write (pipelined), read C{replies} answers."""
    with socket.create_connection(("127.0.0.1", server.port("pop3")), timeout=20) as s:
        f = s.makefile("rb")
        f.readline()
        s.sendall(b"USER u@x.test\r\nPASS p\r\n" + commands)
        f.readline()
        f.readline()
        out = []
        for _ in range(replies):
            first = f.readline()
            if not first.startswith(b"+OK message follows"):
                out.append(first)
                continue
            body = bytearray()
            for line in iter(f.readline, b".\r\n"):
                body += line
            out.append(bytes(body))
        return out


def stored(tmp_path) -> list[bytes]:
    """The mailbox's files in delivery order."""
    from twisted_mail_screen.store.maildir import Maildir
    md = Maildir(str(tmp_path / "data" / "mail" / "x.test" / "u"))
    return [open(md.file_path(m), "rb").read() for m in md.scan()]


def test_pipelined_retr_of_many_messages_is_byte_identical(start_server, tmp_path):
    """200 RETRs in one write (read-ahead batches) each give exactly their own message."""
    server = start_server()
    bodies = [b"Subject: %d\r\n\r\n.dot %d\r\n" % (i, i) + b"x" * (i * 37 % 70) + b"\r\n.\r\n"
              + (b"y" * 76 + b"\r\n") * (i % 40) for i in range(200)]
    deliver(server, "u@x.test", *bodies)
    files = stored(tmp_path)
    got = raw_session(server, b"".join(b"RETR %d\r\n" % i for i in range(1, 201)), 200)
    assert got == [to_wire(f) for f in files]
    for sent, wire in zip(bodies, got):
        assert wire.endswith(sent.replace(b"\r\n.", b"\r\n.."))


def test_dele_between_pipelined_retrs_and_removed_files(start_server, tmp_path):
    """DELE amid RETRs is honoured; a file removed before the session reads it gets -ERR."""
    server = start_server()
    deliver(server, "u@x.test", *(b"Subject: %d\r\n\r\nx\r\n" % i for i in range(20)))
    files = stored(tmp_path)
    from twisted_mail_screen.store.maildir import Maildir
    md = Maildir(str(tmp_path / "data" / "mail" / "x.test" / "u"))
    pop = login(server)
    os.unlink(md.file_path(md.scan()[0]))  # after the login's scan, before any RETR
    with pytest.raises(poplib.error_proto, match=r"removed by another client"):
        pop.retr(1)
    assert pop.retr(2)[1][-2] == b""  # the session goes on
    pop.quit()
    got = raw_session(server, b"RETR 1\r\nDELE 2\r\nRETR 2\r\nRETR 3\r\nQUIT\r\n", 5)
    assert got[0] == to_wire(files[1])
    assert got[1].startswith(b"+OK") and got[2].startswith(b"-ERR No such message")
    assert got[3] == to_wire(files[3])
    assert len(stored(tmp_path)) == 18


def test_large_message_is_streamed_byte_identical(start_server, tmp_path, monkeypatch):
    """A message above SMALL_MESSAGE goes out in chunks: dots and CRLFs at every cut survive."""
    monkeypatch.setattr(pop3_module, "STREAM_CHUNK", 4096)  # many cuts (server runs in-process)
    server = start_server()
    line = b".dot at a line start, then text\r\n"
    body = b"Subject: big\r\n\r\n" + b"".join(line[: 1 + i % len(line)].rstrip(b"\r") + b"\r\n"
                                              for i in range(6000))
    assert len(body) > pop3_module.SMALL_MESSAGE
    deliver(server, "u@x.test", body, b"Subject: small\r\n\r\nafter\r\n")
    files = stored(tmp_path)
    got = raw_session(server, b"RETR 1\r\nTOP 1 3\r\nTOP 1 100000\r\nRETR 2\r\n", 4)
    assert got[0] == to_wire(files[0])
    assert got[0].endswith(body.replace(b"\r\n.", b"\r\n.."))
    assert got[1] == lf_to_wire(top_of(files[0], 3))
    assert got[2] == to_wire(files[0])
    assert got[3] == to_wire(files[1])


_pieces = st.lists(st.sampled_from([b"\r", b"\n", b".", b"a", b"\r\n", b"\n\n", b"\n."]),
                   max_size=60).map(b"".join)


@settings(max_examples=500, deadline=None)
@given(data=_pieces, cuts=st.lists(st.integers(0, 80), max_size=6),
       top=st.one_of(st.none(), st.integers(0, 5)))
def test_wire_stream_matches_whole_transform(data, cuts, top):
    """WireStream over any cuts equals to_wire (or TOP's transform) of the whole message."""
    want = to_wire(data) if top is None else lf_to_wire(top_of(data, top))
    encoder, out, pos = WireStream(top), b"", 0
    for cut in sorted(min(c, len(data)) for c in cuts) + [len(data)]:
        if cut > pos:
            out += encoder.feed(data[pos:cut])
            pos = cut
    assert out + encoder.end() == want
