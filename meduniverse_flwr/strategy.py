"""``StageWise``: MedUniverse's stage-wise aggregation of heterogeneous-head ViTs.

One stage: every node answers a *query* with its task card (once per run);
``ceil(oversample * clients_per_stage)`` trainable nodes (seeded sample) get a
*train* message with the current base backbone plus a fresh, seeded linear head
sized to their card; replies carry the fine-tuned backbone only. Each valid
reply is folded into a running aggregate as it arrives; after
``clients_per_stage`` valid replies the stage ends (late replies are dropped
and logged), or at the stage timeout with at least ``min_replies``, and the
next base is ``(1 - server_mix) * base + server_mix * aggregate``. Heads never
enter it. With ``schedule = arrival`` (``schedule.py``, the paper's protocol) a stage asks
the nodes of its K arriving tasks instead, each task trains once, and only the tasks still
to come (and held-out ones) score each new base.

The class implements all of Flower's ``Strategy`` methods, so Flower's own
``start()`` drives it too; ``run_train_stage`` is the streaming form the
ServerApp uses (replies are pulled as they arrive, never all held at once).

The comparison strategies subclass it and change one thing each: what a node keeps
between messages (``FedPer``: its head; ``Local``: its whole model, and no base update),
the order of training (``Cyclic``: one node after another) or where training happens
(``Centralized``: on the server, on pooled data, which breaks privacy).
"""

from __future__ import annotations

import math
import time
import dataclasses
from collections.abc import Iterable
from logging import INFO, WARNING

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.common import log
from flwr.common.constant import SUPERLINK_NODE_ID

from .aggregation import Aggregate, clip_update, mix, new_aggregate
from .config import RunConfig
from .data import TaskCard, load_node_task, options_from
from .messages import Instructions, pack, record, to_numpy, to_record, unpack
from .model import new_head_state
from .outcome import NodeReport, StageOutcome
from .pooled import train_pooled
from .privacy import PrivacyLedger, example_steps, noise_seed, noisy_sum_mean
from .schedule import arrival_order, arrivals, trained_by
from .seeds import derive_seed
from .task import EVAL_PROTOCOLS
from .validation import (EvalScore, Rejected, TrainUpdate, admit_cards, check_eval_reply, check_train_reply,
                         parse_card)

# Seconds between pulls while waiting for replies: short right after a reply (the in-memory
# simulation grid answers at once), backing off to PULL_MAX so that a deployed SuperLink is
# not kept busy by polling during minutes of local training.
PULL_MIN, PULL_MAX = 0.05, 1.0


class StageFailed(RuntimeError):
    """A stage ended (K replies never came before the timeout) with too few valid replies."""


