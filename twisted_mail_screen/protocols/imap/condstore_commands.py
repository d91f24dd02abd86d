# -*- test-case-name: tests.test_imap_condstore -*-
"""
CONDSTORE and QRESYNC (RFC 7162) on the session: ENABLE, the
C{SELECT}/C{EXAMINE} parameters (C{CONDSTORE}, C{QRESYNC (...)}), the
FETCH modifiers C{CHANGEDSINCE} and C{VANISHED} and the C{MODSEQ} item,
C{STORE (UNCHANGEDSINCE n)} with C{[MODIFIED ...]}, the C{SEARCH MODSEQ}
key and C{STATUS HIGHESTMODSEQ}. The mod-sequences themselves are the
folder's (L{modseq}); these commands read them and hand the rest to the
ordinary commands they extend.

Once a CONDSTORE-enabling command has been seen, every FETCH response
carries MODSEQ (as Dovecot's do; the folder's changes told to the
session carry UID and MODSEQ);
once QRESYNC is enabled, expunges are told as C{VANISHED}.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from twisted.internet.defer import Deferred

from twisted_mail_screen.protocols.imap.message_commands import MessageCommands
from twisted_mail_screen.protocols.imap.modseq import ModSeqItem, changed_ranges
from twisted_mail_screen.protocols.imap.parse import Atom, BadCommand, SeqSet, Token, format_set, parse_seqset
from twisted_mail_screen.protocols.imap.store import set_positions
from twisted_mail_screen.store.modseqlist import MAX_MODSEQ

CAPABILITIES = ["CONDSTORE", "QRESYNC"]


class Resync(NamedTuple):
    """The client's state from C{SELECT ... (QRESYNC (...))}."""

    uidvalidity: int
    modseq: int
    known: SeqSet | None


def number(tok: Token, what: str, low: int = 0, high: int = MAX_MODSEQ) -> int:
    if not isinstance(tok, Atom) or not tok.isdigit() or not low <= int(tok) <= high:
        raise BadCommand(f"{what} expected")
    return int(tok)


