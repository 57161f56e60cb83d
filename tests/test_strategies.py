"""The comparison strategies (fedavg, local, cyclic, centralized) each do what defines them,
driving the real ServerApp and ClientApp in-process."""

import json

import numpy as np
import pytest
import torch
from conftest import EVERY_STAGE, write_medmnist
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from safetensors.numpy import load_file

from meduniverse_flwr import server_app
from meduniverse_flwr.client_app import KEPT, kept_state
from meduniverse_flwr.client_app import app as client_app
from meduniverse_flwr.config import RunConfig
from meduniverse_flwr.data.node_task import load_node_task
from meduniverse_flwr.data.options import DataOptions
from meduniverse_flwr.learn.evaluate import evaluate_base
from meduniverse_flwr.learn.finetune import TrainSettings, settings_for
from meduniverse_flwr.learn.model import create_backbone
from meduniverse_flwr.learn.pooled import train_pooled
from meduniverse_flwr.server_app import build_strategy
from meduniverse_flwr.wire.card import TaskCard
from meduniverse_flwr.wire.messages import Instructions, pack, unpack
from simulation.inprocess import InProcessGrid

FLAGS = ("pneumoniamnist", "bloodmnist", "organamnist")


@pytest.fixture(scope="module")
def sites(tmp_path_factory):
    root = tmp_path_factory.mktemp("sites")
    return [f"medmnist:{write_medmnist(root, flag, n=(24, 8, 8), seed=i)}" for i, flag in enumerate(FLAGS)]


def run(run_config, sites, tmp_path, strategy, num_stages=2, capture=False):
    """A tiny run; with ``capture`` every reply (and the node's kept arrays after it) is recorded."""
    config = run_config(datasets=",".join(sites), pretrain="none", probe_epochs=2, batch_size=16,
                        clients_per_stage=len(sites), num_stages=num_stages, strategy=strategy,
                        output_dir=str(tmp_path / strategy))
    seen = []

    def record(node):
        def tamper(reply):
            kept = grid.contexts[node].state.array_records.get(KEPT)
            seen.append((node, reply, None if kept is None else kept.to_torch_state_dict()))
            return reply
        return tamper

    grid = InProcessGrid(client_app, config, len(sites))
    if capture:
        grid.tamper = {node: record(node) for node in grid.contexts}
    server_app.main(grid, Context(run_id=3, node_id=0, node_config={}, state=RecordDict(), run_config=config))
    run_dir = tmp_path / strategy / "latest"
    results = json.loads((run_dir / "results.json").read_text())
    return results, grid, seen, run_dir, config


def checkpoint(run_dir, stage):
    return load_file(run_dir / "checkpoints" / f"stage-{stage}.safetensors")


def train_messages(grid):
    return [m for m in grid.pushed if m.metadata.message_type == "train"]


def test_kept_state_replaces_what_the_strategy_keeps():
    sent = {"cls_token": torch.zeros(2), "head.weight": torch.zeros(3, 2), "head.bias": torch.zeros(3)}
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    assert kept_state(context, "head", sent) is sent  # nothing kept yet: as sent
    context.state.array_records[KEPT] = ArrayRecord({"cls_token": torch.ones(2), "head.weight": torch.ones(3, 2),
                                                     "head.bias": torch.ones(3)})
    head_kept = kept_state(context, "head", sent)
    assert head_kept["cls_token"].sum() == 0 and head_kept["head.weight"].sum() == 6 and head_kept["head.bias"].sum() == 3
    assert all(value.sum() > 0 for value in kept_state(context, "model", sent).values())
    assert kept_state(context, "nothing", sent) is sent
    assert set(kept_state(context, "model", {"cls_token": torch.zeros(2)})) == {"cls_token"}  # evaluate: backbone only


def test_fedavg_nodes_train_from_their_own_head(run_config, sites, tmp_path):
    results, grid, seen, run_dir, _ = run(run_config, sites, tmp_path, "fedavg", capture=True)
    assert [len(s["participants"]) for s in results["stages"]] == [0, 3, 3]
    train = [(node, reply, kept) for node, reply, kept in seen if reply.metadata.message_type == "train"]
    assert len(train) == 6 and all(set(kept) == {"head.weight", "head.bias"} for _, _, kept in train)
    # stage 2 of one node, replayed as a stagewise node given its stage-1 head, trains the same backbone
    node, _, head_after_stage_1 = train[0]
    stage_2 = [m for m in train_messages(grid) if m.metadata.group_id == "stage-2" and m.metadata.dst_node_id == node][0]
    sent = unpack(stage_2.content.array_records["arrays"], "fp32")
    assert not np.array_equal(sent["head.weight"], head_after_stage_1["head.weight"].numpy())  # the server's is fresh
    given_head = {k: v.numpy() for k, v in head_after_stage_1.items()}
    replay = Message(RecordDict({"arrays": pack({**sent, **given_head}, "fp32"), "config": ConfigRecord(
        {**stage_2.content.config_records["config"], "node-keeps": "nothing"})}), dst_node_id=node, message_type="train")
    replay.metadata.__dict__["_message_id"] = "replay"
    fresh = Context(run_id=1, node_id=node, node_config=grid.contexts[node].node_config, state=RecordDict(),
                    run_config=grid.contexts[node].run_config)
    replayed = unpack(client_app(replay, fresh).content.array_records["arrays"], "fp32")
    stage_2_reply = [reply for n, reply, _ in train[3:] if n == node][0]
    original = unpack(stage_2_reply.content.array_records["arrays"], "fp32")
    assert all(np.array_equal(replayed[name], original[name]) for name in original)


