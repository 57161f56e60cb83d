"""Drive the Flower CLI against a SuperLink started here, and stop it by PID.

Each use gets its own FLWR_HOME and its own free loopback ports, so a sweep job
or a test never touches the user's Flower setup or a SuperLink someone else
started, and everything it started (SuperLink, simulation, Ray) is its own
process group, stopped when it ends, failed or not.
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from deploy.flwr_cli import BIN, flower_env, flwr, wait_for_superlink
from deploy.processes import start, stop

REPO = Path(__file__).resolve().parents[1]
CLIENT_APP = 'clientapp = "meduniverse_flwr.client_app:app"'
HOSTILE_CLIENT_APP = 'clientapp = "simulation.hostile_app:app"'


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass(frozen=True)
class SuperLink:
    env: dict
    pid: int
    log_file: Path


@contextmanager
def local_superlink(flwr_home: Path, cwd: Path):
    """A simulation SuperLink on free loopback ports, run from ``cwd`` (relative output paths
    resolve there); yields its ``env`` for ``flwr`` commands and its PID."""
    http_port, control_port = free_port(), free_port()
    env = {**flower_env(flwr_home), "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(http_port),
           "FLWR_LOCAL_CONTROL_API_PORT": str(control_port)}
    flwr_home.mkdir(parents=True, exist_ok=True)
    log_file = flwr_home / "superlink.log"
    command = [str(BIN / "flower-superlink"), "--insecure", "--simulation", "--isolation", "subprocess",
               "--control-api-address", f"127.0.0.1:{control_port}", "--host", "127.0.0.1",
               "--port", str(http_port), "--database", str(flwr_home / "state.db"), "--log-file", str(log_file)]
    proc = start(command, flwr_home / "superlink-console.log", env, cwd)
    try:
        wait_for_superlink(f"127.0.0.1:{http_port}", None, proc, log_file)
        yield SuperLink(env=env, pid=proc.pid, log_file=log_file)
    finally:
        stop(proc.pid)
        proc.wait()


def hostile_app_dir(directory: Path) -> Path:
    """A copy of this app under ``directory`` whose ClientApp is ``simulation.hostile_app``: what
    experiments with hostile nodes run, so that the deployed app carries no attack path."""
    app = directory / "hostile-app"
    shutil.rmtree(app, ignore_errors=True)
    for package in ("meduniverse_flwr", "simulation"):
        shutil.copytree(REPO / package, app / package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("README.md", "LICENSE"):  # named by pyproject.toml
        shutil.copy2(REPO / name, app / name)
    pyproject = (REPO / "pyproject.toml").read_text()
    if pyproject.count(CLIENT_APP) != 1:
        raise RuntimeError(f"pyproject.toml: expected one line {CLIENT_APP!r} to replace")
    (app / "pyproject.toml").write_text(pyproject.replace(CLIENT_APP, HOSTILE_CLIENT_APP))
    return app


def start_flwr_run(env: dict, run_config: str, log_file: Path, federation_config: str | None = None,
                   connection: str | None = None, app: Path = REPO) -> subprocess.Popen:
    """``flwr run <app> [connection] --stream`` in the background, its output to ``log_file``."""
    command = [str(BIN / "flwr"), "run", str(app), *([connection] if connection else []), "--stream",
               "--run-config", run_config, *(["--federation-config", federation_config] if federation_config else [])]
    with open(log_file, "w") as log:
        return subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)


def finish_flwr_run(proc: subprocess.Popen, log_file: Path, timeout: float = 3600) -> tuple[str, str]:
    """Wait for a started ``flwr run``; returns (run id, output). The caller checks the status,
    since ``--stream`` exits 0 for a failed run."""
    try:
        proc.wait(timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    output = log_file.read_text()
    match = re.search(r"Successfully started run (\d+)", output)
    if proc.returncode != 0 or match is None:
        raise RuntimeError(f"flwr run failed (exit {proc.returncode}):\n{output[-3000:]}")
    return match.group(1), output


def flwr_run(env: dict, run_config: str, federation_config: str | None = None, connection: str | None = None,
             timeout: float = 3600, app: Path = REPO) -> tuple[str, str]:
    """``flwr run <app> --stream`` to its end; returns (run id, output)."""
    log_file = Path(env["FLWR_HOME"]) / "flwr-run.log"
    return finish_flwr_run(start_flwr_run(env, run_config, log_file, federation_config, connection, app),
                           log_file, timeout)


def run_status(env: dict, run_id: str) -> str:
    """The run's status as ``flwr ls`` reports it, e.g. ``finished:completed``."""
    return flwr(env, "ls", "--run-id", run_id)["runs"][0]["status"]
