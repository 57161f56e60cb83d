"""``local``: no federation (the paper's baseline). Each node fine-tunes its own copy of the stage-0
base, stage after stage, and is scored on it (it keeps its model: ``node_keeps = "model"`` in its
registry entry); the server's base never changes. It changes one decision of ``StageWise``: how
the replies become the next base (they do not)."""

from __future__ import annotations

import math

import numpy as np

from meduniverse_flwr.config import RunConfig
from meduniverse_flwr.server.strategy.stagewise import StageWise
from meduniverse_flwr.server.validation import TrainUpdate


class Local(StageWise):
    """Nodes train alone; nothing is aggregated."""

    def __init__(self, config: RunConfig) -> None:
        super().__init__(config)
        self.max_update_ratio = math.inf  # a node's own model drifts from the base; nothing is aggregated

    def fold(self, update: TrainUpdate) -> None:
        pass

    def next_base(self) -> dict[str, np.ndarray]:
        return self.base
