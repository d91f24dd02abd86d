# -*- test-case-name: tests.test_relay -*-
"""
The C{[relay]} section: whether and how mail for other domains leaves this
server (docs/relay.md explains every key).

    [relay]
    smarthost = "tcp:host=smtp.provider.example:port=587"   # absent = MX delivery
    starttls = "required"         # "required" | "opportunistic" | "none"
    username = "site@provider.example"
    password_file = "/etc/mailscreen/relay-password"
    ca_file = "/etc/mailscreen/provider-ca.pem"            # absent = system trust store
    queue_lifetime_hours = 120
"""

from __future__ import annotations

from dataclasses import dataclass

from twisted_mail_screen.config.base import ConfigError, Section

STARTTLS = ("required", "opportunistic", "none")
#: Endpoint types that mean implicit TLS (RFC 8314) to the smarthost.
IMPLICIT_TLS = ("tls", "ssl")
CLIENT_TYPES = ("tcp", "tls", "ssl", "unix")


@dataclass(frozen=True)
class RelayConfig:
    """
    @ivar enabled: whether remote recipients are accepted (authenticated
        clients only; on a test host, any client) and queued; in test-host
        mode only with a smarthost.
    @ivar smarthost: a Twisted client endpoint string, or C{None} for
        delivery by MX lookup.
    @ivar starttls: TLS policy: to the smarthost (always verified when
        used) or to MX hosts (never verified: opportunistic by nature).
    @ivar tls_hostname: the name the smarthost certificate must carry.
    """

    enabled: bool = False
    smarthost: str | None = None
    starttls: str = "opportunistic"
    tls_hostname: str | None = None
    username: str | None = None
    password_file: str | None = None
    ca_file: str | None = None
    queue_lifetime_hours: int = 120
    delay_warning_hours: int = 4
    retry_minutes: int = 5
    max_retry_minutes: int = 240
    max_connections_per_destination: int = 5
    max_messages_per_connection: int = 20
    connect_timeout: int = 30
    command_timeout: int = 300
    mx_port: int = 25

    @property
    def implicit_tls(self) -> bool:
        return self.smarthost is not None and \
            split_endpoint(self.smarthost)[0][0].lower() in IMPLICIT_TLS


def split_endpoint(description: str) -> tuple[list[str], dict[str, str]]:
    """
    Split a Twisted endpoint string into its positional arguments (the
    type first) and its C{key=value} arguments, honouring C{\\} escapes.
    """
    parts: list[str] = []
    current: list[str] = []
    chars = iter(description)
    for c in chars:
        if c == "\\":
            current.append(next(chars, ""))
        elif c == ":":
            parts.append("".join(current))
            current = []
        else:
            current.append(c)
    parts.append("".join(current))
    positional: list[str] = []
    keywords: dict[str, str] = {}
    for i, part in enumerate(parts):
        key, eq, value = part.partition("=")
        if eq and i > 0:
            keywords[key] = value
        else:
            positional.append(part)
    return positional, keywords


def endpoint_host_port(description: str, default_port: int) -> tuple[str | None, int]:
    """The host and port of a C{tcp:}/C{tls:} endpoint string."""
    positional, keywords = split_endpoint(description)
    host = keywords.get("host") or (positional[1] if len(positional) > 1 else None)
    port = keywords.get("port") or (positional[2] if len(positional) > 2 else None)
    return host, int(port) if port else default_port


def read_password(path: str) -> str:
    """The first line of a password file, without its line ending."""
    with open(path, encoding="utf-8") as f:
        return f.readline().rstrip("\r\n")


def load_ca_certificates(path: str) -> list:
    """
    The PEM certificates in C{path} (one or more).

    @raise ValueError: when it holds none, or one is malformed.
    """
    from twisted.internet import ssl

    with open(path, "rb") as f:
        data = f.read()
    marker = b"-----END CERTIFICATE-----"
    certificates = []
    for chunk in data.split(marker)[:-1]:
        start = chunk.find(b"-----BEGIN CERTIFICATE-----")
        if start < 0:
            raise ValueError("malformed PEM certificate")
        certificates.append(ssl.Certificate.loadPEM(chunk[start:] + marker + b"\n"))
    if not certificates:
        raise ValueError("holds no PEM certificate")
    return certificates


