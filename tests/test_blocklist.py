"""
Tests for L{twisted_mail_screen.screening.blocklist} and
L{twisted_mail_screen.screening.listfile}: the list file format, hand
edits, reloads and restarts.
"""

from __future__ import annotations

import os
from pathlib import Path

from twisted.internet.task import Clock
from twisted.logger import Logger, formatEvent

from twisted_mail_screen.screening.blocklist import BlockList, WhitelistFile
from twisted_mail_screen.screening.config import ScreeningConfig
from twisted_mail_screen.screening.listfile import format_expiry, parse_expiry, split_comment
from twisted_mail_screen.screening.service import ScreeningService

START = 1_800_000_000.0  # 2027-01-15T08:00:00Z
START_ISO = "2027-01-15T08:00:00Z"


def make(tmp_path: Path, clock: Clock | None = None) -> tuple[BlockList, Clock, list[str]]:
    if clock is None:
        clock = Clock()
        clock.advance(START)
    lines: list[str] = []
    log = Logger(observer=lambda e: lines.append(formatEvent(e)))
    return BlockList(str(tmp_path / "blocklist.txt"), clock, log), clock, lines


def body_lines(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines()
            if line.strip() and not line.startswith("#")]


def test_expiry_format_roundtrip() -> None:
    """Expiries are ISO 8601 UTC with a Z, and parse back to the same second."""
    assert format_expiry(START) == START_ISO
    assert format_expiry(None) == "never"
    assert parse_expiry(START_ISO, 0) == (START, False)
    assert parse_expiry("2027-01-15T08:00:00+00:00", 0) == (START, False)
    assert parse_expiry("2027-01-15T09:00:00+01:00", 0) == (START, False)
    assert parse_expiry("never", 0) == (None, False)
    assert parse_expiry("+10", START) == (START + 600, True)
    assert parse_expiry("10", START) == (START + 600, True)


def test_comment_split_keeps_wildcard_hash() -> None:
    """A # inside an entry is a wildcard, not a comment."""
    assert split_comment("10.0.0.#  never  # office") == ("10.0.0.#  never", "office")
    assert split_comment("# all comment") == ("", "all comment")
    assert split_comment("1.2.3.4 never") == ("1.2.3.4 never", "")


def test_add_lookup_write(tmp_path: Path) -> None:
    """An added block is found, written in the documented line format, and lapses."""
    blocks, clock, _ = make(tmp_path)
    blocks.add("192.0.2.7", START + 1800, "auth_failures: 10/10 in 15m (imap)")
    assert blocks.lookup("192.0.2.7") is not None
    assert blocks.lookup("::ffff:192.0.2.7") is not None
    assert blocks.lookup("192.0.2.8") is None
    assert blocks.flush()
    assert body_lines(tmp_path / "blocklist.txt") == [
        "192.0.2.7  2027-01-15T08:30:00Z  # auth_failures: 10/10 in 15m (imap)"]
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
    clock.advance(1799)
    assert blocks.lookup("192.0.2.7") is not None
    clock.advance(1)
    assert blocks.lookup("192.0.2.7") is None


def test_network_entries(tmp_path: Path) -> None:
    """A network entry blocks every address inside it; remove by an address inside works."""
    blocks, _, _ = make(tmp_path)
    blocks.add("2001:db8:1:2::/64", None, "manual")
    blocks.add("198.51.100.0/24", None, "manual")
    assert blocks.lookup("2001:db8:1:2::99") is not None
    assert blocks.lookup("2001:db8:1:3::99") is None
    assert blocks.lookup("198.51.100.200") is not None
    removed = blocks.remove("198.51.100.5")
    assert removed is not None and removed.name == "198.51.100.0/24"
    assert blocks.lookup("198.51.100.200") is None
    assert blocks.remove("203.0.113.1") is None
    assert blocks.remove("not an address") is None


