"""The Flower side of the launcher: the environment Flower processes run in, ``flwr`` CLI calls
(registration, node list), the SuperLink health wait and the ``flwr`` connection file."""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import sys
import time
import tomllib
import urllib.request
from pathlib import Path

import tomli_w

from deploy.errors import LaunchError, existing

BIN = Path(sys.executable).parent


def flower_env(flwr_home: Path | None = None) -> dict:
    """The environment for Flower processes: this venv's bin first (the SuperLink starts
    ``flower-superexec`` from PATH), no telemetry, no runtime dependency install."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
    if flwr_home is not None:
        env["FLWR_HOME"] = str(flwr_home)
    return env


def flwr(env: dict, *args: str, timeout: float = 120) -> dict:
    """A ``flwr`` CLI call with JSON output; its answer, or a one-line error with flwr's reason."""
    command = [str(BIN / "flwr"), *args, "--format", "json"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    try:
        answer = json.loads(result.stdout)
    except json.JSONDecodeError:
        answer = {"success": False, "error-message": result.stdout + result.stderr or "(no output)"}
    if result.returncode != 0 or not answer.get("success", True):
        reason = (str(answer.get("error-message", "")).strip().splitlines() or [f"exit {result.returncode}"])[-1]
        raise LaunchError(f"flwr {' '.join(args)}: {reason.strip()}")
    return answer


def register(env: dict, connection: str, public_key: Path) -> int | None:
    """Register a site's public key with the SuperLink; its new node id, or None if the key was
    registered before (the SuperLink's state database keeps it across restarts)."""
    try:
        return int(flwr(env, "supernode", "register", str(existing(public_key, "register")), connection)["node-id"])
    except LaunchError as err:
        if "already in use" in str(err):
            return None
        raise


def supernodes(env: dict, connection: str) -> list[dict]:
    """The SuperLink's SuperNodes with their status (``registered``, ``online``, ...)."""
    return flwr(env, "supernode", "list", connection)["nodes"]


def wait_for_superlink(address: str, ca: Path | None, proc: subprocess.Popen, log_file: Path,
                       timeout: float = 60) -> None:
    """Return once the SuperLink at ``address`` answers its health check; a LaunchError naming
    ``log_file`` if ``proc`` ends first or ``timeout`` seconds pass."""
    scheme = "http" if ca is None else "https"
    context = None if ca is None else ssl.create_default_context(cafile=str(ca))
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"{scheme}://{address}/health", timeout=2, context=context):
                return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise LaunchError(f"the SuperLink did not start; see {log_file}") from None
            time.sleep(0.3)


def write_connection(flwr_home: Path, name: str, superlink: str, ca: Path | None) -> Path:
    """Add (or replace) the ``flwr`` connection ``name`` in ``$FLWR_HOME/config.toml``, so
    ``flwr run . <name>`` submits to this SuperLink. Other connections are kept."""
    path = flwr_home / "config.toml"
    try:
        config = tomllib.loads(path.read_text()) if path.is_file() else {}
    except tomllib.TOMLDecodeError as err:
        raise LaunchError(f"{path}: not valid TOML ({err}); fix or move it, it is left as it is") from None
    entry = {"address": superlink}
    if ca is None:
        entry["insecure"] = True
    else:
        entry["root-certificates"] = str(existing(ca, "connect --ca").resolve())
    config.setdefault("superlink", {})[name] = entry
    config["superlink"].setdefault("default", name)
    flwr_home.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".toml.partial")  # write then rename: a crash never truncates the user's file
    partial.write_text(tomli_w.dumps(config))
    partial.replace(path)
    return path
