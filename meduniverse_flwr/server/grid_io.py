"""The stage driver: the Flower grid I/O every strategy shares, apart from what a strategy decides.

``ask_cards`` asks every connected node for its task card and admits the valid ones. ``stream``
pushes a stage's messages, pulls the replies as they arrive, hands each to the strategy's
``accept`` (validate and fold: one reply's arrays in memory at a time) and stops at the target
count or the timeout. ``sender`` says which node a reply answers for; ``reply_records`` reads a
reply's records, refusing an error reply or one that lacks them. A strategy decides what to
send, to whom and how replies become the next base (``strategy.stagewise.StageWise``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from logging import WARNING

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.common import log
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid

from meduniverse_flwr.server.validation import Rejected, admit_cards, parse_card
from meduniverse_flwr.wire.card import TaskCard
from meduniverse_flwr.wire.messages import record

# Seconds between pulls while waiting for replies: short right after a reply (the in-memory
# simulation grid answers at once), backing off to PULL_MAX so that a deployed SuperLink is
# not kept busy by polling during minutes of local training.
PULL_MIN, PULL_MAX = 0.05, 1.0


def sender(reply: Message, outbox: Sequence[Message]) -> int:
    """The node a reply answers for. Flower's own error replies (e.g. node unavailable) come from
    the SuperLink, not from the node the message was sent to: they count for that node."""
    source = reply.metadata.src_node_id
    if source != SUPERLINK_NODE_ID:
        return source
    asked = {message.metadata.message_id: message.metadata.dst_node_id for message in outbox}
    return asked.get(reply.metadata.reply_to_message_id, source)


def card_queries(grid: Grid, image_size: int) -> list[Message]:
    """One query per connected node, in node order."""
    return [Message(RecordDict({"config": ConfigRecord({"image-size": image_size})}), dst_node_id=node,
                    message_type=MessageType.QUERY) for node in sorted(grid.get_node_ids())]


def reply_records(reply: Message, *wanted: tuple[str, type]) -> list:
    """The ``(name, record type)`` records of a node's reply, in order; Rejected if the reply is an
    error reply or lacks one of them (task cards, train and evaluate replies are all read through here)."""
    if reply.has_error():
        raise Rejected(f"error reply ({reply.error.reason})")
    found = [record(reply.content, name, kind) for name, kind in wanted]
    missing = [f"'{name}'" for (name, _), value in zip(wanted, found) if value is None]
    if missing:
        raise Rejected(f"reply lacks the {' and '.join(missing)} record{'s' if len(missing) > 1 else ''}")
    return found


def ask_cards(grid: Grid, queries: list[Message], timeout: float) -> dict[int, TaskCard]:
    """The valid, admitted task cards by node; each node left out is logged with its reason."""
    parsed: dict[int, TaskCard] = {}
    for reply in grid.send_and_receive(queries, timeout=timeout):
        node = sender(reply, queries)
        try:
            [card] = reply_records(reply, ("card", ConfigRecord))
            parsed[node] = parse_card(card)
        except Rejected as err:
            log(WARNING, "node %d: task card rejected: %s", node, err)
    cards, refused = admit_cards(parsed)
    for node, reason in refused.items():
        log(WARNING, "node %d: task card rejected: %s", node, reason)
    missing = {message.metadata.dst_node_id for message in queries} - set(cards)
    if missing:
        log(WARNING, "no valid task card from nodes %s; they take no part", sorted(missing))
    return cards


def stream(grid: Grid, messages: list[Message], target: int, timeout: float,
           accept: Callable[[Message], bool]) -> set[int]:
    """Push ``messages``; ``accept`` each reply as it arrives until ``target`` are accepted or
    ``timeout`` seconds pass. Returns the nodes whose reply never came (late or missing); a
    reply arriving after the target is dropped unread."""
    pending = {message_id: message.metadata.dst_node_id
               for message_id, message in zip(grid.push_messages(messages), messages)}
    accepted, deadline, interval = 0, time.monotonic() + timeout, PULL_MIN
    while pending and accepted < target and time.monotonic() < deadline:
        replies = list(grid.pull_messages(list(pending)))
        for reply in replies:
            pending.pop(reply.metadata.reply_to_message_id, None)
            if accepted < target and accept(reply):
                accepted += 1
            del reply  # never hold more than one reply's arrays
        interval = PULL_MIN if replies else min(2 * interval, PULL_MAX)
        if not replies:
            time.sleep(interval)
    return set(pending.values())
