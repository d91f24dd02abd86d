"""
LIST-EXTENDED (RFC 5258) and LIST-STATUS (RFC 5819) over a real socket,
on the folders of the RFCs' own examples.
"""

from __future__ import annotations

import pytest

from tests.test_imap import Raw
from tests.test_reactor_budget import LIMIT, fill, measured

KINDS = ("smtp", "imap")


@pytest.fixture
def raw(start_server):
    """RFC 5258 5's folders: Fruit/{Apple,Banana}, Vegetable/{Broccoli,Corn}, Tofu; subscriptions as there."""
    server = start_server(kinds=KINDS)
    r = Raw(server.port("imap"))
    r.command(b"l", b"LOGIN bob@localhost x")
    for name in (b"Fruit/Apple", b"Fruit/Banana", b"Fruit/Peach", b"Tofu", b"Vegetable",
                 b"Vegetable/Broccoli", b"Vegetable/Corn"):
        assert r.command(b"c", b"CREATE " + name)[-1].startswith(b"c OK")
    for name in (b"INBOX", b"Fruit/Banana", b"Fruit/Peach", b"Vegetable", b"Vegetable/Broccoli"):
        assert r.command(b"s", b"SUBSCRIBE " + name)[-1].startswith(b"s OK")
    # Peach stays subscribed without existing (RFC 5258 5, example 3).
    assert r.command(b"d", b"DELETE Fruit/Peach")[-1].startswith(b"d OK")
    yield r
    r.close()


#: The folders every account is given (docs/imap.md), left out of the comparisons.
STANDARD = (b'"Archive"', b'"Drafts"', b'"Junk"', b'"Sent"', b'"Trash"')


def listed(r: Raw, command: bytes, standard: bool = False) -> list[bytes]:
    lines = r.command(b"t", command)
    assert lines[-1].startswith(b"t OK"), lines
    return [line for line in lines[:-1] if standard or not any(s in line for s in STANDARD)]


def test_announced(raw):
    caps = raw.command(b"c", b"CAPABILITY")[0].split()
    assert b"LIST-EXTENDED" in caps and b"LIST-STATUS" in caps


def test_subscribed_selection(raw):
    assert listed(raw, b'LIST (SUBSCRIBED) "" "*"') == [
        b'* LIST (\\Subscribed \\HasNoChildren) "/" "INBOX"',
        b'* LIST (\\Subscribed \\HasNoChildren) "/" "Fruit/Banana"',
        b'* LIST (\\NonExistent \\Subscribed) "/" "Fruit/Peach"',
        b'* LIST (\\Subscribed \\HasChildren) "/" "Vegetable"',
        b'* LIST (\\Subscribed \\HasNoChildren) "/" "Vegetable/Broccoli"',
    ]


def test_return_subscribed_and_children(raw):
    lines = listed(raw, b'LIST "" "%" RETURN (SUBSCRIBED CHILDREN)')
    assert b'* LIST (\\Subscribed \\HasChildren) "/" "Vegetable"' in lines
    assert b'* LIST (\\HasChildren) "/" "Fruit"' in lines
    assert b'* LIST (\\HasNoChildren) "/" "Tofu"' in lines


def test_recursivematch_childinfo(raw):
    """RFC 5258 5, example 5: parents of subscribed folders carry CHILDINFO."""
    assert listed(raw, b'LIST (SUBSCRIBED RECURSIVEMATCH) "" "%" RETURN (CHILDREN)') == [
        b'* LIST (\\Subscribed \\HasNoChildren) "/" "INBOX"',
        b'* LIST (\\HasChildren) "/" "Fruit" ("CHILDINFO" ("SUBSCRIBED"))',
        b'* LIST (\\Subscribed \\HasChildren) "/" "Vegetable" ("CHILDINFO" ("SUBSCRIBED"))',
    ]


