# -*- test-case-name: tests.test_imap -*-
"""
One stored message as IMAP sees it: CRLF octets, MIME parts located by
byte offsets (so C{BODY[1.2]} is an exact slice and sizes and line counts
in BODYSTRUCTURE are exact), ENVELOPE, BODYSTRUCTURE and the text that
SEARCH matches against.

The C{email} package only parses header blocks here; part boundaries are
found on the bytes, so a malformed message still yields a structure.
Everything is pure and runs in worker threads.
"""

from __future__ import annotations

import email
import email.header
import email.utils
import functools
import re
from email.message import Message
from email.parser import BytesHeaderParser
from email.policy import compat32

from twisted_mail_screen.protocols.imap.parse import Section, literal, quote

_header_parser = BytesHeaderParser(policy=compat32)


def to_crlf(data: bytes) -> bytes:
    if b"\r" not in data:
        return data.replace(b"\n", b"\r\n")
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


# Header fields, quickly ------------------------------------------------------------



class Headers:
    """
    The fields of a header block as C{email}'s compat32 parser reads them
    (same names, same raw values, same end of the block), without building
    a C{Message}: C{get}, C{get_all} and C{keys} behave like C{Message}'s.
    Only for ASCII header blocks (see L{fast_headers}).
    """

    __slots__ = ("fields", "_index")

    def __init__(self, fields: list[tuple[str, str, str]]) -> None:
        self.fields = fields  # (lower-case name, name, value)
        self._index: dict[str, list[str]] | None = None

    def _values(self, name: str) -> list[str] | None:
        index = self._index
        if index is None:
            index = self._index = {}
            for k, _, v in self.fields:
                if k in index:
                    index[k].append(v)
                else:
                    index[k] = [v]
        return index.get(name.lower())

    def get(self, name: str, failobj: str | None = None) -> str | None:
        values = self._values(name)
        return values[0] if values else failobj

    def get_all(self, name: str, failobj: list[str] | None = None) -> list[str] | None:
        values = self._values(name)
        return list(values) if values else failobj

    def keys(self) -> list[str]:
        return [name for _, name, _ in self.fields]


_SIMPLE_FIELD = re.compile(rb"([\041-\071\073-\176]+):[ \t]*([^\r\n]*(?:\r?\n[ \t][^\r\n]*)*)\r?\n")


def fast_headers(block: bytes) -> Headers:
    """
    L{Headers} of a header block. Values with 8-bit bytes are decoded as
    UTF-8, bytes that are not UTF-8 kept as surrogates, so ENVELOPE sends
    them back exactly as stored and SEARCH matches UTF-8 text (the C{email}
    parser would turn each such byte into U+FFFD).
    """
    # The usual block: every line a field or a continuation, ending in a blank line.
    fields: list[tuple[str, str, str]] = []
    pos = 0
    for m in _SIMPLE_FIELD.finditer(block):
        if m.start() != pos:
            break
        pos = m.end()
        name = m.group(1).decode("ascii")
        fields.append((name.lower(), name, m.group(2).decode("utf-8", "surrogateescape")))
    else:
        if block[pos:] in (b"", b"\r\n", b"\n"):
            return Headers(fields)
    return _general_headers(block)


def _general_headers(block: bytes) -> Headers:
    # The lines email's parser takes as the header block ...
    lines = []
    for raw in block.splitlines(True):
        c = raw[:1]
        if c == b"\r" or c == b"\n":
            break
        if c == b" " or c == b"\t" or raw.startswith(b"From "):
            lines.append(raw)
            continue
        i = raw.find(b":")
        if i < 0 or (i and not _NAME.fullmatch(raw, 0, i)):
            break
        lines.append(raw)
    # ... and the fields it makes of them (FeedParser._parse_headers, compat32).
    fields: list[tuple[str, str, str]] = []
    current: list[bytes] = []
    last = len(lines) - 1
    for lineno, raw in enumerate(lines):
        c = raw[:1]
        if c == b" " or c == b"\t":
            if current:
                current.append(raw)
            continue
        if current:
            fields.append(_field(current))
            current = []
        if raw.startswith(b"From "):
            if lineno and lineno == last:
                break
            continue
        if raw[:1] == b":":
            continue
        current = [raw]
    if current:
        fields.append(_field(current))
    return Headers(fields)


