"""A real deployment on 127.0.0.1, started by the launcher users run (deploy/launch.py):
one SuperLink with TLS, SuperNode authentication and a state database, three SuperNodes on
different tasks, each reading only its own (tiny, made-here) MedMNIST-layout file, and
``flwr run . meduniverse-local`` on top. Every process is stopped by PID, also on failure.

The nodes share this machine's cores with whatever else runs on it, so a test waits for events
(a file written, a log line, a process ended) under generous limits, and a node that must not
answer is held by a gate the test controls (``Gate``), never raced: only the test of the stage
timeout waits for a timeout, set from what this machine was measured to take."""

import contextlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import pytest
from conftest import ROOT, with_every_stage, write_medmnist

from deploy.command_line import INSECURE_WARNING
from deploy.flwr_cli import BIN, flower_env, flwr, register, supernodes
from deploy.launch import LOCAL_CONNECTION, LocalDeployment, supernode_command
from deploy.make_certs import make_certs
from deploy.processes import command_line, descendants, running, stop
from simulation.flower import finish_flwr_run, free_port, run_status, start_flwr_run

pytestmark = pytest.mark.deployment

FLAGS = ["pneumoniamnist", "bloodmnist", "organamnist"]  # 2, 8 and 11 classes; gray and RGB
# every run below appends its own clients-per-stage
RUN = with_every_stage("local-epochs=1 probe-epochs=2 pretrain='none' batch-size=32", "clients-per-stage")


GATE_ENV = "TEST_CLIENTAPP_GATE"
# First on a gated SuperNode's PATH, so its SuperExec starts this for each message the node gets. While
# the gate's hold file exists a launch waits until the test lets it through (go-<pid>) or opens the gate;
# then it becomes the real flwr-clientapp (same PID, same arguments). Without a hold file it is only exec.
GATE_SCRIPT = """#!/bin/sh
gate="$TEST_CLIENTAPP_GATE"
if [ -e "$gate/hold" ]; then
    : > "$gate/held-$$"
    while [ -e "$gate/hold" ] && [ ! -e "$gate/go-$$" ]; do sleep 0.1; done
fi
exec "REAL" "$@"
"""
RECEIVING = re.compile(r"Receiving: (\w+) message")


class Gate:
    """One SuperNode's ClientApp launches, held while the test says so. A SuperNode takes its next
    message only once the last one is answered, and a launch shows up after the node logged
    ``Receiving: <type> message`` for it, so a held launch is for the type last logged then
    (``kinds``). A claim Flower sees unused for 30 s is launched again: held again, same type."""

    def __init__(self, directory: Path, log: Path) -> None:
        self.dir, self.log = directory, log
        self.dir.mkdir(parents=True, exist_ok=True)
        self.kinds: dict[int, str] = {}  # held launch (PID) -> the type of message it is for
        self.through: set[int] = set()

    def hold(self) -> None:
        for old in [*self.dir.glob("held-*"), *self.dir.glob("go-*")]:
            old.unlink()
        self.kinds, self.through = {}, set()
        (self.dir / "hold").touch()

    def held(self) -> dict[int, str]:
        """Every launch held since ``hold()``, each with the type of its message."""
        for path in self.dir.glob("held-*"):
            pid = int(path.name.removeprefix("held-"))
            if pid not in self.kinds:
                received = RECEIVING.findall(self.log.read_text())
                self.kinds[pid] = received[-1] if received else "?"
        return self.kinds

    def let_through(self, types: Iterable[str]) -> None:
        """Let the held launches for these types of message go on (to flwr-clientapp)."""
        for pid, kind in self.held().items():
            if kind in types and pid not in self.through:
                (self.dir / f"go-{pid}").touch()
                self.through.add(pid)

    def holds(self, kind: str) -> bool:
        """Whether a launch for a ``kind`` message waits here now."""
        return any(k == kind and pid not in self.through and running(pid) for pid, k in self.held().items())

    def open(self) -> None:
        """Launch as usual from now on: the newest held launch goes on (an older one holds a claim Flower
        has dropped: it is ended, by its PID)."""
        waiting = sorted((pid for pid in self.held() if pid not in self.through and running(pid)),
                         key=lambda pid: (self.dir / f"held-{pid}").stat().st_mtime_ns)
        for pid in waiting[:-1]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        (self.dir / "hold").unlink(missing_ok=True)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    root = tmp_path_factory.mktemp("deployment")
    datasets = []
    for index, flag in enumerate(FLAGS):
        site = root / f"site-{index}"
        site.mkdir()
        datasets.append(f"medmnist:{write_medmnist(site, flag, n=(64, 24, 24), seed=index)}")
    gate_bin = root / "gate-bin"
    gate_bin.mkdir()
    (gate_bin / "flwr-clientapp").write_text(GATE_SCRIPT.replace("REAL", str(BIN / "flwr-clientapp")))
    (gate_bin / "flwr-clientapp").chmod(0o755)
    path = f"{gate_bin}{os.pathsep}{flower_env()['PATH']}"
    link = LocalDeployment(root / "link", datasets, data_root=str(root / "cache"), flwr_home=root / "flwr-home",
                           port=free_port(), node_ports=[free_port() for _ in datasets],
                           node_env=[{"PATH": path, GATE_ENV: str(root / f"gate-{i}")} for i in range(len(datasets))])
    link.start()
    try:
        yield link
    finally:
        started = [pid for proc in link.processes.values() for pid in (proc.pid, *descendants(proc.pid))]
        link.stop()
        survivors = [pid for pid in started if running(pid)]
        assert not survivors, f"processes left running: {survivors}"


