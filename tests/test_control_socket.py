"""
C{control_socket}: where the control channel listens (default
C{DATA_DIR/control.sock}), read by the server and by C{mailscreen}; a path
the OS cannot bind is refused when the configuration is read.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import pytest

from twisted_mail_screen.config.base import ConfigError
from twisted_mail_screen.config.settings import MAX_SOCKET_PATH, parse_config
from twisted_mail_screen.runtime import control


def test_default_is_in_the_data_dir(tmp_path) -> None:
    config = parse_config({"data_dir": str(tmp_path)})
    assert config.control_socket == os.path.join(str(tmp_path), "control.sock")


def test_a_relative_path_is_made_absolute(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = parse_config({"data_dir": str(tmp_path), "control_socket": "run/ms.sock"})
    assert config.control_socket == str(tmp_path / "run" / "ms.sock")


def test_too_long_a_path_is_refused_naming_the_key(tmp_path) -> None:
    long_dir = tmp_path / ("d" * (MAX_SOCKET_PATH - len(str(tmp_path))))
    with pytest.raises(ConfigError) as e:
        parse_config({"data_dir": str(long_dir)})
    assert e.value.key == "control_socket"
    assert "data_dir is long" in str(e.value) and "set control_socket to a shorter path" in str(e.value)
    with pytest.raises(ConfigError, match=f"can be at most {MAX_SOCKET_PATH}"):
        parse_config({"data_dir": str(tmp_path), "control_socket": str(long_dir / "c.sock")})
    with pytest.raises(ConfigError, match="must be a path"):
        parse_config({"data_dir": str(tmp_path), "control_socket": " "})
    with pytest.raises(ConfigError, match="must be a string"):
        parse_config({"data_dir": str(tmp_path), "control_socket": 5})
    short = parse_config({"data_dir": str(long_dir), "control_socket": str(tmp_path / "c.sock")})
    assert short.control_socket == str(tmp_path / "c.sock")


def test_server_and_cli_use_the_configured_socket(start_server, tmp_path) -> None:
    directory = tempfile.mkdtemp(prefix="ms-")
    try:
        path = os.path.join(directory, "sub", "control.sock")
        start_server(kinds=("smtp",), control_socket=path)
        assert not os.path.exists(tmp_path / "data" / "control.sock")
        assert control.call(path, "block.list") == []
        config = tmp_path / "host.toml"
        config.write_text(f'data_dir = "{tmp_path / "data"}"\ncontrol_socket = "{path}"\n')
        cli = [sys.executable, "-m", "twisted_mail_screen.admin.cli"]
        listed = subprocess.run(cli + ["--config", str(config), "block", "list"],
                                capture_output=True, text=True, timeout=60)
        assert listed.returncode == 0 and listed.stdout == "no blocks\n", listed.stderr
        flag = subprocess.run(cli + ["--data-dir", str(tmp_path / "data"), "--control-socket", path,
                                     "block", "list"], capture_output=True, text=True, timeout=60)
        assert flag.returncode == 0 and flag.stdout == "no blocks\n", flag.stderr
        missing = subprocess.run(cli + ["--data-dir", str(tmp_path / "data"), "block", "list"],
                                 capture_output=True, text=True, timeout=60)
        assert missing.returncode == 1 and "--control-socket or control_socket" in missing.stderr
    finally:
        import shutil
        shutil.rmtree(directory, ignore_errors=True)
