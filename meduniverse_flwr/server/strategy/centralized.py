"""``centralized``: the upper reference that BREAKS PRIVACY (``registry``: ``breaks_privacy``).

The server trains one model (one head per task) on the pooled training data of every training
task (``learn.pooled.train_pooled``); nodes only score its bases. Its task heads live in server
memory across stages, so a run of it cannot resume.
"""

from __future__ import annotations

import dataclasses
from logging import INFO, WARNING

import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid

from meduniverse_flwr.config import RunConfig
from meduniverse_flwr.data.node_task import load_node_task
from meduniverse_flwr.data.options import options_from
from meduniverse_flwr.learn.finetune import settings_for
from meduniverse_flwr.learn.model import to_arrays, to_tensors
from meduniverse_flwr.learn.pooled import train_pooled
from meduniverse_flwr.server.strategy.stagewise import StageWise, refuse_start
from meduniverse_flwr.wire.messages import to_record
from meduniverse_flwr.wire.seeds import derive_seed


class Centralized(StageWise):
    """Pools every training task's data on the server and trains there."""

    def __init__(self, config: RunConfig) -> None:
        super().__init__(config)
        self.heads: dict[str, dict[str, torch.Tensor]] = {}  # kept across stages, like the backbone

    def summary(self) -> None:
        log(WARNING, "strategy centralized: the server pools every task's training data (breaks privacy; "
            "an upper reference, not a federation)")
        super().summary()

    def start(self, *args, **kwargs):
        refuse_start(self, "it trains on the server, where start() sends train messages to nodes")

    def resume(self, stages: list[dict]) -> None:
        if stages:
            raise ValueError("resume-from: strategy 'centralized' keeps its task heads in server memory only; "
                             "run it again from the start")

    def run_train_stage(
        self, grid: Grid, server_round: int, arrays: ArrayRecord, config: ConfigRecord | None = None
    ) -> tuple[ArrayRecord, MetricRecord]:
        self.start_stage(grid, server_round, arrays)
        c = self.config
        options = options_from(vars(c), c.image_size)
        tasks = {task.card.name: task for task in (load_node_task(entry, 0, 1, options)
                                                   for entry in c.training_datasets)}
        settings = settings_for(dataclasses.replace(self.train_instructions,
                                                    seed=derive_seed(c.seed, server_round, "train", "pooled")))
        backbone = to_tensors(self.base)
        backbone, self.heads, loss = train_pooled(c.model, c.image_size, tasks, backbone, self.heads, settings)
        self.outcome.participants = sorted(tasks)
        self.outcome.train_loss = loss
        log(INFO, "stage %d: trained on the pooled data of %s: train loss %.4f%s", server_round,
            ", ".join(sorted(tasks)), loss, self.progress())
        return to_record(to_arrays(backbone)), MetricRecord(
            {"replies": 0, "train-loss": loss})