@pytest.fixture(scope="module")
def gates(deployment):
    """One ``Gate`` per SuperNode of ``deployment``, all open until a test holds one."""
    return [Gate(deployment.dir.parent / f"gate-{i}", deployment.log(f"node-{i}")) for i in range(len(FLAGS))]


def wait_until(condition, what: str, run: tuple[subprocess.Popen, Path] | None = None, timeout: float = 900) -> None:
    """Poll ``condition``; fail once ``timeout`` passes or, with its output, once the ``run``
    (a ``flwr run`` process and its log) has ended without it."""
    deadline = time.monotonic() + timeout
    while not condition():
        if run is not None and run[0].poll() is not None and not condition():
            pytest.fail(f"the run ended before {what}:\n{run[1].read_text()[-3000:]}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def runs(pid: int, program: str) -> bool:
    """Whether ``pid`` runs ``program`` (a Flower entry point shows as ``python .../<program> ...``)."""
    return program in " ".join(command_line(pid) or [])


def freeze_below(pids: list[int]) -> list[int]:
    """SIGSTOP every process below ``pids`` (a SuperNode's SuperExec and ClientApps), again until
    none is new: a SuperExec may start a ClientApp while its tree is being stopped."""
    frozen: list[int] = []
    while new := [child for pid in pids for child in descendants(pid) if child not in frozen]:
        for child in new:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGSTOP)
        frozen += new
    return frozen


def run_directory(output_dir: Path) -> Path | None:
    """The run directory in an output-dir that one run writes to (its ``latest`` link appears
    only once the run has completed)."""
    found = [path for path in output_dir.glob("*") if path.is_dir() and not path.is_symlink()]
    return found[0] if len(found) == 1 else None


def stages_in(output_dir: Path) -> list[int]:
    run_dir = run_directory(output_dir)
    if run_dir is None:
        return []  # not started yet
    try:
        return [s["stage"] for s in json.loads((run_dir / "results.json").read_text())["stages"]]
    except (OSError, ValueError):
        return []  # not written yet


def run(link: LocalDeployment, name: str, config: str, timeout: float = 1800) -> tuple[str, dict, str]:
    """A whole run on the deployment: (status, results, output)."""
    log_file = link.dir / f"{name}.log"
    run_id, output = finish_flwr_run(start_flwr_run(link.env, config, log_file, connection=LOCAL_CONNECTION),
                                     log_file, timeout)
    results_file = link.dir / "runs" / name / "latest" / "results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    return run_status(link.env, run_id), results, output