def _check_smarthost(sec: Section, value: str) -> None:
    positional, keywords = split_endpoint(value)
    kind = positional[0].lower()
    if kind not in CLIENT_TYPES:
        raise ConfigError(sec.key("smarthost"), value,
                          "must be a client endpoint string of type " + ", ".join(CLIENT_TYPES))
    if kind == "unix":
        if not (keywords.get("path") or len(positional) > 1):
            raise ConfigError(sec.key("smarthost"), value, "needs a path")
        return
    try:
        host, port = endpoint_host_port(value, 465 if kind in IMPLICIT_TLS else 25)
    except ValueError as e:
        raise ConfigError(sec.key("smarthost"), value, "port must be a number") from e
    if not host:
        raise ConfigError(sec.key("smarthost"), value, "needs a host")
    if not 0 < port < 65536:
        raise ConfigError(sec.key("smarthost"), value, "port out of range")


def parse_relay(section: Section, mode: str) -> RelayConfig:
    """
    Read C{[relay]}. In test-host mode relaying is off by default and can
    be switched on only towards a smarthost (a capture sink): a test host
    must never look up MX hosts and send mail out into the world.
    """
    d = RelayConfig()
    enabled = section.get("enabled", bool, mode == "site")
    smarthost = section.get("smarthost", str, None)  # type: ignore[arg-type]
    if enabled and mode == "test-host" and smarthost is None:
        raise ConfigError(section.key("enabled"), True,
                          "test-host mode relays only to a relay.smarthost (a capture sink), "
                          "never by MX lookup: set relay.smarthost or leave relaying off")
    if smarthost is not None:
        _check_smarthost(section, smarthost)
    starttls = section.choice("starttls", "required" if smarthost else "opportunistic", STARTTLS)
    implicit = smarthost is not None and split_endpoint(smarthost)[0][0].lower() in IMPLICIT_TLS
    tls_hostname = section.get("tls_hostname", str, None)  # type: ignore[arg-type]
    if smarthost is None and tls_hostname is not None:
        raise ConfigError(section.key("tls_hostname"), tls_hostname, "needs relay.smarthost")
    if smarthost is not None and tls_hostname is None and not smarthost.lower().startswith("unix:"):
        tls_hostname = endpoint_host_port(smarthost, 25)[0]
    if smarthost is not None and tls_hostname is None and (starttls != "none" or implicit):
        raise ConfigError(section.key("tls_hostname"), None,
                          "is required to check the TLS certificate of a UNIX-socket smarthost")
    username = section.get("username", str, None)  # type: ignore[arg-type]
    password_file = section.readable_file("password_file")
    if username is not None:
        if smarthost is None:
            raise ConfigError(section.key("username"), username, "needs relay.smarthost")
        if password_file is None:
            raise ConfigError(section.key("password_file"), None, "is required with relay.username")
        if starttls == "none" and not implicit:
            raise ConfigError(section.key("starttls"), starttls,
                              "would send relay.username's password unencrypted")
    elif password_file is not None:
        raise ConfigError(section.key("username"), None, "is required with relay.password_file")
    if password_file is not None:
        try:
            empty = read_password(password_file) == ""
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(section.key("password_file"), password_file, f"unreadable: {e}") from e
        if empty:
            raise ConfigError(section.key("password_file"), password_file,
                              "its first line (the password) is empty")
    ca_file = section.readable_file("ca_file")
    if ca_file is not None:
        try:
            load_ca_certificates(ca_file)
        except Exception as e:
            raise ConfigError(section.key("ca_file"), ca_file, f"not usable: {e}") from e
    result = RelayConfig(
        enabled=enabled,
        smarthost=smarthost,
        starttls=starttls,
        tls_hostname=tls_hostname,
        username=username,
        password_file=password_file,
        ca_file=ca_file,
        queue_lifetime_hours=section.integer("queue_lifetime_hours", d.queue_lifetime_hours, 1),
        delay_warning_hours=section.integer("delay_warning_hours", d.delay_warning_hours, 0),
        retry_minutes=section.integer("retry_minutes", d.retry_minutes, 1),
        max_retry_minutes=section.integer("max_retry_minutes", d.max_retry_minutes, 1),
        max_connections_per_destination=section.integer(
            "max_connections_per_destination", d.max_connections_per_destination, 1, 100),
        max_messages_per_connection=section.integer(
            "max_messages_per_connection", d.max_messages_per_connection, 1, 1000),
        connect_timeout=section.integer("connect_timeout", d.connect_timeout, 1),
        command_timeout=section.integer("command_timeout", d.command_timeout, 1),
        mx_port=section.integer("mx_port", d.mx_port, 1, 65535),
    )
    section.finish()
    if result.max_retry_minutes < result.retry_minutes:
        raise ConfigError(section.key("max_retry_minutes"), result.max_retry_minutes,
                          f"must be at least retry_minutes ({result.retry_minutes})")
    return result
