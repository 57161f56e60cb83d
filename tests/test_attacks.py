"""A hostile simulated site (robustness experiments, simulation/hostile_app.py): what it sends, what the
defences make of it, and that the deployed ClientApp has no such path."""

import json

import pytest
import torch
from flwr.app import Context, RecordDict
from test_registries import sites  # noqa: F401 (fixture)

from meduniverse_flwr import server_app
from meduniverse_flwr.client_app import app as client_app
from simulation.attacks import is_hostile, poisoned
from simulation.hostile_app import app as hostile_app
from simulation.inprocess import InProcessGrid


def test_a_hostile_update_is_the_honest_one_scaled_around_the_base():
    base = {"w": torch.tensor([1.0, 2.0, -1.0])}
    trained = {"w": torch.tensor([1.5, 1.0, -1.0])}
    assert poisoned(base, trained, -1.0)["w"].tolist() == [0.5, 3.0, -1.0]
    assert poisoned(base, trained, 10.0)["w"].tolist() == [6.0, -8.0, -1.0]


def test_only_simulated_nodes_below_attack_nodes_are_hostile():
    assert is_hostile({"partition-id": 0, "num-partitions": 3}, 1)
    assert not is_hostile({"partition-id": 1, "num-partitions": 3}, 1)
    assert not is_hostile({"partition-id": 0}, 0)
    assert not is_hostile({"dataset": "x"}, 5)  # a deployed SuperNode names its dataset, no partition


def run(run_config, sites, tmp_path, app=hostile_app, **overrides):  # noqa: F811
    config = run_config(**{"datasets": ",".join(sites["medmnist"]), "pretrain": "none", "probe_epochs": 1,
                           "batch_size": 16, "clients_per_stage": 2, "output_dir": str(tmp_path / "out"),
                           "attack_nodes": 1, **overrides})
    server_app.main(InProcessGrid(app, config, 2),
                    Context(run_id=3, node_id=0, node_config={}, state=RecordDict(), run_config=config))
    return json.loads((tmp_path / "out" / "latest" / "results.json").read_text())["stages"][-1]


def test_the_norm_bound_rejects_a_scaled_update(run_config, sites, tmp_path):  # noqa: F811
    final = run(run_config, sites, tmp_path, attack_factor=1e4)
    assert len(final["rejected"]) == 1 and "update norm" in final["rejected"][0]
    assert len(final["participants"]) == 1


@pytest.mark.parametrize("factor", [-1.0, 1e4])
def test_without_a_bound_the_hostile_update_is_taken_and_its_size_recorded(factor, run_config, sites,
                                                                          tmp_path):  # noqa: F811
    honest = run(run_config, sites, tmp_path / "honest", attack_nodes=0, max_update_ratio=1e9)
    hostile = run(run_config, sites, tmp_path / "hostile", attack_factor=factor, max_update_ratio=1e9,
                  aggregation="median")
    assert not hostile["rejected"] and len(hostile["participants"]) == 2
    ratios = {node["task"]: node["update_ratio"] for node in honest["nodes"]}
    hostile_ratios = {node["task"]: node["update_ratio"] for node in hostile["nodes"]}
    # partition 0 (the first dataset entry) sent |factor| times its honest update; the other node did not
    assert hostile_ratios == pytest.approx({"pneumoniamnist": ratios["pneumoniamnist"] * abs(factor),
                                            "bloodmnist": ratios["bloodmnist"]}, rel=1e-3)


def test_the_deployed_client_app_ignores_attack_nodes(run_config, sites, tmp_path):  # noqa: F811
    """pyproject's ClientApp sends the honest update whatever the run config says; the hostile app,
    on the same run config, does not (so the run config does reach the nodes)."""
    honest = run(run_config, sites, tmp_path / "honest", app=client_app, attack_nodes=0, max_update_ratio=1e9)
    asked = run(run_config, sites, tmp_path / "asked", app=client_app, attack_factor=10.0, max_update_ratio=1e9)
    hostile = run(run_config, sites, tmp_path / "hostile", attack_factor=10.0, max_update_ratio=1e9)
    ratios = [{node["task"]: node["update_ratio"] for node in stage["nodes"]} for stage in (honest, asked, hostile)]
    assert ratios[1] == ratios[0] and ratios[2] != ratios[0]
    assert asked["per_task"] == honest["per_task"]
