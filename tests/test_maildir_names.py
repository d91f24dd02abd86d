"""Tests for L{twisted_mail_screen.store.maildir_names}: the one parser and maker of Maildir names."""

from __future__ import annotations

from twisted_mail_screen.store.maildir_names import (
    UniqueNames, base_of, delivery_order, flags_of, size_field, unique_of, with_flags)

NAME = "1700000000.M5P9Q3.host,S=120,W=124:2,FS"


def test_parts_of_a_name_with_or_without_its_subdirectory() -> None:
    for name in (NAME, "cur/" + NAME):
        assert base_of(name).endswith("1700000000.M5P9Q3.host,S=120,W=124")
        assert flags_of(name) == "FS"
        assert (size_field(name, "S"), size_field(name, "W")) == (120, 124)
    assert unique_of(NAME) == "1700000000.M5P9Q3.host"
    assert flags_of("1700000000.M5P9Q3.host") == "" and size_field("x,W=abc", "W") is None
    assert with_flags(base_of(NAME), "RS") == "1700000000.M5P9Q3.host,S=120,W=124:2,RS"


def test_delivery_order_compares_numbers_not_text() -> None:
    names = ["1700000000.M1000P1Q1.h", "1700000000.M999P1Q2.h", "1699999999.M5P1Q9.h",
             "1700000000.M999P1Q10.h", "not-ours"]
    assert sorted(names, key=delivery_order) == [
        "not-ours", "1699999999.M5P1Q9.h", "1700000000.M999P1Q2.h",
        "1700000000.M999P1Q10.h", "1700000000.M1000P1Q1.h"]


def test_unique_names_are_distinct_and_plain() -> None:
    names = UniqueNames("mx/1:2,3")
    made = {names.new() for _ in range(1000)}
    assert len(made) == 1000
    for name in made:
        assert name.endswith(".mx\\0571\\0722\\0543")  # no "/", ":" or "," from the host
        assert base_of(name) == name and size_field(name + ",W=1", "W") == 1


def test_a_copy_gets_a_new_name_with_the_old_sizes() -> None:
    names = UniqueNames("h")
    copy = names.copy_of(base_of(NAME))
    assert unique_of(copy) != unique_of(NAME)
    assert (size_field(copy, "S"), size_field(copy, "W")) == (120, 124)
    assert delivery_order(names.new()) > delivery_order(unique_of(copy))