class StageWise(Strategy):
    """Stage-wise aggregation of backbones from clients with different task heads."""

    # What a node keeps between its messages (client_app reads it): "nothing" (a fresh head from the
    # server every stage), "head" (its own head across stages) or "model" (its own backbone and head).
    node_keeps = "nothing"

    def __init__(self, config: RunConfig) -> None:
        self.clients_per_stage = config.clients_per_stage
        self.schedule = config.schedule
        self.aggregation = config.aggregation
        self.trim_fraction = config.trim_fraction
        self.merge_density = config.merge_density
        self.dp = config.dp
        self.dp_clip_norm = config.dp_clip_norm
        self.dp_noise_multiplier = config.dp_noise_multiplier
        self.dp_secure_noise = config.dp_secure_noise
        self.privacy = PrivacyLedger(config.dp_delta)
        self.server_mix = config.server_mix
        self.seed = config.seed
        self.held_out = frozenset(config.held_out)
        self.timeout = config.stage_timeout
        self.transport_dtype = config.transport_dtype
        self.oversample = config.oversample
        self.min_replies = config.min_replies
        self.max_update_ratio = config.max_update_ratio
        self.on_excess_update = config.on_excess_update
        self.train_instructions = Instructions(**{
            field.name: getattr(config, "local_epochs" if field.name == "epochs" else field.name)
            for field in dataclasses.fields(Instructions)})
        epochs_key = EVAL_PROTOCOLS[config.eval_mode].epochs_key
        self.evaluate_instructions = dataclasses.replace(self.train_instructions,
                                                         epochs=config.to_run_config()[epochs_key])
        self.cards: dict[int, TaskCard] = {}
        self.outcome = StageOutcome()
        self._base: dict[str, np.ndarray] = {}
        self._running = self._new_aggregate()
        self._replied: set[int] = set()
        self._train_nodes: dict[int, TaskCard] = {}
        self._outbox: list[Message] = []  # the messages last sent (ids set by the grid on push)
        self._stage, self._stage_started = 0, time.monotonic()
        self._loss_sum = 0.0

    def summary(self) -> None:
        log(INFO, "\t├──> StageWise: K=%d valid replies end a stage (of ceil(%.2f K) asked, at least %d "
            "before the timeout), aggregation=%s, server-mix=%.2f", self.clients_per_stage, self.oversample,
            self.min_replies, self.aggregation, self.server_mix)
        log(INFO, "\t├──> held-out tasks (evaluated only): %s", sorted(self.held_out) or "none")
        log(INFO, "\t└──> differential privacy: %s", "off" if self.dp == "off" else
            f"{self.dp} level, clip {self.dp_clip_norm:g}, noise multiplier {self.dp_noise_multiplier:g}, "
            f"delta {self.privacy.delta:g}")

    # ------------------------------------------------------------------ query
    def query_cards(self, grid: Grid) -> dict[int, TaskCard]:
        """Ask every connected node for its task card; nodes with a bad card are left out."""
        node_ids = sorted(grid.get_node_ids())
        messages = [Message(RecordDict({"config": ConfigRecord({"image-size": self.train_instructions.image_size})}),
                            dst_node_id=node, message_type=MessageType.QUERY) for node in node_ids]
        parsed: dict[int, TaskCard] = {}
        self._outbox = messages
        for reply in grid.send_and_receive(messages, timeout=self.timeout):
            node = self._sender(reply)
            try:
                if reply.has_error():
                    raise Rejected(f"error reply ({reply.error.reason})")
                card = record(reply.content, "card", ConfigRecord)
                if card is None:
                    raise Rejected("no 'card' record in the reply")
                parsed[node] = parse_card(card)
            except Rejected as err:
                log(WARNING, "node %d: task card rejected: %s", node, err)
        self.cards, refused = admit_cards(parsed)
        for node, reason in refused.items():
            log(WARNING, "node %d: task card rejected: %s", node, reason)
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
        self._start_stage(grid, arrays)
        sampled = self.sample_train_nodes(server_round)
        # serialise the base once; every message shares its arrays and adds its own head
        base = dict(pack(self._base, self.transport_dtype))
        self._outbox = [self.train_message(node, server_round, base, config) for node in sampled]
        return self._outbox

    def arrival_order(self) -> list[str]:
        """The trainable tasks in the order they arrive (``schedule = arrival``)."""
        return arrival_order({self.cards[node].name for node in self.trainable_nodes()}, self.clients_per_stage,
                             self.seed)

    def sample_train_nodes(self, server_round: int) -> list[int]:
        """The stage's ``ceil(oversample * K)`` trainable nodes (a seeded sample, in node order); with the
        arrival schedule, the nodes of the stage's K arriving tasks."""
        if self.schedule == "arrival":
            arriving = set(arrivals(self.arrival_order(), self.clients_per_stage, server_round))
            candidates = [node for node in self.trainable_nodes() if self.cards[node].name in arriving]
        else:
            candidates = self.trainable_nodes()
        if self.clients_per_stage > len(candidates):
            log(WARNING, "clients-per-stage=%d but only %d trainable nodes: the stage ends after %d replies",
                self.clients_per_stage, len(candidates), len(candidates))
        # ask M = ceil(oversample * K) nodes so that slow or dead ones do not hold the stage up
        m = min(len(candidates), math.ceil(self.oversample * self.clients_per_stage))
        rng = np.random.default_rng(derive_seed(self.seed, server_round, "sample"))
        # indices, not ids: node ids are 64-bit unsigned, which a NumPy array of them can turn into floats
        sampled = (sorted(candidates[int(i)] for i in rng.choice(len(candidates), size=m, replace=False))
                   if m < len(candidates) else candidates)
        self._train_nodes = {node: self.cards[node] for node in sampled}
        self._stage = server_round
        log(INFO, "stage %d: asked %d node(s) to train: %s", server_round, len(sampled), self._describe(sampled))
        return sampled

    def train_message(self, node: int, server_round: int, base: dict[str, Array], config: ConfigRecord) -> Message:
        """One node's train message: ``base`` (packed) plus a fresh, seeded head sized to its card."""
        card = self.cards[node]
        head_seed = derive_seed(self.seed, server_round, "head", card.name)
        head = pack(new_head_state(self._embed_dim(), card.n_classes, head_seed), self.transport_dtype)
        sent = dataclasses.replace(self.train_instructions, seed=derive_seed(self.seed, server_round, "train", card.name))
        content = RecordDict({"arrays": ArrayRecord({**base, **head}),
                              "config": ConfigRecord({**sent.to_record(), **dict(config)})})
        self.outcome.bytes_down += content["arrays"].count_bytes()
        return Message(content, dst_node_id=node, message_type=MessageType.TRAIN, group_id=f"stage-{server_round}")

    def accept_train_reply(self, reply: Message) -> bool:
        """Validate one reply and fold it into the running aggregate; log why if rejected."""
        node = self._sender(reply)
        self._replied.add(node)
        try:
            update = self._check_train_reply(reply)
        except Rejected as reason:
            self.outcome.rejected.append(f"node {node}: {reason}")
            log(WARNING, "stage %d: reply from node %s rejected: %s%s", self._stage, self._name(node), reason,
                self._progress())
            return False
        if update.excess is not None:
            log(WARNING, "stage reply from node %d: %s", node, update.excess)
        self.outcome.bytes_up += record(reply.content, "arrays", ArrayRecord).count_bytes()
        self.fold(update)
        # a missing train-loss is not worth rejecting the update; the stage's mean says it is unknown
        self._loss_sum += math.nan if update.train_loss is None else update.train_loss
        task = self._train_nodes[node].name
        self.outcome.participants.append(task)
        self.outcome.nodes.append(NodeReport(node, task, update.train_loss, update.val_accuracy, update.val_auc,
                                             update.seconds, round(update.update_ratio, 6), update.clipped))
        log(INFO, "stage %d: reply %d/%d from node %s accepted: train loss %s, val accuracy %s, update %.3f x base%s",
            self._stage, self.accepted, self._target(), self._name(node), _shown(update.train_loss),
            _shown(update.val_accuracy), update.update_ratio, self._progress())
        return True

    @property
    def accepted(self) -> int:
        """Valid replies so far in this stage."""
        return len(self.outcome.participants)

    def fold(self, update: TrainUpdate) -> None:
        """Take one valid update into the stage's result (with site-level DP: clipped to the DP bound)."""
        arrays = clip_update(self._base, update.arrays, self.dp_clip_norm) if self.dp == "site" else update.arrays
        self._running.add(arrays, update.num_examples)

    def next_base(self) -> dict[str, np.ndarray]:
        """The base the stage's valid updates make (with site-level DP: their noisy sum over K)."""
        aggregate = self._running.result()
        if self.dp == "site":
            rng = np.random.default_rng(noise_seed(derive_seed(self.seed, self._stage, "dp-noise"), self.dp_secure_noise))
            aggregate = noisy_sum_mean(self._base, aggregate, self._running.count, self._target(),
                                       self.dp_noise_multiplier * self.dp_clip_norm, rng)
        return mix(self._base, aggregate, self.server_mix)

    def spend_privacy(self) -> None:
        """Record what the stage released: one Gaussian event on the sites (site level), or each asked
        site's DP-SGD steps (example level; asked, since a late or rejected reply was still sent)."""
        if self.dp == "site":
            self._spend("federation", 1.0, 1)
        elif self.dp == "example":
            for card in self._train_nodes.values():
                self._spend(card.name, *example_steps(card.n_train, self.train_instructions.batch_size,
                                                      self.train_instructions.epochs))
        if self.dp != "off":
            self.outcome.epsilon, self.outcome.delta = self.privacy.worst_epsilon(), self.privacy.delta
            log(INFO, "stage %d: differential privacy (%s level): epsilon %.3f at delta %g so far",
                self._stage, self.dp, self.outcome.epsilon, self.privacy.delta)

    def _spend(self, party: str, sample_rate: float, steps: int) -> None:
        self.privacy.spend(party, self.dp_noise_multiplier, sample_rate, steps)
        self.outcome.privacy_events.append({"party": party, "noise_multiplier": self.dp_noise_multiplier,
                                            "sample_rate": sample_rate, "steps": steps})

    def replay_privacy(self, events: Iterable[dict]) -> None:
        """A resumed run's spent privacy, from its results.json's events."""
        for event in events:
            self.privacy.spend(event["party"], event["noise_multiplier"], event["sample_rate"], event["steps"])

    def _new_aggregate(self) -> Aggregate:
        return new_aggregate(self.aggregation, self.trim_fraction, self.merge_density, self._base)

    def finish_stage(self, server_round: int) -> tuple[ArrayRecord, MetricRecord]:
        """The next base from the replies folded so far; StageFailed below ``min_replies``."""
        count = self.accepted
        if count < self.min_replies:
            raise StageFailed(f"stage {server_round}: {count} valid replies, fewer than min-replies="
                              f"{self.min_replies}; rejected: {self.outcome.rejected or 'none'}")
        if count < min(self.clients_per_stage, len(self._train_nodes)):
            log(WARNING, "stage %d ends with %d of %d replies", server_round, count, self.clients_per_stage)
        new_base = self.next_base()
        self.spend_privacy()
        self.outcome.participants.sort()
        self.outcome.nodes.sort(key=lambda report: (report.task, report.node))
        self.outcome.train_loss = self._loss_sum / count
        self._running = self._new_aggregate()  # free the sums now
        return to_record(new_base), MetricRecord({"replies": count, "train-loss": self.outcome.train_loss})

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        for reply in replies:
            if self.accepted >= self.clients_per_stage:
                log(INFO, "stage %d: late reply from node %d dropped", server_round, self._sender(reply))
                continue
            self.accept_train_reply(reply)
        return self.finish_stage(server_round)

    def run_train_stage(
        self, grid: Grid, server_round: int, arrays: ArrayRecord, config: ConfigRecord | None = None
    ) -> tuple[ArrayRecord, MetricRecord]:
        """Streaming stage: push, then fold replies one by one as they arrive; stop at K."""
        pending = set(grid.push_messages(self.configure_train(server_round, arrays, config or ConfigRecord(), grid)))
        target = min(self.clients_per_stage, len(self._train_nodes))
        deadline = time.monotonic() + self.timeout
        interval = PULL_MIN
        while pending and self.accepted < target and time.monotonic() < deadline:
            replies = list(grid.pull_messages(pending))
            for reply in replies:
                pending.discard(reply.metadata.reply_to_message_id)
                if self.accepted < target:
                    self.accept_train_reply(reply)
                del reply  # never hold more than one reply's arrays
            interval = PULL_MIN if replies else min(2 * interval, PULL_MAX)
            if not replies:
                time.sleep(interval)
        if pending:
            described = self._describe(node for node in self._train_nodes if node not in self._replied)
            if self.accepted < target:
                log(WARNING, "stage %d: timed out after %.0fs; no reply from nodes %s",
                    server_round, self.timeout, described)
            else:
                log(INFO, "stage %d: K=%d replies in; late replies from %s are dropped", server_round, target, described)
        return self.finish_stage(server_round)

    # --------------------------------------------------------------- evaluate
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The base to every node with a card, held-out tasks included; with the arrival schedule, only
        to the tasks that have not trained yet (and the held-out ones)."""
        if not self.cards:
            self.query_cards(grid)
        messages = []
        sent = pack(to_numpy(arrays), self.transport_dtype)
        for node in self.evaluation_nodes(server_round):
            card = self.cards[node]
            instructions = dataclasses.replace(self.evaluate_instructions,
                                               seed=derive_seed(self.seed, "evaluate", card.name))
            content = RecordDict({"arrays": sent, "config": ConfigRecord({**instructions.to_record(), **dict(config)})})
            self.outcome.bytes_down += sent.count_bytes()
            messages.append(Message(content, dst_node_id=node, message_type=MessageType.EVALUATE,
                                    group_id=f"evaluate-{server_round}"))
        self._outbox = messages
        return messages

    def evaluation_nodes(self, server_round: int) -> list[int]:
        """The nodes that score the base after ``server_round``."""
        trained = (trained_by(self.arrival_order(), self.clients_per_stage, server_round)
                   if self.schedule == "arrival" else set())
        return [node for node in sorted(self.cards) if self.cards[node].name not in trained]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Per-task scores (example-weighted over nodes sharing a task) into ``self.outcome.per_task``.

        Every task with a card gets an entry; one without a valid reply is marked missing, with
        the reasons, so that no mean is quietly computed over fewer tasks.
        """
        asked = self.evaluation_nodes(server_round)
        scores: dict[str, list[EvalScore]] = {self.cards[node].name: [] for node in asked}
        problems: dict[str, list[str]] = {name: [] for name in scores}
        replied = set()
        for reply in replies:
            node = self._sender(reply)
            replied.add(node)
            try:
                if node not in asked:
                    raise Rejected("not asked to evaluate")
                score = _check_evaluate_reply(reply, self.cards.get(node), self.evaluate_instructions.eval_split)
            except Rejected as reason:
                log(WARNING, "stage %d evaluation: reply from node %s rejected: %s", server_round, self._name(node),
                    reason)
                if node in asked:
                    problems[self.cards[node].name].append(f"node {node}: {reason}")
                continue
            scores[self.cards[node].name].append(score)
            log(INFO, "stage %d evaluation: node %s scores accuracy %.4f, AUC %s", server_round, self._name(node),
                score.accuracy, _shown(score.auc))
        silent = set(asked) - replied
        if silent:  # a dead or hung node: the stage goes on without its score
            log(WARNING, "stage %d evaluation: no reply before the timeout from nodes %s", server_round,
                self._describe(silent))
            for node in silent:
                problems[self.cards[node].name].append(f"node {node}: no reply")
        self.outcome.per_task = {name: task_score(scores[name], problems[name], name in self.held_out)
                                 for name in sorted(scores)}
        present = {name: m["accuracy"] for name, m in self.outcome.per_task.items() if m["accuracy"] is not None}
        return MetricRecord({f"{name}/accuracy": value for name, value in present.items()}) if present else None

    def run_evaluation(self, grid: Grid, server_round: int, arrays: ArrayRecord) -> None:
        """Score ``arrays`` on every node with a card (``evaluation_nodes``); per-task results into the
        stage's outcome (none once every task has trained, with the arrival schedule)."""
        if not self.evaluation_nodes(server_round):
            log(INFO, "stage %d: every task has trained; nothing left to score", server_round)
            return
        replies = grid.send_and_receive(self.configure_evaluate(server_round, arrays, ConfigRecord(), grid),
                                        timeout=self.timeout)
        self.aggregate_evaluate(server_round, replies)

    # ---------------------------------------------------------------- helpers
    def take_outcome(self) -> StageOutcome:
        """The record of the stage that just ended; the next stage starts a fresh one."""
        finished, self.outcome = self.outcome, StageOutcome()
        if self.dp != "off" and finished.epsilon is None:  # stage 0 (or evaluation only): nothing released yet
            finished.epsilon, finished.delta = self.privacy.worst_epsilon(), self.privacy.delta
        return finished

    def _sender(self, reply: Message) -> int:
        """The node a reply answers for. Flower's own error replies (e.g. node unavailable) come from
        the SuperLink, not from the node the message was sent to: they count for that node."""
        sender = reply.metadata.src_node_id
        if sender != SUPERLINK_NODE_ID:
            return sender
        asked = {message.metadata.message_id: message.metadata.dst_node_id for message in self._outbox}
        return asked.get(reply.metadata.reply_to_message_id, sender)

    def _describe(self, nodes: Iterable[int]) -> str:
        """``id (task), ...`` for log lines that name nodes."""
        return ", ".join(self._name(node) for node in sorted(nodes))

    def _target(self) -> int:
        return min(self.clients_per_stage, len(self._train_nodes))

    def _progress(self) -> str:
        """``; 12s elapsed, ~24s left`` for a stage's log lines (the estimate from the pace so far)."""
        elapsed = time.monotonic() - self._stage_started
        done = self.accepted
        left = f", ~{elapsed / done * (self._target() - done):.0f}s left" if 0 < done < self._target() else ""
        return f"; {elapsed:.0f}s elapsed{left}"

    def _name(self, node: int) -> str:
        card = self.cards.get(node)
        return f"{node} ({card.name})" if card else str(node)

    def _start_stage(self, grid: Grid, arrays: ArrayRecord) -> None:
        if not self.cards:
            self.query_cards(grid)
        self._stage_started = time.monotonic()
        self._replied = set()
        self._base = to_numpy(arrays)
        self._running = self._new_aggregate()
        self._loss_sum = 0.0

    def _embed_dim(self) -> int:
        return int(self._base["cls_token"].shape[-1])

    def _check_train_reply(self, reply: Message) -> TrainUpdate:
        """The reply's update, fit to aggregate; Rejected says why not."""
        node = self._sender(reply)
        if node not in self._train_nodes:
            raise Rejected("not asked to train in this stage")
        if reply.has_error():
            raise Rejected(f"error reply ({reply.error.reason})")
        arrays_record = record(reply.content, "arrays", ArrayRecord)
        metrics = record(reply.content, "metrics", MetricRecord)
        if arrays_record is None or metrics is None:
            raise Rejected("reply lacks the 'arrays' or 'metrics' record")
        try:
            arrays = unpack(arrays_record, self.transport_dtype)
        except Exception as err:  # a malformed payload from one node must not crash the server
            raise Rejected(f"arrays cannot be decoded ({err})") from None
        return check_train_reply(self._base, arrays, metrics, self._train_nodes[node],
                                 max_update_ratio=self.max_update_ratio, on_excess=self.on_excess_update)


