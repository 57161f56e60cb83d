"""Every kind of variation has one registry, config validation reads it, and every entry runs."""

import csv
import json
import re

import numpy as np
import pytest
import torch
from conftest import EVERY_STAGE, default_run_config, write_medmnist
from flwr.app import Context, RecordDict
from safetensors.torch import load_file
from scipy.stats import trim_mean
from test_real_data import write_dicom, write_png

from meduniverse_flwr import registry, server_app
from meduniverse_flwr.client_app import app as client_app
from meduniverse_flwr.config import ConfigError, RunConfig
from meduniverse_flwr.learn import finetune as task
from meduniverse_flwr.learn.model import create_backbone
from meduniverse_flwr.server import aggregation
from meduniverse_flwr.wire import transport
from simulation.inprocess import InProcessGrid

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
        RunConfig.from_run_config({**default_run_config(), **EVERY_STAGE, key: name})
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


def bases(tmp_path):
    """The stage-0 and stage-1 bases of the last tiny_run, as float32 arrays."""
    run = tmp_path / "out" / "latest" / "checkpoints"
    return [{k: v.numpy() for k, v in load_file(run / f"stage-{s}.safetensors").items()} for s in (0, 1)]


@pytest.mark.parametrize("name", registry.STRATEGIES)
def test_every_strategy_runs(name, run_config, sites, tmp_path):
    final = tiny_run(run_config, sites, tmp_path, strategy=name)["stages"][-1]
    before, after = bases(tmp_path)
    # what the strategy does to the base and to the nodes, not just that it finished:
    # local never changes the server's base; centralized trains on the server (nodes send nothing up)
    assert all(np.array_equal(before[k], after[k]) for k in before) == (name == "local")
    assert (final["bytes_up"] == 0 and not final["nodes"]) == (name == "centralized")


# what each rule should make of K updates u (num_examples n) and the base: computed here, not by RULES
EXPECTED_AGGREGATE = {
    "mean": lambda u, n, base: u.mean(axis=0),
    "weighted": lambda u, n, base: np.tensordot(n / n.sum(), u, axes=1),
    "median": lambda u, n, base: np.median(u, axis=0),
    "trimmed-mean": lambda u, n, base: trim_mean(u, default_run_config()["trim-fraction"], axis=0),
    # task vectors in the updates' float32, as sent: which coordinate passes the magnitude threshold must not
    # hinge on a float64 rounding of the difference
    "ties": lambda u, n, base: base + aggregation.ties_merge(
        (u.astype(np.float32) - base.astype(np.float32)).astype(np.float64), default_run_config()["merge-density"]),
}


# a curation rule trains the next base instead of combining the updates: tests/test_curation.py
@pytest.mark.parametrize("name", [rule for rule in aggregation.RULES if rule not in registry.CURATION_RULES])
def test_every_aggregation_rule_runs(name, run_config, sites, tmp_path, monkeypatch):
    # record the updates the registered rule is given, then check the stage-1 base is that rule's
    # result on them: three nodes (two share a dataset, so example counts differ) so that
    # median, mean and weighted differ
    given = []
    make = aggregation.RULES[name]

    def recording(base, trim_fraction, density):
        running = make(base, trim_fraction, density)

        def add(update, num_examples, fold=running.add):
            given.append((update, num_examples))
            fold(update, num_examples)

        running.add = add
        return running

    monkeypatch.setitem(aggregation.RULES, name, recording)
    tiny_run(run_config, sites, tmp_path, num_nodes=3, aggregation=name)
    assert len(given) == 3, f"the '{name}' rule aggregated {len(given)} updates, expected the stage's 3"
    before, after = bases(tmp_path)
    counts = np.array([n for _, n in given], np.float64)
    assert len(set(counts)) > 1  # unequal weights: 'weighted' is not 'mean' here
    for key, base in before.items():
        stacked = np.stack([update[key] for update, _ in given]).astype(np.float64)
        expected = EXPECTED_AGGREGATE[name](stacked, counts, base.astype(np.float64))
        np.testing.assert_allclose(after[key], expected, rtol=1e-5, atol=1e-6, err_msg=key)


