# -*- test-case-name: tests.test_redis_screening -*-
"""
The lists every node must agree on (blocks, the run-time white list,
frozen accounts) kept in step through Redis.

Each list is a hash in Redis (C{PREFIX list:block}, C{list:white},
C{list:freeze}: name -> C{[expires, reason]} as JSON) and every change is
also published on the cluster's channel, so each node applies it to its
own in-memory table within a round trip. The tables stay the ones the
connection decision reads (L{twisted_mail_screen.screening.listfile}), so
that decision never waits on the network.

A change made while Redis is unreachable is kept here and sent on
reconnect; then the node makes its tables equal to Redis's (a change made
elsewhere during the outage wins over what this node had, except for its
own changes from that time).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from twisted_mail_screen.screening.listfile import Entry, ExpiringFile

Call = Callable[..., Deferred]

# A put and its message in one step, so no node can see one without the
# other; a block also clears the counters it was made from, as the
# in-memory rules forget a blocked client's record.
PUT = """
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
for i = 3, #KEYS do redis.call('DEL', KEYS[i]) end
redis.call('PUBLISH', KEYS[2], ARGV[3])
return 1
"""
DELETE = """
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('PUBLISH', KEYS[2], ARGV[2])
return 1
"""


class SharedLists:
    """
    The tables named in C{tables} (C{"block"}, C{"white"}, C{"freeze"})
    shared through Redis under C{prefix}; C{node} marks this node's own
    messages, which it has already applied.
    """

    def __init__(self, call: Call, prefix: str, channel: str, node: str,
                 tables: dict[str, ExpiringFile], clock: IReactorTime,
                 log: Logger) -> None:
        self._call = call
        self._prefix = prefix
        self._channel = channel
        self._node = node
        self._tables = tables
        self._clock = clock
        self._log = log
        self._applying = False
        self._unsent: dict[tuple[str, str], Entry | None] = {}
        self.on_block: Callable[[str], None] | None = None
        for name, table in tables.items():
            table.on_change = self._observer(name)

    def _observer(self, list_name: str) -> Callable[[str, Entry | None], None]:
        def changed(name: str, entry: Entry | None) -> None:
            if not self._applying:
                self.send(list_name, name, entry)
        return changed

    def key(self, list_name: str) -> str:
        return f"{self._prefix}list:{list_name}"

    def send(self, list_name: str, name: str, entry: Entry | None) -> None:
        """Share one local change (kept for the reconnect if Redis is down)."""
        message = {"n": self._node, "l": list_name, "k": name}
        if entry is None:
            d = self._call("EVAL", DELETE, 2, self.key(list_name), self._channel,
                           name, json.dumps(message))
        else:
            message.update(e=entry.expires, r=entry.reason)
            counters = ([f"{self._prefix}conn:{name}", f"{self._prefix}auth:{name}"]
                        if list_name == "block" else [])
            d = self._call("EVAL", PUT, 2 + len(counters), self.key(list_name), self._channel,
                           *counters, name, json.dumps([entry.expires, entry.reason]),
                           json.dumps(message))
        self._unsent[(list_name, name)] = entry
        d.addCallbacks(lambda _: self._unsent.pop((list_name, name), None), lambda _: None)

    def apply_message(self, message: dict[str, Any]) -> None:
        """A change another node published."""
        if message.get("n") == self._node:
            return
        table = self._tables.get(message.get("l", ""))
        name = message.get("k")
        if table is None or not isinstance(name, str):
            return
        if "e" in message:
            self._apply(table, message["l"], name, Entry(name, message["e"], str(message.get("r", ""))))
        else:
            self._apply(table, message["l"], name, None)

    def _apply(self, table: ExpiringFile, list_name: str, name: str, entry: Entry | None) -> None:
        self._applying = True
        try:
            if entry is None:
                table.delete(name)
            else:
                table.put(entry)
        except Exception:
            self._log.failure("screening: could not apply a shared {what} change", what=list_name)
        finally:
            self._applying = False
        if entry is not None and list_name == "block" and self.on_block is not None:
            self.on_block(name)

    def resync(self) -> Deferred:
        """
        After (re)connecting: send what changed here while Redis was away,
        then make each table equal to Redis's hash (on the very first
        connection, entries only this node has are added to Redis instead).
        """
        for (list_name, name), entry in list(self._unsent.items()):
            self.send(list_name, name, entry)
        return gatherResults([self._resync_one(name) for name in self._tables],
                             consumeErrors=True)

    def _resync_one(self, list_name: str) -> Deferred:
        table = self._tables[list_name]

        def got(reply: list[bytes]) -> None:
            now = self._clock.seconds()
            remote: dict[str, Entry] = {}
            lapsed = []
            for i in range(0, len(reply) - 1, 2):
                name = reply[i].decode("utf-8", "replace")
                try:
                    expires, reason = json.loads(reply[i + 1])
                except ValueError:
                    continue
                entry = Entry(name, expires, reason)
                if entry.active(now):
                    remote[name] = entry
                else:
                    lapsed.append(name)
            if lapsed:
                self._call("HDEL", self.key(list_name), *lapsed).addErrback(lambda _: None)
            local = {e.name: e for e in table.entries()}
            for name, entry in remote.items():
                if local.get(name) != entry and (list_name, name) not in self._unsent:
                    self._apply(table, list_name, name, entry)
            for name, entry in local.items():
                if name in remote or (list_name, name) in self._unsent:
                    continue
                if self._seeded:
                    self._apply(table, list_name, name, None)
                else:
                    self.send(list_name, name, entry)

        def failed(failure: Failure) -> None:
            self._log.warn("screening: could not re-read the shared {what} list: {why}",
                           what=list_name, why=failure.getErrorMessage())

        return self._call("HGETALL", self.key(list_name)).addCallbacks(got, failed)

    _seeded = False

    def seeded(self) -> None:
        """The first resync is done: from now on Redis is the reference."""
        self._seeded = True
