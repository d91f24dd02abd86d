"""
Near-valid commands for the hostile-input tests (tests/test_hostile.py):
hypothesis strategies that follow each protocol's grammar closely enough
to reach the code behind the parser, then break it at one place. A number
past 32 or 64 bits or of 5,000 digits, a Unicode digit (C{str.isdigit}
takes C{'²'} and C{'٣'}, and C{int()} takes the second), NUL and other
control characters, deep nesting of parentheses and of NOT/OR, one item
repeated many times, a literal announced at 4294967296 octets, bad base64
in AUTHENTICATE/AUTH.

Every strategy draws C{bytes}: whole command lines (with any literal data
after them), without the final line ending.
"""

from __future__ import annotations

import base64

from hypothesis import strategies as st

# Numbers --------------------------------------------------------------------------------------

EDGE_NUMBERS = ["0", "1", "2", "3", "007", "4294967295", "4294967296", "18446744073709551616",
                "9" * 21, "-1", "+1", "1_0", "1e3", "0x10", "1.5", "²", "٣", "１",
                "1²", "¹", "Ⅻ", "", "1 "]
# 5,000 digits: past int()'s 4,300-digit limit (built, so hypothesis never prints it whole).
huge_number = st.builds(lambda: "9" * 5000)
# Mostly a number that names a message, so that the command gets past the parser.
numbers = st.one_of(st.sampled_from(EDGE_NUMBERS), st.integers(1, 4).map(str), st.integers(1, 4).map(str),
                    huge_number, st.sampled_from(["4294967296", "²", "٣"]),
                    st.integers(0, 2 ** 70).map(str))

# A character that has no place in a command (or a Unicode one that looks like it might).
ODD_CHARS = ["\x00", "\x01", "\x7f", "\r", "\t", "\x1b", "\x85", "\u2028", "\ufeff", "\udcff", "é"]