def _shown(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _check_evaluate_reply(reply: Message, card: TaskCard | None, eval_split: str) -> EvalScore:
    if card is None:
        raise Rejected("node has no task card")
    if reply.has_error():
        raise Rejected(f"error reply ({reply.error.reason})")
    metrics = record(reply.content, "metrics", MetricRecord)
    if metrics is None:
        raise Rejected("reply lacks the 'metrics' record")
    return check_eval_reply(metrics, card, eval_split)


def task_score(scores: list[EvalScore], problems: list[str], held_out: bool) -> dict:
    """One task's entry of ``per_task``: example-weighted over its nodes; ``missing`` if none replied well."""
    if not scores:
        return {"accuracy": None, "auc": None, "n_test": 0, "held_out": held_out, "missing": "; ".join(problems)}
    n_test = sum(score.n_test for score in scores)
    with_auc = [score for score in scores if score.auc is not None]
    auc = (sum(score.auc * score.n_test for score in with_auc) / sum(score.n_test for score in with_auc)
           if with_auc else None)
    return {"accuracy": sum(score.accuracy * score.n_test for score in scores) / n_test, "auc": auc,
            "n_test": n_test, "held_out": held_out}


class FedPer(StageWise):
    """FedAvg of backbones, FedPer-style: every node keeps its own head across stages."""

    node_keeps = "head"


class Local(StageWise):
    """No federation (the paper's baseline): each node fine-tunes its own copy of the stage-0 base,
    stage after stage, and is scored on it; the server's base never changes."""

    node_keeps = "model"

    def __init__(self, config: RunConfig) -> None:
        super().__init__(config)
        self.max_update_ratio = math.inf  # a node's own model drifts from the base; nothing is aggregated

    def fold(self, update: TrainUpdate) -> None:
        pass

    def next_base(self) -> dict[str, np.ndarray]:
        return self._base


class Cyclic(StageWise):
    """The base visits one node at a time: each fine-tunes what the previous one returned."""

    def run_train_stage(
        self, grid: Grid, server_round: int, arrays: ArrayRecord, config: ConfigRecord | None = None
    ) -> tuple[ArrayRecord, MetricRecord]:
        self._start_stage(grid, arrays)
        order = self.sample_train_nodes(server_round)
        rng = np.random.default_rng(derive_seed(self.seed, server_round, "visits"))
        deadline = time.monotonic() + self.timeout
        for node in [order[int(i)] for i in rng.permutation(len(order))]:
            if self.accepted >= self._target() or time.monotonic() >= deadline:
                break
            message = self.train_message(node, server_round, dict(pack(self._base, self.transport_dtype)),
                                         config or ConfigRecord())
            self._outbox = [message]
            for reply in grid.send_and_receive([message], timeout=max(0.0, deadline - time.monotonic())):
                if self.accept_train_reply(reply):
                    self._base = self._running.result()  # the next node starts from this one's backbone
                    self._running = self._new_aggregate()
            if node not in self._replied:
                log(WARNING, "stage %d: no reply from node %s before the timeout", server_round, self._name(node))
        return self.finish_stage(server_round)

    def next_base(self) -> dict[str, np.ndarray]:
        return self._base


class Centralized(StageWise):
    """Upper reference that BREAKS PRIVACY: the server trains one model (one head per task) on the
    pooled training data of every training task; nodes only score its bases."""

    def __init__(self, config: RunConfig) -> None:
        super().__init__(config)
        self.config = config
        self.heads: dict[str, dict[str, torch.Tensor]] = {}  # kept across stages, like the backbone

    def summary(self) -> None:
        log(WARNING, "strategy centralized: the server pools every task's training data (breaks privacy; "
            "an upper reference, not a federation)")
        super().summary()

    def run_train_stage(
        self, grid: Grid, server_round: int, arrays: ArrayRecord, config: ConfigRecord | None = None
    ) -> tuple[ArrayRecord, MetricRecord]:
        self._start_stage(grid, arrays)
        self._stage = server_round
        options = options_from(vars(self.config), self.config.image_size)
        tasks = {task.card.name: task for task in (load_node_task(entry, 0, 1, options)
                                                   for entry in self.config.training_datasets)}
        settings = dataclasses.replace(self.train_instructions,
                                       seed=derive_seed(self.seed, server_round, "train", "pooled")).train_settings()
        backbone = {name: torch.from_numpy(value) for name, value in self._base.items()}
        backbone, self.heads, loss = train_pooled(self.config.model, self.config.image_size, tasks, backbone,
                                                  self.heads, settings)
        self.outcome.participants = sorted(tasks)
        self.outcome.train_loss = loss
        log(INFO, "stage %d: trained on the pooled data of %s: train loss %.4f%s", server_round,
            ", ".join(sorted(tasks)), loss, self._progress())
        return to_record({name: value.numpy() for name, value in backbone.items()}), MetricRecord(
            {"replies": 0, "train-loss": loss})


# Federation strategies by name (``strategy``): each is built from the run config. ``centralized``
# pools every task's training data on the server: an upper reference that breaks privacy.
STRATEGIES: dict[str, type[StageWise]] = {"stagewise": StageWise, "fedavg": FedPer, "local": Local,
                                         "cyclic": Cyclic, "centralized": Centralized}
