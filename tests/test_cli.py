"""The mailscreen administration command."""

from __future__ import annotations

import subprocess
import sys

import pytest

from twisted_mail_screen.store.accounts import AccountStore


def run(args: list[str], stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "twisted_mail_screen.admin.cli", *args],
                          input=stdin, capture_output=True, text=True, timeout=60)


@pytest.fixture
def site_config(tmp_path):
    f = tmp_path / "site.toml"
    f.write_text(f'mode = "site"\ndomains = ["example.test"]\ndata_dir = "{tmp_path / "data"}"\n')
    return str(f)


def test_user_add_reads_password_from_stdin_and_stores_a_hash(site_config, tmp_path):
    """`user add` takes the password from stdin (not argv) and stores only an scrypt hash."""
    result = run(["--config", site_config, "user", "add", "Alice@Example.test"], "s3cret\n")
    assert result.returncode == 0, result.stderr
    users = (tmp_path / "data" / "users").read_text()
    assert users.startswith("alice@example.test:scrypt$") and "s3cret" not in users
    assert AccountStore(str(tmp_path / "data")).check_password("alice@example.test", "s3cret")


def test_user_list_passwd_del(site_config, tmp_path):
    """list shows users; passwd changes the hash; del removes the user."""
    assert run(["--config", site_config, "user", "add", "a@example.test"], "one\n").returncode == 0
    assert run(["--config", site_config, "user", "list"]).stdout == "a@example.test\n"
    assert run(["--config", site_config, "user", "passwd", "a@example.test"], "two\n").returncode == 0
    assert AccountStore(str(tmp_path / "data")).check_password("a@example.test", "two")
    assert run(["--config", site_config, "user", "del", "a@example.test"]).returncode == 0
    assert run(["--config", site_config, "user", "list"]).stdout == ""


def test_user_add_refuses_foreign_domain_and_bad_names(site_config):
    """Only local domains, and only plain addresses (never a path) become accounts."""
    assert "not one of the local domains" in run(
        ["--config", site_config, "user", "add", "a@other.test"], "x\n").stderr
    result = run(["--config", site_config, "user", "add", "../../etc@example.test"], "x\n")
    assert result.returncode == 1 and "dot-atom" in result.stderr


def test_alias_set_list_del(site_config):
    """Aliases and catch-alls are set, listed and deleted."""
    assert run(["--config", site_config, "alias", "set", "sales@example.test",
                "a@example.test", "b@example.test"]).returncode == 0
    assert run(["--config", site_config, "alias", "set", "@example.test", "a@example.test"]).returncode == 0
    listing = run(["--config", site_config, "alias", "list"]).stdout
    assert "sales@example.test: a@example.test, b@example.test" in listing
    assert "@example.test: a@example.test" in listing
    assert run(["--config", site_config, "alias", "del", "sales@example.test"]).returncode == 0


def test_check_config(site_config, tmp_path):
    """check-config says ok for a good file and names the key for a bad one."""
    assert run(["check-config", site_config]).returncode == 0
    bad = tmp_path / "bad.toml"
    bad.write_text('mode = "site"\ndomains = ["example.test"]\n[smtp]\nmax_recipients = "ten"\n')
    result = run(["check-config", str(bad)])
    assert result.returncode == 1 and "smtp.max_recipients" in result.stderr


def test_check_config_warns_about_readable_secrets(tmp_path, certificate):
    """A TLS key readable by group or others, and a data_dir readable by others, are warned about."""
    import os
    import shutil

    cert, key = certificate
    loose_key = tmp_path / "key.pem"
    shutil.copy(key, loose_key)
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    os.chmod(data, 0o700)
    config = tmp_path / "site.toml"
    config.write_text(f'mode = "site"\ndomains = ["example.test"]\ndata_dir = "{data}"\n'
                      f'[tls]\ncertificate = "{cert}"\nkey = "{loose_key}"\n')
    os.chmod(loose_key, 0o600)
    quiet = run(["check-config", str(config)])
    assert quiet.returncode == 0 and "warning" not in quiet.stderr
    os.chmod(loose_key, 0o640)
    os.chmod(data, 0o755)
    loud = run(["check-config", str(config)])
    assert loud.returncode == 0, loud.stderr
    assert f"warning: tls.key: {loose_key} is readable by group or others (mode 640)" in loud.stderr
    assert f"warning: data_dir: {data} is readable by others (mode 755)" in loud.stderr


def test_unknown_users_password_is_checked_against_a_hash_of_todays_cost():
    """
    The stand-in hash an unknown user's password is checked against is a
    constant (no scrypt at import) of the same cost as a new hash, so a
    login as nobody takes as long as one as somebody.
    """
    from twisted_mail_screen.store import accounts
    from twisted_mail_screen.store.passwords import hash_password, verify_password

    assert accounts._DUMMY_HASH.split("$")[:4] == hash_password("x").split("$")[:4]
    assert verify_password("not a password anyone has", accounts._DUMMY_HASH)


def test_users_file_edited_by_hand_is_read_again(tmp_path):
    """A hand edit of users or aliases takes effect at the next lookup, no restart."""
    store = AccountStore(str(tmp_path))
    assert not store.exists("a@example.test") and store.alias_targets("x@example.test") is None
    (tmp_path / "users").write_text("a@example.test:scrypt$x\n")
    (tmp_path / "aliases").write_text("x@example.test: a@example.test\n")
    assert store.exists("a@example.test")
    assert store.alias_targets("x@example.test") == ("a@example.test",)
    # Another size: two writes within one mtime tick are told apart by size (or inode).
    (tmp_path / "users").write_text("bob@example.test:scrypt$yy\n")
    assert store.users() == {"bob@example.test": "scrypt$yy"}


def test_hand_edited_files_skip_a_line_without_colon_and_keep_the_rest(tmp_path):
    """A line with no ':' in users or aliases is logged and skipped; the other lines still count."""
    from conftest import log_lines

    (tmp_path / "users").write_text("# comment\nAlice@Example.test: scrypt$x\nbroken line\n"
                                    "bob@example.test:scrypt$y\n")
    (tmp_path / "aliases").write_text("Sales@Example.test: Alice@Example.test, bob@example.test,\n"
                                      "oops\n@example.test: bob@example.test\n")
    store = AccountStore(str(tmp_path))
    with log_lines("no ':'") as warnings:
        assert store.users() == {"alice@example.test": "scrypt$x", "bob@example.test": "scrypt$y"}
        assert store.aliases() == {"sales@example.test": ("alice@example.test", "bob@example.test"),
                                   "@example.test": ("bob@example.test",)}
    assert warnings == [f"{tmp_path / 'users'}:3: no ':' in user line, skipped",
                        f"{tmp_path / 'aliases'}:2: no ':' in alias line, skipped"]


def test_control_socket_in_a_data_dir_with_a_colon(tmp_path):
    """The control socket's endpoint string quotes the path: a ':' in data_dir still works."""
    from twisted_mail_screen.config.settings import load_config
    from twisted_mail_screen.runtime import control
    from twisted_mail_screen.testing import RunningServer, ephemeral_overrides

    data = str(tmp_path / "da:ta")
    with RunningServer(load_config(None, ephemeral_overrides(data, ("smtp",)))):
        assert control.call(data, "block.list") == []
