# -*- test-case-name: tests.test_cli -*-
"""
Accounts and aliases, kept in two small text files in the data directory so
an administrator can read them and the C{mailscreen} command can edit them
while the server runs:

  - C{users}: one C{address:hash} per line (see L{passwords}).
  - C{aliases}: one C{address: target, target} per line, aliases(5) style;
    C{@domain: target} is that domain's catch-all.

The server re-reads a file when its version (inode, size, modification
time) changes, so an edit takes effect without a restart. A lookup looks at
a file's version at most once a second by the server's clock (a C{stat} on
the reactor thread per RCPT was the cost before): an edit by another process
(C{mailscreen user add}, an editor) is seen within a second; one made
through any L{AccountStore} of this process (the pytest plugin's
C{add_user}) at the next lookup.
"""

from __future__ import annotations

import os
import threading
from typing import Callable, Iterator

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from twisted_mail_screen.store.addresses import AddressError, normalise_address
from twisted_mail_screen.runtime.atomic import write_atomically
from twisted_mail_screen.runtime.filewatch import FileWatch
from twisted_mail_screen.store.passwords import hash_password, verify_password


#: Seconds a lookup trusts the version of a file it last looked at.
LOOK_INTERVAL = 1.0

#: How many times each file (by absolute path) was written by this process:
#: a lookup through any store sees a write made through another at once.
_writes: dict[str, int] = {}
_writes_lock = threading.Lock()


def _written(key: str) -> None:
    with _writes_lock:
        _writes[key] = _writes.get(key, 0) + 1


class AccountError(ValueError):
    """An administrative change that cannot be made, with the reason."""


