"""Long-running processes the launcher starts, and stopping them by PID.

A PID file outlives its processes and PIDs are reused, so ``pids.json`` records each
process's start time (field 22 of ``/proc/PID/stat``) and command, and ``stop_recorded``
signals only a process it can prove is the one recorded: anything else is skipped and
reported, never signalled.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

from deploy.errors import LaunchError

STAT_START_TIME = 19  # field 22 of /proc/PID/stat, counted from field 3 (see _stat)


def start(command: list[str], log_file: Path, env: dict, cwd: Path) -> subprocess.Popen:
    """Start a long-running Flower process in its own process group (stopped as a group, by PID)."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "ab") as log:
        return subprocess.Popen(command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)


def _stat(pid: int) -> list[str]:
    """/proc/<pid>/stat after the command name: state, parent PID, ..."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def start_time(pid: int) -> int | None:
    """When ``pid`` started, in clock ticks after boot; None if /proc cannot tell."""
    try:
        return int(_stat(pid)[STAT_START_TIME])
    except (OSError, IndexError, ValueError):
        return None


def command_line(pid: int) -> list[str] | None:
    """``pid``'s arguments from /proc; None if /proc cannot tell."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return raw.decode(errors="replace").split("\0")[:-1]  # each argument ends with a NUL


def descendants(pid: int) -> list[int]:
    """Every process below ``pid``, from /proc (Linux); empty elsewhere."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            parent = int(_stat(int(entry.name))[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], list(children.get(pid, []))
    while todo:
        child = todo.pop()
        found.append(child)
        todo.extend(children.get(child, []))
    return found


def running(pid: int) -> bool:
    """Whether ``pid`` still runs; a zombie does not (our own children are reaped here)."""
    try:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    except ChildProcessError:
        pass  # not our child
    try:
        return _stat(pid)[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: ask the kernel
        try:
            os.kill(pid, 0)
            return True
        except ProcessLookupError:
            return False


def stop(pid: int, grace: float = 10.0) -> None:
    """SIGTERM the process group ``pid`` leads and every process below it (Flower starts its
    SuperExec in a session of its own), then SIGKILL what is left after ``grace`` seconds.
    Only groups we started: a PID that no longer leads its group is left alone."""
    try:
        if os.getpgid(pid) != pid:
            return
    except ProcessLookupError:
        return
    tree = [pid, *descendants(pid)]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for target in tree:
            try:
                os.killpg(target, sig) if target == pid else os.kill(target, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(running(target) for target in tree):
            time.sleep(0.1)


def record(proc: subprocess.Popen) -> dict:
    """What proves later that a PID is still this process: its start time and its command
    (the one given to Popen: right after Popen, /proc may not show the new program yet)."""
    return {"pid": proc.pid, "start": start_time(proc.pid), "command": [str(arg) for arg in proc.args]}


def write_pid_file(path: Path, processes: dict[str, subprocess.Popen]) -> None:
    path.write_text(json.dumps({name: record(proc) for name, proc in processes.items()}, indent=1))


def not_ours(entry: dict, start: int | None, command: list[str] | None) -> str | None:
    """Why the process now at ``entry["pid"]`` (its ``start`` time and ``command`` line, None where
    /proc cannot tell) is not provably the one ``entry`` recorded; None if it is."""
    recorded = entry.get("command", [])
    if entry.get("start") is None:
        return "no start time recorded (a pids.json from an older launcher, or no /proc); check it and end it by hand"
    if not recorded or not Path(recorded[0]).name.startswith("flower-"):
        return "the recorded command is not a Flower process"
    if start is None or command is None:
        return "its /proc entry is missing or unreadable (it ended, or is not visible to this user)"
    if start != entry["start"]:
        return "its start time differs from the recorded one (the PID was reused)"
    # a Flower entry point is a script: the kernel runs it as `python <script> <args>`
    if command[-len(recorded):] != recorded:
        return f"it runs something other than the recorded command ({' '.join(command)[:120]})"
    return None


def _entry(pid_file: Path, name: str, value) -> dict:
    entry = {"pid": value} if type(value) is int else value  # an older launcher recorded the PID alone
    command = entry.get("command", []) if isinstance(entry, dict) else None
    valid = (isinstance(entry, dict) and type(entry.get("pid")) is int and entry["pid"] > 0
             and (entry.get("start") is None or type(entry["start"]) is int)
             and isinstance(command, list) and all(isinstance(arg, str) for arg in command))
    if not valid:
        raise LaunchError(f"stop: {pid_file}: entry {name!r} is not a process record: {json.dumps(value)[:120]}")
    return entry


def read_pid_file(pid_file: Path) -> dict[str, dict]:
    """``pids.json``: name -> {pid, start, command}; a one-line LaunchError if it is malformed."""
    if not pid_file.is_file():
        raise LaunchError(f"stop: {pid_file} does not exist; nothing started there")
    try:
        data = json.loads(pid_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise LaunchError(f"stop: {pid_file} is not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise LaunchError(f"stop: {pid_file} is not a JSON object of name: process record")
    return {name: _entry(pid_file, name, value) for name, value in data.items()}


def stop_recorded(pid_file: Path) -> tuple[list[str], list[str]]:
    """Stop what ``pid_file`` records, then remove it; (names stopped, one line per process
    skipped and why). The nodes go before the SuperLink (reverse start order)."""
    stopped, skipped = [], []
    for name, entry in reversed(read_pid_file(pid_file).items()):
        pid = entry["pid"]
        reason = not_ours(entry, start_time(pid), command_line(pid))
        if reason is None:
            stop(pid)
            stopped.append(name)
        else:
            skipped.append(f"{name} (PID {pid}) not stopped: {reason}")
    pid_file.unlink()
    return stopped[::-1], skipped[::-1]
