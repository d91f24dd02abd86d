# -*- test-case-name: tests.test_imap -*-
"""
The commands on an account's folders: SELECT and EXAMINE, CREATE,
DELETE, RENAME, SUBSCRIBE and UNSUBSCRIBE, LIST and LSUB, STATUS, APPEND,
NAMESPACE and ENABLE. File work runs in the worker pool under the
account lock; the reactor only writes the answers.
"""

from __future__ import annotations

from array import array
from typing import Any, Callable

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from twisted_mail_screen.protocols.imap import mailbox as mb, quota_commands as quota
from twisted_mail_screen.protocols.imap.account import DELIMITER, FolderError
from twisted_mail_screen.protocols.imap.core import No
from twisted_mail_screen.protocols.imap.filejobs import append_file
from twisted_mail_screen.protocols.imap.flags import MAX_KEYWORDS, SYSTEM_FLAGS, info_of
from twisted_mail_screen.protocols.imap.listing import MAX_PATTERNS, ListPattern, list_lines
from twisted_mail_screen.protocols.imap.parse import (Atom, BadCommand, encode_mailbox, mailbox_name,
                                                      mailbox_text, parse_datetime)
from twisted_mail_screen.protocols.imap.selected import SelectedView
from twisted_mail_screen.store.folderlock import Stale