def test_several_patterns_each_name_once(raw):
    lines = listed(raw, b'LIST "" ("Fruit/*" "*/Banana" "Tofu")')
    assert lines == [b'* LIST (\\HasNoChildren) "/" "Fruit/Apple"',
                     b'* LIST (\\HasNoChildren) "/" "Fruit/Banana"',
                     b'* LIST (\\HasNoChildren) "/" "Tofu"']


def test_special_use_selection(raw):
    assert listed(raw, b'LIST (SPECIAL-USE) "" "*" RETURN (SPECIAL-USE)', standard=True) == [
        b'* LIST (\\Subscribed \\HasNoChildren \\Archive) "/" "Archive"'.replace(b"\\Subscribed ", b""),
        b'* LIST (\\HasNoChildren \\Drafts) "/" "Drafts"',
        b'* LIST (\\HasNoChildren \\Junk) "/" "Junk"',
        b'* LIST (\\HasNoChildren \\Sent) "/" "Sent"',
        b'* LIST (\\HasNoChildren \\Trash) "/" "Trash"']


def test_list_status(raw, tmp_path):
    """RFC 5819's example: a STATUS right after each selectable mailbox's LIST, none for \\Noselect."""
    for sub in ("cur", "new", "tmp"):  # Bar/Baz without Bar: Bar is only implied
        (tmp_path / "data" / "mail" / "localhost" / "bob" / ".Bar.Baz" / sub).mkdir(parents=True)
    assert raw.command(b"a", b"APPEND Tofu {11+}\r\nSubject: \r\n")[-1].startswith(b"a OK")
    lines = listed(raw, b'LIST "" "%" RETURN (STATUS (MESSAGES UNSEEN))')
    assert lines == [
        b'* LIST (\\HasNoChildren) "/" "INBOX"',
        b'* STATUS "INBOX" (MESSAGES 0 UNSEEN 0)',
        b'* LIST (\\Noselect \\HasChildren) "/" "Bar"',
        b'* LIST (\\HasChildren) "/" "Fruit"',
        b'* STATUS "Fruit" (MESSAGES 0 UNSEEN 0)',
        b'* LIST (\\HasNoChildren) "/" "Tofu"',
        b'* STATUS "Tofu" (MESSAGES 1 UNSEEN 1)',
        b'* LIST (\\HasChildren) "/" "Vegetable"',
        b'* STATUS "Vegetable" (MESSAGES 0 UNSEEN 0)',
    ]


@pytest.mark.parametrize("command", [
    b'LIST (RECURSIVEMATCH) "" "*"',
    b'LIST (BOGUS) "" "*"',
    b'LIST "" "*" RETURN (BOGUS)',
    b'LIST "" "*" RETURN (STATUS)',
    b'LIST "" "*" RETURN (STATUS (MESSAGES BOGUS))',
    b'LIST "" "*" RETURN',
    b'LIST "" ()',
])
def test_bad_options(raw, command):
    assert raw.command(b"b", command)[-1].startswith(b"b BAD")


def test_plain_list_unchanged(raw):
    assert listed(raw, b'LIST "" "Fruit"') == [b'* LIST (\\HasChildren) "/" "Fruit"']


def test_list_status_of_many_folders_keeps_the_reactor_free(start_server, tmp_path):
    """
    200 folders of 100 messages each, LIST-STATUS over all (one STATUS, its
    scan in the worker pool, after another): another session's NOOPs stay quick.
    """
    server = start_server(kinds=KINDS)
    port = server.port("imap")
    box = tmp_path / "data" / "mail" / "localhost" / "bob"
    for i in range(200):
        fill(box / f".F{i:03}", 100)
    r = Raw(port)
    r.command(b"l", b"LOGIN bob@localhost x")
    worst, lines = measured(port, lambda: r.command(b"t", b'LIST "" "*" RETURN (STATUS (MESSAGES UNSEEN))'))
    assert lines[-1].startswith(b"t OK")
    assert b'* STATUS "F199" (MESSAGES 100 UNSEEN 50)' in lines
    assert sum(line.startswith(b"* STATUS ") for line in lines) == 206  # and INBOX and the standard five
    assert worst < LIMIT, worst
    r.close()
