"""ServerApp: base -> stage 0 evaluation -> ``num-stages`` x (train, aggregate, evaluate) -> results.

Thin: the learning lives in ``strategy`` (aggregation), ``model`` and ``results``.
"""

from __future__ import annotations

import time
import zlib
from datetime import datetime, timezone
from logging import ERROR, INFO, WARNING
from pathlib import Path

import torch
from flwr.app import ArrayRecord, Context
from flwr.common import log
from flwr.serverapp import Grid, ServerApp

from . import registry
from .config import ConfigError, RunConfig
from .data import cache_root, options_from
from .data.corpus import load_corpus
from .model import create_backbone, load_backbone, load_pretrained
from .pretrain import PretrainSettings, pretrain
from .run_table import format_table, run_files
from .results import RunOutputs, stage_entry, summarize
from .strategy import StageFailed, build_strategy
from .tracking import Tracker, open_tracker

app = ServerApp()


def initial_base(config: RunConfig) -> dict[str, torch.Tensor]:
    """The stage-0 base: MIM-pretrained on the server (``mae`` / ``simmim``), loaded from a
    checkpoint (a path), or a seeded random initialisation (``none``)."""
    if config.pretrain == "none":
        torch.manual_seed(config.seed)
        return create_backbone(config.model, config.image_size).state_dict()
    if config.pretrain in registry.PRETRAIN_METHODS:
        # held-out domains stay unseen, test splits are never used
        corpus = load_corpus(config.pretrain_corpus or config.training_datasets,
                             options_from(vars(config), config.image_size), archived=config.training_datasets)
        settings = PretrainSettings(method=config.pretrain, epochs=config.pretrain_epochs, seed=config.seed,
                                    input_norm=config.input_norm)
        log(INFO, "pretraining the base: %s, %d epochs on %d unlabeled images", config.pretrain,
            config.pretrain_epochs, len(corpus))
        path = pretrain(config.model, config.image_size, corpus, settings,
                        pretrain_cache_dir(config, settings, len(corpus)), config.device).encoder_path
    else:  # a checkpoint of the model's width and depth, from anywhere: fitted to the run's sizes
        path = Path(config.pretrain).expanduser()
        backbone = create_backbone(config.model, config.image_size)
        for line in load_pretrained(path, backbone):
            log(INFO, "stage-0 base from %s: %s", path, line)
        log(INFO, "stage-0 base loaded from %s", path)
        return backbone.state_dict()
    log(INFO, "stage-0 base loaded from %s", path)
    return base_from_checkpoint(config, path)


def base_from_checkpoint(config: RunConfig, path: Path) -> dict[str, torch.Tensor]:
    """A backbone checkpoint, checked strictly against the run's model (one-line error if it does not fit)."""
    backbone = create_backbone(config.model, config.image_size)
    load_backbone(path, backbone)
    return backbone.state_dict()


def pretrain_cache_dir(config: RunConfig, settings: PretrainSettings, n_images: int) -> Path:
    """Pretraining is deterministic in its settings: runs with the same ones share (and resume) it."""
    key = (f"{config.model}-{config.image_size}-{config.training_datasets}-{config.pretrain_corpus}-"
           f"{config.archive_share}-{n_images}-{settings}")
    return cache_root(config.data_root) / "pretrain" / f"{settings.method}-{config.model}-{zlib.crc32(key.encode()):08x}"


def open_outputs(config: RunConfig, run_id: int) -> tuple[RunOutputs, dict[str, torch.Tensor]]:
    """A new run directory and the stage-0 base, or (``resume-from``) the old directory and its
    last completed stage's base."""
    if not config.resume_from:
        run_name = f"{datetime.now(timezone.utc):%Y%m%d-%H%M%S}-run{run_id}"
        outputs = RunOutputs.create(Path(config.output_dir), run_name, config.to_run_config())  # before pretraining
        return outputs, initial_base(config)
    outputs = RunOutputs.resume(Path(config.resume_from), config.to_run_config())
    last = outputs.stages[-1]["stage"]
    log(INFO, "resuming %s after stage %d", outputs.dir, last)
    return outputs, base_from_checkpoint(config, outputs.checkpoint_path(last))


@app.main()
def main(grid: Grid, context: Context) -> None:
    try:
        config = RunConfig.from_run_config(context.run_config)
        outputs, base = open_outputs(config, context.run_id)
        tracker = open_tracker(config.tracker, outputs.dir, config.to_run_config(), outputs.dir.name)
    except (ConfigError, ValueError, ImportError) as err:
        log(ERROR, "%s", err)
        raise
    log(INFO, "MedUniverse run: outputs in %s", outputs.dir.resolve())
    try:
        run_stages(grid, config, outputs, base, tracker)
    finally:
        tracker.close()  # a failed run is not left open in the tracker


def run_stages(grid: Grid, config: RunConfig, outputs: RunOutputs, base: dict[str, torch.Tensor],
               tracker: Tracker) -> None:
    """Stage 0 (or the resumed stage), then every stage: train, checkpoint, evaluate, record."""
    strategy = build_strategy(config)
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

    arrays = ArrayRecord(base)

    def finish_stage(stage: int, started: float) -> None:
        outputs.save_checkpoint(stage, arrays.to_torch_state_dict())  # the trained base is kept, whatever follows
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
