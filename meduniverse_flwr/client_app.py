"""ClientApp: a hospital's node. Thin: Flower messages in, plain calls into ``task``, messages out.

``query``    -> the node's task card (never its data)
``train``    -> fine-tune base + fresh head on the local train split, reply with the backbone only
``evaluate`` -> score the received base for the local task (``eval-mode``: linear probe or fine-tune)

What a node keeps between messages (in ``context.state``, which Flower keeps per run and node)
is a fact of the strategy that travels in each message (``node-keeps``): nothing, its own head
(``fedavg``, FedPer-style) or its own backbone and head (``local``, which is also scored on its
own backbone). So is a strategy's term in the training loss (``node-term``: FedProx's). No
server code is imported here.

A node reads from the run config only where its data are (``config.NODE_DATA_KEYS``) and, in
experiments on robust aggregation, whether it is hostile (``config.NODE_ATTACK_KEYS``);
everything else, model and arrays' encoding included, comes in each message's
``config`` record. Server-side settings (checkpoint paths, ``resume-from``,
``output-dir``) are never read here, so a SuperNode depends only on its own
files and node config.
"""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from .attacks import is_hostile, poisoned
from .config import NODE_ATTACK_KEYS, NODE_DATA_KEYS, read_keys
from .data import NodeTask, load_node_task, options_from
from .data.partition import node_dataset
from .messages import Instructions, pack, record, unpack_torch
from .model import split_state
from .task import evaluate_base, train_on_task

app = ClientApp()
KEPT = "meduniverse-kept"  # the context.state record of what the node keeps


def kept_state(context: Context, keeps: str, sent: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``sent`` with the arrays the node kept (per ``keeps``) in place of the same names; as sent
    when it keeps nothing or has nothing yet (its first message of the run)."""
    kept_record = record(context.state, KEPT, ArrayRecord)
    if keeps == "nothing" or kept_record is None:
        return sent
    kept = kept_record.to_torch_state_dict()
    if keeps == "head":
        kept = split_state(kept)[1]
    return {**sent, **{name: value for name, value in kept.items() if name in sent}}


def node_task(context: Context, image_size: int) -> NodeTask:
    """This node's task. A deployed SuperNode names its own dataset (and data root) in
    ``--node-config 'dataset="..." data-root="..."'``; in simulation the partition id picks one."""
    values = read_keys(context.run_config, NODE_DATA_KEYS)
    node = context.node_config
    if "dataset" in node:
        entry, shard, n_shards = str(node["dataset"]), 0, 1
    else:
        entry, shard, n_shards = node_dataset(int(node["partition-id"]), int(node["num-partitions"]),
                                              values["datasets"])
    values["data_root"] = str(node.get("data-root", values["data_root"]))
    return load_node_task(entry, shard, n_shards, options_from(values, image_size))


def _record(message: Message, name: str, kind: type):
    found = record(message.content, name, kind)
    if found is None:
        raise ValueError(f"message lacks its {kind.__name__} {name!r}")
    return found


def instructions(message: Message) -> Instructions:
    return Instructions.from_record(_record(message, "config", ConfigRecord))


@app.query()
def query(message: Message, context: Context) -> Message:
    image_size = read_keys(_record(message, "config", ConfigRecord), ["image-size"])["image_size"]
    card = node_task(context, image_size).card
    return Message(RecordDict({"card": ConfigRecord(card.to_record())}), reply_to=message)


@app.train()
def train(message: Message, context: Context) -> Message:
    sent = instructions(message)
    task = node_task(context, sent.image_size)
    keeps = sent.node_keeps
    state = kept_state(context, keeps, unpack_torch(_record(message, "arrays", ArrayRecord), sent.transport_dtype))
    backbone, head, metrics = train_on_task(sent.model, sent.image_size, task, state, sent.train_settings(),
                                            validate=sent.node_metrics)
    attack = read_keys(context.run_config, NODE_ATTACK_KEYS)
    if is_hostile(context.node_config, attack["attack_nodes"]):
        backbone = poisoned(split_state(state)[0], backbone, attack["attack_factor"])
    if keeps != "nothing":
        context.state[KEPT] = ArrayRecord(head if keeps == "head" else {**backbone, **head})
    content = RecordDict({"arrays": pack(backbone, sent.transport_dtype), "metrics": MetricRecord(metrics)})
    return Message(content, reply_to=message)


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    sent = instructions(message)
    task = node_task(context, sent.image_size)
    backbone = unpack_torch(_record(message, "arrays", ArrayRecord), sent.transport_dtype)
    if sent.node_keeps == "model":  # scored on its own backbone, once it has one
        backbone = kept_state(context, "model", backbone)
    metrics = evaluate_base(sent.model, sent.image_size, task, backbone, sent.eval_mode, sent.train_settings())
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=message)
