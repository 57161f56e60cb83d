"""The launcher's pieces that start no process: commands, the flwr connection file, errors."""

import tomllib

import pytest

from deploy.launch import LaunchError, supernode_command, write_connection


def test_launch_errors_are_one_line(tmp_path):
    (tmp_path / "ca.crt").touch()
    with pytest.raises(LaunchError, match=r"^supernode --key: \S+node-9 does not exist$"):
        supernode_command("127.0.0.1:1", "ct-tissue", "", 1, tmp_path / "ca.crt", tmp_path / "node-9", False)


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
