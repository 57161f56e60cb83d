"""Launch a real deployment: one SuperLink (TLS, SuperNode authentication, persistent state),
one SuperNode per site naming its own dataset, and the ``flwr`` connection to run on them.

One command per machine (see deploy/README.md for the whole guide)::

    coordinating centre  python -m deploy.launch superlink --certs secrets --host 0.0.0.0 --port 9092 --state state
    researcher           python -m deploy.launch connect hospitals --superlink link.example.org:9092 --ca ca.crt
                         python -m deploy.launch register hospitals node-0.pub node-1.pub
    each hospital        python -m deploy.launch check --superlink link.example.org:9092 --ca ca.crt \\
                             --key node-0 --dataset medmnist:pneumoniamnist --data-root /data/medmnist
                         python -m deploy.launch supernode <the same arguments>
    then                 flwr run . hospitals --stream

All of it on this machine, on 127.0.0.1 (to try the chain, and what the tests run)::

    python -m deploy.launch local --dir deploy/local --datasets ct-tissue,histology-stain,brain-tissue
    flwr run . meduniverse-local --stream
    python -m deploy.launch stop --dir deploy/local

TLS and node authentication are on unless ``--insecure`` is given; that flag prints a warning.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from deploy.command_line import node_config_string, require_tls
from deploy.errors import LaunchError, existing
from deploy.flwr_cli import BIN, flower_env, register, supernodes, wait_for_superlink, write_connection
from deploy.make_certs import make_certs
from deploy.processes import start, stop, stop_recorded, write_pid_file
from meduniverse_flwr.registry import DEVICES

LOCAL_CONNECTION = "meduniverse-local"
# A SuperNode's SuperExec asks it for a new ClientApp task once a second by default, so every
# message waited 0.5 s on average before its ClientApp started; flower-supernode has no flag for
# it, only this variable, which its SuperExec inherits. 0.25 s costs ~1.5% of a core per idle node.
SUPEREXEC_POLL = {"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.25"}


def superlink_command(host: str, port: int, state: Path, certs: Path | None, insecure: bool) -> list[str]:
    """``flower-superlink`` with TLS (``certs`` holds ca.crt, server.pem, server.key from make_certs),
    SuperNode authentication and a state database that survives restarts."""
    require_tls(certs is not None, insecure, "superlink")
    command = [str(BIN / "flower-superlink"), "--host", host, "--port", str(port),
               "--database", str(state / "state.db"), "--log-file", str(state / "superlink.log"),
               "--disable-runtime-dependency-installation"]
    if insecure:
        return command + ["--insecure"]
    return command + ["--ssl-ca-certfile", str(existing(certs / "ca.crt", "superlink --certs")),
                      "--ssl-certfile", str(existing(certs / "server.pem", "superlink --certs")),
                      "--ssl-keyfile", str(existing(certs / "server.key", "superlink --certs")),
                      "--enable-supernode-auth"]


def supernode_env(env: dict) -> dict:
    """The environment of a SuperNode: ``env`` with a shorter task poll, unless ``env`` sets its own."""
    return {**SUPEREXEC_POLL, **env}


def supernode_command(superlink: str, dataset: str, data_root: str, port: int,
                      ca: Path | None, key: Path | None, insecure: bool,
                      site: Mapping[str, object] | None = None) -> list[str]:
    """``flower-supernode`` for one site: it trusts only ``ca``, signs in with its private ``key``
    and reads only its own ``dataset`` under ``data_root``; ``site`` holds its other node-config
    keys (``meduniverse_flwr.node.site.SITE_KEYS``: cache dir, download, device, privacy floor)."""
    require_tls(ca is not None, insecure, "supernode")
    node_config = node_config_string({"dataset": dataset, "data-root": data_root, **(site or {})})
    command = [str(BIN / "flower-supernode"), "--superlink", superlink, "--host", "127.0.0.1",
               "--port", str(port), "--node-config", node_config]
    if insecure:
        return command + ["--insecure"]
    if key is None:
        raise LaunchError("supernode: --key is required with TLS (the SuperLink authenticates every node)")
    return command + ["--root-certificates", str(existing(ca, "supernode --ca")),
                      "--auth-supernode-private-key", str(existing(key, "supernode --key"))]


@dataclass
class LocalDeployment:
    """SuperLink + one SuperNode per dataset, all on 127.0.0.1, with certificates made in ``dir``.

    ``start()`` brings it up and writes ``dir/pids.json``; ``stop()`` ends every process it
    started, by PID. ``env`` runs ``flwr`` against it (connection ``LOCAL_CONNECTION``).
    ``sites[i]``, where given, holds node i's other node-config keys (``supernode_command``);
    ``node_env[i]``, where given, adds to node i's environment (the tests put a gate on its PATH)."""

    dir: Path
    datasets: list[str]
    data_root: str
    flwr_home: Path
    insecure: bool = False
    port: int = 9092
    node_ports: list[int] = field(default_factory=list)
    sites: list[dict] = field(default_factory=list)
    node_env: list[dict] = field(default_factory=list)
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
        threads = max(1, (os.cpu_count() or 1) // max(1, len(self.datasets)))
        node_env = supernode_env({**self.env, "OMP_NUM_THREADS": str(threads)})
        for index, (dataset, port) in enumerate(zip(self.datasets, ports)):
            key = None if self.certs is None else self.certs / f"node-{index}"
            if key is not None:
                register(self.env, LOCAL_CONNECTION, key.with_name(f"node-{index}.pub"))
            site = self.sites[index] if index < len(self.sites) else None
            command = supernode_command(self.address, dataset, self.data_root, port, ca, key, self.insecure, site)
            extra = self.node_env[index] if index < len(self.node_env) else {}
            self._track(f"node-{index}", start(command, self.log(f"node-{index}"), {**node_env, **extra}, cwd=self.dir))
        self.wait_online(len(self.datasets))

    def online(self) -> int:
        """How many SuperNodes the SuperLink lists as online."""
        return sum(node["status"] == "online" for node in supernodes(self.env, LOCAL_CONNECTION))

    def wait_online(self, n: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while self.online() < n:
            if time.monotonic() > deadline:
                raise LaunchError(f"fewer than {n} SuperNodes came online in {timeout:.0f}s; see {self.dir / 'logs'}")
            time.sleep(0.5)

    def _track(self, name: str, proc: subprocess.Popen) -> None:
        self.processes[name] = proc
        write_pid_file(self.dir / "pids.json", self.processes)

    def stop(self) -> None:
        for proc in reversed(self.processes.values()):
            stop(proc.pid)
            proc.wait()
        (self.dir / "pids.json").unlink(missing_ok=True)


# the node-config keys beyond dataset / data-root (meduniverse_flwr.node.site.SITE_KEYS), one flag each
SITE_FLAGS = ("cache-dir", "download", "skip-unreadable", "device", "require-dp", "max-epsilon",
              "max-epsilon-delta")


def _site_arguments(dataset_required: bool = True) -> argparse.ArgumentParser:
    """A site's arguments, shared by `supernode` and `check`: a site checks the very command line
    it will start its node with."""
    site = argparse.ArgumentParser(add_help=False)
    site.add_argument("--superlink", required=True, help="host:port of the SuperLink")
    site.add_argument("--ca", type=Path, help="the deployment's ca.crt")
    site.add_argument("--key", type=Path, help="this site's private authentication key (node-<i>)")
    site.add_argument("--dataset", required=dataset_required,
                      help="this site's dataset entry, e.g. medmnist:pneumoniamnist")
    site.add_argument("--data-root", default="", help="where this site's data lies (default: the app's)")
    site.add_argument("--port", type=int, default=9094, help="local port for this node's ClientApps")
    site.add_argument("--insecure", action="store_true", help="no TLS, no node authentication (testing only)")
    site.add_argument("--cache-dir", help="where the node writes: decoded data, its privacy ledger "
                                          "(default: under --data-root)")
    site.add_argument("--download", action="store_true", help="let the node fetch a missing public dataset")
    site.add_argument("--skip-unreadable", action="store_true",
                      help="drop unreadable images (logged) instead of refusing the dataset")
    site.add_argument("--device", choices=DEVICES, help="what the node trains on (default: auto)")
    site.add_argument("--require-dp", choices=("example",),
                      help="release only updates trained with example-level DP-SGD")
    site.add_argument("--max-epsilon", type=float, help="the most epsilon this site spends on its data, all runs")
    site.add_argument("--max-epsilon-delta", type=float, help="the delta --max-epsilon is stated at (default 1e-5)")
    return site


def _site_settings(args: argparse.Namespace) -> dict[str, object]:
    """The site flags given: a flag not given leaves its key out, so the node keeps its default."""
    values = {key: getattr(args, key.replace("-", "_")) for key in SITE_FLAGS}
    return {key: value for key, value in values.items() if value is not None and value is not False}


def _node_config_file(args: argparse.Namespace) -> None:
    """`check --node-config FILE`: the site's settings from the TOML file its SuperNode is started
    with (``flower-supernode --node-config FILE``, deploy/containers/site.yml), not from flags."""
    if args.node_config is None:
        if args.dataset is None:
            raise LaunchError("check: give --dataset (and the site flags) or --node-config FILE")
        return
    given = [f"--{key}" for key in ("dataset", "data-root", *SITE_FLAGS)
             if getattr(args, key.replace("-", "_")) not in (None, False, "")]
    if given:
        raise LaunchError(f"check: --node-config {args.node_config} holds the site's settings; drop {given[0]}")
    from flwr.common.config import parse_config_args

    try:
        settings = parse_config_args([str(existing(args.node_config, "check --node-config"))])
    except ValueError as err:  # TOMLDecodeError
        raise LaunchError(f"{args.node_config}: not a TOML node config ({err})") from None
    unknown = sorted(set(settings) - {"dataset", "data-root", *SITE_FLAGS})
    if unknown:
        raise LaunchError(f"{args.node_config}: unknown node-config key '{unknown[0]}'")
    for key, value in settings.items():
        setattr(args, key.replace("-", "_"), value)
    args.dataset = settings.get("dataset")
    if not args.dataset:
        raise LaunchError(f"{args.node_config}: no 'dataset'")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m deploy.launch", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    link = commands.add_parser("superlink", help="run the SuperLink (foreground)")
    link.add_argument("--certs", type=Path, help="folder with ca.crt, server.pem, server.key (make_certs.py)")
    link.add_argument("--host", default="127.0.0.1",
                      help="address to listen on (default: this machine only; other sites need 0.0.0.0 "
                           "or the address of the interface they reach)")
    link.add_argument("--port", type=int, default=9092, help="the one port SuperNodes and flwr connect to")
    link.add_argument("--state", type=Path, default=Path("state"), help="state database and log folder")
    link.add_argument("--insecure", action="store_true", help="no TLS, no node authentication (testing only)")

    site = _site_arguments()
    commands.add_parser("supernode", parents=[site], help="run one site's SuperNode (foreground)")
    check = commands.add_parser("check", parents=[_site_arguments(dataset_required=False)],
                                help="check a site before it joins: the same arguments as `supernode`")
    check.add_argument("--node-config", type=Path,
                       help="the site's node-config TOML file (as its SuperNode gets it), instead of "
                            "--dataset, --data-root and the site flags")
    check.add_argument("--image-size", type=int,
                       help="the run's image-size, if it is not the app's default")

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
                                        args.key, args.insecure, _site_settings(args))
            os.execve(command[0], command, supernode_env(flower_env()))
        elif args.command == "check":
            from deploy import preflight  # torch and the data loaders: only `check` needs them

            _node_config_file(args)
            sys.exit(preflight.check(args.superlink, args.dataset, args.data_root, args.ca, args.key,
                                     args.insecure, _site_settings(args), args.image_size))
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
            stopped, skipped = stop_recorded(args.dir / "pids.json")
            for line in skipped:
                print(line, file=sys.stderr)
            print(f"stopped {', '.join(stopped) or 'nothing'}")
    except (LaunchError, FileExistsError) as err:  # FileExistsError: make_certs will not replace a CA
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()
