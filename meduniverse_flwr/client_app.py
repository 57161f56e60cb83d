"""ClientApp: a hospital's node. Thin: Flower messages in, plain calls into ``task``, messages out.

``query``    -> the node's task card (never its data)
``train``    -> fine-tune base + fresh head on the local train split, reply with the backbone only
``evaluate`` -> score the received base for the local task (linear probe or fine-tune)
"""

from __future__ import annotations

import dataclasses

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from .config import RunConfig
from .data import NodeTask, load_node_task, options_from
from .data.partition import node_dataset
from .messages import pack, unpack_torch
from .task import TrainSettings, evaluate_base, resolve_device, train_on_task

app = ClientApp()


def node_task(context: Context) -> tuple[RunConfig, NodeTask]:
    """The run config and this node's task. A deployed SuperNode names its own
    dataset in ``--node-config 'dataset="..."'``; in simulation the partition id picks one."""
    config = RunConfig.from_run_config(context.run_config)
    node = context.node_config
    if "dataset" in node:
        entry, shard, n_shards = str(node["dataset"]), 0, 1
    else:
        entry, shard, n_shards = node_dataset(int(node["partition-id"]), int(node["num-partitions"]), config.datasets)
    options = dataclasses.replace(options_from(config), root=str(node.get("data-root", config.data_root)))
    return config, load_node_task(entry, shard, n_shards, options)


def settings_from(message: Message, config: RunConfig, epochs_key: str) -> TrainSettings:
    sent = message.content.config_records["config"]
    return TrainSettings(
        epochs=int(sent[epochs_key]),
        lr=float(sent["lr"]),
        weight_decay=float(sent["weight-decay"]),
        batch_size=int(sent["batch-size"]),
        seed=int(sent["seed"]),
        device=resolve_device(config.device),
    )


@app.query()
def query(message: Message, context: Context) -> Message:
    _, task = node_task(context)
    return Message(RecordDict({"card": ConfigRecord(task.card.to_record())}), reply_to=message)


@app.train()
def train(message: Message, context: Context) -> Message:
    config, task = node_task(context)
    state = unpack_torch(message.content.array_records["arrays"], config.transport_dtype)
    backbone, metrics = train_on_task(config.model, config.image_size, task, state,
                                      settings_from(message, config, "local-epochs"))
    content = RecordDict({"arrays": pack(backbone, config.transport_dtype), "metrics": MetricRecord(metrics)})
    return Message(content, reply_to=message)


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    config, task = node_task(context)
    sent = message.content.config_records["config"]
    eval_mode = str(sent["eval-mode"])
    epochs_key = "probe-epochs" if eval_mode == "linear-probe" else "eval-epochs"
    backbone = unpack_torch(message.content.array_records["arrays"], config.transport_dtype)
    metrics = evaluate_base(config.model, config.image_size, task, backbone, eval_mode,
                            settings_from(message, config, epochs_key))
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=message)
