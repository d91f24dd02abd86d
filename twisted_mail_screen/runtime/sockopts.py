"""
Socket options set on a connection's socket, apart from TLS (whose module
imports OpenSSL, which a server without TLS does not need to load).
"""

from __future__ import annotations

import os
import socket
from typing import Any


def hold_output(transport: Any, hold: bool) -> bool:
    """
    Hold back (C{TCP_CORK}) or release what the kernel sends on
    C{transport}'s socket; C{False} where that cannot be done. The kernel
    sends held data after 200 ms anyway, so a hold cannot stall a session.
    """
    cork = getattr(socket, "TCP_CORK", None)
    if cork is None:
        return False
    try:
        with socket.socket(fileno=os.dup(transport.fileno())) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, cork, int(hold))
    except (OSError, AttributeError, ValueError):
        return False
    return True
