# -*- test-case-name: tests.test_config -*-
"""
The error type and typed readers every configuration section uses, so each
section parses its own TOML table with messages that name the key path.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

T = TypeVar("T")


class ConfigError(Exception):
    """
    A configuration value is unusable.

    @ivar key: dotted path of the key (C{screening.block_minutes}).
    @ivar value: the offending value, or C{None} when the key is missing.
    @ivar problem: what is wrong with it, in words.
    """

    def __init__(self, key: str, value: object, problem: str) -> None:
        self.key = key
        self.value = value
        self.problem = problem
        super().__init__(f"{key} = {value!r}: {problem}")


def _type_name(t: type | tuple[type, ...]) -> str:
    names = {str: "a string", int: "an integer", bool: "true or false",
             float: "a number", list: "a list", dict: "a table"}
    if isinstance(t, tuple):
        return " or ".join(names.get(x, x.__name__) for x in t)
    return names.get(t, t.__name__)


class Section:
    """
    A TOML table being read: every key taken is recorded, so that
    L{finish} can refuse the keys nobody asked for (typos).
    """

    def __init__(self, table: Mapping[str, Any], path: str = "") -> None:
        if not isinstance(table, Mapping):
            raise ConfigError(path or "(top level)", table, "must be a table")
        self._table = table
        self._path = path
        self._seen: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self._path}.{name}" if self._path else name

    def has(self, name: str) -> bool:
        return name in self._table

    def raw(self, name: str, default: Any = None) -> Any:
        self._seen.add(name)
        return self._table.get(name, default)

    def get(self, name: str, kind: type[T], default: T) -> T:
        """
        The value of C{name}, which must be of C{kind} (bools are not ints).
        """
        self._seen.add(name)
        if name not in self._table:
            return default
        value = self._table[name]
        ok = isinstance(value, kind)
        if kind is int and isinstance(value, bool):
            ok = False
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value, ok = float(value), True
        if not ok:
            raise ConfigError(self.key(name), value, f"must be {_type_name(kind)}")
        return value  # type: ignore[return-value]

    def integer(self, name: str, default: int, minimum: int = 0,
                maximum: int | None = None) -> int:
        value = self.get(name, int, default)
        if value < minimum:
            raise ConfigError(self.key(name), value, f"must be at least {minimum}")
        if maximum is not None and value > maximum:
            raise ConfigError(self.key(name), value, f"must be at most {maximum}")
        return value

    def number(self, name: str, default: float, minimum: float = 0.0) -> float:
        value = self.get(name, float, default)
        if value < minimum:
            raise ConfigError(self.key(name), value, f"must be at least {minimum}")
        return value

    def string_list(self, name: str, default: Iterable[str]) -> tuple[str, ...]:
        value = self.get(name, list, list(default))
        for item in value:
            if not isinstance(item, str):
                raise ConfigError(self.key(name), value, "must be a list of strings")
        return tuple(value)

    def choice(self, name: str, default: str, choices: Iterable[str]) -> str:
        value = self.get(name, str, default)
        allowed = tuple(choices)
        if value not in allowed:
            raise ConfigError(self.key(name), value,
                              "must be one of " + ", ".join(repr(c) for c in allowed))
        return value

    def readable_file(self, name: str) -> str | None:
        """The path at C{name}, which must name a readable file; C{None} if absent."""
        value = self.get(name, str, None)  # type: ignore[arg-type]
        if value is None:
            return None
        if not os.path.isfile(value):
            raise ConfigError(self.key(name), value, "no such file")
        if not os.access(value, os.R_OK):
            raise ConfigError(self.key(name), value, "is not readable")
        return value

    def section(self, name: str) -> "Section":
        self._seen.add(name)
        return Section(self._table.get(name, {}), self.key(name))

    def finish(self) -> None:
        """
        Refuse any key of this table that no reader asked for.
        """
        for name in self._table:
            if name not in self._seen:
                raise ConfigError(self.key(name), self._table[name], "unknown key")