class AccountStore:
    """
    Users (address → password hash) and aliases (address → targets).

    Lookups are cheap and safe from any thread. With a C{clock} (the
    server's), each file's version is looked at (one C{stat}) at most once
    a L{LOOK_INTERVAL}; without one (the CLI), at every lookup.
    """

    log = Logger()

    def __init__(self, data_dir: str, clock: IReactorTime | None = None) -> None:
        paths = (os.path.join(data_dir, "users"), os.path.join(data_dir, "aliases"))
        self._users, self._aliases = FileWatch(paths[0]), FileWatch(paths[1])
        # Each file's contents as last parsed, until its FileWatch says it changed.
        self._parsed: dict[str, dict] = {}
        self._lock = threading.Lock()
        self._clock = clock
        # Each file's key in _writes (made absolute once: abspath of a relative path asks the kernel).
        self._keys = {p: os.path.abspath(p) for p in paths}
        # Per file: when its version was last looked at, and _writes' count then.
        self._looked: dict[str, tuple[float, int]] = {}

    # reading

    def _trusted(self, path: str) -> bool:
        """Whether the version last looked at may be used without a C{stat} (under C{_lock})."""
        if self._clock is None or path not in self._parsed:
            return False
        looked = self._looked.get(path)
        return (looked is not None and self._clock.seconds() < looked[0] + LOOK_INTERVAL
                and looked[1] == _writes.get(self._keys[path], 0))

    def _load(self, watch: FileWatch, parse: Callable[[str], dict]) -> dict:
        path = watch.path
        assert path is not None
        with self._lock:
            if self._trusted(path):
                return self._parsed[path]
        writes = _writes.get(self._keys[path], 0)  # before the stat: a write after it is seen next time
        signature = watch.current()
        with self._lock:
            if self._clock is not None:
                self._looked[path] = (self._clock.seconds(), writes)
            value = self._parsed.get(path)
            if value is None or signature != watch.signature:
                value = self._parsed[path] = parse(path) if signature else {}
                watch.written(signature)
            return value

    def _parse_users(self, path: str) -> dict[str, str]:
        return {address: hashed.strip() for address, hashed in self._entries(path, "user")}

    def _parse_aliases(self, path: str) -> dict[str, tuple[str, ...]]:
        return {name: tuple(t.strip().lower() for t in targets.split(",") if t.strip())
                for name, targets in self._entries(path, "alias")}

    def _entries(self, path: str, kind: str) -> Iterator[tuple[str, str]]:
        """C{(key, value)} of each C{key:value} line, key lower-cased; others logged and skipped."""
        for number, line in _lines(path):
            key, sep, value = line.partition(":")
            if not sep:
                self.log.warn("{path}:{number}: no ':' in {kind} line, skipped",
                              path=path, number=number, kind=kind)
                continue
            yield key.strip().lower(), value

    def users(self) -> dict[str, str]:
        return dict(self._load(self._users, self._parse_users))

    def aliases(self) -> dict[str, tuple[str, ...]]:
        return dict(self._load(self._aliases, self._parse_aliases))

    def exists(self, address: str) -> bool:
        return address.lower() in self._load(self._users, self._parse_users)

    def alias_targets(self, address: str) -> tuple[str, ...] | None:
        return self._load(self._aliases, self._parse_aliases).get(address.lower())

    def check_password(self, address: str, password: str) -> bool:
        """Slow by design (scrypt): call it off the reactor thread."""
        stored = self._load(self._users, self._parse_users).get(address.lower())
        if stored is None:
            # Same work for unknown users, so timing does not reveal them.
            verify_password(password, _DUMMY_HASH)
            return False
        return verify_password(password, stored)

    # administration (the mailscreen command)

    def add_user(self, address: str, password: str) -> str:
        address = _checked(address)
        users = self.users()
        if address in users:
            raise AccountError(f"{address} already exists")
        users[address] = hash_password(password)
        self._write_users(users)
        return address

    def set_password(self, address: str, password: str) -> None:
        address = _checked(address)
        users = self.users()
        if address not in users:
            raise AccountError(f"{address} does not exist")
        users[address] = hash_password(password)
        self._write_users(users)

    def delete_user(self, address: str) -> None:
        address = address.lower()
        users = self.users()
        if users.pop(address, None) is None:
            raise AccountError(f"{address} does not exist")
        self._write_users(users)

    def set_alias(self, name: str, targets: list[str]) -> None:
        if name.startswith("@"):
            key = "@" + _checked("x" + name)[2:]
        else:
            key = _checked(name)
        if not targets:
            raise AccountError("an alias needs at least one target")
        aliases = self.aliases()
        aliases[key] = tuple(_checked(t) for t in targets)
        self._write_aliases(aliases)

    def delete_alias(self, name: str) -> None:
        aliases = self.aliases()
        if aliases.pop(name.lower(), None) is None:
            raise AccountError(f"{name} is not an alias")
        self._write_aliases(aliases)

    def _write_users(self, users: dict[str, str]) -> None:
        body = "".join(f"{a}:{h}\n" for a, h in sorted(users.items()))
        os.makedirs(os.path.dirname(self._users.path), mode=0o750, exist_ok=True)
        write_atomically(self._users.path, body.encode(), 0o600)
        _written(self._keys[self._users.path])

    def _write_aliases(self, aliases: dict[str, tuple[str, ...]]) -> None:
        body = "".join(f"{a}: {', '.join(t)}\n" for a, t in sorted(aliases.items()))
        os.makedirs(os.path.dirname(self._aliases.path), mode=0o750, exist_ok=True)
        write_atomically(self._aliases.path, body.encode(), 0o644)
        _written(self._keys[self._aliases.path])


#: A fixed hash (of "not a password anyone has", same cost as every new
#: hash) that an unknown user's password is checked against; a constant, so
#: importing this module runs no scrypt.
_DUMMY_HASH = "scrypt$16384$8$1$vYXnW7It91wTAFCdgBf7mQ==$87yN1oO6oL5x2ya0qmvwPtVBTOLs+Pvpc4OyiKWMkqE="


def _checked(address: str) -> str:
    try:
        return normalise_address(address)
    except AddressError as e:
        raise AccountError(f"{address!r}: {e}") from e


def _lines(path: str) -> Iterator[tuple[int, str]]:
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            if line and not line.startswith("#"):
                yield number, line
