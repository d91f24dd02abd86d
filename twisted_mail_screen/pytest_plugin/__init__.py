# -*- test-case-name: tests.test_pytest_plugin -*-
"""
The pytest plugin (entry point C{pytest11: mailscreen}): C{mailserver}
and C{mailserver_session} fixtures, the C{mailserver} marker and the
C{--mailscreen-*} options. docs/testing.md shows them in use.

pytest imports this module in every session of every project that has
the package installed, so it imports nothing heavy: no Twisted, no
reactor. The server module is imported by the first fixture that runs.
"""

from __future__ import annotations

import gc
import importlib
import sys
from typing import Any, Callable, Iterator

import pytest

MODES = ("test-host", "site")
DEFAULT_TIMEOUT = 5.0
SERVER_MODULE = "twisted_mail_screen.pytest_plugin.server"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("mailscreen", "twisted-mail-screen test mail server")
    group.addoption("--mailscreen-mode", choices=MODES, default=None,
                    help="default mode of the mailserver fixtures (ini: mailscreen_mode)")
    group.addoption("--mailscreen-timeout", type=float, default=None,
                    help="default wait_for timeout in seconds (ini: mailscreen_timeout)")
    parser.addini("mailscreen_mode", "default mode of the mailserver fixtures: test-host or site",
                  default="test-host")
    parser.addini("mailscreen_timeout", "default mailserver.wait_for timeout in seconds",
                  default=str(DEFAULT_TIMEOUT))
    group.addoption("--mailscreen-no-gc-freeze", action="store_true", default=False,
                    help="do not gc.freeze() the heap after the first server's imports "
                         "(ini: mailscreen_gc_freeze = false)")
    parser.addini("mailscreen_gc_freeze", "gc.freeze() the heap after the first server's imports",
                  type="bool", default=True)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "mailserver(site=False, tls=False, **config): how the test's mailserver "
                   "fixture is configured (docs/testing.md)")


def _mode(config: pytest.Config) -> str:
    mode = config.getoption("--mailscreen-mode") or config.getini("mailscreen_mode")
    if mode not in MODES:
        raise pytest.UsageError(f"mailscreen_mode: {mode!r} is not one of {', '.join(MODES)}")
    return mode


def _timeout(config: pytest.Config) -> float:
    value = config.getoption("--mailscreen-timeout")
    if value is None:
        raw = config.getini("mailscreen_timeout")
        try:
            value = float(raw)
        except ValueError:
            raise pytest.UsageError(f"mailscreen_timeout: {raw!r} is not a number of seconds")
    return value


def _build(config: pytest.Config) -> Callable[..., Any]:
    """
    The server module's C{build}, imported by the first fixture that needs
    it. Right after that import, once per process, the heap is frozen
    (C{gc.freeze()}): Twisted and the server's modules are some 40,000
    objects that live as long as the process, and every full collection of
    the run, and the two or three at interpreter exit, would walk them all
    (the exit alone took 54 ms with them, 8 ms frozen; docs/testing.md,
    "Options"). C{mailscreen_gc_freeze = false} leaves the collector alone.
    """
    first = SERVER_MODULE not in sys.modules
    module = importlib.import_module(SERVER_MODULE)
    if first and not config.getoption("--mailscreen-no-gc-freeze") \
            and config.getini("mailscreen_gc_freeze"):
        gc.freeze()
    return module.build  # type: ignore[no-any-return]


@pytest.fixture(scope="session")
def mailserver_certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """A self-signed certificate and key (PEM paths) for the servers started with tls=True."""
    from twisted_mail_screen.testcert import make_certificate

    return make_certificate(str(tmp_path_factory.mktemp("mailscreen-tls")))


@pytest.fixture
def mailserver_config() -> dict[str, Any]:
    """
    Override to configure every C{mailserver} of a module or directory:
    C{site}, C{tls} and server config keys (C{"screening__enabled": False}).
    A C{mailserver} marker on the test wins over it.
    """
    return {}


def _options(request: pytest.FixtureRequest, config: dict[str, Any]) -> dict[str, Any]:
    """The mode option, then C{mailserver_config}, then the test's markers (closest last)."""
    options: dict[str, Any] = {"site": _mode(request.config) == "site"}
    options.update(config)
    for mark in reversed(list(request.node.iter_markers("mailserver"))):
        options.update(mark.kwargs)
    return options


@pytest.fixture
def mailserver(request: pytest.FixtureRequest, tmp_path: Any,
               mailserver_config: dict[str, Any]) -> Iterator[Any]:
    """A mail server of the test's own, stopped when the test ends."""
    build = _build(request.config)
    server = build(str(tmp_path / "mailscreen"), _options(request, mailserver_config),
                   _timeout(request.config),
                   lambda: request.getfixturevalue("mailserver_certificate"))
    yield server
    server.stop()


class ServerPool:
    """
    The servers shared across a run: one per configuration, started on
    first use and stopped when the session ends.
    """

    def __init__(self, request: pytest.FixtureRequest,
                 tmp_path_factory: pytest.TempPathFactory) -> None:
        self._request = request
        self._tmp = tmp_path_factory
        self._servers: dict[str, Any] = {}

    def get(self, options: dict[str, Any] | None = None) -> Any:
        """The shared server for C{options} (the marker's keys), started if need be."""
        options = dict(options or {})
        options.setdefault("site", _mode(self._request.config) == "site")
        key = repr(sorted(options.items()))
        if key not in self._servers:
            self._servers[key] = _build(self._request.config)(
                str(self._tmp.mktemp("mailscreen")), options, _timeout(self._request.config),
                lambda: self._request.getfixturevalue("mailserver_certificate"))
        return self._servers[key]

    def stop(self) -> None:
        servers, self._servers = list(self._servers.values()), {}
        for server in servers:
            server.stop()


@pytest.fixture(scope="session")
def mailserver_pool(request: pytest.FixtureRequest,
                    tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerPool]:
    """The run's shared servers; C{get(options)} from a session-scoped fixture of yours."""
    pool = ServerPool(request, tmp_path_factory)
    yield pool
    pool.stop()


@pytest.fixture
def mailserver_session(request: pytest.FixtureRequest, mailserver_pool: ServerPool,
                       mailserver_config: dict[str, Any]) -> Any:
    """
    A server shared by every test of the run with the same configuration
    (C{mailserver_config} and marker, as for C{mailserver}); call
    C{purge()} between tests that count.
    """
    return mailserver_pool.get(_options(request, mailserver_config))