def test_hand_written_file(tmp_path: Path) -> None:
    """Every accepted form is read; +MINUTES becomes absolute and the file is rewritten."""
    path = tmp_path / "blocklist.txt"
    path.write_text(
        "# a comment\n"
        "\n"
        "192.0.2.1   2027-01-15T09:00:00Z   # until nine\n"
        "192.0.2.2   never                  # forever\n"
        "192.0.2.3   +90                    # an hour and a half\n"
        "192.0.2.4   15\n"
        "192.0.2.5\n"
        "10.9.8.7/8  never\n"
        "::ffff:192.0.2.6  never\n")
    blocks, clock, _ = make(tmp_path)
    got = {e.name: e.expires for e in blocks.entries()}
    assert got == {"192.0.2.1": START + 3600, "192.0.2.2": None,
                   "192.0.2.3": START + 5400, "192.0.2.4": START + 900,
                   "192.0.2.5": None, "10.0.0.0/8": None, "192.0.2.6": None}
    assert blocks.flush()
    text = path.read_text()
    assert "+90" not in text and "2027-01-15T09:30:00Z" in text
    assert "10.0.0.0/8" in text
    # Reading the rewritten file later changes nothing.
    clock.advance(600)
    again, _, _ = make(tmp_path, clock)
    assert {e.name: e.expires for e in again.entries()} == got


def test_malformed_lines_skipped_and_kept(tmp_path: Path) -> None:
    """Bad lines are logged with their line number, ignored, and kept as comments."""
    path = tmp_path / "blocklist.txt"
    path.write_text("192.0.2.1 never\nbogus-host never\n192.0.2.2 tomorrow\n"
                    "192.0.2.3 never extra\n192.0.2.4 never\n")
    blocks, _, lines = make(tmp_path)
    assert [e.name for e in blocks.entries()] == ["192.0.2.1", "192.0.2.4"]
    assert any("line 2" in line and "bogus-host" in line for line in lines)
    assert any("line 3" in line for line in lines)
    assert any("line 4" in line for line in lines)
    blocks.flush()
    text = path.read_text()
    assert "# malformed (ignored): bogus-host never" in text
    # The preserved comment is not re-reported as a new error on the next read.
    lines.clear()
    make(tmp_path, blocks._clock)[0].entries()  # type: ignore[attr-defined]
    assert not lines


def test_expired_entries_dropped(tmp_path: Path) -> None:
    """Entries already expired when read are dropped; expire() removes lapsed ones."""
    path = tmp_path / "blocklist.txt"
    path.write_text("192.0.2.1 2020-01-01T00:00:00Z\n192.0.2.2 +1\n")
    blocks, clock, _ = make(tmp_path)
    assert [e.name for e in blocks.entries()] == ["192.0.2.2"]
    clock.advance(60)
    assert [e.name for e in blocks.expire()] == ["192.0.2.2"]
    blocks.flush()
    assert body_lines(path) == []


def test_reload_if_changed(tmp_path: Path) -> None:
    """A hand edit is seen by reload_if_changed; our own write is not a change."""
    path = tmp_path / "blocklist.txt"
    blocks, clock, _ = make(tmp_path)
    blocks.add("192.0.2.1", None, "manual")
    blocks.flush()
    assert not blocks.reload_if_changed()
    with open(path, "a") as f:
        f.write("203.0.113.9  +10  # by hand\n")
    assert blocks.reload_if_changed()
    entry = blocks.lookup("203.0.113.9")
    assert entry is not None and entry.expires == START + 600
    assert blocks.flush()
    assert "+10" not in path.read_text()
    assert not blocks.reload_if_changed()


def test_deleting_the_file_lifts_everything(tmp_path: Path) -> None:
    """Removing blocklist.txt by hand empties the list."""
    blocks, _, _ = make(tmp_path)
    blocks.add("192.0.2.1", None, "manual")
    blocks.flush()
    os.unlink(tmp_path / "blocklist.txt")
    assert blocks.reload_if_changed()
    assert blocks.entries() == []


def test_hand_edit_merged_with_pending(tmp_path: Path) -> None:
    """A change not yet written survives a hand edit made meanwhile, and vice versa."""
    path = tmp_path / "blocklist.txt"
    blocks, _, _ = make(tmp_path)
    blocks.add("192.0.2.1", None, "first")
    blocks.flush()
    blocks.add("192.0.2.2", None, "pending")
    with open(path, "a") as f:
        f.write("192.0.2.3 never # by hand\n")
    blocks.flush()
    assert sorted(e.name for e in blocks.entries()) == ["192.0.2.1", "192.0.2.2", "192.0.2.3"]
    assert {line.split()[0] for line in body_lines(path)} == {
        "192.0.2.1", "192.0.2.2", "192.0.2.3"}