_NAME = re.compile(rb"[\041-\071\073-\176]*")


def _field(lines: list[bytes]) -> tuple[str, str, str]:
    name, value = lines[0].decode("utf-8", "surrogateescape").split(":", 1)
    value = value.lstrip(" \t")
    if len(lines) > 1:
        value += b"".join(lines[1:]).decode("utf-8", "surrogateescape")
    value = value.rstrip("\r\n")
    return name.lower(), name, value


def _q(value: str | None) -> bytes:
    if value is None:
        return b"NIL"
    return quote(value.encode("utf-8", "surrogateescape"))


def _qu(value: str | None) -> bytes:
    return _q(None if value is None else value.upper())


class Part:
    """
    A MIME entity of C{data} spanning C{[start, end)}: header block, then
    body from C{body_start}.
    """

    def __init__(self, data: bytes, start: int, end: int, default_type: str = "text/plain",
                 depth: int = 0) -> None:
        self.data = data
        self.start = start
        self.end = end
        self.depth = depth
        if data.startswith(b"\r\n", start) or start >= end:
            self.body_start = min(start + 2, end)
        else:
            sep = data.find(b"\r\n\r\n", start, end)
            self.body_start = end if sep < 0 else sep + 4
        self.default_type = default_type
        self._headers: Message | None = None
        self._fields: Headers | None = None
        self._children: list[Part] | None = None
        self._message: Part | None = None

    @property
    def headers(self) -> Message:
        """The header block as an C{email} message (parsed when first asked for)."""
        if self._headers is None:
            self._headers = _header_parser.parsebytes(self.data[self.start:self.body_start])
            self._headers.set_default_type(self.default_type)
        return self._headers

    @property
    def fields(self) -> Headers:
        """The header fields for ENVELOPE (see L{fast_headers})."""
        if self._fields is None:
            self._fields = fast_headers(self.data[self.start:self.body_start])
        return self._fields

    @property
    def ctype(self) -> str:
        return self.headers.get_content_type()

    @property
    def maintype(self) -> str:
        return self.ctype.split("/", 1)[0]

    @property
    def subtype(self) -> str:
        return self.ctype.split("/", 1)[1] if "/" in self.ctype else ""

    @property
    def is_multipart(self) -> bool:
        return self.maintype == "multipart" and self.depth < 50

    @property
    def is_message(self) -> bool:
        return self.ctype == "message/rfc822" and self.depth < 50

    def header_bytes(self) -> bytes:
        return self.data[self.start:self.body_start]

    def body_bytes(self) -> bytes:
        return self.data[self.body_start:self.end]

    @property
    def message(self) -> "Part":
        """The message encapsulated in a message/rfc822 part."""
        if self._message is None:
            self._message = Part(self.data, self.body_start, self.end, depth=self.depth + 1)
        return self._message

    @property
    def children(self) -> list["Part"]:
        if self._children is None:
            self._children = self._split() if self.is_multipart else []
        return self._children

    def _split(self) -> list["Part"]:
        boundary = self.headers.get_boundary()
        if not boundary:
            return []
        delim = b"--" + boundary.encode("utf-8", "surrogateescape")
        data, end = self.data, self.end
        child_type = "message/rfc822" if self.subtype == "digest" else "text/plain"
        parts: list[Part] = []
        part_start: int | None = None
        pos = self.body_start
        while True:
            if data.startswith(delim, pos) and pos == self.body_start:
                at = pos
            else:
                found = data.find(b"\r\n" + delim, max(pos - 2, self.body_start), end)
                if found < 0:
                    break
                at = found + 2
            after = at + len(delim)
            tail = data[after:after + 2]
            if tail and tail != b"--" and tail[:1] not in (b"\r", b" ", b"\t"):
                pos = after  # a longer line that merely starts like the delimiter
                continue
            if part_start is not None:
                parts.append(Part(data, part_start, max(part_start, at - 2), child_type, self.depth + 1))
            if tail == b"--":
                part_start = None
                break
            line_end = data.find(b"\r\n", after, end)
            if line_end < 0:
                part_start = None
                break
            part_start = pos = line_end + 2
        if part_start is not None and part_start < end:
            parts.append(Part(data, part_start, end, child_type, self.depth + 1))
        return parts

    # BODYSTRUCTURE ----------------------------------------------------------

    def structure(self, extended: bool) -> bytes:
        if self.is_multipart:
            children = self.children
            inner = b"".join(c.structure(extended) for c in children) if children else \
                b'("TEXT" "PLAIN" ("CHARSET" "US-ASCII") NIL NIL "7BIT" 0 0)'
            out = inner + b" " + _qu(self.subtype)
            if extended:
                out += b" " + self._params() + b" " + self._extension()
            return b"(" + out + b")"
        h = self.headers
        body = self.body_bytes()
        fields = [_qu(self.maintype), _qu(self.subtype), self._params(), _q(h.get("Content-ID")),
                  _q(h.get("Content-Description")),
                  _qu(h.get("Content-Transfer-Encoding", "7BIT").strip() or "7BIT"),
                  str(len(body)).encode()]
        if self.maintype == "text":
            fields.append(str(line_count(body)).encode())
        elif self.is_message:
            m = self.message
            fields += [envelope(m.fields), m.structure(extended), str(line_count(body)).encode()]
        if extended:
            fields += [_q(h.get("Content-MD5")), self._extension()]
        return b"(" + b" ".join(fields) + b")"

    def _params(self) -> bytes:
        params = self.headers.get_params()
        if not params or len(params) < 2:
            if self.maintype == "text":
                return b'("CHARSET" "US-ASCII")'
            return b"NIL"
        return _param_list(params[1:])

    def _extension(self) -> bytes:
        h = self.headers
        disp = h.get("Content-Disposition")
        if disp:
            params = h.get_params(header="content-disposition") or [(disp.split(";")[0].strip(), "")]
            disposition = b"(" + _qu(params[0][0]) + b" " + (
                _param_list(params[1:]) if len(params) > 1 else b"NIL") + b")"
        else:
            disposition = b"NIL"
        lang = h.get("Content-Language")
        if lang:
            tags = [t.strip() for t in lang.split(",") if t.strip()]
            language = b"(" + b" ".join(_q(t) for t in tags) + b")" if tags else b"NIL"
        else:
            language = b"NIL"
        return disposition + b" " + language + b" " + _q(h.get("Content-Location"))


