"""The runs of the arrival report (``report.arrival``): read and checked, the arm each belongs to, the
stage each task arrives (trains) at, and the stage-wise run a control is measured against."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meduniverse_flwr.common.text import safe_label
from meduniverse_flwr.config import declared_defaults
from meduniverse_flwr.server.results import config_value, read_results

RANDOM_INIT = "random init"
CLIENT_RECIPE = ("client-lr", "client-layer-decay", "client-head-epochs")
DEFAULTS = declared_defaults()


@dataclass(frozen=True)
class ArrivalRun:
    results_path: Path
    config: dict[str, Any]
    stages: list[dict[str, Any]]
    tasks: dict[str, dict[str, Any]]  # task -> {"modality": str, "classes": [str]}, from results.json's "tasks"
    arm: str
    seed: int
    eval_labels: int
    num_stages: int

    @property
    def control(self) -> bool:
        """The run scores only its starting base (random init, a base pretrained longer)."""
        return self.num_stages == 0

    def sent(self, arrival: int) -> dict[str, Any]:
        """The stage entry that scores a task arriving at stage ``arrival``: the base it was sent
        (``arrival - 1``), or a control's one base."""
        return self.stages[0 if self.control else arrival - 1]


def _is_int(value: Any, low: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_name(value: Any) -> bool:
    return isinstance(value, str) and value != ""


CONFIG_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "seed": (lambda v: isinstance(v, int) and not isinstance(v, bool), "must be an integer"),
    "eval-labels": (_is_int, "must be an integer >= 0"),
    "num-stages": (_is_int, "must be an integer >= 0"),
    "pretrain": (_is_name, "must be a name or a path"),
    "pretrain-epochs": (_is_int, "must be an integer >= 0"),
    "aggregation": (_is_name, "must be a rule name"),
    "server-mix": (_is_number, "must be a number"),
    "merge-density": (_is_number, "must be a number"),
    "pretrain-continue-epochs": (_is_int, "must be an integer >= 0"),
    "distill-weight": (_is_number, "must be a number"),
    "distill-epochs": (_is_int, "must be an integer >= 0"),
    "distill-tokens": (_is_name, "must be a token choice"),
    "client-lr": (_is_number, "must be a number"),
    "client-layer-decay": (_is_number, "must be a number"),
    "client-head-epochs": (_is_int, "must be an integer >= 0"),
    "datasets": (lambda v: isinstance(v, str), "must be a comma-separated string"),
    "eval-mode": (_is_name, "must be a protocol name"),
}


