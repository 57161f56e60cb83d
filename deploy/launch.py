"""Launch a real deployment: one SuperLink (TLS, SuperNode authentication, persistent state),
one SuperNode per site naming its own dataset, and the ``flwr`` connection to run on them.

One command per machine (see deploy/README.md for the whole guide)::

    coordinating centre  python -m deploy.launch superlink --certs secrets --host 0.0.0.0 --port 9092 --state state
    researcher           python -m deploy.launch connect hospitals --superlink link.example.org:9092 --ca ca.crt
                         python -m deploy.launch register hospitals node-0.pub node-1.pub
    each hospital        python -m deploy.launch supernode --superlink link.example.org:9092 --ca ca.crt \\
                             --key node-0 --dataset medmnist:pneumoniamnist --data-root /data/medmnist
    then                 flwr run . hospitals --stream

All of it on this machine, on 127.0.0.1 (to try the chain, and what the tests run)::

    python -m deploy.launch local --dir deploy/local --datasets ct-tissue,histology-stain,brain-tissue
    flwr run . meduniverse-local --stream
    python -m deploy.launch stop --dir deploy/local

TLS and node authentication are on unless ``--insecure`` is given; that flag prints a warning.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import ssl
import subprocess
import sys
import time
import tomllib
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import tomli_w

from deploy.make_certs import make_certs

BIN = Path(sys.executable).parent
INSECURE_WARNING = ("WARNING: --insecure: traffic is unencrypted and any node can join; "
                    "use it only on a trusted network, never with patient data")
LOCAL_CONNECTION = "meduniverse-local"


class LaunchError(RuntimeError):
    """A launch that cannot go on; the message is one line naming what and where."""


def flower_env(flwr_home: Path | None = None) -> dict:
    """The environment for Flower processes: this venv's bin first (the SuperLink starts
    ``flower-superexec`` from PATH), no telemetry, no runtime dependency install."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
    if flwr_home is not None:
        env["FLWR_HOME"] = str(flwr_home)
    return env


def require_tls(certs_given: bool, insecure: bool, who: str) -> None:
    if certs_given and insecure:
        raise LaunchError(f"{who}: give certificates or --insecure, not both")
    if not certs_given and not insecure:
        raise LaunchError(f"{who}: no certificates given; refusing to run without TLS "
                          f"(make them with deploy/make_certs.py, or pass --insecure to accept the risk)")
    if insecure:
        print(INSECURE_WARNING, file=sys.stderr)


def _existing(path: Path, what: str) -> Path:
    if not path.is_file():
        raise LaunchError(f"{what}: {path} does not exist")
    return path


def superlink_command(host: str, port: int, state: Path, certs: Path | None, insecure: bool) -> list[str]:
    """``flower-superlink`` with TLS (``certs`` holds ca.crt, server.pem, server.key from make_certs),
    SuperNode authentication and a state database that survives restarts."""
    require_tls(certs is not None, insecure, "superlink")
    command = [str(BIN / "flower-superlink"), "--host", host, "--port", str(port),
               "--database", str(state / "state.db"), "--log-file", str(state / "superlink.log"),
               "--disable-runtime-dependency-installation"]
    if insecure:
        return command + ["--insecure"]
    return command + ["--ssl-ca-certfile", str(_existing(certs / "ca.crt", "superlink --certs")),
                      "--ssl-certfile", str(_existing(certs / "server.pem", "superlink --certs")),
                      "--ssl-keyfile", str(_existing(certs / "server.key", "superlink --certs")),
                      "--enable-supernode-auth"]


def supernode_command(superlink: str, dataset: str, data_root: str, port: int,
                      ca: Path | None, key: Path | None, insecure: bool) -> list[str]:
    """``flower-supernode`` for one site: it trusts only ``ca``, signs in with its private ``key``
    and reads only its own ``dataset`` under ``data_root``."""
    require_tls(ca is not None, insecure, "supernode")
    node_config = f"dataset={json.dumps(dataset)} data-root={json.dumps(data_root)}"
    command = [str(BIN / "flower-supernode"), "--superlink", superlink, "--host", "127.0.0.1",
               "--port", str(port), "--node-config", node_config]
    if insecure:
        return command + ["--insecure"]
    if key is None:
        raise LaunchError("supernode: --key is required with TLS (the SuperLink authenticates every node)")
    return command + ["--root-certificates", str(_existing(ca, "supernode --ca")),
                      "--auth-supernode-private-key", str(_existing(key, "supernode --key"))]


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
        entry["root-certificates"] = str(_existing(ca, "connect --ca").resolve())
    config.setdefault("superlink", {})[name] = entry
    config["superlink"].setdefault("default", name)
    flwr_home.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".toml.partial")  # write then rename: a crash never truncates the user's file
    partial.write_text(tomli_w.dumps(config))
    partial.replace(path)
    return path


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
        return int(flwr(env, "supernode", "register", str(_existing(public_key, "register")), connection)["node-id"])
    except LaunchError as err:
        if "already in use" in str(err):
            return None
        raise


