"""ClientApp: a hospital's node. Thin: Flower messages in, plain calls into ``learn.finetune``, messages out.

``query``    -> the node's task card (never its data)
``train``    -> fine-tune base + fresh head on the local train split, reply with the backbone only
``evaluate`` -> score the received base for the local task (``eval-mode``: linear probe or fine-tune)

What a node keeps between messages (in ``context.state``, which Flower keeps per run and node)
is a fact of the strategy that travels in each message (``node-keeps``): nothing, its own head
(``fedavg``, FedPer-style) or its own backbone and head (``local``, which is also scored on its
own backbone). So is a strategy's term in the training loss (``node-term``: FedProx's). No
server code is imported here.

What the node reads, writes, fetches and runs on, and the privacy it may spend, are the site's:
its node config (``node/site.py``; in simulation the simulation plays the sites). From the run config
it reads only how the run splits its data (``config.NODE_DATA_KEYS``); everything else, model
and arrays' encoding included, comes in each message's ``config`` record. A site with a privacy
floor refuses a train message that breaks it, with a one-line error reply (``node/ledger.py``).
This app has no attack path: hostile nodes for experiments are ``simulation/hostile_app.py``.
"""

from __future__ import annotations

import dataclasses

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from meduniverse_flwr.config import read_keys
from meduniverse_flwr.data.node_task import NodeTask, load_node_task
from meduniverse_flwr.learn.evaluate import evaluate_base
from meduniverse_flwr.learn.finetune import settings_for, train_on_task
from meduniverse_flwr.learn.model import split_state, to_arrays, to_tensors
from meduniverse_flwr.node.ledger import charge, site_epsilon
from meduniverse_flwr.node.site import Site, site_from
from meduniverse_flwr.wire.messages import Instructions, pack, record, unpack

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


def node_task(context: Context, site: Site, image_size: int) -> NodeTask:
    return load_node_task(site.dataset, site.shard, site.n_shards, site.data_options(context.run_config, image_size))


def _record(message: Message, name: str, kind: type):
    found = record(message.content, name, kind)
    if found is None:
        raise ValueError(f"message lacks its {kind.__name__} {name!r}")
    return found


def instructions(message: Message, site: Site) -> Instructions:
    """The message's instructions, on the site's device."""
    return dataclasses.replace(Instructions.from_record(_record(message, "config", ConfigRecord)), device=site.device)


@app.query()
def query(message: Message, context: Context) -> Message:
    image_size = read_keys(_record(message, "config", ConfigRecord), ["image-size"])["image_size"]
    card = node_task(context, site_from(context.node_config, context.run_config), image_size).card
    return Message(RecordDict({"card": ConfigRecord(card.to_record())}), reply_to=message)


@app.train()
def train(message: Message, context: Context) -> Message:
    site = site_from(context.node_config, context.run_config)
    sent = instructions(message, site)
    task = node_task(context, site, sent.image_size)
    if site.has_floor:  # refused (an error reply) before any training if the floor does not allow it
        charge(site, task.card.name, len(task.train), sent.dp, sent.dp_noise_multiplier, sent.dp_secure_noise,
               sent.batch_size, sent.epochs + sent.head_epochs)
    keeps = sent.node_keeps
    sent_arrays = to_tensors(unpack(_record(message, "arrays", ArrayRecord), sent.transport_dtype))
    state = kept_state(context, keeps, sent_arrays)
    backbone, head, metrics = train_on_task(sent.model, sent.image_size, task, state, settings_for(sent),
                                            validate=sent.node_metrics)
    if keeps != "nothing":
        context.state[KEPT] = ArrayRecord(head if keeps == "head" else {**backbone, **head})
    content = RecordDict({"arrays": pack(to_arrays(backbone), sent.transport_dtype), "metrics": MetricRecord(metrics)})
    return Message(content, reply_to=message)


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    site = site_from(context.node_config, context.run_config)
    sent = instructions(message, site)
    task = node_task(context, site, sent.image_size)
    backbone = to_tensors(unpack(_record(message, "arrays", ArrayRecord), sent.transport_dtype))
    if sent.node_keeps == "model":  # scored on its own backbone, once it has one
        backbone = kept_state(context, "model", backbone)
    metrics = evaluate_base(sent.model, sent.image_size, task, backbone, sent.eval_mode, settings_for(sent))
    if site.has_floor:  # what the site's own ledger says it has spent, beside the server's account
        metrics["site-epsilon"] = site_epsilon(site, task.card.name)
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=message)
