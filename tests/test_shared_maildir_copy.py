"""
COPY and MOVE through servers sharing one Maildir, of a message another
server renamed meanwhile to carry a keyword whose letter this server's
keyword table does not know yet: the copy carries the keyword (the
source's dovecot-keywords is read again for the letter), as STORE keeps
such letters.
"""

from __future__ import annotations

import os

import pytest

from test_shared_maildir_flags import (  # noqa: F401 (pair and sessions are fixtures)
    flags_seen, inbox, letters_on_disk, pair, sessions, store)


@pytest.mark.parametrize("command", ["COPY", "MOVE"])
def test_a_copy_or_move_carries_a_keyword_the_other_server_gave_a_letter_meanwhile(sessions, tmp_path, command):
    ca, cb = sessions(2)
    assert ca.create("Kept")[0] == "OK"
    store(cb, 1, "+FLAGS", "($Label \\Flagged)")  # B gives $Label the letter a; A's table is empty
    typ, data = ca.uid(command, "1:2", "Kept")
    assert typ == "OK", data
    kept = inbox(tmp_path) / ".Kept"
    assert (kept / "dovecot-keywords").read_text() == "0 $Label\n"
    assert sorted(n.partition(":2,")[2] for n in os.listdir(kept / "cur")) == ["", "Fa"]
    assert len(letters_on_disk(tmp_path)) == (2 if command == "COPY" else 0)
    for c in (ca, cb):
        assert c.select("Kept")[0] == "OK"
        assert flags_seen(c) == {1: {"\\Flagged", "$Label"}, 2: set()}