def try_node(command: list[str], env: dict, log_file: Path) -> tuple[int | None, str]:
    """Start a SuperNode that should be refused; (exit code, its output). Its whole process group
    is stopped either way (a SuperNode's SuperExec child outlives it otherwise)."""
    with open(log_file, "w") as log:
        proc = subprocess.Popen(command + ["--max-retries", "1"], env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        proc.wait(300)  # it exits once refused; the limit is only for a node that is not
    except subprocess.TimeoutExpired:
        pass
    finally:
        stop(proc.pid)
    return proc.wait(), log_file.read_text()


def comparable(value):
    """``value`` without what two runs with the same settings need not share: wall times
    (``seconds``, at any depth) and the order in which nodes replied (``nodes``)."""
    if isinstance(value, dict):
        return {key: sorted(comparable(item), key=lambda node: json.dumps(node, sort_keys=True)) if key == "nodes"
                else comparable(item) for key, item in value.items() if key != "seconds"}
    if isinstance(value, list):
        return [comparable(item) for item in value]
    return value


@pytest.fixture(scope="module")
def straight(deployment):
    """An uninterrupted 1-stage run: the integration check, and the reference for resume."""
    nodes = supernodes(deployment.env, LOCAL_CONNECTION)
    assert sorted(n["status"] for n in nodes) == ["online"] * 3
    status, results, output = run(deployment, "straight",
                                  f"{RUN} clients-per-stage=3 num-stages=1 output-dir='runs/straight'")
    assert status == "finished:completed", output[-3000:]
    return results


def test_stages_over_tls_with_authenticated_nodes(deployment, straight):
    link_args = deployment.processes["superlink"].args
    assert "--ssl-certfile" in link_args and "--enable-supernode-auth" in link_args and "--insecure" not in link_args
    assert [s["stage"] for s in straight["stages"]] == [0, 1]
    assert sorted(straight["stages"][1]["participants"]) == sorted(FLAGS)
    assert all(sorted(s["per_task"]) == sorted(FLAGS) for s in straight["stages"])
    assert straight["stages"][1]["bytes_up"] > 0 and len(straight["summary"]["accuracy_gain"]) == 2
    assert (deployment.dir / "runs" / "straight" / "latest" / "checkpoints" / "stage-1.safetensors").is_file()
    # each site was given only its own file
    for index, flag in enumerate(FLAGS):
        named = [f for f in FLAGS if f"{f}.npz" in " ".join(deployment.processes[f"node-{index}"].args)]
        assert named == [flag]


def test_a_node_without_the_ca_certificate_cannot_connect(deployment, tmp_path):
    make_certs(tmp_path, ["localhost"], nodes=1)  # a registered key, but no CA given to the node
    register(deployment.env, LOCAL_CONNECTION, tmp_path / "node-0.pub")
    command = supernode_command(deployment.address, "medmnist:pneumoniamnist", "", free_port(),
                                tmp_path / "ca.crt", tmp_path / "node-0", insecure=False)
    without_ca = command[:command.index("--root-certificates")] + command[command.index("--root-certificates") + 2:]
    code, output = try_node(without_ca, deployment.env, tmp_path / "node.log")
    assert code != 0 and "CERTIFICATE_VERIFY_FAILED" in output
    assert deployment.online() == 3


def test_an_unregistered_node_key_is_refused(deployment, tmp_path):
    make_certs(tmp_path, ["localhost"], nodes=1)  # a key the SuperLink never saw
    command = supernode_command(deployment.address, "medmnist:pneumoniamnist", "", free_port(),
                                deployment.certs / "ca.crt", tmp_path / "node-0", insecure=False)
    code, output = try_node(command, deployment.env, tmp_path / "node.log")
    assert code != 0 and "Failed to activate SuperNode" in output
    assert deployment.online() == 3


@pytest.mark.parametrize("role", ["superlink", "supernode"])
def test_insecure_mode_needs_the_explicit_flag(role, tmp_path):
    args = {"superlink": ["--state", str(tmp_path)],
            "supernode": ["--superlink", "127.0.0.1:1", "--dataset", "ct-tissue"]}[role]
    refused = subprocess.run([sys.executable, "-m", "deploy.launch", role, *args], cwd=ROOT, capture_output=True,
                             text=True, timeout=60)
    assert refused.returncode == 1
    assert refused.stderr.strip() == (f"error: {role}: no certificates given; refusing to run without TLS "
                                      "(make them with deploy/make_certs.py, or pass --insecure to accept the risk)")
    # with the flag it warns and starts (the launcher becomes the Flower program; a SuperLink on loopback)
    err_file = tmp_path / "launch.err"
    with open(err_file, "w") as err:
        started = subprocess.Popen([sys.executable, "-m", "deploy.launch", role, *args, "--insecure",
                                    "--port", str(free_port())], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err,
                                   start_new_session=True)
    try:
        wait_until(lambda: runs(started.pid, f"flower-{role}") or started.poll() is not None,
                   f"flower-{role} to start", timeout=300)
        assert started.poll() is None, err_file.read_text()
    finally:
        stop(started.pid)
        started.wait(60)
    assert INSECURE_WARNING in err_file.read_text()


def test_a_stage_without_replies_ends_by_its_timeout(deployment, gates, straight):
    """A run resumed from a copy of ``straight`` (stages 0 and 1 done) asks for stage 2, and every
    node's ClientApp for its train message is held at the gate: stage 2 ends at its timeout with
    no reply, the run fails with the reason, and what the earlier stages wrote stays as it was.

    The SuperNodes run on (only the ClientApp launch waits), so their heartbeat keeps them online
    and the stage cannot end by Flower reporting them gone; the held claim is never started, so
    Flower makes no error reply for it either. What must come before stage 2 is only the task
    cards (a resumed run skips stage 0), and the one stage-timeout also bounds that query: one
    ClientApp round per node, lighter than the stage-0 round ``straight`` timed on this machine,
    so the timeout is twice that time (60 s at least) instead of a fixed margin. Once the run has
    failed the gates open: the late replies reach a finished run and are dropped."""
    timeout = float(max(60, math.ceil(2 * straight["stages"][0]["seconds"])))
    source = run_directory(deployment.dir / "runs" / "straight")
    output_dir = deployment.dir / "runs" / "hung"
    copy = output_dir / source.name
    shutil.copytree(source, copy, symlinks=True)
    written = {path.relative_to(copy): path.read_bytes() for path in copy.rglob("*") if path.is_file()}
    log_file = deployment.dir / "hung.log"
    ignored = [gate.log.read_text().count("Ignoring reply message") for gate in gates]
    for gate in gates:
        gate.hold()
    proc = start_flwr_run(deployment.env, f"{RUN} clients-per-stage=3 num-stages=2 stage-timeout={timeout} "
                          f"output-dir='runs/hung' resume-from='{copy}'", log_file, connection=LOCAL_CONNECTION)
    try:
        def served() -> bool:
            for gate in gates:
                gate.let_through({"query"})  # the task cards; a train message's ClientApp stays held
            return proc.poll() is not None
        wait_until(served, "the run to end", timeout=900 + timeout)
        run_id, output = finish_flwr_run(proc, log_file, 60)
        held = {FLAGS[i] for i, gate in enumerate(gates) if "train" in gate.held().values()}
        assert deployment.online() == 3  # every SuperNode ran on
    finally:
        for gate in gates:
            gate.open()
    assert run_status(deployment.env, run_id).startswith("finished:failed")
    timed_out = re.search(rf"stage 2: timed out after {timeout:.0f}s; no reply from nodes (.*)", output)
    assert timed_out, output[-3000:]
    assert set(re.findall(r"\((\w+)\)", timed_out.group(1))) == held and held  # silent: the nodes held
    assert "stage 2: 0 valid replies, fewer than min-replies=1" in output
    assert f"results up to stage 1 are kept in {copy}" in output
    # the held ClientApps now answer a run that has ended: the SuperLink drops their replies
    late = [(gate, before) for flag, gate, before in zip(FLAGS, gates, ignored) if flag in held]
    wait_until(lambda: all(gate.log.read_text().count("Ignoring reply message") > before for gate, before in late),
               "the late replies to be dropped", timeout=900)
    assert {path.relative_to(copy): path.read_bytes() for path in copy.rglob("*") if path.is_file()} == written


def test_a_killed_server_app_resumes_to_the_same_results(deployment, straight):
    config = f"{RUN} clients-per-stage=3 num-stages=1"
    log_file = deployment.dir / "killed.log"
    output_dir = deployment.dir / "runs" / "killed"
    proc = start_flwr_run(deployment.env, f"{config} output-dir='runs/killed'", log_file,
                          connection=LOCAL_CONNECTION)
    wait_until(lambda: stages_in(output_dir) == [0], "stage 0", run=(proc, log_file))
    server_apps = [pid for pid in descendants(deployment.processes["superlink"].pid)
                   if runs(pid, "flwr-serverapp")]
    assert len(server_apps) == 1
    os.kill(server_apps[0], signal.SIGKILL)
    # what an operator does next: stop the dead run (the SuperLink would notice by itself, later)
    run_id = re.search(r"Successfully started run (\d+)", log_file.read_text()).group(1)
    flwr(deployment.env, "stop", run_id, LOCAL_CONNECTION)
    proc.wait(600)
    assert run_status(deployment.env, run_id).startswith("finished:stopped")
    assert stages_in(output_dir) == [0]

    resumed_dir = run_directory(output_dir)
    status, _, output = run(deployment, "resumed", f"{config} output-dir='runs/killed' resume-from='{resumed_dir}'")
    assert status == "finished:completed", output[-3000:]
    resumed = json.loads((resumed_dir / "results.json").read_text())
    assert [s["stage"] for s in resumed["stages"]] == [0, 1]  # none lost, none twice
    assert comparable(resumed["stages"]) == comparable(straight["stages"])
    assert resumed["summary"] == straight["summary"]


def test_a_killed_node_does_not_stop_the_stage(deployment, gates):
    """K=2 of 3 asked: node 2 dies (the SuperNode and every process below it) after it got its
    train message, with its ClientApp for it held at the gate, so no reply of its can exist; the
    live nodes' ClientApps for their train messages are held until then, so the stage cannot end
    before the death either. The stage ends on the two live replies; the evaluation ends when the
    SuperLink reports the dead node unavailable (no heartbeat for up to a minute), long before the
    stage timeout, which is generous since it also bounds the live nodes' replies.
    Last in this module: Flower refuses a restarted SuperNode until it has marked the dead one
    offline."""
    victim = deployment.processes["node-2"]
    log_file = deployment.dir / "killed-node.log"
    for gate in gates:
        gate.hold()
    proc = start_flwr_run(deployment.env, f"{RUN} clients-per-stage=2 oversample=1.5 num-stages=1 "
                          f"stage-timeout=300.0 output-dir='runs/killed-node'", log_file,
                          connection=LOCAL_CONNECTION)
    try:
        def served() -> bool:
            for gate in gates:
                gate.let_through({"query", "evaluate"})  # task cards and stage 0; train messages wait
            return gates[2].holds("train")
        wait_until(served, "node 2's train message", run=(proc, log_file))
        os.kill(victim.pid, signal.SIGSTOP)  # frozen first, so that nothing below it is orphaned
        for pid in [*freeze_below([victim.pid]), victim.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        victim.wait()
        for gate in gates[:2]:
            gate.open()
        run_id, output = finish_flwr_run(proc, log_file, 1800)
        assert run_status(deployment.env, run_id) == "finished:completed", output[-3000:]
        results = json.loads((deployment.dir / "runs" / "killed-node" / "latest" / "results.json").read_text())
        stage = results["stages"][1]
        assert sorted(stage["participants"]) == sorted(FLAGS[:2])  # the stage ended on the two live nodes
        scored = [task for task, metrics in stage["per_task"].items() if metrics.get("accuracy") is not None]
        assert sorted(scored) == sorted(FLAGS[:2])
        dead = re.search(rf"node (\d+): {FLAGS[2]} \(", output).group(1)
        assert any("evaluation" in line and dead in line for line in output.splitlines())  # its score is missing
    finally:
        for gate in gates:
            gate.open()
        if proc.poll() is None:
            proc.kill()
