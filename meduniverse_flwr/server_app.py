"""ServerApp: base -> stage 0 evaluation -> ``num-stages`` x (train, aggregate, evaluate) -> results.

Thin: the learning lives in ``strategy`` (aggregation), ``model`` and ``results``.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from logging import ERROR, INFO, WARNING
from pathlib import Path

from flwr.app import ArrayRecord, Context
from flwr.common import log
from flwr.serverapp import Grid, ServerApp

from meduniverse_flwr import registry
from meduniverse_flwr.config import ConfigError, RunConfig
from meduniverse_flwr.report.run_table import format_table, run_files
from meduniverse_flwr.server.pretrain.base import ServerBase, checkpoint_backbone, initial_base, server_corpus
from meduniverse_flwr.server.pretrain.distill import read_decoder
from meduniverse_flwr.server.results import RunOutputs, stage_entry, summarize
from meduniverse_flwr.server.strategy.stagewise import StageFailed, StageWise
from meduniverse_flwr.server.tracking import Tracker

app = ServerApp()


def build_strategy(config: RunConfig) -> StageWise:
    """The run's strategy: its registry entry's class (``strategy`` or a comparison built on it), built
    from the run config. Here, not in ``strategy``: the comparisons import ``strategy``."""
    return registry.resolve(registry.STRATEGIES[config.strategy].target)(config)


def open_outputs(config: RunConfig, run_id: int) -> tuple[RunOutputs, ServerBase]:
    """A new run directory and the stage-0 base, or (``resume-from``) the old directory and its
    last completed stage's base (with the server's MAE decoder, when a curation rule keeps one)."""
    if not config.resume_from:
        run_name = f"{datetime.now(timezone.utc):%Y%m%d-%H%M%S}-run{run_id}"
        outputs = RunOutputs.create(Path(config.output_dir), run_name, config.to_run_config())  # before pretraining
        return outputs, initial_base(config)
    outputs = RunOutputs.resume(Path(config.resume_from), config.to_run_config())
    last = outputs.stages[-1]["stage"]
    log(INFO, "resuming %s after stage %d", outputs.dir, last)
    decoder_path = outputs.decoder_path(last)
    decoder = read_decoder(decoder_path, config.model, config.image_size) if decoder_path.is_file() else None
    return outputs, ServerBase(checkpoint_backbone(config, outputs.checkpoint_path(last)), decoder,
                               outputs.base.get("from", ""))


@app.main()
def main(grid: Grid, context: Context) -> None:
    try:
        config = RunConfig.from_run_config(context.run_config)
        outputs, base = open_outputs(config, context.run_id)
        log(INFO, "stage-0 base: %s", base.source)
        tracker = registry.resolve(registry.TRACKERS[config.tracker])(outputs.dir, config.to_run_config(),
                                                                      outputs.dir.name)
    except (ConfigError, ValueError, ImportError) as err:
        log(ERROR, "%s", err)
        raise
    log(INFO, "MedUniverse run: outputs in %s", outputs.dir.resolve())
    try:
        run_stages(grid, config, outputs, base, tracker)
    finally:
        tracker.close()  # a failed run is not left open in the tracker


def run_stages(grid: Grid, config: RunConfig, outputs: RunOutputs, base: ServerBase, tracker: Tracker) -> None:
    """Stage 0 (or the resumed stage), then every stage: train, checkpoint, evaluate, record."""
    strategy = build_strategy(config)
    if config.aggregation in registry.CURATION_RULES:  # it trains each next base on the server's corpus
        strategy.curator = registry.resolve(registry.CURATION_RULES[config.aggregation])(
            config, server_corpus(config), base.decoder)
    strategy.summary()
    if not strategy.query_cards(grid):
        raise RuntimeError("no node answered the task-card query; nothing to train")
    for node, card in sorted(strategy.cards.items(), key=lambda item: item[1].name):
        log(INFO, "node %d: %s (%s, %d classes, %s, %d train)", node, card.name, card.modality,
            card.n_classes, card.label_kind, card.n_train)
    outputs.tasks = {card.name: {"modality": card.modality, "n_classes": card.n_classes,
                                 "label_kind": card.label_kind, "classes": list(card.classes)}
                     for card in strategy.cards.values()}
    if config.schedule == "arrival":
        log(INFO, "arrival order (%d per stage): %s", config.clients_per_stage, ", ".join(strategy.arrival_order()))

    arrays = ArrayRecord(base.backbone)

    def finish_stage(stage: int, started: float) -> None:
        # the trained base is kept, whatever follows; the decoder a curator continues stays beside it
        outputs.save_checkpoint(stage, arrays.to_torch_state_dict(), strategy.server_state())
        if stage == 0:
            outputs.describe_base(base.source)
        strategy.run_evaluation(grid, stage, arrays)
        outputs.add_stage(stage_entry(stage, strategy.take_outcome(), time.monotonic() - started))
        entry = outputs.stages[-1]
        try:
            tracker.log_stage(entry, summarize(outputs.stages))
        except Exception as err:  # results.json and the checkpoint are written: a tracker failure costs only its copy
            log(WARNING, "tracker %s: stage %d not logged (%s)", config.tracker, stage, err)
        log(INFO, "stage %d: mean accuracy %s, %.1fs", stage, entry["mean_accuracy"], entry["seconds"])

    strategy.resume(outputs.stages)  # a resumed run goes on from what its stages spent
    if not outputs.stages:
        finish_stage(0, time.monotonic())
    for stage in range(outputs.stages[-1]["stage"] + 1, config.num_stages + 1):
        started = time.monotonic()
        log(INFO, "[STAGE %d/%d]", stage, config.num_stages)
        try:
            arrays, _ = strategy.run_train_stage(grid, stage, arrays)
        except StageFailed as err:
            log(ERROR, "%s; results up to stage %d are kept in %s (resume-from continues there)",
                err, stage - 1, outputs.dir)
            raise
        finish_stage(stage, started)

    outputs.plot()
    outputs.mark_latest()
    log(INFO, "per-stage accuracy (%s):\n%s", config.eval_mode, format_table(outputs.stages))
    log(INFO, "results:     %s", outputs.results_path.resolve())
    for line in run_files(outputs.dir.resolve()):  # the plot, checkpoints and tracker files
        log(INFO, "%s", line)
