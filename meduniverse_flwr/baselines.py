"""Comparison strategies that change one decision of ``StageWise`` each.

``fedavg`` (FedPer: each node keeps its own head) and ``fedprox`` (a proximal term in each site's
loss) change only facts a node acts on: they are ``StageWise`` with their registry entry.
``Local`` changes how replies become the next base (they do not: no federation), ``Cyclic`` the
order of training (one node after another).
"""

from __future__ import annotations

import math
import time
from logging import WARNING

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid

from .config import RunConfig
from .messages import pack
from .seeds import derive_seed
from .strategy import StageWise, refuse_start
from .validation import TrainUpdate


class Local(StageWise):
    """No federation (the paper's baseline): each node fine-tunes its own copy of the stage-0 base,
    stage after stage, and is scored on it (it keeps its model: ``node_keeps = "model"``); the
    server's base never changes."""

    def __init__(self, config: RunConfig) -> None:
        super().__init__(config)
        self.max_update_ratio = math.inf  # a node's own model drifts from the base; nothing is aggregated

    def fold(self, update: TrainUpdate) -> None:
        pass

    def next_base(self) -> dict[str, np.ndarray]:
        return self._base


class Cyclic(StageWise):
    """The base visits one node at a time: each fine-tunes what the previous one returned."""

    def start(self, *args, **kwargs):
        refuse_start(self, "it sends one node at a time, each the previous node's backbone, where start() "
                           "sends a stage's messages at once")

    def run_train_stage(
        self, grid: Grid, server_round: int, arrays: ArrayRecord, config: ConfigRecord | None = None
    ) -> tuple[ArrayRecord, MetricRecord]:
        self._start_stage(grid, arrays)
        order = self.sample_train_nodes(server_round)
        self._running = self.new_aggregate()
        rng = np.random.default_rng(derive_seed(self.config.seed, server_round, "visits"))
        deadline = time.monotonic() + self.timeout
        for node in [order[int(i)] for i in rng.permutation(len(order))]:
            if self.accepted >= self._target() or time.monotonic() >= deadline:
                break
            message = self.train_message(node, server_round, dict(pack(self._base, self.config.transport_dtype)),
                                         config or ConfigRecord())
            self._outbox = [message]
            for reply in grid.send_and_receive([message], timeout=max(0.0, deadline - time.monotonic())):
                if self.accept_train_reply(reply):
                    self._base = self._running.result()  # the next node starts from this one's backbone
                    self._running = self.new_aggregate()
            if node not in self._replied:
                log(WARNING, "stage %d: no reply from node %s before the timeout", server_round, self._name(node))
        return self.finish_stage(server_round)

    def next_base(self) -> dict[str, np.ndarray]:
        return self._base