def _task_cards(cards: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The facts the per-task table shows of results.json's ``tasks`` (checked by ``read_results``)."""
    return {name: {"modality": card.get("modality", ""), "classes": list(card.get("classes", []))}
            for name, card in cards.items()}


def with_defaults(config: dict[str, Any]) -> dict[str, Any]:
    """Keys newer than the file take their declared defaults, except the clients' own recipe: a file
    written before it existed trained its clients with the scoring recipe (``lr``, ``layer-decay``)."""
    scoring = {**DEFAULTS, **config}
    before_recipe = {"client-lr": scoring["lr"], "client-layer-decay": scoring["layer-decay"], "client-head-epochs": 0}
    return {**DEFAULTS, **before_recipe, **config}


def arm_label(config: dict[str, Any]) -> str:
    """The arm a run belongs to, from its (checked) config; seeds of one arm share it. A client recipe
    other than the declared one is part of a stage-wise arm's name (runs of a recipe grid differ in it)."""
    config = with_defaults(config)
    pretrain = config["pretrain"]
    if config["num-stages"] == 0:
        if pretrain == "none":
            return RANDOM_INIT
        epochs = f", {config['pretrain-epochs']} epochs" if pretrain in ("mae", "simmim") else ""
        if config["pretrain-continue-epochs"]:
            epochs += f" + {config['pretrain-continue-epochs']} continued"
        return f"{safe_label(pretrain)} base{epochs} (no stages)"
    label = f"stage-wise: {safe_label(config['aggregation'])}"
    if config["server-mix"] != 1:
        label += f", mix {config['server-mix']:g}"
    if config["aggregation"] == "ties":
        label += f", density {config['merge-density']:g}"
    if config["aggregation"] == "distill":
        label += (f", weight {config['distill-weight']:g}, {config['distill-epochs']} epochs, "
                  f"{safe_label(config['distill-tokens'])} tokens")
    recipe = {key: config[key] for key in CLIENT_RECIPE}
    if recipe != {key: DEFAULTS[key] for key in CLIENT_RECIPE}:
        label += (f"; client lr {recipe['client-lr']:g}, layer decay {recipe['client-layer-decay']:g}, "
                  f"head epochs {recipe['client-head-epochs']}")
    return label + (", from random init" if pretrain == "none" else "")


def read_run(results_path: Path) -> ArrivalRun:
    """A checked results.json with the config fields the arms need (missing keys take their declared
    defaults); ValueError (one line, naming the file) otherwise."""
    payload = read_results(results_path)
    config = dict(payload["config"])
    defaults = with_defaults(config)
    for key, (ok, why) in CONFIG_CHECKS.items():
        config[key] = config_value(results_path, config, key, defaults.get(key), ok, why)
    return ArrivalRun(results_path, config, payload["stages"], _task_cards(payload.get("tasks", {})),
                      arm_label(config), config["seed"], config["eval-labels"], config["num-stages"])


def arrival_stages(stages: list[dict[str, Any]]) -> dict[str, int]:
    """Task -> the stage it trained in (its ``participants``); ValueError when one trains twice."""
    arrival: dict[str, int] = {}
    for stage in stages[1:]:
        for task in stage["participants"]:
            if task in arrival:
                raise ValueError(f"task {safe_label(task)!r} trains in stages {arrival[task]} and {stage['stage']}")
            arrival[task] = stage["stage"]
    return arrival


def usable_runs(runs: list[ArrivalRun]) -> tuple[list[ArrivalRun], list[str]]:
    """The runs a report can use, one per (arm, eval-labels, seed), the first given; notes say why
    the others are left out (not an arrival run, unfinished, a task trained twice, no arrival)."""
    kept: dict[tuple[str, int, int], ArrivalRun] = {}
    notes = []
    for run in runs:
        key = (run.arm, run.eval_labels, run.seed)
        why = None
        if run.config.get("schedule") != "arrival":
            why = f"schedule {safe_label(str(run.config.get('schedule')))!r}, not an arrival run"
        elif len(run.stages) <= run.num_stages:
            why = f"unfinished ({len(run.stages)} of {run.num_stages + 1} stages)"
        elif not run.control:
            try:
                why = None if arrival_stages(run.stages) else "no task trained in any stage"
            except ValueError as err:
                why = str(err)
        if why is None and key in kept and run.results_path.resolve() != kept[key].results_path.resolve():
            why = f"same arm, eval-labels and seed as {kept[key].results_path}"
        if why is not None:
            notes.append(f"{run.results_path}: {why}, left out")
        elif key not in kept:
            kept[key] = run
    return list(kept.values()), notes


def arm_order(run: ArrivalRun) -> tuple[int, str]:
    """Stage-wise arms first, then the longer-pretrained controls, random init last."""
    return (2 if run.arm == RANDOM_INIT else int(run.control), run.arm)


def level_order(level: int) -> tuple[bool, int]:
    """Label-scarce levels first (ascending), all labels (0) last."""
    return level == 0, level


def level_label(level: int) -> str:
    return "eval-labels = all" if level == 0 else f"eval-labels = {level}"


def find_reference(control: ArrivalRun, runs: list[ArrivalRun]) -> ArrivalRun | None:
    """The stage-wise run a control is compared with: same seed, eval-labels, datasets (hence the
    same arrival order) and eval-mode; the first in arm order, one started from a pretrained base first."""
    same = [run for run in runs if not run.control and run.seed == control.seed
            and run.eval_labels == control.eval_labels
            and all(run.config[k] == control.config[k] for k in ("datasets", "eval-mode"))]
    return min(same, key=lambda run: (run.config["pretrain"] == "none", arm_order(run)), default=None)
