"""
DKIM signing of submitted mail (mailauth/sign.py) and `mailscreen dkim`:
a key made by keygen signs a message alice submits; relayed to the capture
sink it verifies with dkimpy given the printed TXT record, and fails once
its body is changed; Ed25519 adds a second signature; mail from
unauthenticated clients and from domains without a key is not signed.
"""

from __future__ import annotations

import os
import re
import smtplib
import stat

import dkim
import pytest

from conftest import queue_settled, relay_to
from relay_sink import wait_for
from twisted_mail_screen.admin.cli import main
from twisted_mail_screen.config.base import ConfigError
from twisted_mail_screen.config.settings import load_config

BODY = b"From: alice@example.test\r\nTo: carol@remote.test\r\nSubject: signed\r\n\r\nhello\r\n.dot\r\n"


def keygen(capsys, data, *args) -> tuple[str, str]:
    """(the key file, the TXT record's value) printed by `mailscreen dkim keygen`."""
    assert main(["--data-dir", str(data), "dkim", "keygen", "example.test", *args]) == 0
    out = capsys.readouterr().out
    path = re.search(r"^wrote (\S+) ", out, re.M).group(1)
    record = re.search(r"^(\S+)\._domainkey\.example\.test\. IN TXT (.+)$", out, re.M)
    return path, "".join(re.findall(r'"([^"]*)"', record.group(2)))


def dns(records: dict[str, str]):
    def lookup(name, timeout=5):
        name = name.decode() if isinstance(name, bytes) else name
        value = records.get(name.rstrip("."))
        return value.encode() if value is not None else None
    return lookup


def submit(server, body=BODY, rcpts=("carol@remote.test",)):
    client = smtplib.SMTP("127.0.0.1", server.port("submission"), timeout=10)
    client.login("alice@example.test", "alice-secret")
    client.sendmail("alice@example.test", list(rcpts), body)
    client.quit()


def relayed(server, sink) -> bytes:
    wait_for(lambda: sink.messages, what="the relayed message")
    queue_settled(server)
    return sink.messages[-1].data


def test_keygen_writes_a_private_key_and_show_prints_the_record(tmp_path, capsys):
    path, txt = keygen(capsys, tmp_path / "data", "--selector", "s1")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert path == str(tmp_path / "data" / "dkim" / "example.test.s1.key")
    assert txt.startswith("v=DKIM1; k=rsa; p=MIIBIjAN")  # RSA 2048
    assert main(["--data-dir", str(tmp_path / "data"), "dkim", "show", "example.test"]) == 0
    shown = capsys.readouterr().out
    assert "".join(re.findall(r'"([^"]*)"', shown)) == txt
    # A second keygen with the same selector never replaces the key.
    assert main(["--data-dir", str(tmp_path / "data"), "dkim", "keygen", "example.test",
                 "--selector", "s1"]) == 1
    assert "exists" in capsys.readouterr().err


def test_submitted_mail_is_signed_and_verifies(start_server, accounts, sink, tmp_path, capsys):
    path, txt = keygen(capsys, tmp_path / "keys", "--selector", "s1")
    server = start_server(site=True, **relay_to(sink),
                          dkim__keys=[{"domain": "example.test", "selector": "s1", "key": path}])
    submit(server)
    data = relayed(server, sink)
    lookup = dns({"s1._domainkey.example.test": txt})
    assert dkim.verify(data, dnsfunc=lookup)
    signature = data.split(b"\r\n\r\n")[0].split(b"DKIM-Signature:")[1]
    tags = dict(t.strip().split(b"=", 1) for t in re.sub(rb"\s+", b"", signature).split(b";") if t)
    assert tags[b"c"] == b"relaxed/relaxed" and tags[b"a"] == b"rsa-sha256" and tags[b"d"] == b"example.test"
    assert tags[b"h"].lower().split(b":").count(b"from") == 2  # oversigned
    assert not dkim.verify(data.replace(b"hello", b"hullo"), dnsfunc=lookup)
    assert not dkim.verify(data.replace(b"Subject: signed", b"Subject: changed"), dnsfunc=lookup)


