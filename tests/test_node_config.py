"""A node needs only its own files: server-side settings in the run config are never read there."""

import numpy as np
from flwr.app import ArrayRecord

from meduniverse_flwr.client_app import app as client_app
from meduniverse_flwr.config import RunConfig
from meduniverse_flwr.learn.model import create_backbone
from meduniverse_flwr.server.strategy.stagewise import StageWise
from simulation.inprocess import InProcessGrid


def test_every_handler_answers_when_server_only_paths_do_not_exist_on_the_node(run_config):
    server = run_config(datasets="ct-tissue,histology-stain", clients_per_stage=2, probe_epochs=1)
    # what a SuperNode sees: the server's checkpoint path and resume directory, absent here
    node = {**server, "pretrain": "/server-only/pretrained/encoder.safetensors",
            "resume-from": "/server-only/runs/r1", "output-dir": "/server-only/outputs"}
    grid = InProcessGrid(client_app, node, num_nodes=2)
    strategy = StageWise(RunConfig.from_run_config(server))

    cards = strategy.query_cards(grid)  # query
    assert sorted(card.name for card in cards.values()) == ["ct-tissue", "histology-stain"]
    base = ArrayRecord(create_backbone("vit-micro", 28).state_dict())
    new_base, metrics = strategy.run_train_stage(grid, 1, base)  # train
    assert metrics["replies"] == 2
    strategy.run_evaluation(grid, 1, new_base)  # evaluate
    outcome = strategy.take_outcome()
    assert not outcome.rejected and all(m["accuracy"] is not None for m in outcome.per_task.values())
    assert not np.array_equal(new_base["cls_token"].numpy(), base["cls_token"].numpy())


def test_a_message_says_how_its_arrays_are_encoded(run_config):
    config = run_config(datasets="ct-tissue", clients_per_stage=1, transport_dtype="bf16")
    grid = InProcessGrid(client_app, {**config, "transport-dtype": "fp32"}, num_nodes=1)  # the node's copy is stale
    strategy = StageWise(RunConfig.from_run_config(config))
    strategy.query_cards(grid)
    _, metrics = strategy.run_train_stage(grid, 1, ArrayRecord(create_backbone("vit-micro", 28).state_dict()))
    assert metrics["replies"] == 1  # the node followed the message, not its run config
    sent = grid.pushed[-1].content.config_records["config"]
    assert sent["transport-dtype"] == "bf16" and sent["model"] == "vit-micro" and sent["epochs"] == 1