def supernodes(env: dict, connection: str) -> list[dict]:
    """The SuperLink's SuperNodes with their status (``registered``, ``online``, ...)."""
    return flwr(env, "supernode", "list", connection)["nodes"]


def start(command: list[str], log_file: Path, env: dict, cwd: Path) -> subprocess.Popen:
    """Start a long-running Flower process in its own process group (stopped as a group, by PID)."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "ab") as log:
        return subprocess.Popen(command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)


def _stat(pid: int) -> list[str]:
    """/proc/<pid>/stat after the command name: state, parent PID, ..."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


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


def wait_for_superlink(address: str, ca: Path | None, proc: subprocess.Popen, log_file: Path,
                       timeout: float = 60) -> None:
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


@dataclass
class LocalDeployment:
    """SuperLink + one SuperNode per dataset, all on 127.0.0.1, with certificates made in ``dir``.

    ``start()`` brings it up and writes ``dir/pids.json``; ``stop()`` ends every process it
    started, by PID. ``env`` runs ``flwr`` against it (connection ``LOCAL_CONNECTION``)."""

    dir: Path
    datasets: list[str]
    data_root: str
    flwr_home: Path
    insecure: bool = False
    port: int = 9092
    node_ports: list[int] = field(default_factory=list)
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def env(self) -> dict:
        return flower_env(self.flwr_home)

    @property
    def certs(self) -> Path | None:
        return None if self.insecure else self.dir / "secrets"

    def log(self, name: str) -> Path:
        return self.dir / "logs" / f"{name}.log"

    def start(self) -> LocalDeployment:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        state = self.dir / "state"
        state.mkdir(parents=True, exist_ok=True)
        if self.certs is not None and not (self.certs / "ca.crt").is_file():
            make_certs(self.certs, ["localhost", "127.0.0.1"], len(self.datasets))
        ca = None if self.certs is None else self.certs / "ca.crt"
        link = start(superlink_command("127.0.0.1", self.port, state, self.certs, self.insecure),
                     self.log("superlink"), self.env, cwd=self.dir)
        self._track("superlink", link)
        wait_for_superlink(self.address, ca, link, state / "superlink.log")
        write_connection(self.flwr_home, LOCAL_CONNECTION, self.address, ca)
        ports = self.node_ports or [self.port + 10 + i for i in range(len(self.datasets))]
        # the nodes share this machine's cores: oversubscribed torch threads slow every node down
        node_env = {**self.env, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // max(1, len(self.datasets))))}
        for index, (dataset, port) in enumerate(zip(self.datasets, ports)):
            key = None if self.certs is None else self.certs / f"node-{index}"
            if key is not None:
                register(self.env, LOCAL_CONNECTION, key.with_name(f"node-{index}.pub"))
            command = supernode_command(self.address, dataset, self.data_root, port, ca, key, self.insecure)
            self._track(f"node-{index}", start(command, self.log(f"node-{index}"), node_env, cwd=self.dir))
        self.wait_online(len(self.datasets))

    def wait_online(self, n: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while sum(node["status"] == "online" for node in supernodes(self.env, LOCAL_CONNECTION)) < n:
            if time.monotonic() > deadline:
                raise LaunchError(f"fewer than {n} SuperNodes came online in {timeout:.0f}s; see {self.dir / 'logs'}")
            time.sleep(0.5)

    def _track(self, name: str, proc: subprocess.Popen) -> None:
        self.processes[name] = proc
        (self.dir / "pids.json").write_text(json.dumps({n: p.pid for n, p in self.processes.items()}))

    def stop(self) -> None:
        for proc in reversed(self.processes.values()):
            stop(proc.pid)
            proc.wait()
        (self.dir / "pids.json").unlink(missing_ok=True)


def _is_flower(pid: int) -> bool:
    try:
        return b"flower-" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: trust the PID file
        return True


def stop_from_pid_file(directory: Path) -> list[str]:
    """``launch stop``: end what ``launch local`` started in ``directory``."""
    pid_file = directory / "pids.json"
    if not pid_file.is_file():
        raise LaunchError(f"stop: {pid_file} does not exist; nothing started there")
    try:
        pids = json.loads(pid_file.read_text())
    except json.JSONDecodeError as err:
        raise LaunchError(f"stop: {pid_file} is not valid JSON ({err})") from None
    for pid in reversed(pids.values()):
        if _is_flower(int(pid)):  # a PID reused since by something else is left alone
            stop(int(pid))
    pid_file.unlink()
    return list(pids)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m deploy.launch", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    link = commands.add_parser("superlink", help="run the SuperLink (foreground)")
    link.add_argument("--certs", type=Path, help="folder with ca.crt, server.pem, server.key (make_certs.py)")
    link.add_argument("--host", default="0.0.0.0", help="address to listen on")
    link.add_argument("--port", type=int, default=9092, help="the one port SuperNodes and flwr connect to")
    link.add_argument("--state", type=Path, default=Path("state"), help="state database and log folder")
    link.add_argument("--insecure", action="store_true", help="no TLS, no node authentication (testing only)")

    node = commands.add_parser("supernode", help="run one site's SuperNode (foreground)")
    node.add_argument("--superlink", required=True, help="host:port of the SuperLink")
    node.add_argument("--ca", type=Path, help="the deployment's ca.crt")
    node.add_argument("--key", type=Path, help="this site's private authentication key (node-<i>)")
    node.add_argument("--dataset", required=True, help="this site's dataset entry, e.g. medmnist:pneumoniamnist")
    node.add_argument("--data-root", default="", help="where this site's data lies (default: the app's)")
    node.add_argument("--port", type=int, default=9094, help="local port for this node's ClientApps")
    node.add_argument("--insecure", action="store_true", help="no TLS, no node authentication (testing only)")

    connect = commands.add_parser("connect", help="add the flwr connection NAME for `flwr run . NAME`")
    connect.add_argument("name")
    connect.add_argument("--superlink", required=True, help="host:port of the SuperLink")
    connect.add_argument("--ca", type=Path, help="the deployment's ca.crt")
    connect.add_argument("--insecure", action="store_true")

    reg = commands.add_parser("register", help="register sites' public keys with the SuperLink")
    reg.add_argument("connection")
    reg.add_argument("public_keys", nargs="+", type=Path)

    local = commands.add_parser("local", help="SuperLink + one SuperNode per dataset on 127.0.0.1 (background)")
    local.add_argument("--dir", type=Path, default=Path("deploy/local"))
    local.add_argument("--datasets", default="ct-tissue,histology-stain,brain-tissue")
    local.add_argument("--data-root", default="")
    local.add_argument("--port", type=int, default=9092)
    local.add_argument("--insecure", action="store_true")

    halt = commands.add_parser("stop", help="stop what `local` started")
    halt.add_argument("--dir", type=Path, default=Path("deploy/local"))
    return parser


def _flwr_home() -> Path:
    return Path(os.environ.get("FLWR_HOME", Path.home() / ".flwr"))


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    try:
        if args.command == "superlink":
            args.state.mkdir(parents=True, exist_ok=True)
            command = superlink_command(args.host, args.port, args.state, args.certs, args.insecure)
            os.execve(command[0], command, flower_env())
        elif args.command == "supernode":
            command = supernode_command(args.superlink, args.dataset, args.data_root, args.port, args.ca,
                                        args.key, args.insecure)
            os.execve(command[0], command, flower_env())
        elif args.command == "connect":
            require_tls(args.ca is not None, args.insecure, "connect")
            path = write_connection(_flwr_home(), args.name, args.superlink, args.ca)
            print(f"connection '{args.name}' -> {args.superlink} written to {path}; run: flwr run . {args.name}")
        elif args.command == "register":
            for key in args.public_keys:
                node_id = register(flower_env(), args.connection, key)
                print(f"{key}: " + ("registered before" if node_id is None else f"node id {node_id}"))
        elif args.command == "local":
            datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
            if not datasets:
                raise LaunchError("local: --datasets names no dataset")
            args.dir.mkdir(parents=True, exist_ok=True)
            if (args.dir / "pids.json").is_file():
                raise LaunchError(f"local: {args.dir / 'pids.json'} exists; run `stop --dir {args.dir}` first")
            deployment = LocalDeployment(args.dir.resolve(), datasets, args.data_root, _flwr_home(),
                                         args.insecure, args.port).start()
            print(f"SuperLink on {deployment.address}, {len(datasets)} SuperNodes ({', '.join(datasets)}); "
                  f"logs in {args.dir / 'logs'}\nrun:  flwr run . {LOCAL_CONNECTION} --stream\n"
                  f"stop: python -m deploy.launch stop --dir {shlex.quote(str(args.dir))}")
        elif args.command == "stop":
            print(f"stopped {', '.join(stop_from_pid_file(args.dir))}")
    except LaunchError as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()
