"""The launcher's pieces that start no process: commands, the flwr connection file, errors."""

import os
import tomllib

import pytest

from deploy.errors import LaunchError
from deploy.flwr_cli import write_connection
from deploy.launch import main, supernode_command


def test_launch_errors_are_one_line(tmp_path):
    (tmp_path / "ca.crt").touch()
    with pytest.raises(LaunchError, match=r"^supernode --key: \S+node-9 does not exist$"):
        supernode_command("127.0.0.1:1", "ct-tissue", "", 1, tmp_path / "ca.crt", tmp_path / "node-9", False)


def test_the_superlink_listens_on_this_machine_unless_told_otherwise(tmp_path, monkeypatch):
    started = []
    monkeypatch.setattr(os, "execve", lambda path, args, env: started.append(args))
    main(["superlink", "--insecure", "--state", str(tmp_path)])
    main(["superlink", "--insecure", "--state", str(tmp_path), "--host", "0.0.0.0"])
    assert [args[args.index("--host") + 1] for args in started] == ["127.0.0.1", "0.0.0.0"]


def test_the_connection_is_added_and_other_entries_are_kept(tmp_path):
    (tmp_path / "ca.crt").touch()
    (tmp_path / "config.toml").write_text('[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local:"\n')
    write_connection(tmp_path, "hospitals", "link.example.org:9092", tmp_path / "ca.crt")
    config = tomllib.loads((tmp_path / "config.toml").read_text())
    assert config["superlink"]["default"] == "local"
    assert config["superlink"]["local"] == {"address": ":local:"}
    assert config["superlink"]["hospitals"] == {"address": "link.example.org:9092",
                                                "root-certificates": str((tmp_path / "ca.crt").resolve())}


def test_a_broken_connection_file_is_a_one_line_error_and_left_as_it_is(tmp_path):
    broken = "[superlink\naddress = \n"
    (tmp_path / "config.toml").write_text(broken)
    with pytest.raises(LaunchError, match=r"config.toml: not valid TOML .*it is left as it is$") as err:
        write_connection(tmp_path, "hospitals", "127.0.0.1:9092", None)
    assert "\n" not in str(err.value)
    assert (tmp_path / "config.toml").read_text() == broken
