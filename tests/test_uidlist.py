"""The persistent UID map (dovecot-uidlist syntax) of one Maildir folder."""

from __future__ import annotations

import os
from array import array

import pytest
from hypothesis import given, strategies as st

from twisted_mail_screen.store import uidlist


def test_round_trip(tmp_path):
    ul = uidlist.UidList(1234, 10, array("L", [3, 7, 9]), ["a,S=1,W=1", "b", "c"])
    ul.save(str(tmp_path))
    text = (tmp_path / uidlist.FILENAME).read_text()
    assert text == "3 V1234 N10\n3 :a,S=1,W=1\n7 :b\n9 :c\n"
    loaded, reason = uidlist.load(str(tmp_path))
    assert reason is None
    assert (loaded.uidvalidity, loaded.next_uid) == (1234, 10)
    assert list(loaded.uids) == [3, 7, 9] and loaded.bases == ["a,S=1,W=1", "b", "c"]


def test_missing_file_gets_fresh_validity(tmp_path):
    ul, reason = uidlist.load(str(tmp_path))
    assert reason == "missing"
    assert ul.next_uid == 1 and ul.uidvalidity > 0 and not ul.uids


@pytest.mark.parametrize("content", [
    b"3 V100 N5",                      # truncated inside the header line
    b"3 V100 N5\n2 :a\n1 :b\n",        # not ascending
    b"3 V100 N5\n2 :a\n2 :b\n",        # a UID twice
    b"3 V100 N5\nxx :a\n",             # not a number
    b"3 V100 N5\n1 a\n",               # no " :"
])
def test_corrupt_file_gets_a_new_higher_validity(tmp_path, content):
    (tmp_path / uidlist.FILENAME).write_bytes(content)
    ul, reason = uidlist.load(str(tmp_path))
    assert reason is not None and reason.startswith("corrupt")
    assert ul.uidvalidity > 100
    assert not ul.uids and ul.next_uid == 1


def test_bad_header(tmp_path):
    (tmp_path / uidlist.FILENAME).write_bytes(b"garbage\n")
    ul, reason = uidlist.load(str(tmp_path))
    assert reason.startswith("corrupt") and ul.uidvalidity > 0


def test_validities_never_repeat():
    seen = [uidlist.new_uidvalidity() for _ in range(50)]
    assert len(set(seen)) == 50 and seen == sorted(seen)


def test_write_is_atomic_no_temp_left(tmp_path):
    uidlist.UidList(5, 1).save(str(tmp_path))
    assert os.listdir(tmp_path) == [uidlist.FILENAME]


@given(st.lists(st.tuples(st.integers(1, 10**9),
                          st.text(alphabet=st.characters(blacklist_characters="\n/\r\x00",
                                                         blacklist_categories=("Cs",)),
                                  min_size=1, max_size=40)),
                max_size=30, unique_by=lambda t: t[0]))
def test_render_parse_property(pairs):
    pairs.sort()
    uids = array("L", [u for u, _ in pairs])
    # base names are unique within a folder (a base listed twice means "moved back")
    bases = [f"{b.replace(' :', '') or 'x'}.{i}" for i, (_, b) in enumerate(pairs)]
    next_uid = (pairs[-1][0] + 1) if pairs else 1
    ul = uidlist.UidList(77, next_uid, uids, bases)
    back = uidlist.parse(ul.render())
    assert list(back.uids) == list(uids) and back.bases == bases and back.next_uid == next_uid


def test_appended_records_are_read_and_marked_for_rewrite(tmp_path):
    uidlist.UidList(100, 3, array("L", [1, 2]), ["a", "b"]).save(str(tmp_path))
    uidlist.append_records(str(tmp_path), [(3, "c"), (7, "d")])
    assert (tmp_path / uidlist.FILENAME).read_text() == "3 V100 N3\n1 :a\n2 :b\n3 :c\n7 :d\n"
    ul, reason = uidlist.load(str(tmp_path))
    assert reason is None and ul.dirty
    assert list(ul.uids) == [1, 2, 3, 7] and ul.bases == ["a", "b", "c", "d"] and ul.next_uid == 8
    with pytest.raises(FileNotFoundError):
        uidlist.append_records(str(tmp_path / "nonexistent"), [(1, "x")])


def test_torn_append_drops_only_the_unfinished_line(tmp_path):
    (tmp_path / uidlist.FILENAME).write_bytes(b"3 V100 N5\n1 :a\n2 :b\n5 :c,S=1")
    ul, reason = uidlist.load(str(tmp_path))
    assert reason is None and ul.dirty and ul.uidvalidity == 100
    assert list(ul.uids) == [1, 2] and ul.next_uid == 5  # 5 was never acknowledged


def test_a_base_moved_out_and_back_keeps_its_later_uid(tmp_path):
    (tmp_path / uidlist.FILENAME).write_bytes(b"3 V100 N5\n1 :a\n2 :b\n6 :a\n")
    ul, _ = uidlist.load(str(tmp_path))
    assert list(ul.uids) == [2, 6] and ul.bases == ["b", "a"] and ul.next_uid == 7 and ul.dirty