def _param_list(params: list) -> bytes:
    out = []
    for key, value in params:
        if isinstance(value, tuple):
            value = email.utils.collapse_rfc2231_value(value)
        out.append(_qu(key) + b" " + _q(str(value)))
    return b"(" + b" ".join(out) + b")" if out else b"NIL"


def line_count(body: bytes) -> int:
    n = body.count(b"\r\n")
    if body and not body.endswith(b"\r\n"):
        n += 1
    return n


def _addresses(msg: "Message | Headers", name: str) -> bytes:
    if isinstance(msg, Headers):
        values = msg._values(name)
        return _address_list(tuple(values)) if values else b"NIL"
    values = msg.get_all(name)
    if not values:
        return b"NIL"
    return _address_list(tuple(str(v) for v in values))


@functools.lru_cache(maxsize=4096)
def _address_list(values: tuple[str, ...]) -> bytes:
    """An ENVELOPE address list (mail from one sender or to one list repeats: cached)."""
    out = []
    for display, addr in email.utils.getaddresses(list(values)):
        if not display and not addr:
            continue
        local, at, domain = addr.rpartition("@")
        if not at:
            local, domain = addr, None
        out.append(b"(" + _q(display or None) + b" NIL " + _q(local or None) + b" " +
                   _q(domain or None) + b")")
    return b"(" + b"".join(out) + b")" if out else b"NIL"


