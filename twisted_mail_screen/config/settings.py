# -*- test-case-name: tests.test_config -*-
"""
The configuration: one TOML file parsed once into frozen, typed objects.

Everything the server does is decided by a L{Config}; nothing reads the
file again later. Command-line overrides are applied to the parsed table
before validation, so they get the same checks and messages.
"""

from __future__ import annotations

import os
import sys
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

from twisted_mail_screen.store.addresses import AddressError, normalise_address, valid_domain
from twisted_mail_screen.config.base import ConfigError, Section
from twisted_mail_screen.mailauth.config import DKIMConfig, MailAuthConfig, parse_dkim, parse_mail_auth
from twisted_mail_screen.quota.config import QuotaConfig, parse_quota
from twisted_mail_screen.relay.config import RelayConfig, parse_relay
from twisted_mail_screen.screening.config import (
    FreezeConfig, ScreeningConfig, parse_freeze, parse_screening)
from twisted_mail_screen.screening.netmatch import Network, parse_network
from twisted_mail_screen.web.config import WebConfig, parse_web

MODES = ("test-host", "site")
PLAINTEXT_AUTH = ("loopback", "always", "never")


@dataclass(frozen=True)
class ListenConfig:
    smtp: tuple[str, ...] = ()
    submission: tuple[str, ...] = ()
    pop3: tuple[str, ...] = ()
    imap: tuple[str, ...] = ()
    web: tuple[str, ...] = ()

    def items(self) -> list[tuple[str, tuple[str, ...]]]:
        return [("smtp", self.smtp), ("submission", self.submission),
                ("pop3", self.pop3), ("imap", self.imap), ("web", self.web)]


@dataclass(frozen=True)
class TLSConfig:
    certificate: str | None = None
    key: str | None = None

    @property
    def enabled(self) -> bool:
        return self.certificate is not None


@dataclass(frozen=True)
class SMTPConfig:
    max_message_size: int = 25 * 1024 * 1024
    max_recipients: int = 100
    max_line_length: int = 1000
    max_commands: int = 1000
    idle_timeout: int = 300


@dataclass(frozen=True)
class POP3Config:
    idle_timeout: int = 600


@dataclass(frozen=True)
class IMAPConfig:
    idle_timeout: int = 1800
    max_literal_size: int = 50 * 1024 * 1024
    max_folders: int = 1000


@dataclass(frozen=True)
class StorageConfig:
    threads: int = 16
    #: fsync each delivered message and the directories it lands in; only a
    #: test host may turn it off (its mail is thrown away with the test).
    fsync: bool = True


@dataclass(frozen=True)
class ProxyConfig:
    """The proxies whose PROXY headers C{haproxy:} listeners accept (none by default)."""

    trusted: tuple[Network, ...] = ()


@dataclass(frozen=True)
class Config:
    mode: str = "test-host"
    hostname: str = "localhost"
    data_dir: str = "mailscreen-data"
    #: Where the control socket listens (docs/administration.md); set from
    #: data_dir unless given, so never empty in a parsed config.
    control_socket: str = ""
    domains: tuple[str, ...] = ()
    postmaster: str = "postmaster@localhost"
    plaintext_auth: str = "loopback"
    listen: ListenConfig = field(default_factory=ListenConfig)
    tls: TLSConfig = field(default_factory=TLSConfig)
    smtp: SMTPConfig = field(default_factory=SMTPConfig)
    pop3: POP3Config = field(default_factory=POP3Config)
    imap: IMAPConfig = field(default_factory=IMAPConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    proxy: ProxyConfig = field(default_factory=ProxyConfig)
    screening: ScreeningConfig = field(default_factory=ScreeningConfig)
    freeze: FreezeConfig = field(default_factory=FreezeConfig)
    relay: RelayConfig = field(default_factory=RelayConfig)
    web: WebConfig = field(default_factory=WebConfig)
    dkim: DKIMConfig = field(default_factory=DKIMConfig)
    mail_auth: MailAuthConfig = field(default_factory=MailAuthConfig)
    quota: QuotaConfig = field(default_factory=QuotaConfig)

    @property
    def test_host(self) -> bool:
        return self.mode == "test-host"

    def is_local_domain(self, domain: str) -> bool:
        return domain.lower() in self.domains


TEST_HOST_LISTEN: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "smtp": ("tcp:2525:interface=127.0.0.1",),
    "submission": (),
    "pop3": ("tcp:2110:interface=127.0.0.1",),
    "imap": ("tcp:2143:interface=127.0.0.1",),
    # Mailpit's port, so its habits and clients carry over.
    "web": ("tcp:8025:interface=127.0.0.1",),
})

