"""The ClientApp of experiments on robust aggregation: the site's app, with hostile simulated nodes.

Simulation only. The deployed ClientApp (``pyproject.toml``'s ``clientapp``) has no attack path;
experiments with ``attack-nodes > 0`` run this app instead: in-process (``simulation.inprocess``)
or through ``flwr run`` on an app directory of its own (``simulation.flower.hostile_app_dir``),
since Flower reads a run's ClientApp from its app's pyproject only. A hostile node answers a train
message as an honest one would, then replaces its backbone by ``attacks.poisoned`` around the base
it trained from.
"""

from __future__ import annotations

from flwr.app import ArrayRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from meduniverse_flwr import client_app
from meduniverse_flwr.config import NODE_ATTACK_KEYS, read_keys
from meduniverse_flwr.learn.model import split_state, to_arrays, to_tensors
from meduniverse_flwr.node.site import site_from
from meduniverse_flwr.wire.messages import pack, record, unpack
from simulation.attacks import is_hostile, poisoned

app = ClientApp()
app.query()(client_app.query)
app.evaluate()(client_app.evaluate)


@app.train()
def train(message: Message, context: Context) -> Message:
    attack = read_keys(context.run_config, NODE_ATTACK_KEYS)
    if not is_hostile(context.node_config, attack["attack_nodes"]):
        return client_app.train(message, context)
    sent = client_app.instructions(message, site_from(context.node_config, context.run_config))
    sent_arrays = to_tensors(unpack(record(message.content, "arrays", ArrayRecord), sent.transport_dtype))
    # the base this node trains from (its own backbone where it keeps one), read before it trains
    base = split_state(client_app.kept_state(context, sent.node_keeps, sent_arrays))[0]
    reply = client_app.train(message, context)
    backbone = to_tensors(unpack(record(reply.content, "arrays", ArrayRecord), sent.transport_dtype))
    content = RecordDict({"arrays": pack(to_arrays(poisoned(base, backbone, attack["attack_factor"])), sent.transport_dtype),
                          "metrics": reply.content["metrics"]})
    return Message(content, reply_to=message)
