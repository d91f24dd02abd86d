# -*- test-case-name: tests.test_imap_compress -*-
"""
COMPRESS=DEFLATE (RFC 4978) for IMAP: announced and accepted once the
client has logged in (so a password never crosses a compressed stream an
attacker could probe by its length), on plain and TLS sessions alike.
The layer itself is L{twisted_mail_screen.protocols.deflate}.
"""

from __future__ import annotations

from typing import Any

from twisted_mail_screen.protocols.deflate import CompressionError, DeflateTransport
from twisted_mail_screen.protocols.imap.core import No, SessionCore
from twisted_mail_screen.protocols.imap.parse import Atom, BadCommand

#: Commands of the authenticated and selected states.
COMMANDS = {"COMPRESS"}
#: Capabilities announced once logged in.
CAPABILITIES = ["COMPRESS=DEFLATE"]


class CompressCommands(SessionCore):
    """The COMPRESS command (state in L{SessionCore})."""

    compressed = False

    def do_COMPRESS(self, tag: bytes, args: list) -> None:
        if len(args) != 1 or not isinstance(args[0], Atom):
            raise BadCommand("COMPRESS needs one mechanism")
        if args[0].upper() != "DEFLATE":
            raise BadCommand(f"Unknown compression mechanism {args[0][:20]}")
        if self.compressed:
            raise No("DEFLATE is active already", "COMPRESSIONACTIVE")
        self.compressed = True
        # The OK goes out uncompressed; everything after it, both ways, is deflated.
        self.tagged(tag, "OK DEFLATE active")
        self.add_layer(self._deflate_layer)
        self.log.debug("imap: {peer}: COMPRESS=DEFLATE active", peer=self.peer_host)
        return None

    def _deflate_layer(self, transport: Any, pending: bytes) -> DeflateTransport:
        return DeflateTransport(transport, pending, self.received_plain, self.output, self.clock,
                                self._compression_broken)

    def _compression_broken(self, error: CompressionError) -> None:
        # RFC 4978 4: a decompression error ends the session; the BYE is compressed like the rest.
        self.log.info("imap: {peer}: {error}", peer=self.peer_host, error=str(error))
        self.untagged(f"BYE {error}")
        self.close()