def envelope(msg: "Message | Headers") -> bytes:
    """RFC 3501 ENVELOPE of a header block; strings are as sent (not decoded)."""
    def one(name: str) -> bytes:
        v = msg.get(name)
        if v is None:
            return b"NIL"
        v = str(v)
        return _q(" ".join(v.split()) if "\n" in v else v)

    frm = _addresses(msg, "From")
    sender = _addresses(msg, "Sender")
    reply_to = _addresses(msg, "Reply-To")
    return b"(" + b" ".join([
        one("Date"), one("Subject"), frm, sender if sender != b"NIL" else frm,
        reply_to if reply_to != b"NIL" else frm, _addresses(msg, "To"), _addresses(msg, "Cc"),
        _addresses(msg, "Bcc"), one("In-Reply-To"), one("Message-ID")]) + b")"


# Sections -------------------------------------------------------------------------

class NoSuchPart(Exception):
    """A section names a part the message does not have (answered as empty)."""


def resolve(root: Part, path: tuple[int, ...]) -> Part:
    node = root
    for depth, n in enumerate(path):
        if depth and node.is_message:
            node = node.message
        if node.is_multipart:
            if n > len(node.children):
                raise NoSuchPart()
            node = node.children[n - 1]
        elif n != 1:
            raise NoSuchPart()
    return node


def filter_headers(block: bytes, names: tuple[str, ...], keep: bool) -> bytes:
    """The header lines of C{block} whose names are (not) in C{names}, plus CRLF."""
    wanted = {n.lower() for n in names}
    out = bytearray()
    current_keep = False
    for line in block.split(b"\r\n"):
        if not line:
            continue
        if line[:1] in (b" ", b"\t"):
            if current_keep:
                out += line + b"\r\n"
            continue
        name = line.split(b":", 1)[0].strip().decode("ascii", "replace").lower()
        current_keep = (name in wanted) == keep
        if current_keep:
            out += line + b"\r\n"
    return bytes(out) + b"\r\n"


def section_bytes(root: Part, section: Section) -> bytes:
    try:
        node = resolve(root, section.path)
    except NoSuchPart:
        return b""
    text = section.text
    if text == "MIME":
        return node.header_bytes() if section.path else b""
    if text:
        if section.path:
            if not node.is_message:
                return b""
            node = node.message
        header = node.header_bytes()
        if text == "HEADER":
            return header if header.endswith(b"\r\n\r\n") else header + b"\r\n"
        if text == "TEXT":
            return node.body_bytes()
        return filter_headers(header, section.fields, text == "HEADER.FIELDS")
    if not section.path:
        return root.data[root.start:root.end]
    if node.is_multipart and node is not root:
        return node.body_bytes()
    return node.body_bytes()


def section_response(root: Part, section: Section) -> bytes:
    data = section_bytes(root, section)
    label = section.label.encode()
    if section.partial is not None:
        offset, length = section.partial
        data = data[offset:offset + length]
        label += b"<%d>" % offset
    return label + b" " + literal(data)


# SEARCH text ------------------------------------------------------------------

def decoded_header_values(msg: "Message | Headers", name: str) -> list[str]:
    out = []
    for v in msg.get_all(name) or []:
        if isinstance(v, str) and "=?" not in v:
            out.append(v)  # what decoding would give back
            continue
        try:
            out.append(str(email.header.make_header(email.header.decode_header(str(v)))))
        except Exception:
            out.append(str(v))
    return out


def all_headers_text(msg: "Message | Headers") -> str:
    return "\n".join(f"{k}: {' '.join(decoded_header_values(msg, k))}" for k in set(msg.keys()))
