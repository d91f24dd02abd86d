# -*- test-case-name: tests.test_twistd -*-
"""
The C{twistd mailscreen} command: options parsing and L{makeService}.

Options only parse and validate (the whole configuration, so a bad file
fails before anything binds); L{makeService} builds.
"""

from __future__ import annotations

import sys
from typing import Any

from twisted.python import usage

from twisted_mail_screen.config.settings import Config, load_config
from twisted_mail_screen.config.base import ConfigError
from twisted_mail_screen.runtime.service import ListenError, MailService, build_service


class Options(usage.Options):
    synopsis = "[--config FILE] [options]"
    longdesc = ("Run the twisted-mail-screen mail server (SMTP, submission, POP3, IMAP). "
                "With no options it runs as a test host on 127.0.0.1 "
                "(SMTP 2525, POP3 2110, IMAP 2143, web 8025) keeping mail in ./mailscreen-data.")
    optParameters = [
        ["config", "c", None, "TOML configuration file (default: the embedded test-host default)"],
        ["mode", None, None, "'test-host' or 'site' (overrides the file)"],
        ["data-dir", "d", None, "data directory (overrides data_dir)"],
        ["hostname", None, None, "host name used in greetings and headers (overrides hostname)"],
    ]

    def __init__(self) -> None:
        super().__init__()
        self.listen: dict[str, list[str]] = {}
        self.config: Config | None = None

    def _listen(self, kind: str, endpoint: str) -> None:
        self.listen.setdefault(kind, []).append(endpoint)

    def opt_smtp(self, endpoint: str) -> None:
        """SMTP endpoint string, e.g. tcp:25 (repeatable; replaces listen.smtp)"""
        self._listen("smtp", endpoint)

    def opt_submission(self, endpoint: str) -> None:
        """submission endpoint string, e.g. tcp:587 (repeatable)"""
        self._listen("submission", endpoint)

    def opt_pop3(self, endpoint: str) -> None:
        """POP3 endpoint string, e.g. tcp:110 (repeatable)"""
        self._listen("pop3", endpoint)

    def opt_imap(self, endpoint: str) -> None:
        """IMAP endpoint string, e.g. tcp:143 (repeatable)"""
        self._listen("imap", endpoint)

    def opt_web(self, endpoint: str) -> None:
        """web port endpoint string, e.g. tcp:8025 (repeatable)"""
        self._listen("web", endpoint)

    def overrides(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for option, key in (("mode", "mode"), ("data-dir", "data_dir"), ("hostname", "hostname")):
            if self[option] is not None:
                out[key] = self[option]
        for kind, endpoints in self.listen.items():
            out[f"listen.{kind}"] = endpoints
        return out

    def postOptions(self) -> None:
        try:
            self.config = load_config(self["config"], self.overrides())
        except ConfigError as e:
            raise usage.UsageError(f"configuration error: {e}") from e


class _Server(MailService):
    """Turns a failure to bind into a clean non-zero exit under twistd."""

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except ListenError as e:
            raise SystemExit(f"mailscreen: {e}") from e


def makeService(options: Options) -> MailService:
    from twisted.internet import reactor

    assert options.config is not None
    try:
        service = build_service(options.config, reactor, service_class=_Server)
    except ConfigError as e:
        sys.stderr.write(f"mailscreen: configuration error: {e}\n")
        raise SystemExit(1) from e
    return service