def merged(positions: list[int]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for i in positions:
        if out and out[-1][1] == i:
            out[-1] = (out[-1][0], i + 1)
        else:
            out.append((i, i + 1))
    return out


class CondStoreCommands(MessageCommands):
    """RFC 7162 on top of the ordinary commands (state in L{SessionCore})."""

    _search_modseq = False

    def enable_extension(self, name: str) -> bool:
        if name == "CONDSTORE":
            self.condstore = True
            return True
        if name == "QRESYNC":
            self.condstore = self.qresync = True
            return True
        return super().enable_extension(name)  # type: ignore[misc]

    # SELECT / EXAMINE / STATUS

    def do_SELECT(self, tag: bytes, args: list, readonly: bool = False) -> Deferred:
        resync: Resync | None = None
        if len(args) == 2 and isinstance(args[1], list):
            resync = self._select_params(args[1])
            args = args[:1]
        if self.qresync and self.folder is not None:
            # RFC 7162 3.2.11: what follows is the new mailbox's, not the old one's.
            self.untagged("OK [CLOSED] Previous mailbox closed")
        d: Deferred = super().do_SELECT(tag, args, readonly)  # type: ignore[misc]
        return d.addCallback(self._selected, resync)

    def _select_params(self, params: list) -> Resync | None:
        resync = None
        i = 0
        while i < len(params):
            word = params[i].upper() if isinstance(params[i], Atom) else ""
            if word == "CONDSTORE":
                self.condstore = True
                i += 1
            elif word == "QRESYNC" and i + 1 < len(params) and isinstance(params[i + 1], list):
                if not self.qresync:
                    raise BadCommand("QRESYNC must be enabled first")
                q = params[i + 1]
                if not 2 <= len(q) <= 4:
                    raise BadCommand("QRESYNC needs a UIDVALIDITY and a mod-sequence")
                known = parse_seqset(q[2]) if len(q) > 2 else None
                if len(q) > 3:  # the sequence match data is syntax-checked; our expunges are remembered
                    if not isinstance(q[3], list) or len(q[3]) != 2:
                        raise BadCommand("QRESYNC sequence match data expected")
                    parse_seqset(q[3][0])
                    parse_seqset(q[3][1])
                resync = Resync(number(q[0], "UIDVALIDITY", 1, 2**32 - 1),
                                number(q[1], "mod-sequence", 1), known)
                i += 2
            else:
                raise BadCommand("unknown SELECT parameter")
        return resync

    def _selected(self, text: str | None, resync: Resync | None) -> Any:
        f = self.folder
        if text is None or f is None:
            return text
        self.untagged(f"OK [HIGHESTMODSEQ {f.ms.highest}] Highest")
        if resync is None or resync.uidvalidity != f.uidvalidity:
            return text
        gone = f.ms.vanished(resync.modseq, f.uids, f.next_uid, resync.known)
        if gone:
            self.untagged("VANISHED (EARLIER) " + gone)
        within = [(0, len(self.view))] if resync.known is None else \
            set_positions(resync.known, self.view, True)
        ranges = changed_ranges(self.view, within, f.ms.by_uid, resync.modseq)
        return self._stream_fetch(ranges, ["UID", "FLAGS", ModSeqItem(f.ms.by_uid)]).addCallback(
            lambda _: text)

    def do_STATUS(self, tag: bytes, args: list) -> Deferred:
        if len(args) == 2 and isinstance(args[1], list) and \
                any(isinstance(a, Atom) and a.upper() == "HIGHESTMODSEQ" for a in args[1]):
            self.condstore = True
        return super().do_STATUS(tag, args)  # type: ignore[misc,no-any-return]

    # FETCH

    def do_FETCH(self, tag: bytes, args: list, uid: bool = False, since: int | None = None,
                 extra: Any = ()) -> Deferred:
        vanished = False
        if len(args) == 3:
            since, vanished = self._fetch_modifiers(args[2], uid)
            args = args[:2]
        if len(args) == 2:
            atts = args[1] if isinstance(args[1], list) else [args[1]]
            kept = [a for a in atts if not (isinstance(a, Atom) and a.upper() == "MODSEQ")]
            if len(kept) != len(atts):  # MODSEQ is added below, as every FETCH's once enabled
                self.condstore = True
                args = [args[0], kept or [Atom("UID")]]
        folder = self.folder
        assert folder is not None
        if self.condstore:
            extra = [ModSeqItem(folder.ms.by_uid)]
        if vanished and since is not None:
            gone = folder.ms.vanished(since, folder.uids, folder.next_uid, parse_seqset(args[0]))
            if gone:
                self.untagged("VANISHED (EARLIER) " + gone)
        return super().do_FETCH(tag, args, uid, since, extra)

    def _fetch_modifiers(self, mods: Token, uid: bool) -> tuple[int | None, bool]:
        if not isinstance(mods, list) or not mods:
            raise BadCommand("FETCH modifiers expected")
        since: int | None = None
        vanished = False
        i = 0
        while i < len(mods):
            word = mods[i].upper() if isinstance(mods[i], Atom) else ""
            if word == "CHANGEDSINCE" and i + 1 < len(mods) and since is None:
                since = number(mods[i + 1], "mod-sequence")
                i += 2
            elif word == "VANISHED" and not vanished:
                vanished = True
                i += 1
            else:
                raise BadCommand("unknown FETCH modifier")
        if vanished and (not uid or not self.qresync or since is None):
            raise BadCommand("VANISHED needs UID FETCH, CHANGEDSINCE and QRESYNC enabled")
        self.condstore = True
        return since, vanished

    # STORE

    def do_STORE(self, tag: bytes, args: list, uid: bool = False) -> Deferred:
        unchanged: int | None = None
        if len(args) == 4 and isinstance(args[1], list):
            mods = args[1]
            if len(mods) != 2 or not isinstance(mods[0], Atom) or mods[0].upper() != "UNCHANGEDSINCE":
                raise BadCommand("unknown STORE modifier")
            unchanged = number(mods[1], "mod-sequence")
            self.condstore = True
            args = [args[0], args[2], args[3]]
        elif not self.condstore:
            return super().do_STORE(tag, args, uid)
        seqset, mode, silent, flags = self._store_args(args)
        folder = self.folder
        assert folder is not None
        modified: list[int] = []

        def store(ranges: list[tuple[int, int]]) -> Deferred:
            uids = [self.view[i] for i in self._iter_positions(ranges)]
            if unchanged is None:
                d = self._store_flags(uids, mode, flags)
            else:
                # Another process sharing the folder may have changed these messages since
                # this one's last look (its poll is a second apart): look first, so such a
                # change has its mod-sequence here when UNCHANGEDSINCE is compared.
                d = self.factory.registry.sync(folder).addCallback(
                    lambda _: self._store_flags(uids, mode, flags, unchanged, modified))
            return d.addCallback(lambda _: answer(ranges))

        def answer(ranges: list[tuple[int, int]]) -> Any:
            if modified:  # the messages that failed the test are not told of
                skip = set(modified)
                ranges = merged([i for i in self._iter_positions(ranges) if self.view[i] not in skip])
            # .SILENT still tells the mod-sequences (RFC 7162 3.1.3's example), of every message stored.
            atts: list = (["UID"] if uid else []) + ([] if silent else ["FLAGS"])
            return self._stream_fetch(ranges, atts + [ModSeqItem(folder.ms.by_uid)])

        def done(_: object) -> str:
            if not modified:
                return "OK STORE completed"
            if uid:
                listed = sorted(modified)
            else:
                where = {u: i + 1 for i, u in enumerate(self.view)}
                listed = sorted(where[u] for u in modified if u in where)
            return f"OK [MODIFIED {format_set(listed)}] Conditional STORE failed"

        return self._ranges(seqset, uid).addCallback(store).addCallback(done)

    # SEARCH

    def do_SEARCH(self, tag: bytes, args: list, uid: bool = False) -> Deferred:
        folder = self.folder
        assert folder is not None
        found = [False]
        args = self._modseq_keys(list(args), found)
        self._search_modseq = found[0]
        if found[0]:
            self.condstore = True
        return super().do_SEARCH(tag, args, uid)

    def _modseq_keys(self, tokens: list, found: list[bool]) -> list:
        """C{MODSEQ [name type] n} keys rewritten as the UID set of the messages changed at or after n."""
        out: list = []
        i = 0
        while i < len(tokens):
            tok = tokens[i]
            if isinstance(tok, list):
                out.append(self._modseq_keys(tok, found))
                i += 1
                continue
            if not (isinstance(tok, Atom) and tok.upper() == "MODSEQ"):
                out.append(tok)
                i += 1
                continue
            i += 1
            # An entry name and type: accepted, not told apart (a message has one mod-sequence).
            if i < len(tokens) and isinstance(tokens[i], bytes):
                if i + 1 >= len(tokens) or not isinstance(tokens[i + 1], Atom) or \
                        tokens[i + 1].lower() not in ("priv", "shared", "all"):
                    raise BadCommand("MODSEQ entry type expected")
                i += 2
            if i >= len(tokens):
                raise BadCommand("MODSEQ needs a mod-sequence")
            least = number(tokens[i], "mod-sequence")
            i += 1
            found[0] = True
            folder = self.folder
            assert folder is not None
            table = folder.ms.by_uid
            uids = [u for u in folder.uids if table.get(u, 0) >= least]
            out += [Atom("UID"), Atom(format_set(uids))] if uids else [Atom("NOT"), Atom("ALL")]
        return out

    def search_reply(self, line: bytes, uid: bool) -> bytes:
        if not self._search_modseq or self.folder is None:
            return line
        self._search_modseq = False
        numbers = [int(n) for n in line.split()[2:]]
        if not numbers:
            return line
        table = self.folder.ms.by_uid
        view = self.view
        uids = numbers if uid else [view[n - 1] for n in numbers if 0 < n <= len(view)]
        highest = max((table.get(u, 0) for u in uids), default=0)
        return line.rstrip(b"\r\n") + b" (MODSEQ %d)\r\n" % highest
