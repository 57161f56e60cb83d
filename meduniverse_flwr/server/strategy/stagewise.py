"""``StageWise``: MedUniverse's stage-wise aggregation of heterogeneous-head ViTs, as a Flower Strategy.

One stage: every node answers a *query* with its task card (once per run); ``ceil(oversample * K)``
trainable nodes (a seeded sample) get a *train* message with the base backbone plus a fresh, seeded
head sized to their card; replies carry the fine-tuned backbone only. Each valid reply is folded
into the stage's aggregate as it arrives; K valid replies end the stage (late ones are dropped and
logged), or the timeout with at least ``min-replies``; the next base is ``(1 - server_mix) * base +
server_mix * aggregate``. Heads never enter it. With ``schedule = arrival`` (``server.schedule``, the
paper's protocol) a stage asks its K arriving tasks, each task trains once, and only the tasks still
to come (and held-out ones) score each new base.

What a strategy decides, each in one hook that a variant overrides:
- ``sample_train_nodes``: which nodes a stage asks;
- ``train_message``: what each is sent; the facts a node acts on (what it keeps, its training
  term) come from the strategy's ``registry.STRATEGIES`` entry and travel in the message;
- ``send_train``: how the messages go out (all at once, or one node after another);
- ``new_aggregate``, ``fold`` and ``next_base``: how the valid replies become the next base.
The rest is shared: grid I/O (``grid_io``), reply checks (``validation``), DP around the aggregate
(``server.privacy``), scoring (``scoring``). Comparisons: ``local``, ``cyclic`` and ``centralized``
beside this module; ``fedprox`` is this class with a node-side term (``learn.fedprox``).

Flower's own ``start()`` drives this class through ``configure_train`` / ``aggregate_train`` /
``configure_evaluate`` / ``aggregate_evaluate``; ``run_train_stage`` is the streaming form the
ServerApp uses (replies are pulled as they arrive, never all held at once). A strategy that
cannot run under ``start()`` says so by overriding ``start`` (``refuse_start``).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Iterable
from logging import INFO, WARNING

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from meduniverse_flwr.config import RunConfig
from meduniverse_flwr.learn.model import new_head_state, to_arrays
from meduniverse_flwr.server import grid_io
from meduniverse_flwr.server.aggregation import Aggregate, mix, new_aggregate
from meduniverse_flwr.server.outcome import NodeReport, StageOutcome
from meduniverse_flwr.server.privacy import server_privacy
from meduniverse_flwr.server.schedule import arrival_order, arrivals, trained_by
from meduniverse_flwr.server.scoring import reply_score, task_score
from meduniverse_flwr.server.validation import EvalScore, Rejected, TrainUpdate, check_train_reply
from meduniverse_flwr.wire.card import TaskCard
from meduniverse_flwr.wire.messages import Instructions, pack, record, to_numpy, to_record, unpack
from meduniverse_flwr.wire.seeds import derive_seed


class StageFailed(RuntimeError):
    """A stage ended (K replies never came before the timeout) with too few valid replies."""


class StageWise(Strategy):
    """Stage-wise aggregation of backbones from clients with different task heads."""

    def __init__(self, config: RunConfig) -> None:
        self.config = config
        self.clients_per_stage = config.clients_per_stage
        self.held_out = frozenset(config.held_out)
        self.timeout = config.stage_timeout
        self.max_update_ratio = config.max_update_ratio
        self.privacy = server_privacy(config)
        self.train_instructions = Instructions.for_training(config)
        self.evaluate_instructions = Instructions.for_scoring(config)
        self.cards: dict[int, TaskCard] = {}
        self.outcome = StageOutcome()
        self.base: dict[str, np.ndarray] = {}  # the stage's base backbone: what its train messages carry
        self._replied: set[int] = set()
        self._train_nodes: dict[int, TaskCard] = {}
        self._outbox: list[Message] = []  # the messages last sent (ids set by the grid on push)
        self._stage, self._stage_started = 0, time.monotonic()
        self._loss_sum = 0.0
        self._running: Aggregate = self.new_aggregate()
        self.curator = None  # a curation rule's (registry.CURATION_RULES): it trains the next base instead

    def summary(self) -> None:
        c = self.config
        log(INFO, "\t├──> %s: K=%d valid replies end a stage (of ceil(%.2f K) asked, at least %d before the "
            "timeout), aggregation=%s, server-mix=%.2f", c.strategy, c.clients_per_stage, c.oversample,
            c.min_replies, c.aggregation, c.server_mix)
        log(INFO, "\t├──> held-out tasks (evaluated only): %s", sorted(self.held_out) or "none")
        log(INFO, "\t└──> differential privacy: %s", self.privacy.describe())

    # ------------------------------------------------------------------ query
    def query_cards(self, grid: Grid) -> dict[int, TaskCard]:
        """Ask every connected node for its task card; nodes with a bad card are left out."""
        self._outbox = grid_io.card_queries(grid, self.config.image_size)
        self.cards = grid_io.ask_cards(grid, self._outbox, self.timeout)
        return self.cards

    def trainable_nodes(self) -> list[int]:
        """Nodes whose task trains, ordered by (task, node id)."""
        nodes = [n for n, card in self.cards.items() if card.name not in self.held_out]
        return sorted(nodes, key=lambda n: (self.cards[n].name, n))

    def arrival_order(self) -> list[str]:
        """The trainable tasks in the order they arrive (``schedule = arrival``)."""
        return arrival_order({self.cards[node].name for node in self.trainable_nodes()}, self.clients_per_stage,
                             self.config.seed)

    # ------------------------------------------------------- the decisions
    def sample_train_nodes(self, server_round: int) -> list[int]:
        """The stage's ``ceil(oversample * K)`` trainable nodes (a seeded sample, in node order); with the
        arrival schedule, the nodes of the stage's K arriving tasks."""
        if self.config.schedule == "arrival":
            arriving = set(arrivals(self.arrival_order(), self.clients_per_stage, server_round))
            candidates = [node for node in self.trainable_nodes() if self.cards[node].name in arriving]
        else:
            candidates = self.trainable_nodes()
        if self.clients_per_stage > len(candidates):
            log(WARNING, "clients-per-stage=%d but only %d trainable nodes: the stage ends after %d replies",
                self.clients_per_stage, len(candidates), len(candidates))
        # ask M = ceil(oversample * K) nodes so that slow or dead ones do not hold the stage up
        m = min(len(candidates), math.ceil(self.config.oversample * self.clients_per_stage))
        rng = np.random.default_rng(derive_seed(self.config.seed, server_round, "sample"))
        # indices, not ids: node ids are 64-bit unsigned, which a NumPy array of them can turn into floats
        sampled = (sorted(candidates[int(i)] for i in rng.choice(len(candidates), size=m, replace=False))
                   if m < len(candidates) else candidates)
        self._train_nodes = {node: self.cards[node] for node in sampled}
        self._stage = server_round
        log(INFO, "stage %d: asked %d node(s) to train: %s", server_round, len(sampled), self._describe(sampled))
        return sampled

    def train_message(self, node: int, server_round: int, base: dict[str, Array], config: ConfigRecord) -> Message:
        """One node's train message: ``base`` (packed) plus a fresh, seeded head sized to its card."""
        card, seed = self.cards[node], self.config.seed
        head = pack(to_arrays(new_head_state(self._embed_dim(), card.n_classes,
                                             derive_seed(seed, server_round, "head", card.name))),
                    self.config.transport_dtype)
        sent = dataclasses.replace(self.train_instructions, seed=derive_seed(seed, server_round, "train", card.name))
        content = RecordDict({"arrays": ArrayRecord({**base, **head}),
                              "config": ConfigRecord({**sent.to_record(), **dict(config)})})
        self.outcome.bytes_down += content["arrays"].count_bytes()
        return Message(content, dst_node_id=node, message_type=MessageType.TRAIN, group_id=f"stage-{server_round}")

    def new_aggregate(self) -> Aggregate:
        """The stage's aggregate of valid updates (``aggregation``), inside the run's DP."""
        c = self.config
        aggregate = new_aggregate(c.aggregation, c.trim_fraction, c.merge_density, self.base)
        return self.privacy.wrap(aggregate, self.base, self.target, self._stage)

    def next_base(self) -> dict[str, np.ndarray]:
        """The base the stage's valid updates make: mixed from their aggregate, or trained from them on the
        server's corpus by a curator (its compute counted in the stage's ``server_seconds``)."""
        if self.curator is None:
            return mix(self.base, self._running.result(), self.config.server_mix)
        curated = self.curator.next_base(self.base, self._running.updates, self._stage)
        self.outcome.server_seconds = round(self.curator.seconds, 3)
        return mix(self.base, curated, self.config.server_mix)

    def server_state(self) -> dict | None:
        """What the server keeps beside each base and never sends (a curator's MAE decoder), or None."""
        return None if self.curator is None else self.curator.decoder

    # ------------------------------------------------------------------ train
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Base backbone + a fresh head per node's card; starts the stage's aggregate."""
        return self._train_messages(server_round, self._begin_training(grid, server_round, arrays), config)

    def _begin_training(self, grid: Grid, server_round: int, arrays: ArrayRecord) -> list[int]:
        """The stage's nodes to train, with its aggregate started."""
        self.start_stage(grid, server_round, arrays)
        sampled = self.sample_train_nodes(server_round)
        self._running = self.new_aggregate()  # its DP denominator is the stage's K, known from here
        return sampled

    def _train_messages(self, server_round: int, nodes: list[int], config: ConfigRecord) -> list[Message]:
        # serialise the base once; every message shares its arrays and adds its own head
        base = dict(pack(self.base, self.config.transport_dtype))
        self._outbox = [self.train_message(node, server_round, base, config) for node in nodes]
        return self._outbox

    def accept_train_reply(self, reply: Message) -> bool:
        """Validate one reply and fold it into the running aggregate; log why if rejected."""
        node = grid_io.sender(reply, self._outbox)
        self._replied.add(node)
        try:
            update = self._check_train_reply(reply, node)
        except Rejected as reason:
            self.outcome.rejected.append(f"node {node}: {reason}")
            log(WARNING, "stage %d: reply from node %s rejected: %s%s", self._stage, self._name(node), reason,
                self.progress())
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
            self._stage, self.accepted, self.target, self._name(node), _shown(update.train_loss),
            _shown(update.val_accuracy), update.update_ratio, self.progress())
        return True

    @property
    def accepted(self) -> int:
        """Valid replies so far in this stage."""
        return len(self.outcome.participants)

    def fold(self, update: TrainUpdate) -> None:
        """Take one valid update into the stage's aggregate."""
        self._running.add(update.arrays, update.num_examples)

    def finish_stage(self, server_round: int) -> tuple[ArrayRecord, MetricRecord]:
        """The next base from the replies folded so far; StageFailed below ``min_replies``."""
        count = self.accepted
        if count < self.config.min_replies:
            raise StageFailed(f"stage {server_round}: {count} valid replies, fewer than min-replies="
                              f"{self.config.min_replies}; rejected: {self.outcome.rejected or 'none'}")
        if count < self.target:
            log(WARNING, "stage %d ends with %d of %d replies", server_round, count, self.clients_per_stage)
        new_base = self.next_base()
        self._spend_privacy()
        self.outcome.participants.sort()
        self.outcome.nodes.sort(key=lambda report: (report.task, report.node))
        self.outcome.train_loss = self._loss_sum / count
        self._running = self.new_aggregate()  # free the sums now
        return to_record(new_base), MetricRecord({"replies": count, "train-loss": self.outcome.train_loss})

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        for reply in replies:
            if self.accepted >= self.clients_per_stage:
                log(INFO, "stage %d: late reply from node %d dropped", server_round,
                    grid_io.sender(reply, self._outbox))
                continue
            self.accept_train_reply(reply)
        return self.finish_stage(server_round)

    def run_train_stage(
        self, grid: Grid, server_round: int, arrays: ArrayRecord, config: ConfigRecord | None = None
    ) -> tuple[ArrayRecord, MetricRecord]:
        """Streaming stage: the train messages go out (``send_train``), replies are folded as they arrive."""
        nodes = self._begin_training(grid, server_round, arrays)
        self.send_train(grid, server_round, nodes, config or ConfigRecord(), self.timeout)
        return self.finish_stage(server_round)

    def send_train(self, grid: Grid, server_round: int, nodes: list[int], config: ConfigRecord,
                   timeout: float) -> None:
        """How a stage's train messages go out: to all ``nodes`` at once, each reply validated and folded
        (``accept_train_reply``) as it arrives, until ``target`` valid replies or ``timeout`` seconds."""
        messages = self._train_messages(server_round, nodes, config)
        silent = grid_io.stream(grid, messages, self.target, timeout, self.accept_train_reply)
        if silent:
            if self.accepted < self.target:
                log(WARNING, "stage %d: timed out after %.0fs; no reply from nodes %s",
                    server_round, timeout, self._describe(silent))
            else:
                log(INFO, "stage %d: K=%d replies in; late replies from %s are dropped", server_round,
                    self.target, self._describe(silent))

    # --------------------------------------------------------------- evaluate
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The base to every node with a card, held-out tasks included; with the arrival schedule, only
        to the tasks that have not trained yet (and the held-out ones)."""
        if not self.cards:
            self.query_cards(grid)
        messages = []
        sent = pack(to_numpy(arrays), self.config.transport_dtype)
        for node in self.evaluation_nodes(server_round):
            card = self.cards[node]
            instructions = dataclasses.replace(self.evaluate_instructions,
                                               seed=derive_seed(self.config.seed, "evaluate", card.name))
            content = RecordDict({"arrays": sent, "config": ConfigRecord({**instructions.to_record(), **dict(config)})})
            self.outcome.bytes_down += sent.count_bytes()
            messages.append(Message(content, dst_node_id=node, message_type=MessageType.EVALUATE,
                                    group_id=f"evaluate-{server_round}"))
        self._outbox = messages
        return messages

    def evaluation_nodes(self, server_round: int) -> list[int]:
        """The nodes that score the base after ``server_round``: every node, or with the arrival schedule
        the tasks still to come (``eval-tasks = unseen``) or only the next stage's arrivals (``arriving``:
        what the arrival gain needs), and the held-out tasks; stage 0 (the MIM base) is scored by all."""
        if self.config.schedule != "arrival":
            return sorted(self.cards)
        order = self.arrival_order()
        skipped = trained_by(order, self.clients_per_stage, server_round)
        if self.config.eval_tasks == "arriving" and server_round > 0:
            arriving = arrivals(order, self.clients_per_stage, server_round + 1) \
                if server_round < self.config.num_stages else []  # after the last stage nobody arrives
            skipped |= set(order) - set(arriving)
        return [node for node in sorted(self.cards) if self.cards[node].name not in skipped]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Per-task scores (example-weighted over nodes sharing a task) into ``self.outcome.per_task``."""
        asked = self.evaluation_nodes(server_round)
        split = self.config.eval_split
        scores: dict[str, list[EvalScore]] = {self.cards[node].name: [] for node in asked}
        problems: dict[str, list[str]] = {name: [] for name in scores}
        replied = set()
        for reply in replies:
            node = grid_io.sender(reply, self._outbox)
            replied.add(node)
            try:
                if node not in asked:
                    raise Rejected("not asked to evaluate")
                score = reply_score(reply, self.cards.get(node), split)
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
        self.outcome.per_task = {name: task_score(scores[name], problems[name], name in self.held_out, split)
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

    # ------------------------------------------------------------ run state
    def resume(self, stages: list[dict]) -> None:
        """Go on from a resumed run's finished stages: the privacy they spent (from results.json)."""
        for entry in stages:
            self.privacy.spend(entry.get("privacy_events", []))

    def take_outcome(self) -> StageOutcome:
        """The record of the stage that just ended; the next stage starts a fresh one."""
        finished, self.outcome = self.outcome, StageOutcome()
        spent = self.privacy.epsilon()
        if spent is not None and finished.epsilon is None:  # stage 0 (or evaluation only): nothing released yet
            finished.epsilon, finished.delta = spent
        return finished

    # ---------------------------------------------------------------- helpers
    def _spend_privacy(self) -> None:
        """Record what the stage released (``server.privacy``); asked nodes count, since a late or
        rejected reply was still sent."""
        events = self.privacy.released(self._train_nodes.values())
        self.privacy.spend(events)
        self.outcome.privacy_events.extend(events)
        spent = self.privacy.epsilon()
        if spent is not None:
            self.outcome.epsilon, self.outcome.delta = spent
            log(INFO, "stage %d: differential privacy (%s level): epsilon %.3f at delta %g so far",
                self._stage, self.config.dp, *spent)

    def _describe(self, nodes: Iterable[int]) -> str:
        """``id (task), ...`` for log lines that name nodes."""
        return ", ".join(self._name(node) for node in sorted(nodes))

    @property
    def target(self) -> int:
        """The valid replies that end the stage: K, or every node asked where fewer were."""
        return min(self.clients_per_stage, len(self._train_nodes))

    def progress(self) -> str:
        """``; 12s elapsed, ~24s left`` for a stage's log lines (the estimate from the pace so far)."""
        elapsed = time.monotonic() - self._stage_started
        done = self.accepted
        left = f", ~{elapsed / done * (self.target - done):.0f}s left" if 0 < done < self.target else ""
        return f"; {elapsed:.0f}s elapsed{left}"

    def _name(self, node: int) -> str:
        card = self.cards.get(node)
        return f"{node} ({card.name})" if card else str(node)

    def start_stage(self, grid: Grid, server_round: int, arrays: ArrayRecord) -> None:
        """A stage begins from ``arrays``: the nodes' cards asked once per run, the stage's counters reset."""
        self._stage = server_round
        if not self.cards:
            self.query_cards(grid)
        self._stage_started = time.monotonic()
        self._replied = set()
        self.base = to_numpy(arrays)
        self._loss_sum = 0.0

    def _embed_dim(self) -> int:
        return int(self.base["cls_token"].shape[-1])

    def _check_train_reply(self, reply: Message, node: int) -> TrainUpdate:
        """The reply's update, fit to aggregate; Rejected says why not."""
        if node not in self._train_nodes:
            raise Rejected("not asked to train in this stage")
        arrays_record, metrics = grid_io.reply_records(reply, ("arrays", ArrayRecord), ("metrics", MetricRecord))
        try:
            arrays = unpack(arrays_record, self.config.transport_dtype)
        except Exception as err:  # a malformed payload from one node must not crash the server
            raise Rejected(f"arrays cannot be decoded ({err})") from None
        return check_train_reply(self.base, arrays, metrics, self._train_nodes[node],
                                 max_update_ratio=self.max_update_ratio, on_excess=self.config.on_excess_update)


def refuse_start(strategy: StageWise, why: str) -> None:
    """For a strategy that Flower's ``start()`` cannot drive: a one-line error saying why."""
    raise NotImplementedError(f"strategy '{strategy.config.strategy}' cannot run under Flower's Strategy.start(): "
                              f"{why}; run it with the MedUniverse ServerApp (server_app.run_stages)")


def _shown(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"
