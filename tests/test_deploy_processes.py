"""``launch stop`` signals only processes it can prove it started: same PID, same start time, same
Flower command. Each test runs a stand-in Flower program (a script named ``flower-*`` that sleeps)."""

import json
import os
import pathlib
import sys

import pytest

from deploy.errors import LaunchError
from deploy.launch import main
from deploy.processes import record, running, start, stop_recorded, write_pid_file


@pytest.fixture
def flower_program(tmp_path):
    """Start stand-in Flower processes; every one still running is killed at the end."""
    script = tmp_path / "flower-sleeper"
    script.write_text(f"#!{sys.executable}\nimport time\ntime.sleep(600)\n")
    script.chmod(0o755)
    started = []

    def launch(*args: str):
        proc = start([str(script), *args], tmp_path / "logs" / "sleeper.log", dict(os.environ), tmp_path)
        started.append(proc)
        return proc

    yield launch
    for proc in started:
        proc.kill()
        proc.wait()


def test_stop_ends_the_recorded_processes(tmp_path, flower_program, capsys):
    processes = {"superlink": flower_program("--port", "1"), "node-0": flower_program("--port", "2")}
    write_pid_file(tmp_path / "pids.json", processes)
    main(["stop", "--dir", str(tmp_path)])
    assert capsys.readouterr().out == "stopped superlink, node-0\n"
    assert not any(running(proc.pid) for proc in processes.values())
    assert not (tmp_path / "pids.json").exists()


@pytest.mark.parametrize("change, reason", [
    ({"start": -1}, "its start time differs from the recorded one (the PID was reused)"),
    ({"command": ["/elsewhere/flower-superlink", "--port", "1"]}, "it runs something other than the recorded command"),
    ({"command": ["/usr/bin/sleep", "600"]}, "the recorded command is not a Flower process"),
])
def test_a_process_that_is_not_the_recorded_one_is_not_signalled(tmp_path, flower_program, change, reason):
    proc = flower_program("--port", "1")
    (tmp_path / "pids.json").write_text(json.dumps({"superlink": {**record(proc), **change}}))
    stopped, skipped = stop_recorded(tmp_path / "pids.json")
    assert stopped == [] and len(skipped) == 1
    assert skipped[0].startswith(f"superlink (PID {proc.pid}) not stopped: {reason}")
    assert running(proc.pid)


def test_a_process_whose_proc_entry_cannot_be_read_is_not_signalled(tmp_path, flower_program, monkeypatch):
    proc = flower_program()
    write_pid_file(tmp_path / "pids.json", {"superlink": proc})
    hidden = f"/proc/{proc.pid}/"  # as with /proc mounted hidepid=2, or another user's process
    for method in ("read_text", "read_bytes"):
        real = getattr(pathlib.Path, method)

        def unreadable(path, *args, _real=real, **kwargs):
            if str(path).startswith(hidden):
                raise PermissionError(13, "Permission denied", str(path))
            return _real(path, *args, **kwargs)

        monkeypatch.setattr(pathlib.Path, method, unreadable)
    stopped, skipped = stop_recorded(tmp_path / "pids.json")
    monkeypatch.undo()
    assert stopped == []
    assert skipped == [f"superlink (PID {proc.pid}) not stopped: its /proc entry is missing or unreadable "
                       "(it ended, or is not visible to this user)"]
    assert running(proc.pid)


def test_an_old_pid_file_without_start_times_is_reported_not_acted_on(tmp_path, flower_program, capsys):
    proc = flower_program()
    (tmp_path / "pids.json").write_text(json.dumps({"superlink": proc.pid}))
    main(["stop", "--dir", str(tmp_path)])
    out, err = capsys.readouterr()
    assert out == "stopped nothing\n"
    assert err == (f"superlink (PID {proc.pid}) not stopped: no start time recorded (a pids.json from an older "
                   "launcher, or no /proc); check it and end it by hand\n")
    assert running(proc.pid)


@pytest.mark.parametrize("content, error", [
    ("{", r"pids.json is not valid JSON \(Expecting"),
    ("[1, 2]", r"pids.json is not a JSON object of name: process record$"),
    ('{"superlink": "123"}', r"""pids.json: entry 'superlink' is not a process record: "123"$"""),
    ('{"superlink": {"pid": 123, "start": "x"}}', r"pids.json: entry 'superlink' is not a process record: \{"),
    ('{"superlink": {"pid": 0, "start": 1, "command": []}}', r"pids.json: entry 'superlink' is not a process"),
])
def test_a_malformed_pid_file_is_a_one_line_error(tmp_path, content, error):
    (tmp_path / "pids.json").write_text(content)
    with pytest.raises(LaunchError, match=r"^stop: \S+" + error) as err:
        stop_recorded(tmp_path / "pids.json")
    assert "\n" not in str(err.value)
    with pytest.raises(SystemExit, match=r"^error: stop: "):
        main(["stop", "--dir", str(tmp_path)])