class AccountCommands(SelectedView):
    """The authenticated-state commands on folders (state in L{SessionCore})."""

    def _account_call(self, f: Callable[..., Any], *args: Any) -> Deferred:
        """Run a blocking L{AccountFolders} call in the pool, under the account lock."""
        assert self.folders is not None
        return self.factory.registry.lock(self.folders.inbox).run(self.factory.blocking.run, f, *args)

    def _mailbox_arg(self, args: list, count: int = 1) -> str:
        if len(args) < count:
            raise BadCommand("mailbox name expected")
        return mailbox_name(args[0], self.utf8)

    def do_NAMESPACE(self, tag: bytes, args: list) -> str:
        self.untagged(f'NAMESPACE (("" "{DELIMITER}")) NIL NIL')
        return "OK NAMESPACE completed"

    def do_ENABLE(self, tag: bytes, args: list) -> str:
        if not args:
            raise BadCommand("ENABLE needs capability names")
        enabled: list[str] = []
        for arg in args:
            if not isinstance(arg, Atom):
                raise BadCommand("capability name expected")
            if arg.upper() not in enabled and self.enable_extension(arg.upper()):
                enabled.append(arg.upper())
        self.untagged(" ".join(["ENABLED", *enabled]))
        return "OK ENABLE completed"

    def enable_extension(self, name: str) -> bool:
        """Turn on the extension C{name} (RFC 5161) for the session; whether it is one we have."""
        return False

    def do_SELECT(self, tag: bytes, args: list, readonly: bool = False) -> Deferred:
        if len(args) != 1:
            raise BadCommand("SELECT needs one mailbox name" if len(args) < 2 else
                             "SELECT parameters are not supported")
        name = mailbox_name(args[0], self.utf8)
        assert self.folders is not None
        self._deselect()
        try:
            path = self.folders.path(name)
        except FolderError as e:
            raise No(str(e), "NONEXISTENT") from None
        registry = self.factory.registry
        self.writable = not readonly
        self.recent = set()
        d = registry.open(self.folders.inbox, path, claim_for=self if self.writable else None)

        def selected(folder: mb.Folder, exists: bool) -> str | None:
            if self.closing:  # the client left while the folder was scanned: never attach a gone session
                if not folder.sessions:
                    registry.idle(folder)
                return None
            if not folder.loaded or not exists:
                registry.idle(folder)
                raise No("No such mailbox", "NONEXISTENT")
            self.folder = folder
            self.folder_name = name
            self.state = "selected"
            self.seen = folder.attach(self)
            self.view = array("L", folder.uids)
            if not self.writable:
                self.recent = {u for u, n in zip(folder.uids, folder.names) if n.startswith("new/")}
            self.recent |= folder.claim(self)
            unseen = next((i + 1 for i, n in enumerate(folder.names) if "S" not in info_of(n)), None)
            flags = " ".join(SYSTEM_FLAGS + tuple(folder.keywords))
            perm = flags + (" \\*" if len(folder.keywords) < MAX_KEYWORDS else "")
            self.untagged(f"FLAGS ({flags})")
            self.untagged(f"{len(self.view)} EXISTS")
            self.untagged(f"{len(self.recent)} RECENT")
            if unseen is not None:
                self.untagged(f"OK [UNSEEN {unseen}] First unseen")
            self.untagged(f"OK [UIDVALIDITY {folder.uidvalidity}] UIDs valid")
            self.untagged(f"OK [UIDNEXT {folder.next_uid}] Predicted next UID")
            self.untagged(f"OK [PERMANENTFLAGS ({perm if self.writable else ''})] Flags permitted")
            return ("OK [READ-WRITE] SELECT completed" if self.writable
                    else "OK [READ-ONLY] EXAMINE completed")

        return d.addCallback(lambda folder: self.exists(path).addCallback(
            lambda exists: selected(folder, exists)))

    def do_EXAMINE(self, tag: bytes, args: list) -> Deferred:
        return self.do_SELECT(tag, args, readonly=True)

    def do_CREATE(self, tag: bytes, args: list) -> Deferred:
        name = self._mailbox_arg(args)
        if name.endswith(DELIMITER):
            name = name.rstrip(DELIMITER)
        assert self.folders is not None
        return self._account_call(self.folders.create, name).addCallback(
            lambda _: "OK CREATE completed")

    def do_DELETE(self, tag: bytes, args: list) -> Deferred:
        name = self._mailbox_arg(args)
        assert self.folders is not None
        if self.folder is not None and name == self.folder_name:
            self._deselect()
        path = self.folders.path(name)

        def done(_: object) -> str:
            self.factory.registry.forget(path)
            quota.forget(self)  # its messages went with it
            return "OK DELETE completed"

        return self._account_call(self.folders.delete, name).addCallback(done)

    def do_RENAME(self, tag: bytes, args: list) -> Deferred:
        if len(args) != 2:
            raise BadCommand("RENAME needs two mailbox names")
        old, new = mailbox_name(args[0], self.utf8), mailbox_name(args[1], self.utf8).rstrip(DELIMITER)
        assert self.folders is not None
        registry = self.factory.registry

        def done(moves: list[tuple[str, str]]) -> Any:
            for src, dst in moves:
                registry.move(src, dst)
            inbox = registry.folders.get(self.folders.inbox)  # type: ignore[union-attr]
            if old == "INBOX" and inbox is not None and inbox.loaded:
                return registry.sync(inbox).addCallback(lambda _: "OK RENAME completed")
            return "OK RENAME completed"

        return self._account_call(self.folders.rename, old, new).addCallback(done)

    def do_SUBSCRIBE(self, tag: bytes, args: list, on: bool = True) -> Deferred:
        name = self._mailbox_arg(args)
        assert self.folders is not None
        word = "SUBSCRIBE" if on else "UNSUBSCRIBE"
        return self._account_call(self.folders.subscribe, name, on).addCallback(
            lambda _: f"OK {word} completed")

    def do_UNSUBSCRIBE(self, tag: bytes, args: list) -> Deferred:
        return self.do_SUBSCRIBE(tag, args, on=False)

    def do_LIST(self, tag: bytes, args: list, lsub: bool = False) -> Any:
        args = list(args)
        select_opts: set[str] = set()
        return_opts: set[str] = set()
        if args and isinstance(args[0], list) and not lsub:
            select_opts = {str(a).upper() for a in args.pop(0)}
        if len(args) >= 4 and isinstance(args[2], Atom) and args[2].upper() == "RETURN":
            return_opts = {str(a).upper() for a in args[3]} if isinstance(args[3], list) else set()
            args = args[:2]
        if len(args) != 2:
            raise BadCommand("LIST needs a reference and a mailbox pattern")
        reference = mailbox_text(args[0], self.utf8)
        patterns = args[1] if isinstance(args[1], list) else [args[1]]
        pats = [mailbox_text(p, self.utf8) for p in patterns]
        word = "LSUB" if lsub else "LIST"
        if pats == [""] and not lsub:
            self.untagged(f'LIST (\\Noselect) "{DELIMITER}" ""')
            return "OK LIST completed"
        assert self.folders is not None
        folders = self.folders
        if len(pats) > MAX_PATTERNS:
            raise BadCommand("too many mailbox patterns")
        matchers = [ListPattern(reference, p) for p in pats]

        def gather() -> list[bytes]:
            # Scan and match in the worker: a thousand folders and a long
            # pattern cost the reactor only the writing of the lines.
            return list_lines(folders.names(), folders.subscriptions(), matchers, lsub,
                              select_opts, return_opts, self.utf8)

        def answer(lines: list[bytes]) -> str:
            for line in lines:
                self.untagged(line)
            return f"OK {word} completed"

        return self.factory.blocking.run(gather).addCallback(answer)

    def do_LSUB(self, tag: bytes, args: list) -> Any:
        return self.do_LIST(tag, args, lsub=True)

    def do_STATUS(self, tag: bytes, args: list) -> Deferred:
        if len(args) != 2 or not isinstance(args[1], list):
            raise BadCommand("STATUS needs a mailbox and a list of items")
        name = mailbox_name(args[0], self.utf8)
        items = [str(a).upper() for a in args[1]]
        for item in items:
            if item not in ("MESSAGES", "RECENT", "UIDNEXT", "UIDVALIDITY", "UNSEEN", "HIGHESTMODSEQ"):
                raise BadCommand(f"unknown status item {item[:20]}")
        assert self.folders is not None
        try:
            path = self.folders.path(name)
        except FolderError as e:
            raise No(str(e), "NONEXISTENT") from None
        registry = self.factory.registry

        def answer(folder: mb.Folder, exists: bool) -> str:
            if not folder.sessions:
                registry.idle(folder)
            if not folder.loaded or not exists:
                raise No("No such mailbox", "NONEXISTENT")
            values = {"MESSAGES": len(folder.uids), "UIDNEXT": folder.next_uid,
                      "UIDVALIDITY": folder.uidvalidity,
                      "RECENT": folder.recent_count(),
                      "UNSEEN": sum(1 for n in folder.names if "S" not in info_of(n)),
                      "HIGHESTMODSEQ": folder.ms.highest}
            body = " ".join(f"{i} {values[i]}" for i in items)
            self.untagged(b"STATUS " + encode_mailbox(name, self.utf8) + f" ({body})".encode())
            return "OK STATUS completed"

        return registry.open(self.folders.inbox, path).addCallback(
            lambda folder: self.exists(path).addCallback(lambda exists: answer(folder, exists)))

    def do_APPEND(self, tag: bytes, args: list) -> Deferred:
        if len(args) < 2:
            raise BadCommand("APPEND needs a mailbox and a message")
        name = mailbox_name(args[0], self.utf8)
        rest = list(args[1:])
        flags: list[str] = []
        date = None
        if rest and isinstance(rest[0], list):
            flags = self._flag_list(rest.pop(0))
        if len(rest) == 2 and isinstance(rest[0], bytes):
            date = parse_datetime(rest.pop(0))
        if len(rest) != 1 or not isinstance(rest[0], bytes):
            raise BadCommand("APPEND message literal expected")
        message = rest[0]
        if not message:
            raise No("Empty message")
        assert self.folders is not None
        path = self.folders.path(name)  # a name no folder can have: NO [CANNOT], not [TRYCREATE]
        registry = self.factory.registry
        folder = registry.folder(self.folders.inbox, path)
        flags = [f for f in flags if f.lower() != "\\recent"]

        def locked() -> Deferred:
            def loaded(exists: bool) -> Any:
                if not folder.loaded or not exists:
                    raise No("No such mailbox", "TRYCREATE")
                return registry.guarded(folder, lambda: (
                    append_file, self.factory.store, path, message, flags, date, list(folder.keywords),
                    folder.uidvalidity, folder.next_uid, array("L", folder.uids), list(folder.names)))

            def appended(result: tuple[int, str, list[str]]) -> Deferred:
                uid, rel, keywords = result
                recorded = quota.changed(self, [rel], [])
                folder.keywords = keywords
                folder.add([(uid, rel)], uid + 1)
                folder.notify()
                return recorded.addCallback(lambda _: registry.persist(folder, uid))

            return registry.ensure_loaded(folder).addCallback(lambda _: self.exists(path)).addCallback(
                loaded).addCallback(appended)

        def done(uid: int) -> str:
            if not folder.sessions:
                registry.idle(folder)
            return f"OK [APPENDUID {folder.uidvalidity} {uid}] APPEND completed"

        def failed(failure: Failure) -> Any:
            if not folder.sessions:
                registry.idle(folder)
            if failure.check(ValueError):
                raise No("Too many keywords in this mailbox", "LIMIT")
            if failure.check(Stale):
                raise No("Mailbox is being changed by another server, try again", "INUSE")
            return failure

        # Checked before the folder lock: a full account waits for no one.
        return quota.room(self, len(message), 1).addCallback(
            lambda _: folder.lock.run(locked)).addCallbacks(done, failed)
