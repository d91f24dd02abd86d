"""Configuration parsing: defaults, overrides and precise errors."""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

import pytest

from twisted_mail_screen.config.settings import Config, load_config, parse_config
from twisted_mail_screen.config.base import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def test_embedded_default_is_a_loopback_test_host(tmp_path):
    """With no file: test-host on 127.0.0.1, SMTP 2525, POP3 2110, IMAP 2143."""
    config = parse_config({"data_dir": str(tmp_path)})
    assert config.mode == "test-host"
    assert config.listen.smtp == ("tcp:2525:interface=127.0.0.1",)
    assert config.listen.pop3 == ("tcp:2110:interface=127.0.0.1",)
    assert config.listen.imap == ("tcp:2143:interface=127.0.0.1",)
    assert config.listen.submission == ()


def test_sample_configuration_is_valid(tmp_path):
    """etc/mailscreen.toml parses (with its data_dir pointed somewhere writable)."""
    config = load_config(str(ROOT / "etc" / "mailscreen.toml"), {"data_dir": str(tmp_path)})
    assert config.mode == "site"


def test_overrides_win_over_the_file(tmp_path):
    """Command-line overrides replace file values, dotted keys reach sections."""
    f = tmp_path / "c.toml"
    f.write_text('hostname = "a.test"\n[listen]\nsmtp = ["tcp:25"]\n')
    config = load_config(str(f), {"hostname": "b.test", "listen.smtp": ["tcp:2600"],
                                  "data_dir": str(tmp_path)})
    assert config.hostname == "b.test" and config.listen.smtp == ("tcp:2600",)


def test_service_sections_are_typed_and_frozen(tmp_path):
    """[screening], [freeze] and [relay] are parsed once into frozen objects on Config."""
    config = parse_config({"mode": "site", "domains": ["example.test"],
                           "data_dir": str(tmp_path),
                           "screening": {"max_connections": 7,
                                         "session_auth": {"max_failures": 3}},
                           "freeze": {"minutes": 5},
                           "relay": {"queue_lifetime_hours": 48}})
    assert config.screening.max_connections == 7
    assert config.screening.session_auth.max_failures == 3
    assert config.screening.whitelist == ()  # a site trusts nobody by default
    assert config.freeze.minutes == 5
    assert config.relay.enabled and config.relay.queue_lifetime_hours == 48
    assert not hasattr(config, "extra")
    for section in (config, config.screening, config.freeze, config.relay):
        with pytest.raises(dataclasses.FrozenInstanceError):
            section.enabled = False  # type: ignore[misc]
    assert parse_config({"data_dir": str(tmp_path)}).screening.whitelist == (
        "127.0.0.0/8", "::1")


@pytest.mark.parametrize("text, key, words", [
    ('colour = "blue"', "colour", "unknown key"),
    ('mode = "production"', "mode", "must be one of"),
    ('hostname = 42', "hostname", "must be a string"),
    ('[listen]\nsmtp = "tcp:25"', "listen.smtp", "must be a list"),
    ('[listen]\nsmtp = [25]', "listen.smtp", "list of strings"),
    ('[smtp]\nmax_recipients = 0', "smtp.max_recipients", "at least 1"),
    ('[smtp]\nmax_message_size = true', "smtp.max_message_size", "must be an integer"),
    ('[smtp]\nmaxrecipients = 5', "smtp.maxrecipients", "unknown key"),
    ('[tls]\ncertificate = "/nonexistent/cert.pem"', "tls.certificate", "no such file"),
    ('mode = "site"', "domains", "at least one local domain"),
    ('domains = ["bad domain"]', "domains", "not a valid domain"),
    ('this is not toml', "--config", "not valid TOML"),
    ('[screening]\nblock_minutes = 0', "screening.block_minutes", "at least 1"),
    ('[screening.session_auth]\nprotocols = ["x"]', "screening.session_auth.protocols",
     "unknown protocol"),
    ('[freeze]\nminutes = -1', "freeze.minutes", "at least 0"),
    ('[relay]\nenabled = true', "relay.enabled", "relays only to a relay.smarthost"),
    ('mode = "site"\ndomains = ["example.test"]\n[storage]\nfsync = false', "storage.fsync",
     "only a test host"),
    ('[storage]\nfsync = "no"', "storage.fsync", "must be true or false"),
])
def test_bad_values_name_the_key(tmp_path, text, key, words):
    """Each kind of mistake raises ConfigError naming the key and the problem."""
    f = tmp_path / "bad.toml"
    f.write_text(text + f'\ndata_dir = "{tmp_path}"\n' if "not toml" not in text else text)
    with pytest.raises(ConfigError) as e:
        load_config(str(f))
    assert e.value.key == key
    assert words in str(e.value)


def test_tls_key_that_is_not_a_key(tmp_path, certificate):
    """A certificate paired with a file that is not a key names tls.key."""
    cert, _ = certificate
    junk = tmp_path / "junk.pem"
    junk.write_text("nope")
    with pytest.raises(ConfigError) as e:
        parse_config({"data_dir": str(tmp_path), "tls": {"certificate": cert, "key": str(junk)}})
    assert e.value.key == "tls.key"


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_data_dir(tmp_path):
    """A data directory that cannot be written is refused."""
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(ConfigError) as e:
        parse_config({"data_dir": str(locked / "data")})
    assert e.value.key == "data_dir"


def test_data_dir_that_is_a_file(tmp_path):
    """A data_dir path that is a regular file is refused, naming data_dir."""
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ConfigError) as e:
        parse_config({"data_dir": str(f)})
    assert e.value.key == "data_dir"


def _config_keys(cls: type = Config, section: str = "") -> list[tuple[str, str]]:
    """(section, key) for every key the parser reads: the fields of Config and its sections."""
    keys = []
    for f in dataclasses.fields(cls):
        kind = f.default_factory if f.default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(kind):
            keys += _config_keys(kind, f"{section}.{f.name}".lstrip("."))
        else:
            keys.append((section, f.name))
    return keys


def _split(text: str, heading: str) -> dict[str, str]:
    """Section name -> its text, split at lines matching C{heading} (group 1: the name)."""
    parts: dict[str, str] = {}
    name = ""
    for line in text.splitlines():
        m = re.match(heading, line)
        if m:
            name = m.group(1) or ""
        parts[name] = parts.get(name, "") + line + "\n"
    return parts


def test_every_key_is_in_configuration_md_and_the_sample():
    """Each key the parser reads has its row in its docs/configuration.md section and a line
    (commented or not) in its etc/mailscreen.toml table."""
    docs = _split((ROOT / "docs" / "configuration.md").read_text(), r"## (?:`\[(.+)\]`|Top level)")
    sample = _split((ROOT / "etc" / "mailscreen.toml").read_text(), r"\[([\w.]+)\]$")
    keys = _config_keys()
    assert len(keys) > 60  # the walk over Config found the sections
    assert [k for k in keys if f"| `{k[1]}` |" not in docs.get(k[0], "")] == []
    assert [k for k in keys
            if not re.search(rf"^#? ?{k[1]} = ", sample.get(k[0], ""), re.M)] == []