def test_local_keeps_the_base_and_scores_each_node_on_its_own_model(run_config, sites, tmp_path):
    results, grid, _, run_dir, config = run(run_config, sites, tmp_path, "local")
    for stage in (1, 2):
        assert all(np.array_equal(checkpoint(run_dir, stage)[k], v) for k, v in checkpoint(run_dir, 0).items())
    scores = results["stages"][2]["per_task"]
    for node, context in grid.contexts.items():
        kept = context.state.array_records[KEPT].to_torch_state_dict()
        backbone = {k: v for k, v in kept.items() if not k.startswith("head.")}
        task = load_node_task(sites[node - 1000], 0, 1, DataOptions(root=config["data-root"]))
        evaluate = [m for m in grid.pushed if m.metadata.message_type == "evaluate" and m.metadata.dst_node_id == node]
        sent = Instructions.from_record(evaluate[-1].content.config_records["config"])
        own = evaluate_base(sent.model, sent.image_size, task, backbone, sent.eval_mode, settings_for(sent))
        assert scores[task.card.name]["accuracy"] == own["accuracy"]


def test_cyclic_passes_the_model_from_node_to_node(run_config, sites, tmp_path):
    results, grid, seen, run_dir, _ = run(run_config, sites, tmp_path, "cyclic", num_stages=1, capture=True)
    sent = train_messages(grid)
    replies = [reply for _, reply, _ in seen if reply.metadata.message_type == "train"]
    assert len(sent) == len(replies) == 3 and len({m.metadata.dst_node_id for m in sent}) == 3
    for reply, following in zip(replies, sent[1:]):  # each node starts from the previous node's backbone
        returned = unpack(reply.content.array_records["arrays"], "fp32")
        given = unpack(following.content.array_records["arrays"], "fp32")
        assert all(np.array_equal(given[name], value) for name, value in returned.items())
    last = unpack(replies[-1].content.array_records["arrays"], "fp32")
    assert all(np.array_equal(checkpoint(run_dir, 1)[name], value) for name, value in last.items())
    assert sorted(results["stages"][1]["participants"]) == sorted(results["stages"][0]["per_task"])


def test_centralized_trains_on_the_server_and_says_it_pools_data(run_config, sites, tmp_path, caplog):
    results, grid, _, run_dir, _ = run(run_config, sites, tmp_path, "centralized", num_stages=1)
    assert not train_messages(grid) and results["stages"][1]["bytes_up"] == 0
    assert sorted(results["stages"][1]["participants"]) == sorted(results["stages"][0]["per_task"])
    assert not all(np.array_equal(checkpoint(run_dir, 1)[k], v) for k, v in checkpoint(run_dir, 0).items())
    assert "breaks privacy" in caplog.text
    with pytest.raises(ValueError, match="resume-from: strategy 'centralized' keeps its task heads in server memory"):
        build_strategy(RunConfig.with_defaults(**EVERY_STAGE, strategy="centralized")).resume(results["stages"])


def test_pooled_training_is_seeded_and_keeps_a_head_per_task(sites, tmp_path):
    tasks = {task.card.name: task for task in (load_node_task(entry, 0, 1, DataOptions(root=str(tmp_path)))
                                               for entry in sites)}
    torch.manual_seed(0)
    backbone = create_backbone("vit-micro", 28).state_dict()
    settings = TrainSettings(1, 1e-3, 0.05, 16, 0, torch.device("cpu"))
    first = train_pooled("vit-micro", 28, tasks, backbone, {}, settings)
    second = train_pooled("vit-micro", 28, tasks, backbone, {}, settings)
    assert all(torch.equal(first[0][k], second[0][k]) for k in backbone) and first[2] == second[2]
    assert {name: head["weight"].shape[0] for name, head in first[1].items()} == {
        name: task.card.n_classes for name, task in tasks.items()}
    again = train_pooled("vit-micro", 28, tasks, first[0], first[1], settings)  # the heads carry on
    assert np.isfinite(again[2]) and all(not torch.equal(again[1][name]["weight"], first[1][name]["weight"])
                                         for name in tasks)


@pytest.mark.parametrize("strategy", ["stagewise", "cyclic"])
def test_node_ids_past_int64_are_sampled_and_visited_as_ids(strategy):
    """Flower's node ids are 64-bit unsigned: a NumPy array of them can become float64."""
    chosen = build_strategy(RunConfig.with_defaults(**EVERY_STAGE,
                                                    strategy=strategy, datasets="a,b,c", clients_per_stage=2,
                                                    oversample=1.0))
    ids = [2**64 - 1, 17, 8920515508404772000]
    chosen.cards = {node: TaskCard(name, "CT", 2, "binary", 10, 5, 5) for node, name in zip(ids, "abc")}
    sampled = chosen.sample_train_nodes(1)
    assert len(sampled) == 2 and set(sampled) <= set(ids) and all(type(node) is int for node in sampled)