def enc(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


@st.composite
def spoiled(draw: st.DrawFn, text: str | bytes) -> bytes:
    """C{text}, sometimes with one odd character put in somewhere (once per command)."""
    data = enc(text) if isinstance(text, str) else text
    if draw(st.integers(0, 5)) == 0:
        pos = draw(st.integers(0, len(data)))
        data = data[:pos] + enc(draw(st.sampled_from(ODD_CHARS))) + data[pos:]
    return data


def repeated(item: st.SearchStrategy[str], sep: str = " ") -> st.SearchStrategy[str]:
    """One item, or the same one many times over."""
    return st.tuples(item, st.sampled_from([1, 1, 1, 1, 2, 3, 100, 4000])).map(
        lambda t: sep.join([t[0]] * (t[1] if len(t[0]) * t[1] < 100_000 else 2)))


def b64(data: bytes) -> st.SearchStrategy[bytes]:
    good = base64.b64encode(data)
    return st.sampled_from([good, good[:-1], good + b"=", b"=" + good, good.replace(b"A", b"*"),
                            b"====", b"A", b"AA==AA==", b"\xff\xfe", good + b"\x00", b"*", b"",
                            base64.b64encode(b"\x00" * 3), base64.b64encode(b"\xff\x00\xff\x00x"),
                            base64.b64encode(b"a" * 3000), b"=" * 5000])


# IMAP -----------------------------------------------------------------------------------------

MAILBOXES = ["INBOX", "inbox", "Fz", "Fz/Sub", "INBOX/Fz", "Sent", "../../../../tmp/pwn", "a/../b",
             "./x", "~", "~/x", "/etc", "a//b", "Fz/", "", "#news", "&", "&-", "&2AA-", "&AAA",
             "&ANw-", "Ü", "a" * 300, "/".join(["a"] * 200), "*", "%", "Fz\x01", "Fz\x00"]
mailbox_names = st.one_of(st.sampled_from(MAILBOXES),
                          st.text(st.sampled_from("ab/.~&-é\x01 \udcff"), min_size=1, max_size=12))


@st.composite
def imap_string(draw: st.DrawFn, text: bytes) -> bytes:
    """C{text} as an atom, a quoted string or a literal (its announced size true or not)."""
    form = draw(st.integers(0, 5))
    if b"\n" in text and draw(st.integers(0, 7)):
        form = 3  # a quoted string cannot hold a line break: mostly a literal
    if form == 0 and text and all(0x21 <= c < 0x7F and c not in b'(){%*"\\]' for c in text):
        return text
    if form <= 2:
        return b'"' + text.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'
    size = draw(st.sampled_from([len(text)] * 8 + [len(text) + 1, max(0, len(text) - 1),
                                                   4294967296, 10 ** 20]))
    plus = draw(st.sampled_from([b"", b"+"]))
    return b"{%d%s}\r\n" % (size, plus) + text


seq_numbers = st.one_of(numbers, st.just("*"))
seqsets = st.one_of(st.sampled_from(["1", "1:*", "*", "2:3", "1,3"]), repeated(
    st.one_of(seq_numbers, st.tuples(seq_numbers, seq_numbers).map(":".join)), ","))

SECTIONS = ["", "HEADER", "TEXT", "1", "2", "1.MIME", "1.2.3", "HEADER.FIELDS (FROM TO)",
            "HEADER.FIELDS.NOT (SUBJECT)", "HEADER.FIELDS ()", "MIME", "HEADER.FIELDS ((((FROM))))", "0"]
sections = st.one_of(st.sampled_from(SECTIONS), st.builds(lambda: "HEADER.FIELDS (" + "X " * 2000 + ")"),
                     st.builds(lambda: "1." * 200 + "1"), numbers, st.tuples(numbers, numbers).map(".".join))
partials = st.one_of(st.just(""), st.tuples(numbers, numbers).map(lambda t: f"<{t[0]}.{t[1]}>"))
fetch_items = st.one_of(
    st.sampled_from(["FLAGS", "UID", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE", "BODYSTRUCTURE",
                     "BODY", "RFC822.HEADER", "ALL", "FAST", "FULL", "BINARY[1]", "MODSEQ"]),
    st.tuples(st.sampled_from(["BODY[", "BODY.PEEK["]), sections, partials)
    .map(lambda t: f"{t[0]}{t[1]}]{t[2]}"))


@st.composite
def fetch_atts(draw: st.DrawFn) -> str:
    items = draw(st.lists(repeated(fetch_items), min_size=1, max_size=4))
    depth = draw(st.sampled_from([0, 1, 1, 1, 1, 2, 31, 33, 200]))
    close = depth - draw(st.sampled_from([0, 0, 0, 1, -1]))
    return "(" * depth + " ".join(items) + ")" * max(close, 0)


DATES = ["1-Jan-2020", "01-Feb-2021", "32-Jan-2020", "31-Feb-2020", "29-Feb-2021", "1-Foo-2020", "1-Jan-99999", "²-Jan-2020",
         "1-Jan-٢٠٢٠", "0-Jan-0000", '"1-Jan-2020"']
search_leaves = st.one_of(
    st.sampled_from(["ALL", "SEEN", "UNSEEN", "DELETED", "NEW", "OLD", "RECENT", "ANSWERED", "DRAFT",
                     "FLAGGED", "UNKEYWORD $x", "KEYWORD fz", "TEXT body", "BODY m1", "SUBJECT m",
                     'HEADER Subject ""', "FROM a", "CHARSET", "BOGUS", "()"]),
    st.tuples(st.sampled_from(["LARGER", "SMALLER"]), numbers).map(" ".join),
    st.tuples(st.sampled_from(["UID", ""]), seqsets).map(lambda t: " ".join(t).strip()),
    st.tuples(st.sampled_from(["BEFORE", "ON", "SINCE", "SENTBEFORE", "SENTON", "SENTSINCE"]),
              st.sampled_from(DATES)).map(" ".join))
search_keys = st.recursive(search_leaves, lambda inner: st.one_of(
    inner.map(lambda k: "NOT " + k),
    st.tuples(inner, inner).map(lambda t: f"OR {t[0]} {t[1]}"),
    st.lists(inner, min_size=1, max_size=3).map(lambda ks: "(" + " ".join(ks) + ")")), max_leaves=8)


@st.composite
def search_program(draw: st.DrawFn) -> str:
    chain = draw(st.sampled_from([0, 0, 0, 31, 32, 33, 1100]))
    op = draw(st.sampled_from(["NOT ", "OR ALL ", "("]))
    tail = ")" * chain if op == "(" else ""
    keys = " ".join(draw(st.lists(search_keys, min_size=1, max_size=3)))
    charset = draw(st.sampled_from(["", "", "", "", "CHARSET UTF-8 ", "CHARSET KOI8-R ", "CHARSET "]))
    return charset + op * chain + keys + tail


FLAGS = ["\\Seen", "\\Deleted", "\\Answered", "\\Flagged", "\\Draft", "\\Recent", "\\Bogus", "$Fz",
         "fz", "\\*", "(", "\\"]
flag_lists = st.lists(st.sampled_from(FLAGS), max_size=4).map(lambda fs: "(" + " ".join(fs) + ")") \
    | repeated(st.sampled_from(FLAGS)).map(lambda f: "(" + f + ")")

MESSAGE = b"Subject: fz\r\nFrom: a@x.test\r\n\r\nbody\r\n"


@st.composite
def imap_selected_command(draw: st.DrawFn) -> bytes:
    """One command for a session with INBOX selected (its literals included)."""
    return draw(_imap_selected_command().flatmap(spoiled))


@st.composite
def _imap_selected_command(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from([0, 0, 0, 0, 1, 1, 1, 2, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]))
    mbox = draw(mailbox_names.flatmap(lambda n: imap_string(enc(n))))
    uid = draw(st.sampled_from([b"", b"UID "]))
    if kind == 0:
        return uid + b"FETCH " + enc(draw(seqsets)) + b" " + enc(draw(fetch_atts()))
    if kind == 1:
        return uid + b"SEARCH " + enc(draw(search_program()))
    if kind == 2:
        mode = draw(st.sampled_from(["FLAGS", "+FLAGS", "-FLAGS.SILENT", "+FLAGS.SILENT", "FLAGZ"]))
        return uid + b"STORE " + enc(draw(seqsets)) + b" " + enc(mode) + b" " + \
            enc(draw(flag_lists))
    if kind == 3:
        verb = draw(st.sampled_from([b"COPY ", b"MOVE "]))
        return uid + verb + enc(draw(seqsets)) + b" " + mbox
    if kind == 4:
        # (the test selects INBOX again after a SELECT or EXAMINE)
        return draw(st.sampled_from([b"CREATE ", b"DELETE ", b"SUBSCRIBE ", b"UNSUBSCRIBE ",
                                     b"CREATE ", b"EXAMINE ", b"SELECT "])) + mbox
    if kind == 5:
        other = draw(mailbox_names.flatmap(lambda n: imap_string(enc(n))))
        return b"RENAME " + mbox + b" " + other
    if kind == 6:
        items = draw(repeated(st.sampled_from(["MESSAGES", "UIDNEXT", "UNSEEN", "RECENT", "SIZE"])))
        return b"STATUS " + mbox + b" (" + enc(items) + b")"
    if kind == 7:
        flags = draw(st.sampled_from([b"", b"(\\Seen) ", b"() ", b"(\\Recent $x) "]))
        date = draw(st.sampled_from([b"", b'"01-Jan-2020 10:00:00 +0000" ', b'"99-Foo-2020 1:2:3 x" ',
                                     '"²1-Jan-2020 10:00:00 +0000" '.encode()]))
        return b"APPEND " + mbox + b" " + flags + date + draw(imap_string(MESSAGE))
    if kind == 8:
        return b"UID EXPUNGE " + enc(draw(seqsets))
    if kind == 9:
        verb = draw(st.sampled_from([b"LIST ", b"LSUB ", b"LIST (SUBSCRIBED) ", b"LIST (SPECIAL-USE) "]))
        pattern = draw(st.one_of(st.sampled_from([b"*", b"%", b'"Fz/*"', b"INBOX", b'"~/*"', b"(* %)",
                                                  b'"\xff*"', b'"&*"']), st.just(mbox)))
        return verb + draw(st.sampled_from([b'""', b"Fz/", mbox])) + b" " + pattern + \
            draw(st.sampled_from([b"", b"", b" RETURN (SUBSCRIBED CHILDREN)", b" RETURN x"]))
    if kind == 10:
        return draw(st.sampled_from([b"NOOP", b"CHECK", b"EXPUNGE", b"ID NIL", b'ID ("name" "fz")',
                                     b"ID " + b"(" * 40, b"ENABLE UTF8=ACCEPT", b"NAMESPACE",
                                     b"CAPABILITY", b"SELECT INBOX", b"IDLE\r\nDONE", b"IDLE\r\nnope"]))
    if kind == 11:
        return b"SELECT INBOX (CONDSTORE " + draw(numbers.map(enc)) + b")"
    return draw(st.binary(max_size=20)) + b" " + mbox


@st.composite
def imap_unauth_command(draw: st.DrawFn) -> bytes:
    """One command before login: LOGIN and AUTHENTICATE with odd strings and bad base64."""
    kind = draw(st.integers(0, 3))
    if kind == 0:
        user = draw(st.sampled_from([b"fz@x.test", b"", b"a\x00b", b"\xff", b"x" * 2000]))
        return b"LOGIN " + draw(imap_string(user)) + b" " + draw(imap_string(b"pw"))
    if kind == 1:
        return b"AUTHENTICATE PLAIN " + draw(b64(b"\x00fz@x.test\x00pw"))
    if kind == 2:
        # the response on its own line, after the server's continuation
        return b"AUTHENTICATE " + draw(st.sampled_from([b"PLAIN", b"plain", b"LOGIN", b"X", b""])) + \
            b"\r\n" + draw(b64(b"fz@x.test\x00fz@x.test\x00pw"))
    return draw(st.sampled_from([b"STARTTLS", b"CAPABILITY", b"LOGOUT x", b"SELECT INBOX", b"NOOP"]))


# SMTP -----------------------------------------------------------------------------------------

ADDRESSES = ["<a@x.test>", "<>", "<fz@x.test>", "<@route:a@x.test>", "<a@[127.0.0.1]>", "a@x.test",
             "<\"q u\"@x.test>", "<a@x.test", "<" + "a" * 300 + "@x.test>", "<a\x00@x.test>",
             "<a\rX: 1@x.test>", "<é@x.test>", "<a@é.test>"]
smtp_params = st.lists(st.one_of(
    st.tuples(st.sampled_from(["SIZE", "size", "BODY", "RET", "ENVID", "AUTH", "NOTIFY", "ORCPT",
                               "SMTPUTF8", "X-FZ"]),
              st.one_of(numbers, st.sampled_from(["8BITMIME", "7BIT", "BINARYMIME", "<>", "FULL",
                                                  "NEVER", "rfc822;a@x.test", "", "=", "x" * 600])))
    .map(lambda t: f"{t[0]}={t[1]}"),
    st.sampled_from(["SIZE", "BODY", "=", "SIZE==1"])), max_size=4)


@st.composite
def smtp_command(draw: st.DrawFn) -> bytes:
    kind = draw(st.integers(0, 7))
    if kind == 0:
        return b"MAIL FROM:" + enc(draw(st.sampled_from(ADDRESSES))) + b" " + \
            draw(smtp_params.map(" ".join).flatmap(spoiled))
    if kind == 1:
        return b"RCPT TO:" + enc(draw(st.sampled_from(ADDRESSES))) + b" " + \
            draw(smtp_params.map(" ".join).flatmap(spoiled))
    if kind == 2:
        body = draw(st.sampled_from([b"Subject: fz\r\n\r\nhi", b"a\rb", b"a\nb", b"x\x00y", b"..",
                                     b".\r", b"hello\r.\r", b"x" * 5000, b""]))
        return b"DATA\r\n" + body + b"\r\n."
    if kind == 3:
        return b"AUTH PLAIN " + draw(b64(b"\x00fz@x.test\x00pw"))
    if kind == 4:
        return b"AUTH LOGIN\r\n" + draw(b64(b"fz@x.test")) + b"\r\n" + draw(b64(b"pw"))
    if kind == 5:
        return draw(st.sampled_from([b"EHLO ", b"HELO ", b"VRFY ", b"EXPN ", b"HELP ", b"NOOP ",
                                     b"BDAT ", b"RSET "])) + draw(numbers.flatmap(spoiled))
    if kind == 6:
        return b"EHLO " + draw(spoiled("client.example"))
    return draw(st.sampled_from([b"RSET", b"NOOP", b"EHLO c", b"STARTTLS", b"AUTH PLAIN",
                                 b"AUTH", b"AUTH CRAM-MD5", b"*"]))


# POP3 -----------------------------------------------------------------------------------------

@st.composite
def pop3_command(draw: st.DrawFn) -> bytes:
    kind = draw(st.integers(0, 4))
    if kind == 0:
        verb = draw(st.sampled_from(["LIST", "UIDL", "RETR", "DELE", "TOP", "STAT", "NOOP", "RSET"]))
        args = draw(st.lists(numbers, max_size=3))
        return draw(spoiled(" ".join([verb, *args])))
    if kind == 1:
        return b"AUTH PLAIN " + draw(b64(b"\x00fz@x.test\x00pw"))
    if kind == 2:
        return b"AUTH PLAIN\r\n" + draw(b64(b"\x00fz@x.test\x00pw"))
    if kind == 3:
        return draw(st.sampled_from([b"USER ", b"PASS ", b"APOP fz@x.test ", b"CAPA ", b"STLS "])) + \
            draw(spoiled("fz@x.test"))
    return draw(st.sampled_from([b"CAPA", b"STAT", b"LIST", b"UIDL", b"RSET", b"NOOP", b"AUTH"]))
