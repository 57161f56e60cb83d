"""How good a base is for one task: an evaluation protocol (``eval-mode``, ``registry.EVAL_PROTOCOLS``:
linear probe or the paper's fine-tuning, both in ``finetune``) trained on the scoring labels and scored
on the evaluation split. Nothing trained here leaves the site, only the scores."""

from __future__ import annotations

import dataclasses

import torch

from meduniverse_flwr import registry
from meduniverse_flwr.data.node_task import NodeTask, TaskData
from meduniverse_flwr.data.partition import stratified_subset, stratify_by
from meduniverse_flwr.learn.finetune import TrainSettings, eval_data


def scoring_labels(train: TaskData, count: int, seed: int) -> TaskData:
    """The ``count`` labelled examples (stratified by class, seeded) an evaluation may train on; all if 0.
    The seed is the task's evaluation seed, so every base of a run is scored with the same labels."""
    index = torch.from_numpy(stratified_subset(stratify_by(train.labels.numpy().reshape(len(train), -1)), count, seed))
    return train if len(index) == len(train) else TaskData(train.images[index], train.labels[index])


def evaluate_base(
    model_name: str, image_size: int, task: NodeTask, backbone: dict[str, torch.Tensor], eval_mode: str,
    settings: TrainSettings,
) -> dict[str, float]:
    """How good ``backbone`` is for this task: a fresh head trained on the train split, scored on the
    ``settings.eval_split`` split (test by default; with val the test split is never read), with
    ``settings.eval_labels`` of the train split's labels (0: all).
    ``n-scored`` is the number of examples scored. Evaluation never uses DP-SGD: nothing trained here
    leaves the site, only the scores."""
    settings = dataclasses.replace(settings, dp_sgd=None)
    torch.manual_seed(settings.seed)
    labelled = scoring_labels(task.train, settings.eval_labels, settings.seed)
    protocol = registry.resolve(registry.EVAL_PROTOCOLS[eval_mode].target)
    scores = protocol(model_name, image_size, dataclasses.replace(task, train=labelled), backbone, settings)
    return {**scores, "n-scored": len(eval_data(task, settings.eval_split))}
