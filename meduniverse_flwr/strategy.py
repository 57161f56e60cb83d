"""``StageWise``: MedUniverse's stage-wise aggregation of heterogeneous-head ViTs.

One stage: every node answers a *query* with its task card (once per run);
``ceil(oversample * clients_per_stage)`` trainable nodes (seeded sample) get a
*train* message with the current base backbone plus a fresh, seeded linear head
sized to their card; replies carry the fine-tuned backbone only. Each valid
reply is folded into a running aggregate as it arrives; after
``clients_per_stage`` valid replies the stage ends (late replies are dropped
and logged), or at the stage timeout with at least ``min_replies``, and the
next base is ``(1 - server_mix) * base + server_mix * aggregate``. Heads never
enter it.

The class implements all of Flower's ``Strategy`` methods, so Flower's own
``start()`` drives it too; ``run_train_stage`` is the streaming form the
ServerApp uses (replies are pulled as they arrive, never all held at once).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from logging import INFO, WARNING

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.common import log

from .aggregation import RunningAggregate, check_update, mix
from .data import TaskCard
from .messages import pack, to_numpy, to_record, unpack
from .model import new_head_state
from .seeds import derive_seed

# Seconds between pulls while waiting for replies: short right after a reply (the in-memory
# simulation grid answers at once), backing off to PULL_MAX so that a deployed SuperLink is
# not kept busy by polling during minutes of local training.
PULL_MIN, PULL_MAX = 0.05, 1.0


class StageFailed(RuntimeError):
    """A stage ended (K replies never came before the timeout) with too few valid replies."""


@dataclass
class StageLog:
    """What happened in one stage, for results.json."""

    participants: list[str] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)
    bytes_up: int = 0
    bytes_down: int = 0
    train_loss: float | None = None
    per_task: dict[str, dict] = field(default_factory=dict)


class StageWise(Strategy):
    """Stage-wise aggregation of backbones from clients with different task heads."""

    def __init__(
        self,
        clients_per_stage: int,
        aggregation: str = "weighted",
        server_mix: float = 1.0,
        seed: int = 0,
        held_out: Iterable[str] = (),
        timeout: float = 3600.0,
        transport_dtype: str = "fp32",
        oversample: float = 1.0,
        min_replies: int = 1,
    ) -> None:
        self.clients_per_stage = clients_per_stage
        self.aggregation = aggregation
        self.server_mix = server_mix
        self.seed = seed
        self.held_out = frozenset(held_out)
        self.timeout = timeout
        self.transport_dtype = transport_dtype
        self.oversample = oversample
        self.min_replies = min_replies
        self.cards: dict[int, TaskCard] = {}
        self.log = StageLog()
        self._base: dict[str, np.ndarray] = {}
        self._running = RunningAggregate(aggregation)
        self._replied: set[int] = set()
        self._train_nodes: dict[int, TaskCard] = {}
        self._loss_sum = 0.0

    def summary(self) -> None:
        log(INFO, "\t├──> StageWise: K=%d valid replies end a stage (of ceil(%.2f K) asked, at least %d "
            "before the timeout), aggregation=%s, server-mix=%.2f", self.clients_per_stage, self.oversample,
            self.min_replies, self.aggregation, self.server_mix)
        log(INFO, "\t└──> held-out tasks (evaluated only): %s", sorted(self.held_out) or "none")

    # ------------------------------------------------------------------ query
    def query_cards(self, grid: Grid) -> dict[int, TaskCard]:
        """Ask every connected node for its task card; nodes with a bad card are left out."""
        node_ids = sorted(grid.get_node_ids())
        messages = [Message(RecordDict(), dst_node_id=node, message_type=MessageType.QUERY) for node in node_ids]
        self.cards = {}
        for reply in grid.send_and_receive(messages, timeout=self.timeout):
            node = reply.metadata.src_node_id
            try:
                if reply.has_error():
                    raise ValueError(f"error reply ({reply.error.reason})")
                if "card" not in reply.content.config_records:
                    raise ValueError("no 'card' record in the reply")
                self.cards[node] = TaskCard.from_record(reply.content.config_records["card"])
            except ValueError as err:
                log(WARNING, "node %d: task card rejected: %s", node, err)
        missing = set(node_ids) - set(self.cards)
        if missing:
            log(WARNING, "no valid task card from nodes %s; they take no part", sorted(missing))
        return self.cards

    def trainable_nodes(self) -> list[int]:
        """Nodes whose task trains, ordered by (task, node id)."""
        nodes = [n for n, card in self.cards.items() if card.name not in self.held_out]
        return sorted(nodes, key=lambda n: (self.cards[n].name, n))

    # ------------------------------------------------------------------ train
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Base backbone + a fresh head per node's card; starts the stage's aggregate."""
        if not self.cards:
            self.query_cards(grid)
        self._start_stage(arrays)
        candidates = self.trainable_nodes()
        if self.clients_per_stage > len(candidates):
            log(WARNING, "clients-per-stage=%d but only %d trainable nodes: the stage ends after %d replies",
                self.clients_per_stage, len(candidates), len(candidates))
        # ask M = ceil(oversample * K) nodes so that slow or dead ones do not hold the stage up
        m = min(len(candidates), math.ceil(self.oversample * self.clients_per_stage))
        rng = np.random.default_rng(derive_seed(self.seed, server_round, "sample"))
        sampled = sorted(rng.choice(candidates, size=m, replace=False).tolist()) if m < len(candidates) else candidates
        self._train_nodes = {node: self.cards[node] for node in sampled}
        # serialise the base once; every message shares its arrays and adds its own head
        base = dict(pack(self._base, self.transport_dtype))
        messages = []
        for node in sampled:
            card = self.cards[node]
            head_seed = derive_seed(self.seed, server_round, "head", card.name)
            head = pack(new_head_state(self._embed_dim(), card.n_classes, head_seed), self.transport_dtype)
            content = RecordDict({
                "arrays": ArrayRecord({**base, **head}),
                "config": ConfigRecord({**dict(config), "stage": server_round,
                                        "seed": derive_seed(self.seed, server_round, "train", card.name)}),
            })
            self.log.bytes_down += content.array_records["arrays"].count_bytes()
            messages.append(Message(content, dst_node_id=node, message_type=MessageType.TRAIN,
                                    group_id=f"stage-{server_round}"))
        return messages

    def accept_train_reply(self, reply: Message) -> bool:
        """Validate one reply and fold it into the running aggregate; log why if rejected."""
        node = reply.metadata.src_node_id
        self._replied.add(node)
        arrays, reason = self._decode_train_reply(reply)
        if reason is not None:
            self.log.rejected.append(f"node {node}: {reason}")
            log(WARNING, "stage reply from node %d rejected: %s", node, reason)
            return False
        self.log.bytes_up += reply.content.array_records["arrays"].count_bytes()
        metrics = reply.content.metric_records["metrics"]
        self._running.add(arrays, float(metrics["num-examples"]))
        loss = metrics.get("train-loss")  # optional; a malformed one is not worth rejecting the update
        self._loss_sum += float(loss) if isinstance(loss, (int, float)) else math.nan
        self.log.participants.append(self._train_nodes[node].name)
        return True

    def finish_stage(self, server_round: int) -> tuple[ArrayRecord, MetricRecord]:
        """The next base from the replies folded so far; StageFailed below ``min_replies``."""
        count = self._running.count
        if count < self.min_replies:
            raise StageFailed(f"stage {server_round}: {count} valid replies, fewer than min-replies="
                              f"{self.min_replies}; rejected: {self.log.rejected or 'none'}")
        if count < min(self.clients_per_stage, len(self._train_nodes)):
            log(WARNING, "stage %d ends with %d of %d replies", server_round, count, self.clients_per_stage)
        new_base = mix(self._base, self._running.result(), self.server_mix)
        self.log.participants.sort()
        self.log.train_loss = self._loss_sum / count
        self._running = RunningAggregate(self.aggregation)  # free the sums now
        return to_record(new_base), MetricRecord({"replies": count, "train-loss": self.log.train_loss})

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        for reply in replies:
            if self._running.count >= self.clients_per_stage:
                log(INFO, "stage %d: late reply from node %d dropped", server_round, reply.metadata.src_node_id)
                continue
            self.accept_train_reply(reply)
        return self.finish_stage(server_round)

    def run_train_stage(
        self, grid: Grid, server_round: int, arrays: ArrayRecord, config: ConfigRecord
    ) -> tuple[ArrayRecord, MetricRecord]:
        """Streaming stage: push, then fold replies one by one as they arrive; stop at K."""
        pending = set(grid.push_messages(self.configure_train(server_round, arrays, config, grid)))
        target = min(self.clients_per_stage, len(self._train_nodes))
        deadline = time.monotonic() + self.timeout
        interval = PULL_MIN
        while pending and self._running.count < target and time.monotonic() < deadline:
            replies = list(grid.pull_messages(pending))
            for reply in replies:
                pending.discard(reply.metadata.reply_to_message_id)
                if self._running.count < target:
                    self.accept_train_reply(reply)
                del reply  # never hold more than one reply's arrays
            interval = PULL_MIN if replies else min(2 * interval, PULL_MAX)
            if not replies:
                time.sleep(interval)
        if pending:
            described = self._describe(node for node in self._train_nodes if node not in self._replied)
            if self._running.count < target:
                log(WARNING, "stage %d: timed out after %.0fs; no reply from nodes %s",
                    server_round, self.timeout, described)
            else:
                log(INFO, "stage %d: K=%d replies in; late replies from %s are dropped", server_round, target, described)
        return self.finish_stage(server_round)

    # --------------------------------------------------------------- evaluate
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The base to every node with a card, held-out tasks included."""
        if not self.cards:
            self.query_cards(grid)
        messages = []
        sent = pack(to_numpy(arrays), self.transport_dtype)
        for node in sorted(self.cards):
            card = self.cards[node]
            content = RecordDict({
                "arrays": sent,
                "config": ConfigRecord({**dict(config), "stage": server_round,
                                        "seed": derive_seed(self.seed, "evaluate", card.name)}),
            })
            self.log.bytes_down += sent.count_bytes()
            messages.append(Message(content, dst_node_id=node, message_type=MessageType.EVALUATE,
                                    group_id=f"evaluate-{server_round}"))
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Per-task metrics (example-weighted over nodes sharing a task) into ``self.log.per_task``."""
        sums: dict[str, dict[str, float]] = {}
        replied = set()
        for reply in replies:
            node = reply.metadata.src_node_id
            replied.add(node)
            reason = _evaluate_reply_problem(reply, self.cards.get(node))
            if reason is not None:
                log(WARNING, "evaluation reply from node %d rejected: %s", node, reason)
                continue
            metrics = reply.content.metric_records["metrics"]
            n_test = float(metrics["n-test"])
            task = sums.setdefault(self.cards[node].name, {"accuracy": 0.0, "auc": 0.0, "n_test": 0.0})
            task["accuracy"] += float(metrics["accuracy"]) * n_test
            task["auc"] += float(metrics["auc"]) * n_test
            task["n_test"] += n_test
        silent = set(self.cards) - replied
        if silent:  # a dead or hung node: the stage goes on without its task's score
            log(WARNING, "stage %d evaluation: no reply before the timeout from nodes %s", server_round,
                self._describe(silent))
        self.log.per_task = {
            name: {"accuracy": s["accuracy"] / s["n_test"], "auc": s["auc"] / s["n_test"],
                   "n_test": int(s["n_test"]), "held_out": name in self.held_out}
            for name, s in sorted(sums.items())
        }
        if not self.log.per_task:
            return None
        return MetricRecord({f"{name}/accuracy": m["accuracy"] for name, m in self.log.per_task.items()})

    # ---------------------------------------------------------------- helpers
    def new_log(self) -> StageLog:
        """Start recording a new stage; returns the finished log of the previous one."""
        finished, self.log = self.log, StageLog()
        return finished

    def _describe(self, nodes: Iterable[int]) -> str:
        """``id (task), ...`` for log lines that name nodes."""
        return ", ".join(f"{node} ({self.cards[node].name})" for node in sorted(nodes))

    def _start_stage(self, arrays: ArrayRecord) -> None:
        self._replied = set()
        self._base = to_numpy(arrays)
        self._running = RunningAggregate(self.aggregation)
        self._loss_sum = 0.0

    def _embed_dim(self) -> int:
        return int(self._base["cls_token"].shape[-1])

    def _decode_train_reply(self, reply: Message) -> tuple[dict[str, np.ndarray], str | None]:
        """The reply's backbone arrays, or the reason it cannot be aggregated."""
        node = reply.metadata.src_node_id
        if node not in self._train_nodes:
            return {}, "not asked to train in this stage"
        if reply.has_error():
            return {}, f"error reply ({reply.error.reason})"
        content = reply.content
        if "arrays" not in content.array_records or "metrics" not in content.metric_records:
            return {}, "reply lacks the 'arrays' or 'metrics' record"
        num_examples = content.metric_records["metrics"].get("num-examples")
        if not isinstance(num_examples, (int, float)) or not math.isfinite(num_examples) or num_examples <= 0:
            return {}, f"num-examples is {num_examples!r}, expected a positive number"
        try:
            arrays = unpack(content.array_records["arrays"], self.transport_dtype)
        except Exception as err:  # a malformed payload from one node must not crash the server
            return {}, f"arrays cannot be decoded ({err})"
        return arrays, check_update(self._base, arrays)


def _evaluate_reply_problem(reply: Message, card: TaskCard | None) -> str | None:
    if card is None:
        return "node has no task card"
    if reply.has_error():
        return f"error reply ({reply.error.reason})"
    if "metrics" not in reply.content.metric_records:
        return "reply lacks the 'metrics' record"
    metrics = reply.content.metric_records["metrics"]
    for key in ("accuracy", "auc", "n-test"):
        if not isinstance(metrics.get(key), (int, float)):
            return f"metric '{key}' missing or not a number"
    if not (0.0 <= metrics["accuracy"] <= 1.0) or metrics["n-test"] <= 0:
        return f"accuracy {metrics['accuracy']} or n-test {metrics['n-test']} out of range"
    return None
