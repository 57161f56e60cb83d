"""A site's privacy floor on a deployment of its own (deploy/launch.py, TLS, SuperNode authentication),
beside the one tests/test_deploy.py shares between its tests: in a file of its own, so that pytest-xdist
(``--dist loadfile``) runs it on another worker than that deployment's chain of tests."""

import json
import re

import pytest
from conftest import write_medmnist
from test_deploy import RUN, run, wait_until

from deploy.flwr_cli import register
from deploy.launch import LOCAL_CONNECTION, LocalDeployment, supernode_command, supernode_env
from deploy.make_certs import make_certs
from deploy.processes import start, stop
from meduniverse_flwr.learn.privacy import epsilon_of, example_steps
from meduniverse_flwr.node.ledger import ledger_path, read_ledger
from simulation.flower import free_port

pytestmark = pytest.mark.deployment


def restart(link: LocalDeployment, name: str) -> None:
    """Stop a SuperNode (it signs off: offline at once) and start it again with the same command."""
    proc = link.processes[name]
    stop(proc.pid)
    proc.wait()
    wait_until(lambda: link.online() == len(link.datasets) - 1, f"{name} offline", timeout=120)
    link.processes[name] = start(proc.args, link.log(name), supernode_env(link.env), cwd=link.dir)
    wait_until(lambda: link.online() == len(link.datasets), f"{name} back online", timeout=120)


def test_a_site_enforces_its_privacy_floor_over_runs_and_restarts(tmp_path):
    """A deployment of its own (SuperLink, a plain site, a site with a privacy floor on a bare MedMNIST
    flag under its own data root, and a third site without a dataset): a DP-SGD run that also asks for
    downloads from another data root goes on without the site that has no data (its card refused with
    the reason) and is joined by the floor site, reading its own files; after a restart of its SuperNode
    its ledger refuses the release that would pass its budget. That a floor site refuses a run without
    DP is the same refusal, tested in process (tests/test_site.py)."""
    site_root = tmp_path / "site"
    site_root.mkdir()
    plain = write_medmnist(site_root, "pneumoniamnist", n=(48, 16, 16), seed=0)
    write_medmnist(site_root, "breastmnist", n=(48, 16, 16), seed=7)
    rate, steps = example_steps(48, 32, 1)  # RUN's batch size, one local epoch
    one, two = (epsilon_of([(1.0, rate, steps)] * n, 1e-5) for n in (1, 2))
    floor = {"cache-dir": str(tmp_path / "floor-cache"), "require-dp": "example", "max-epsilon": (one + two) / 2}
    link = LocalDeployment(tmp_path / "link", [f"medmnist:{plain}", "medmnist:breastmnist"], data_root=str(site_root),
                           flwr_home=tmp_path / "flwr-home", port=free_port(), node_ports=[free_port(), free_port()],
                           sites=[{}, floor])
    link.start()
    try:
        make_certs(tmp_path / "keys", ["localhost"], nodes=1)
        register(link.env, LOCAL_CONNECTION, tmp_path / "keys" / "node-0.pub")
        no_dataset = supernode_command(link.address, "unused", "", free_port(), link.certs / "ca.crt",
                                       tmp_path / "keys" / "node-0", False)
        no_dataset[no_dataset.index("--node-config") + 1] = f"data-root={json.dumps(str(site_root))}"
        link.processes["no-dataset"] = start(no_dataset, link.log("no-dataset"), supernode_env(link.env), link.dir)
        wait_until(lambda: link.online() == 3, "the site without a dataset online", timeout=120)

        private = f"{RUN} dp='example' dp-secure-noise=true clients-per-stage=2 num-stages=1"
        submitter = tmp_path / "submitter-data"  # what a run cannot make a site read or fetch into
        status, results, output = run(link, "floor-dp", f"{private} download=true data-root='{submitter}' "
                                                        "output-dir='runs/floor-dp'")
        assert status == "finished:completed", output[-3000:]
        assert re.search(r"node \d+: task card rejected: error reply .*node config: no 'dataset': start the "
                         r"SuperNode with --node-config", output), output[-3000:]
        stage = results["stages"][1]
        assert sorted(stage["participants"]) == ["breastmnist", "pneumoniamnist"] and not stage["rejected"]
        assert stage["per_task"]["breastmnist"]["site_epsilon"] == pytest.approx(one, rel=1e-6)
        assert "site_epsilon" not in stage["per_task"]["pneumoniamnist"]  # no floor, no ledger
        assert not list(submitter.rglob("*.npz"))
        ledger = read_ledger(ledger_path(tmp_path / "floor-cache"))
        assert ledger == {"breastmnist": [(1.0, rate, steps)]}
        stop(link.processes["no-dataset"].pid)
        link.processes.pop("no-dataset").wait()
        wait_until(lambda: link.online() == 2, "the site without a dataset offline", timeout=120)

        restart(link, "node-1")  # the ledger is the site's file, not the process's memory
        status, results, output = run(link, "floor-spent", f"{private} output-dir='runs/floor-spent'")
        assert status == "finished:completed", output[-3000:]
        stage = results["stages"][1]
        assert stage["participants"] == ["pneumoniamnist"]
        assert len(stage["rejected"]) == 1 and "past max-epsilon" in stage["rejected"][0]
        assert re.search(r"stage 1: reply from node \d+ \(breastmnist\) rejected: error reply .*site privacy "
                         r"floor: .*past max-epsilon", output), output[-3000:]
        assert stage["per_task"]["breastmnist"]["site_epsilon"] == pytest.approx(one, rel=1e-6)
        assert read_ledger(ledger_path(tmp_path / "floor-cache")) == ledger  # the refused release cost nothing
    finally:
        link.stop()
