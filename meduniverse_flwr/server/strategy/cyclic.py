"""``cyclic``: the base visits one node at a time, each fine-tuning what the previous one returned
(cyclic weight transfer). It changes two decisions of ``StageWise``: how the train messages go out
(``send_train``: one node after another, in a seeded order) and how a valid reply moves the base
(``fold``: the next node starts from this one's backbone)."""

from __future__ import annotations

import time

import numpy as np
from flwr.app import ConfigRecord
from flwr.serverapp import Grid

from meduniverse_flwr.server.strategy.stagewise import StageWise, refuse_start
from meduniverse_flwr.server.validation import TrainUpdate
from meduniverse_flwr.wire.seeds import derive_seed


class Cyclic(StageWise):
    """One node after another; the stage's base is the last valid reply's backbone."""

    def start(self, *args, **kwargs):
        refuse_start(self, "it sends one node at a time, each the previous node's backbone, where start() "
                           "sends a stage's messages at once")

    def send_train(self, grid: Grid, server_round: int, nodes: list[int], config: ConfigRecord,
                   timeout: float) -> None:
        """The stage's nodes in a seeded order, each sent the base as the previous one left it, until
        ``target`` valid replies or ``timeout`` seconds for the whole stage."""
        rng = np.random.default_rng(derive_seed(self.config.seed, server_round, "visits"))
        deadline = time.monotonic() + timeout
        for node in [nodes[int(i)] for i in rng.permutation(len(nodes))]:
            if self.accepted >= self.target or time.monotonic() >= deadline:
                break
            super().send_train(grid, server_round, [node], config, max(0.0, deadline - time.monotonic()))

    def fold(self, update: TrainUpdate) -> None:
        self.base = dict(update.arrays)  # the next node starts from this one's backbone

    def next_base(self) -> dict[str, np.ndarray]:
        return self.base