SITE_LISTEN: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "smtp": ("tcp:25",),
    "submission": ("tcp:587",),
    "pop3": ("tcp:110",),
    "imap": ("tcp:143",),
    "web": (),  # off until configured: it shows mail and steers screening
})


def load_file(path: str) -> dict[str, Any]:
    """
    Read a TOML file into a plain table, turning I/O and syntax errors into
    L{ConfigError}s that name the file.
    """
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as e:
        raise ConfigError("--config", path, f"cannot be read: {e.strerror}") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError("--config", path, f"is not valid TOML: {e}") from e


def _parse_listen(sec: Section, mode: str) -> ListenConfig:
    defaults = TEST_HOST_LISTEN if mode == "test-host" else SITE_LISTEN
    lists = {}
    for proto, default in defaults.items():
        lists[proto] = sec.string_list(proto, default)
        for endpoint in lists[proto]:
            if not endpoint.strip():
                raise ConfigError(sec.key(proto), endpoint, "empty endpoint string")
    sec.finish()
    return ListenConfig(**lists)


def _parse_tls(sec: Section) -> TLSConfig:
    certificate = sec.readable_file("certificate")
    key = sec.readable_file("key")
    sec.finish()
    if key is not None and certificate is None:
        raise ConfigError(sec.key("certificate"), None, "is required when tls.key is set")
    if certificate is not None and key is None:
        key = certificate  # one PEM file may hold both
    if certificate is not None:
        from twisted_mail_screen.runtime.tls import TLSFileError, load_server_context
        try:
            load_server_context(certificate, key)  # type: ignore[arg-type]
        except TLSFileError as e:
            raise ConfigError(sec.key(e.which), e.path, e.problem) from e
    return TLSConfig(certificate, key)


def _parse_proxy(sec: Section) -> ProxyConfig:
    trusted = tuple(parse_network(entry, sec.key("trusted"))
                    for entry in sec.string_list("trusted", ()))
    sec.finish()
    return ProxyConfig(trusted)


def _check_data_dir(key: str, path: str) -> str:
    path = os.path.abspath(path)
    probe = path
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        raise ConfigError(key, path, f"{probe} is not a directory")
    if not os.access(probe, os.R_OK | os.W_OK | os.X_OK):
        what = "is not readable and writable" if probe == path else f"cannot be created in {probe}"
        raise ConfigError(key, path, what)
    return path


#: The longest UNIX socket path the OS accepts, in bytes, without the
#: terminating NUL (sun_path is 108 bytes on Linux, 104 on the BSDs and macOS).
MAX_SOCKET_PATH = 107 if sys.platform.startswith("linux") else 103


def _control_socket(top: Section, data_dir: str) -> str:
    return _control_socket_path(top.get("control_socket", str, None), data_dir)  # type: ignore[arg-type]


def _control_socket_path(given: str | None, data_dir: str) -> str:
    if given is not None and not given.strip():
        raise ConfigError("control_socket", given, "must be a path")
    path = os.path.abspath(given) if given is not None else os.path.join(data_dir, "control.sock")
    size = len(os.fsencode(path))
    if size > MAX_SOCKET_PATH:
        where = "" if given is not None else " (DATA_DIR/control.sock: data_dir is long)"
        raise ConfigError("control_socket", path,
                          f"is {size} bytes long{where}; a UNIX socket path can be at most "
                          f"{MAX_SOCKET_PATH}: set control_socket to a shorter path")
    return path


