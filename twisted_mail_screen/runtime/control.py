# -*- test-case-name: tests.test_cli -*-
"""
The control channel: a UNIX socket (mode 600; C{control_socket}, by default
C{control.sock} in the data directory) through which the C{mailscreen}
command changes a running server at once.

One JSON object per line each way. A request is
C{{"command": "block.add", "args": {...}}}; the answer is
C{{"ok": true, "result": ...}} or C{{"ok": false, "error": "..."}}. Services
register the commands they answer; nothing here knows what they do.
"""

from __future__ import annotations

import json
import os
import socket
from typing import Any, Callable

from twisted.internet.defer import maybeDeferred
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols.basic import LineOnlyReceiver

SOCKET_NAME = "control.sock"

Handler = Callable[..., Any]


class CommandError(Exception):
    """
    A command (of the control channel or the web API) that cannot be
    carried out, with the reason. C{not_found}: what it names is not there
    (the web answers 404); otherwise the input is bad (400).
    """

    def __init__(self, message: str, not_found: bool = False) -> None:
        super().__init__(message)
        self.not_found = not_found


class ControlProtocol(LineOnlyReceiver):
    delimiter = b"\n"
    MAX_LENGTH = 64 * 1024
    log = Logger()
    factory: "ControlFactory"

    def lineReceived(self, line: bytes) -> None:
        try:
            request = json.loads(line)
            name = request["command"]
            args = request.get("args", {})
            handler = self.factory.commands[name]
            if not isinstance(args, dict):
                raise TypeError("args must be an object")
        except (ValueError, KeyError, TypeError) as e:
            return self._answer({"ok": False, "error": f"bad request: {e}"})
        d = maybeDeferred(handler, **args)
        d.addCallbacks(lambda result: self._answer({"ok": True, "result": result}),
                       self._failed, errbackArgs=(name,))

    def _failed(self, failure: Any, name: str) -> None:
        if failure.check(CommandError, ValueError, TypeError):
            self._answer({"ok": False, "error": failure.getErrorMessage()})
        else:
            self.log.failure("control: {name} failed", failure, name=name)
            self._answer({"ok": False, "error": "internal error (see the server log)"})

    def _answer(self, answer: dict[str, Any]) -> None:
        self.sendLine(json.dumps(answer).encode())

    def lineLengthExceeded(self, line: bytes) -> None:
        self._answer({"ok": False, "error": "request too long"})
        self.transport.loseConnection()


class ControlFactory(Factory):
    protocol = ControlProtocol
    noisy = False

    def __init__(self) -> None:
        self.commands: dict[str, Handler] = {}

    def register(self, name: str, handler: Handler) -> None:
        self.commands[name] = handler


def socket_path(data_dir: str) -> str:
    """The default control socket of a data directory."""
    return os.path.join(data_dir, SOCKET_NAME)


class NotRunning(Exception):
    """No server answers on the control socket."""


def call(where: str, command: str, timeout: float = 10.0, **args: Any) -> Any:
    """
    Send one command to the server whose control socket is C{where}, or,
    when C{where} is a directory, its default socket in that data
    directory; return its result.

    @raise NotRunning: nothing listens on the socket.
    @raise CommandError: the server refused the command.
    """
    path = socket_path(where) if os.path.isdir(where) else where
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        try:
            s.connect(path)
        except (FileNotFoundError, ConnectionRefusedError) as e:
            raise NotRunning(path) from e
        s.sendall(json.dumps({"command": command, "args": args}).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    finally:
        s.close()
    answer = json.loads(data)
    if not answer.get("ok"):
        raise CommandError(answer.get("error", "failed"))
    return answer.get("result")
