"""Every kind of variation has one registry, config validation reads it, and every entry runs."""

import csv
import json
import re

import numpy as np
import pytest
from conftest import default_run_config, write_medmnist
from flwr.app import Context, RecordDict
from simulation.inprocess import InProcessGrid
from test_real_data import write_dicom, write_png

from meduniverse_flwr import aggregation, registry, server_app, transport
from meduniverse_flwr.client_app import app as client_app
from meduniverse_flwr.config import ConfigError, RunConfig

REGISTRIES = {
    "strategy": registry.STRATEGIES,
    "aggregation": aggregation.RULES,
    "eval-mode": registry.EVAL_PROTOCOLS,
    "data": registry.SOURCES,
    "partition": registry.PARTITIONS,
    "model": registry.MODELS,
    "transport-dtype": transport.TRANSPORT_DTYPES,
    "device": registry.DEVICES,
    "eval-split": registry.EVAL_SPLITS,
    "tracker": registry.TRACKERS,
    "on-excess-update": registry.ON_EXCESS,
}


@pytest.mark.parametrize("key", REGISTRIES)
def test_validation_accepts_exactly_the_registered_names(key):
    for name in REGISTRIES[key]:
        RunConfig.from_run_config({**default_run_config(), key: name})
    with pytest.raises(ConfigError, match=re.escape(f"'{key}' = 'not-registered': must be one of "
                                                   f"{tuple(REGISTRIES[key])}")):
        RunConfig.from_run_config({**default_run_config(), key: "not-registered"})


def test_pretrain_accepts_the_registered_methods_none_or_a_file():
    for method in (*registry.PRETRAIN_METHODS, "none"):
        RunConfig.from_run_config({**default_run_config(), "pretrain": method})
    with pytest.raises(ConfigError, match=re.escape(f"must be one of {('none', *registry.PRETRAIN_METHODS)}")):
        RunConfig.from_run_config({**default_run_config(), "pretrain": "byol"})


@pytest.fixture(scope="module")
def sites(tmp_path_factory):
    """Two tiny datasets of every source (the embedded ones are the real, cached universe)."""
    root = tmp_path_factory.mktemp("sites")
    entries = {"embedded": ["embedded:ct-tissue", "embedded:histology-stain"]}
    entries["medmnist"] = [f"medmnist:{write_medmnist(root, flag, n=(24, 8, 8))}" for flag in ("pneumoniamnist", "bloodmnist")]
    (root / "npz").mkdir()
    entries["npz"] = [f"npz:{write_medmnist(root / 'npz', flag, n=(24, 8, 8)).rename(root / 'npz' / name)}"
                      for flag, name in (("pneumoniamnist", "site-x.npz"), ("bloodmnist", "site-y.npz"))]
    for index, site in enumerate(("site-a", "site-b")):
        for split in ("train", "val", "test"):
            for cls, value in (("benign", 40 + index), ("malignant", 200 - index)):
                for i in range(4):
                    write_png(root / site / split / cls / f"{i}.png", value + i)
    entries["folder"] = [f"folder:{root / site}" for site in ("site-a", "site-b")]
    for site in ("ct-a", "ct-b"):
        rows = [["split", "path", "label"]]
        for split in ("train", "val", "test"):
            for label, stored in ((0, 24), (1, 1064)):
                for i in range(3):
                    write_dicom(root / site / f"{split}{label}{i}.dcm", np.full((16, 16), stored + i))
                    rows.append([split, f"{split}{label}{i}.dcm", str(label)])
        with open(root / site / "labels.csv", "w", newline="") as handle:
            csv.writer(handle).writerows(rows)
    entries["dicom"] = [f"dicom:{root / site}" for site in ("ct-a", "ct-b")]
    return entries


def tiny_run(run_config, sites, tmp_path, num_nodes=2, **overrides):
    config = run_config(**{"datasets": ",".join(sites["medmnist"]), "pretrain": "none", "probe_epochs": 1,
                           "batch_size": 16, "clients_per_stage": num_nodes, "output_dir": str(tmp_path / "out"),
                           **overrides})
    grid = InProcessGrid(client_app, config, num_nodes)
    server_app.main(grid, Context(run_id=3, node_id=0, node_config={}, state=RecordDict(), run_config=config))
    results = json.loads((tmp_path / "out" / "latest" / "results.json").read_text())
    final = results["stages"][-1]
    assert len(final["participants"]) == num_nodes and not final["rejected"], final
    assert all(m["accuracy"] is not None for m in final["per_task"].values())
    return results


@pytest.mark.parametrize("name", registry.STRATEGIES)
def test_every_strategy_runs(name, run_config, sites, tmp_path):
    tiny_run(run_config, sites, tmp_path, strategy=name)


@pytest.mark.parametrize("name", aggregation.RULES)
def test_every_aggregation_rule_runs(name, run_config, sites, tmp_path):
    tiny_run(run_config, sites, tmp_path, aggregation=name)


@pytest.mark.parametrize("name", registry.EVAL_PROTOCOLS)
def test_every_evaluation_protocol_runs(name, run_config, sites, tmp_path):
    tiny_run(run_config, sites, tmp_path, eval_mode=name)


@pytest.mark.parametrize("name", registry.SOURCES)
def test_every_data_source_runs(name, run_config, sites, tmp_path):
    results = tiny_run(run_config, sites, tmp_path, datasets=",".join(sites[name]))
    assert len(results["stages"][-1]["per_task"]) == 2


@pytest.mark.parametrize("name", registry.PARTITIONS)
def test_every_partition_runs(name, run_config, sites, tmp_path):
    results = tiny_run(run_config, sites, tmp_path, num_nodes=4, partition=name, dirichlet_alpha=100.0)
    assert len(results["stages"][-1]["participants"]) == 4


@pytest.mark.parametrize("name", transport.TRANSPORT_DTYPES)
def test_every_transport_dtype_runs(name, run_config, sites, tmp_path):
    tiny_run(run_config, sites, tmp_path, transport_dtype=name)


@pytest.mark.parametrize("name", registry.PRETRAIN_METHODS)
def test_every_pretraining_method_runs(name, run_config, sites, tmp_path):
    results = tiny_run(run_config, sites, tmp_path, pretrain=name, pretrain_epochs=1,
                       data_root=str(tmp_path / "cache"))
    assert results["config"]["pretrain"] == name