def test_an_ed25519_key_adds_a_second_signature(start_server, accounts, sink, tmp_path, capsys):
    rsa_key, rsa_txt = keygen(capsys, tmp_path / "keys", "--selector", "s1")
    ed_key, ed_txt = keygen(capsys, tmp_path / "keys", "--selector", "e1", "--algorithm", "ed25519")
    assert ed_txt.startswith("v=DKIM1; k=ed25519; p=")
    server = start_server(site=True, **relay_to(sink), dkim__keys=[
        {"domain": "example.test", "selector": "s1", "key": rsa_key},
        {"domain": "example.test", "selector": "e1", "key": ed_key, "algorithm": "ed25519"}])
    submit(server)
    data = relayed(server, sink)
    lookup = dns({"s1._domainkey.example.test": rsa_txt, "e1._domainkey.example.test": ed_txt})
    d = dkim.DKIM(data)
    assert d.verify(idx=0, dnsfunc=lookup) and d.verify(idx=1, dnsfunc=lookup)
    assert {b"rsa-sha256", b"ed25519-sha256"} == set(re.findall(rb"a=([\w-]+);", data))


def test_unauthenticated_and_keyless_mail_is_not_signed(start_server, accounts, sink, tmp_path, capsys):
    path, _ = keygen(capsys, tmp_path / "keys", "--selector", "s1")
    server = start_server(site=True, **relay_to(sink),
                          dkim__keys=[{"domain": "example.test", "selector": "s1", "key": path}])
    client = smtplib.SMTP("127.0.0.1", server.port("smtp"), timeout=10)
    client.sendmail("someone@remote.test", ["bob@example.test"], BODY)
    client.quit()
    inbox = tmp_path / "data" / "mail" / "example.test" / "bob" / "new"
    assert b"DKIM-Signature" not in next(inbox.iterdir()).read_bytes()


@pytest.mark.parametrize("entry, key, words", [
    ({"domain": "other.test", "selector": "s1"}, "dkim.keys[0].domain", "local domains"),
    ({"domain": "example.test", "selector": "bad_selector"}, "dkim.keys[0].selector", "DNS label"),
    ({"domain": "example.test", "selector": "s1", "algorithm": "ed25519"}, "dkim.keys[0].key",
     "not an Ed25519 private key"),
    ({"domain": "example.test", "selector": "s1", "algorithm": "dsa"}, "dkim.keys[0].algorithm",
     "one of"),
    ({"domain": "example.test", "selector": "s1", "colour": "red"}, "dkim.keys[0].colour",
     "unknown key"),
])
def test_bad_dkim_keys_name_the_key(tmp_path, capsys, entry, key, words):
    path, _ = keygen(capsys, tmp_path / "keys", "--selector", "s1")
    table = {"mode": "site", "hostname": "mail.example.test", "domains": ["example.test"],
             "data_dir": str(tmp_path / "data"), "dkim.keys": [{"key": path, **entry}]}
    with pytest.raises(ConfigError) as e:
        load_config(None, table)
    assert e.value.key == key and words in e.value.problem


def test_signing_is_handed_to_the_worker_pool(tmp_path, capsys):
    """The hook never signs on the calling (reactor) thread: the signer runs through the pool."""
    from twisted_mail_screen.mailauth.gate import MailAuth
    from twisted_mail_screen.mailauth.sign import Signer
    from twisted_mail_screen.testing import InlineWorkers

    path, _ = keygen(capsys, tmp_path / "keys", "--selector", "s1")
    config = load_config(None, {"data_dir": str(tmp_path / "data"),
                                "dkim.keys": [{"domain": "example.test", "selector": "s1", "key": path}]})
    handed: list = []

    class Recording(InlineWorkers):
        def run(self, f, *args, **kwargs):
            handed.append(f)
            return super().run(f, *args, **kwargs)

    signer = Signer(config.dkim)
    gate = MailAuth(Recording(), signer)
    out = []
    gate.check(user="alice@example.test", submitting=True, peer="127.0.0.1", helo="c",
               sender="alice@example.test", body=b"From: alice@example.test\n\nhi\n").addCallback(out.append)
    assert handed == [signer.sign] and out[0].startswith(b"DKIM-Signature:")