def test_restart_keeps_expiries(tmp_path: Path) -> None:
    """A new list on the same file has the same expiries to the second."""
    blocks, clock, _ = make(tmp_path)
    blocks.add("192.0.2.1", START + 1234.5, "auth_failures: x")
    blocks.add("2001:db8::/64", None, "manual")
    blocks.flush()
    before = [(e.name, e.expires, e.reason) for e in blocks.entries()]
    clock.advance(1000)
    after, _, _ = make(tmp_path, clock)
    assert [(e.name, e.expires, e.reason) for e in after.entries()] == before
    assert after.flush() is False  # nothing to rewrite


def test_memory_only(tmp_path: Path) -> None:
    """Without a path the list works in memory and writes nothing."""
    clock = Clock()
    blocks = BlockList(None, clock)
    blocks.add("192.0.2.1", None, "manual")
    assert blocks.lookup("192.0.2.1") is not None
    assert blocks.flush() is False
    assert not blocks.reload_if_changed()


def test_whitelist_file(tmp_path: Path) -> None:
    """whitelist.txt holds wildcard entries whose # is not a comment."""
    path = tmp_path / "whitelist.txt"
    path.write_text("10.0.0.#  never  # printers\n192.168.*.*\nnonsense\n")
    clock = Clock()
    wl = WhitelistFile(str(path), clock, Logger(observer=lambda e: None))
    assert wl.matches_parsed(4, 0x0A000005)
    assert not wl.matches_parsed(4, 0x0A000037)
    assert wl.matches_parsed(4, 0xC0A80101)
    assert [e.name for e in wl.entries()] == ["10.0.0.#", "192.168.*.*"]


class HeldPool:
    """A stand-in worker pool whose calls run when the test says so."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def run(self, f, *args):
        from twisted.internet.defer import Deferred
        d = Deferred()
        self.calls.append((f, args, d))
        return d

    def finish(self, fail: bool = False) -> None:
        f, args, d = self.calls.pop(0)
        if fail:
            d.errback(OSError(28, "No space left on device"))
        else:
            d.callback(f(*args))


def test_write_in_a_pool_waits_for_its_own_write(tmp_path: Path) -> None:
    """
    With a worker pool, flush only starts the write; until it lands, later
    changes wait, the landing file is not taken for a hand edit, and a
    failed write leaves the changes pending.
    """
    blocks, _, log = make(tmp_path)
    pool = HeldPool()
    blocks.write_with(pool.run)
    blocks.add("192.0.2.7", None, "first")
    assert blocks.flush() and len(pool.calls) == 1
    assert not (tmp_path / "blocklist.txt").exists()  # nothing written on this thread
    blocks.add("192.0.2.8", None, "second")
    assert not blocks.flush() and blocks.dirty  # one write at a time
    pool.finish()
    assert not blocks.reload_if_changed()  # its own write, not a hand edit
    assert [l.split()[0] for l in body_lines(tmp_path / "blocklist.txt")] == ["192.0.2.7"]
    assert blocks.flush()
    pool.finish(fail=True)
    assert blocks.dirty and any("cannot write" in line for line in log)
    assert blocks.flush(wait=True)  # e.g. at shutdown: in this thread
    assert [l.split()[0] for l in body_lines(tmp_path / "blocklist.txt")] == ["192.0.2.7", "192.0.2.8"]


def test_running_service_writes_blocks_on_its_tick(tmp_path: Path) -> None:
    """
    While the screening service runs, automatic blocks wait for its
    once-a-second check, so a storm of blocks is one write a second.
    """
    blocks, clock, _ = make(tmp_path)
    quiet = Logger(observer=lambda e: None)
    service = ScreeningService(ScreeningConfig(max_auth_failures=1), clock, blocks, log=quiet)
    service.start()
    for i in range(3):
        service.open(f"192.0.2.{i}", "imap").auth_failed("bob@example.com", b"x")
    path = tmp_path / "blocklist.txt"
    assert not path.exists() or "192.0.2.0" not in path.read_text()
    clock.advance(1)
    assert [line.split()[0] for line in body_lines(path)] == ["192.0.2.0", "192.0.2.1",
                                                               "192.0.2.2"]
    service.stop()
