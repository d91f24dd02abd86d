"""
Tests for L{twisted_mail_screen.screening.freeze}: one conformance mixin run against
both stores (the txacme pattern), plus the file store's own behaviour.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.task import Clock
from twisted.logger import Logger

from twisted_mail_screen.screening.config import FreezeConfig, ScreeningConfig
from twisted_mail_screen.screening.freeze import FileFreezeStore, MemoryFreezeStore
from twisted_mail_screen.screening.interfaces import AdminFreezeStore, FreezeStore
from twisted_mail_screen.screening.service import ScreeningService

START = 1_800_000_000.0
QUIET = Logger(observer=lambda e: None)


class FreezeStoreTests:
    """What every freeze store must do; subclasses supply C{make}."""

    clock: Clock

    def make(self) -> Any:
        raise NotImplementedError

    @pytest.fixture(autouse=True)
    def _setup(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.clock = Clock()
        self.clock.advance(START)

    def test_is_a_freeze_store(self) -> None:
        """The store satisfies the protocol code's FreezeStore seam."""
        store: FreezeStore = self.make()
        assert store.is_frozen("alice@example.com") is False

    def test_freeze_and_thaw(self) -> None:
        """A frozen account is frozen until thawed; thaw reports whether it was."""
        store = self.make()
        store.freeze("alice@example.com", None, "manual")
        assert store.is_frozen("alice@example.com")
        assert not store.is_frozen("bob@example.com")
        assert store.thaw("alice@example.com") is True
        assert not store.is_frozen("alice@example.com")
        assert store.thaw("alice@example.com") is False

    def test_case_insensitive(self) -> None:
        """Accounts compare case-insensitively."""
        store = self.make()
        store.freeze("Alice@Example.COM", 0, "manual")
        assert store.is_frozen("alice@example.com")
        assert store.entries()[0].name == "alice@example.com"

    def test_freeze_expires(self) -> None:
        """A timed freeze holds until its minutes have passed, then lapses by itself."""
        store = self.make()
        entry = store.freeze("alice@example.com", 30, "session_auth: 5/5")
        assert entry.expires == START + 1800
        self.clock.advance(1799)
        assert store.is_frozen("alice@example.com")
        self.clock.advance(1)
        assert not store.is_frozen("alice@example.com")
        assert store.entries() == []
        assert store.thaw("alice@example.com") is False

    def test_refreeze_replaces(self) -> None:
        """Freezing again replaces expiry and reason."""
        store = self.make()
        store.freeze("alice@example.com", 10, "first")
        store.freeze("alice@example.com", None, "second")
        [entry] = store.entries()
        assert entry.expires is None and entry.reason == "second"

    def test_entries(self) -> None:
        """entries() lists every active freeze with expiry and reason."""
        store = self.make()
        store.freeze("a@example.com", None, "one")
        store.freeze("b@example.com", 5, "two")
        got = [(e.name, e.expires, e.reason) for e in store.entries()]
        assert got == [("a@example.com", None, "one"), ("b@example.com", START + 300, "two")]

    def test_bad_names(self) -> None:
        """Names that cannot be written to the file are refused, never frozen."""
        store = self.make()
        with pytest.raises(ValueError):
            store.freeze("two words", None, "x")
        with pytest.raises(ValueError):
            store.freeze("", None, "x")
        assert not store.is_frozen("")


class TestMemoryFreezeStore(FreezeStoreTests):
    def make(self) -> MemoryFreezeStore:
        return MemoryFreezeStore(self.clock, QUIET)


class TestFileFreezeStore(FreezeStoreTests):
    def make(self) -> FileFreezeStore:
        return FileFreezeStore(str(self.tmp_path / "frozen.txt"), self.clock, QUIET)

    def test_file_format(self) -> None:
        """frozen.txt has one readable line per account, written atomically."""
        store = self.make()
        store.freeze("alice@example.com", 60, "session_auth: 5/5 failures")
        store.freeze("bob@example.com", None, "manual")
        lines = [line for line in (self.tmp_path / "frozen.txt").read_text().splitlines()
                 if not line.startswith("#")]
        assert lines == [
            "alice@example.com  2027-01-15T09:00:00Z  # session_auth: 5/5 failures",
            "bob@example.com    never                 # manual",
        ]
        assert sorted(os.listdir(self.tmp_path)) == ["frozen.txt"]

    def test_restart(self) -> None:
        """A new store on the same file sees the same freezes and expiries."""
        store = self.make()
        store.freeze("alice@example.com", 60, "x")
        self.clock.advance(100)
        again = self.make()
        assert again.is_frozen("alice@example.com")
        assert again.entries()[0].expires == START + 3600

    def test_hand_edit(self) -> None:
        """A hand edit (with +MINUTES) is picked up within a second and made absolute."""
        store = self.make()
        store.freeze("alice@example.com", None, "x")
        path = self.tmp_path / "frozen.txt"
        path.write_text("carol@example.com +30 # by hand\nbroken line here\n")
        assert store.is_frozen("alice@example.com")  # not re-read yet
        self.clock.advance(1)
        assert not store.is_frozen("alice@example.com")
        assert store.is_frozen("carol@example.com")
        text = path.read_text()
        assert "+30" not in text and "2027-01-15T08:30:01Z" in text
        assert "# malformed (ignored): broken line here" in text


def test_stores_satisfy_the_admin_seam(tmp_path: Path) -> None:
    """Both stores are what the screening service and its admin API use."""
    clock = Clock()
    stores: list[AdminFreezeStore] = [
        MemoryFreezeStore(clock, QUIET), FileFreezeStore(str(tmp_path / "frozen.txt"), clock, QUIET)]
    for store in stores:
        assert store.reload_if_changed() in (True, False)
        assert store.table.entries() == []


def test_service_check_rewrites_hand_edits(tmp_path: Path) -> None:
    """
    The screening service's once-a-second check picks up a hand edit of
    frozen.txt and makes +MINUTES absolute, with no account looked up.
    """
    clock = Clock()
    clock.advance(START)
    service = ScreeningService.in_directory(ScreeningConfig(), FreezeConfig(), clock,
                                            str(tmp_path), None, QUIET)
    service.start()
    path = tmp_path / "frozen.txt"
    path.write_text("carol@example.com +30 # by hand\n")
    clock.advance(1)
    text = path.read_text()
    assert "+30" not in text and "carol@example.com" in text
    service.stop()


def test_service_check_drops_lapsed_freezes_from_the_file(tmp_path: Path) -> None:
    """
    A timed freeze lapses by itself, and the once-a-second check then takes
    it out of frozen.txt (as it does for lapsed blocks), logging it once.
    """
    clock = Clock()
    clock.advance(START)
    lines: list[str] = []
    log = Logger(observer=lambda e: lines.append(e["log_format"].format(**e)))
    service = ScreeningService.in_directory(ScreeningConfig(), FreezeConfig(), clock,
                                            str(tmp_path), None, log)
    service.start()
    assert service.freeze_store is not None
    service.freeze_store.freeze("alice@example.com", 1, "manual")
    service.freeze_store.freeze("bob@example.com", None, "manual")
    path = tmp_path / "frozen.txt"
    clock.advance(59)
    assert "alice@example.com" in path.read_text()
    clock.advance(1)
    text = path.read_text()
    assert "alice@example.com" not in text and "bob@example.com" in text
    assert [l for l in lines if "action=expire" in l] == [
        "screening: action=expire account=alice@example.com reason=manual"]
    service.stop()