def parse_config(table: dict[str, Any], overrides: dict[str, Any] | None = None) -> Config:
    """
    Validate a TOML table (plus command-line C{overrides}, dotted keys) and
    return the frozen L{Config}.

    @raise ConfigError: naming the first key that is wrong.
    """
    table = _merge_overrides(table, overrides or {})
    top = Section(table)
    mode = top.choice("mode", "test-host", MODES)
    test_host = mode == "test-host"
    hostname = top.get("hostname", str, "localhost")
    if not valid_domain(hostname.lower()):
        raise ConfigError("hostname", hostname, "is not a valid host name")
    data_dir = _check_data_dir("data_dir", top.get("data_dir", str, "mailscreen-data"))
    control_socket = _control_socket(top, data_dir)
    domains = tuple(d.lower() for d in top.string_list("domains", ()))
    for d in domains:
        if not valid_domain(d):
            raise ConfigError("domains", d, "is not a valid domain name")
    if not test_host and not domains:
        raise ConfigError("domains", [], "site mode needs at least one local domain")
    default_pm = f"postmaster@{domains[0] if domains else hostname.lower()}"
    try:
        postmaster = normalise_address(top.get("postmaster", str, default_pm))
    except AddressError as e:
        raise ConfigError("postmaster", top.raw("postmaster"), str(e)) from e
    if not test_host and postmaster.rpartition("@")[2] not in domains:
        raise ConfigError("postmaster", postmaster, "must be in one of the local domains")
    plaintext = top.choice("plaintext_auth", "loopback", PLAINTEXT_AUTH)
    listen = _parse_listen(top.section("listen"), mode)
    tls = _parse_tls(top.section("tls"))
    proxy = _parse_proxy(top.section("proxy"))

    s = top.section("smtp")
    smtp = SMTPConfig(
        max_message_size=s.integer("max_message_size", SMTPConfig.max_message_size, 1024),
        max_recipients=s.integer("max_recipients", SMTPConfig.max_recipients, 1),
        max_line_length=s.integer("max_line_length", SMTPConfig.max_line_length, 1000),
        max_commands=s.integer("max_commands", SMTPConfig.max_commands, 10),
        idle_timeout=s.integer("idle_timeout", SMTPConfig.idle_timeout, 1),
    )
    s.finish()
    p = top.section("pop3")
    pop3 = POP3Config(idle_timeout=p.integer("idle_timeout", POP3Config.idle_timeout, 1))
    p.finish()
    i = top.section("imap")
    imap = IMAPConfig(
        idle_timeout=i.integer("idle_timeout", IMAPConfig.idle_timeout, 1),
        max_literal_size=i.integer("max_literal_size", IMAPConfig.max_literal_size, 1024),
        # INBOX and the five special-use folders made at the first login must fit.
        max_folders=i.integer("max_folders", IMAPConfig.max_folders, 6, 1_000_000),
    )
    i.finish()
    st = top.section("storage")
    storage = StorageConfig(threads=st.integer("threads", StorageConfig.threads, 1, 256),
                            fsync=st.get("fsync", bool, StorageConfig.fsync))
    if not storage.fsync and not test_host:
        raise ConfigError("storage.fsync", False, "site mode keeps every delivery durable: "
                          "only a test host (mode = \"test-host\") may turn fsync off")
    st.finish()

    # Sections owned by the services that use them, each parsed by its own
    # module so this one stays small.
    screening = parse_screening(top.section("screening"), mode)
    freeze = parse_freeze(top.section("freeze"))
    relay = parse_relay(top.section("relay"), mode)
    web = parse_web(top.section("web"))
    dkim = parse_dkim(top.section("dkim"), domains, mode == "test-host")
    mail_auth = parse_mail_auth(top.section("mail_auth"))
    quota = parse_quota(top.section("quota"))
    top.finish()
    return Config(mode=mode, hostname=hostname, data_dir=data_dir,
                  control_socket=control_socket, domains=domains,
                  postmaster=postmaster, plaintext_auth=plaintext, listen=listen, tls=tls,
                  smtp=smtp, pop3=pop3, imap=imap, storage=storage, proxy=proxy,
                  screening=screening, freeze=freeze, relay=relay, web=web, dkim=dkim,
                  mail_auth=mail_auth, quota=quota)


def _merge_overrides(table: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    merged = {k: (dict(v) if isinstance(v, dict) else v) for k, v in table.items()}
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split(".")
        node = merged
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(p, node, "must be a table")
        node[leaf] = value
    return merged


def load_config(path: str | None, overrides: dict[str, Any] | None = None) -> Config:
    """Load C{path} (or the embedded default when C{None}) with overrides."""
    table = load_file(path) if path else {}
    return parse_config(table, overrides)


def with_data_dir(config: Config, data_dir: str, control_socket: str | None = None) -> Config:
    """
    C{config} moved to another data directory (and control socket, by
    default DATA_DIR/control.sock), both checked as L{parse_config} checks
    them: the plugin parses a test host's settings once per process and
    gives each test its own directory this way (docs/performance.md).
    """
    data_dir = _check_data_dir("data_dir", data_dir)
    return replace(config, data_dir=data_dir,
                   control_socket=_control_socket_path(control_socket, data_dir))
