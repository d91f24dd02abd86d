# -*- test-case-name: tests.test_imap_sort -*-
"""
SORT's ordering and the two THREAD algorithms of RFC 5256
(ORDEREDSUBJECT and REFERENCES), over messages already reduced to their
L{SortFields}. Pure functions, run in the worker pool.

A message is C{(number, fields, arrival)}: the number answered (sequence
number or UID; both grow with the sequence, so it also breaks ties), its
keys, and its internal date, which stands in for a missing or unparsable
sent date (RFC 5256 section 2.2).
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

from twisted_mail_screen.protocols.imap.sortkeys import SortFields

Msg = tuple[int, SortFields, float]
#: References followed per message (the nearest ones): bounds the work a hostile header can ask
MAX_REFERENCES = 256
SORT_KEYS = {"ARRIVAL", "CC", "DATE", "FROM", "SIZE", "SUBJECT", "TO"}


def _date(m: Msg) -> float:
    sent = m[1][0]  # SortFields.date, by position: SORT passes the index's plain tuples
    return sent if sent is not None else m[2]


def sort_numbers(msgs: Sequence[Msg], criteria: Sequence[tuple[str, bool]],
                 sizes: dict[int, int]) -> list[int]:
    """
    The numbers in the order C{criteria} (key, reversed) give; ties by
    ascending number, also under REVERSE. One stable sort per criterion,
    the last first (a reversed stable sort keeps equal items in order).
    """
    def value(k: str) -> Any:
        if k == "ARRIVAL":
            return lambda m: m[2]
        if k == "DATE":
            return _date
        if k == "SIZE":
            return lambda m: sizes.get(m[0], 0)
        field = {"SUBJECT": 1, "FROM": 3, "TO": 4, "CC": 5}[k]  # SortFields positions
        return lambda m: m[1][field]

    ordered = sorted(msgs, key=lambda m: m[0])
    for k, rev in reversed(criteria):
        ordered.sort(key=value(k), reverse=rev)
    return [m[0] for m in ordered]


class Node:
    """A thread container; a dummy (C{msg} None) stands for a referenced, absent message."""

    __slots__ = ("msg", "parent", "children")

    def __init__(self, msg: Msg | None = None) -> None:
        self.msg = msg
        self.parent: Node | None = None
        self.children: list[Node] = []

    def first_msg(self) -> Msg | None:
        node: Node | None = self
        while node is not None and node.msg is None:
            node = node.children[0] if node.children else None
        return node.msg if node is not None else None

    def sort_key(self) -> tuple[float, int]:
        m = self.first_msg()
        return (_date(m), m[0]) if m is not None else (0.0, 0)

    def is_ancestor_of(self, other: "Node") -> bool:
        node: Node | None = other
        while node is not None:
            if node is self:
                return True
            node = node.parent
        return False


def _link(parent: Node, child: Node) -> None:
    if child.parent is not None:
        child.parent.children.remove(child)
    child.parent = parent
    parent.children.append(child)


def _unlink(child: Node) -> None:
    if child.parent is not None:
        child.parent.children.remove(child)
        child.parent = None


def render(roots: Iterable[Node]) -> bytes:
    """
    The THREAD response's thread lists (RFC 5256 section 4 grammar): a
    chain of only children is one list, two or more children nest. Walked
    with a stack, so a thread thousands of levels deep is no recursion.
    """
    out: list[str] = []
    stack: list[Node | str] = []
    for r in reversed(list(roots)):
        stack += [")", r, "("]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            out.append(item)
            continue
        node = item
        if node.msg is not None:
            out.append(str(node.msg[0]))
        kids = node.children
        if kids and node.msg is not None:
            out.append(" ")
        if len(kids) == 1:
            stack.append(kids[0])
        else:
            for k in reversed(kids):
                stack += [")", k, "("]
    return "".join(out).encode()


def ordered_subject(msgs: Sequence[Msg]) -> list[Node]:
    """THREAD=ORDEREDSUBJECT: by base subject, then sent date; one flat thread per subject."""
    ordered = sorted(msgs, key=lambda m: (m[1].subject, _date(m), m[0]))
    roots: list[Node] = []
    current: Node | None = None
    for m in ordered:
        if current is None or current.msg is None or current.msg[1].subject != m[1].subject:
            current = Node(m)
            roots.append(current)
        else:
            _link(current, Node(m))
    roots.sort(key=Node.sort_key)
    return roots


def references(msgs: Sequence[Msg]) -> list[Node]:
    """THREAD=REFERENCES (RFC 5256 section 3), the steps numbered as there."""
    table: dict[str, Node] = {}
    anonymous: list[Node] = []
    for m in sorted(msgs, key=lambda m: m[0]):
        f = m[1]
        # (1A) own container; a missing or duplicate Message-ID gets a unique one
        mid = f.message_id
        if mid is not None and mid in table and table[mid].msg is None:
            own = table[mid]
            own.msg = m
        elif mid is not None and mid not in table:
            own = table[mid] = Node(m)
        else:
            own = Node(m)
            anonymous.append(own)
        prev: Node | None = None
        for ref in f.references[-MAX_REFERENCES:]:
            node = table.get(ref)
            if node is None:
                node = table[ref] = Node()
            if prev is not None and node.parent is None and node is not prev \
                    and not node.is_ancestor_of(prev):
                _link(prev, node)
            prev = node
        # (1B) the last reference becomes the parent, replacing any earlier link
        if prev is not None and prev is not own and not own.is_ancestor_of(prev):
            _link(prev, own)
        elif prev is None:
            _unlink(own)
    # (2) the root set
    roots = [n for n in list(table.values()) + anonymous if n.parent is None]
    # (3) prune dummies
    roots = _prune(roots)
    # (4) sort siblings by date
    _sort_tree(roots)
    roots.sort(key=Node.sort_key)
    # (5) gather roots by base subject
    roots = _group_subjects(roots)
    # (6) sort again
    _sort_tree(roots)
    roots.sort(key=Node.sort_key)
    return roots


def _prune(roots: list[Node]) -> list[Node]:
    """Step 3: dummies without children go, others give their children to their parent."""
    order: list[Node] = []
    stack = list(roots)
    while stack:
        n = stack.pop()
        order.append(n)
        stack.extend(n.children)
    for n in reversed(order):  # children are pruned before their parent
        kept: list[Node] = []
        for c in n.children:
            if c.msg is not None:
                kept.append(c)
            else:
                kept.extend(c.children)
        for c in kept:
            c.parent = n
        n.children = kept
    out: list[Node] = []
    for n in roots:
        if n.msg is not None or len(n.children) > 1:
            out.append(n)  # a dummy root with several children stays
        else:
            out.extend(n.children)  # one child: promoted to the root set
    for n in out:
        n.parent = None
    return out


def _sort_tree(nodes: list[Node]) -> None:
    # children before parents: a dummy's key is its first child's
    order: list[Node] = []
    stack = list(nodes)
    while stack:
        n = stack.pop()
        order.append(n)
        stack.extend(n.children)
    for n in reversed(order):
        n.children.sort(key=Node.sort_key)


def _subject_of(n: Node) -> tuple[str, bool] | None:
    m = n.msg if n.msg is not None else (n.children[0].msg if n.children else None)
    if m is None or not m[1].subject:
        return None
    return m[1].subject, m[1].reply


def _group_subjects(roots: list[Node]) -> list[Node]:
    subjects: dict[str, Node] = {}
    for r in roots:
        s = _subject_of(r)
        if s is None:
            continue
        old = subjects.get(s[0])
        if old is None or (old.msg is not None and r.msg is None) or (
                old.msg is not None and r.msg is not None and old.msg[1].reply and not s[1]):
            # dummies win over messages; a non-reply wins over a reply
            subjects[s[0]] = r
    out: list[Node] = []
    for r in roots:
        if r.parent is not None:
            continue  # already merged under another root
        s = _subject_of(r)
        if s is None:
            out.append(r)
            continue
        entry = subjects[s[0]]
        if entry is r:
            out.append(r)
            continue
        if entry.msg is None and r.msg is None:
            for c in list(r.children):
                _link(entry, c)
        elif entry.msg is None:
            _link(entry, r)
        elif r.msg is not None and r.msg[1].reply and not entry.msg[1].reply:
            _link(entry, r)
        else:
            dummy = Node()
            at = out.index(entry) if entry in out else -1
            _link(dummy, entry)
            _link(dummy, r)
            subjects[s[0]] = dummy
            if at >= 0:
                out[at] = dummy
            else:
                out.append(dummy)
    return out