@pytest.mark.parametrize("name", registry.EVAL_PROTOCOLS)
def test_every_evaluation_protocol_runs(name, run_config, sites, tmp_path, monkeypatch):
    # the protocol's own function (named here, not read from the registry) scores every task at
    # every stage, and its scores are the reported ones
    attribute = {"linear-probe": "probe_score", "finetune": "finetune_score"}[name]
    scored, protocol = [], getattr(task, attribute)

    def recording(model_name, image_size, node_task, backbone, settings):
        scores = protocol(model_name, image_size, node_task, backbone, settings)
        scored.append((node_task.card.name, scores))
        return scores

    monkeypatch.setattr(task, attribute, recording)
    results = tiny_run(run_config, sites, tmp_path, eval_mode=name)
    assert len(scored) == 2 * len(results["stages"])  # 2 tasks x (stage 0 + stage 1)
    for stage, calls in zip(results["stages"], (scored[:2], scored[2:])):
        assert {t: (s["accuracy"], s["auc"]) for t, s in calls} == \
               {t: (m["accuracy"], m["auc"]) for t, m in stage["per_task"].items()}


# what each source makes of the sites the fixture writes: task name -> (modality, test examples scored)
SOURCE_TASKS = {
    "embedded": {"ct-tissue": ("CT", 400), "histology-stain": ("histopathology (IHC)", 399)},
    "medmnist": {"pneumoniamnist": ("chest X-ray", 8), "bloodmnist": ("blood cell microscopy", 8)},
    "npz": {"site-x": ("unknown", 8), "site-y": ("unknown", 8)},
    "folder": {"site-a": ("images (site folder)", 8), "site-b": ("images (site folder)", 8)},
    "dicom": {"ct-a": ("DICOM", 6), "ct-b": ("DICOM", 6)},
}


@pytest.mark.parametrize("name", registry.SOURCES)
def test_every_data_source_runs(name, run_config, sites, tmp_path):
    results = tiny_run(run_config, sites, tmp_path, datasets=",".join(sites[name]))
    # the source's own loader named and read these sites (another loader gives other names or facts)
    assert {task: (results["tasks"][task]["modality"], scores["n_scored"])
            for task, scores in results["stages"][-1]["per_task"].items()} == SOURCE_TASKS[name]


@pytest.mark.parametrize("name", registry.PARTITIONS)
def test_every_partition_runs(name, run_config, sites, tmp_path):
    results = tiny_run(run_config, sites, tmp_path, num_nodes=4, partition=name, dirichlet_alpha=100.0)
    assert len(results["stages"][-1]["participants"]) == 4


@pytest.mark.parametrize("name", transport.TRANSPORT_DTYPES)
def test_every_transport_dtype_runs(name, run_config, sites, tmp_path):
    final = tiny_run(run_config, sites, tmp_path, transport_dtype=name)["stages"][-1]
    # what the 2 nodes send up is the dtype's size per backbone value: 4 bytes for fp32, 2 for fp16 / bf16
    values = sum(v.size for v in bases(tmp_path)[1].values())
    itemsize = {"fp32": 4, "fp16": 2, "bf16": 2}[name]  # named here, not read from the registry
    assert itemsize * values * 2 <= final["bytes_up"] < (itemsize + 0.5) * values * 2


@pytest.mark.parametrize("name", registry.PRETRAIN_METHODS)
def test_every_pretraining_method_runs(name, run_config, sites, tmp_path):
    results = tiny_run(run_config, sites, tmp_path, pretrain=name, pretrain_epochs=1,
                       data_root=str(tmp_path / "cache"))
    # the stage-0 base was trained, away from the seeded random init a pretrain='none' run starts from
    torch.manual_seed(results["config"]["seed"])
    init = create_backbone(results["config"]["model"], results["config"]["image-size"]).state_dict()
    stage0 = bases(tmp_path)[0]
    assert not all(np.array_equal(init[k].numpy(), stage0[k]) for k in init)
    # ... by the named method: MAE reconstructs through a decoder, SimMIM through a linear head on the encoder
    (state,) = (tmp_path / "cache").glob(f"**/pretrain/{name}-*/state.safetensors")
    assert any(k.startswith("model/decoder") for k in load_file(state)) == (name == "mae")
