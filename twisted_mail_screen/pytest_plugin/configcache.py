"""
The plugin's test-host settings, parsed once per process for each distinct
set of settings and reused: each test gets the frozen L{Config} moved to
its own data directory (and control socket) by L{with_data_dir}, which
checks them as a parse does. About 0.6 ms of a test's set-up
(docs/performance.md, the plugin's start-up cost, sixth round).
"""

from __future__ import annotations

import os
from typing import Any, Hashable

from twisted_mail_screen.config.settings import Config, load_config, with_data_dir

#: The settings that differ from test to test, applied after the lookup.
PER_TEST = ("data_dir", "control_socket")
#: Distinct settings kept at most (a test's own sink port makes its own).
MAX_ENTRIES = 64
_PLAIN = (str, int, float, bool, type(None))

_parsed: dict[Hashable, Config] = {}


class _NotCacheable(Exception):
    pass


def _frozen(value: Any) -> Hashable:
    """
    A hashable form of a settings value that tells C{True} from C{1} and
    a list from a string; a value naming an existing file makes the
    settings uncacheable (the parse reads files, which may change).
    """
    if isinstance(value, str) and value and os.path.exists(value):
        raise _NotCacheable(value)
    if isinstance(value, _PLAIN):
        return (type(value).__name__, value)
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_frozen(v) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple(sorted((str(k), _frozen(v)) for k, v in value.items())))
    raise _NotCacheable(value)


def host_config(table: dict[str, Any]) -> Config:
    """
    L{load_config}C{(None, table)}, the parse shared by every call whose
    C{table} differs only in C{data_dir} and C{control_socket} (and made
    in the same working directory: relative paths resolve against it).
    """
    if any(not isinstance(table.get(k, ""), str) for k in PER_TEST):
        return load_config(None, table)  # its own error message names the key
    rest = {k: v for k, v in table.items() if k not in PER_TEST}
    try:
        key: Hashable = (os.getcwd(), _frozen(rest))
    except _NotCacheable:
        return load_config(None, table)
    cached = _parsed.get(key)
    if cached is None:
        config = load_config(None, table)
        if len(_parsed) >= MAX_ENTRIES:  # e.g. a relay sink's port in every table
            _parsed.clear()
        _parsed[key] = config
        return config
    return with_data_dir(cached, table.get("data_dir", "mailscreen-data"), table.get("control_socket"))
