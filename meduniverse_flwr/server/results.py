"""Run outputs: ``results.json`` (rewritten after every stage), stage checkpoints and the gain plot
(drawn by ``plots``).

Layout under ``<output-dir>/<run-name>/`` (``<output-dir>/latest`` points at the newest completed run):
``results.json``, ``accuracy_gain.png``, ``checkpoints/stage-<s>.safetensors``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from meduniverse_flwr.common.files import write_json_atomic
from meduniverse_flwr.learn.metrics import paired_p_value
from meduniverse_flwr.learn.model import save_backbone
from meduniverse_flwr.registry import EVAL_SPLITS
from meduniverse_flwr.report.plots import plot_accuracy_gain
from meduniverse_flwr.server.outcome import StageOutcome


def _mean(values: list[float | None]) -> float | None:
    """The mean, or None when there is nothing to average or a task's score is missing."""
    return float(np.mean(values)) if values and None not in values else None


def stage_entry(stage: int, outcome: StageOutcome, seconds: float) -> dict[str, Any]:
    """One item of ``results.json``'s ``stages`` list."""
    trained = [m["accuracy"] for m in outcome.per_task.values() if not m["held_out"]]
    held_out = [m["accuracy"] for m in outcome.per_task.values() if m["held_out"]]
    entry: dict[str, Any] = {
        "stage": stage,
        "participants": outcome.participants,
        "per_task": outcome.per_task,
        "mean_accuracy": _mean(trained),
    }
    if held_out:
        entry["mean_accuracy_held_out"] = _mean(held_out)
    missing = sorted(name for name, m in outcome.per_task.items() if m["accuracy"] is None)
    if missing:
        entry["missing_tasks"] = missing
    entry.update({"train_loss": outcome.train_loss, "rejected": outcome.rejected,
                  "nodes": [dataclasses.asdict(report) for report in outcome.nodes],
                  "bytes_up": outcome.bytes_up, "bytes_down": outcome.bytes_down, "seconds": round(seconds, 3),
                  "server_seconds": outcome.server_seconds})
    if outcome.epsilon is not None:
        entry.update({"epsilon": outcome.epsilon, "delta": outcome.delta, "privacy_events": outcome.privacy_events})
    return entry


def summarize(stages: list[dict[str, Any]]) -> dict[str, Any]:
    """Accuracy gain of every stage over stage 0, and a paired p-value over tasks.

    When every stage scores every task (``schedule = every-stage``): the stage's mean minus stage 0's, and
    the final stage against stage 0. When a stage scores only some tasks (the arrival protocol scores the
    tasks arriving next, each from the base it is sent): the mean over those tasks of their score minus
    their own stage-0 score (a difference of means over different tasks would measure the task mix), and
    the test pools every such pair of the later stages."""
    base = stages[0]
    tasks = [t for t, m in base["per_task"].items() if not m["held_out"]]
    if all(t in s["per_task"] for t in tasks for s in stages):
        return _summarize_every_task(stages, tasks)
    pairs = [[(s["per_task"][t]["accuracy"], base["per_task"][t]["accuracy"]) for t in tasks
              if t in s["per_task"] and None not in (s["per_task"][t]["accuracy"], base["per_task"][t]["accuracy"])]
             for s in stages]
    gains = [float(np.mean([a - b for a, b in stage_pairs])) if stage_pairs else None for stage_pairs in pairs]
    pooled = [pair for stage_pairs in pairs[1:] for pair in stage_pairs]
    return {"accuracy_gain": gains, "p_value": paired_p_value(*zip(*pooled)) if pooled else None,
            "p_value_test": "paired t-test over the tasks scored after stage 0, each against its stage-0 score"}


def _summarize_every_task(stages: list[dict[str, Any]], tasks: list[str]) -> dict[str, Any]:
    base, last = stages[0], stages[-1]
    gains = [None if s["mean_accuracy"] is None or base["mean_accuracy"] is None
             else s["mean_accuracy"] - base["mean_accuracy"] for s in stages]
    p_value = None
    scored = all(s["per_task"][t]["accuracy"] is not None for t in tasks for s in (base, last))
    if len(stages) > 1 and scored:
        p_value = paired_p_value([last["per_task"][t]["accuracy"] for t in tasks],
                                 [base["per_task"][t]["accuracy"] for t in tasks])
    return {"accuracy_gain": gains, "p_value": p_value, "p_value_test": "paired t-test over tasks, final stage vs 0"}


# Keys a resumed run may change: they do not alter what the finished stages computed.
RESUME_MAY_DIFFER = ("num-stages", "output-dir", "resume-from", "stage-timeout", "device")


class RunOutputs:
    """Everything a run writes, each file written atomically so a crash never leaves half of one.

    After every stage the checkpoint is written first, then results.json: the
    run directory is always a consistent place to resume from.
    """

    def __init__(self, run_dir: Path, config: dict[str, Any], stages: list[dict[str, Any]]) -> None:
        self.dir = Path(run_dir)
        self.config = config
        self.stages = stages
        self.tasks: dict[str, dict[str, Any]] = {}  # each task's card facts (modality, classes, ...), for reports
        self.base: dict[str, str] = {}  # the stage-0 base: what it is and its checkpoint's sha256

    @classmethod
    def create(cls, output_dir: Path, run_name: str, config: dict[str, Any]) -> "RunOutputs":
        root = Path(output_dir)
        try:
            (root / run_name).mkdir(parents=True, exist_ok=False)
        except OSError as err:
            raise ValueError(f"output-dir: cannot create {root / run_name} ({err.strerror})") from None
        return cls(root / run_name, config, [])

    @classmethod
    def resume(cls, run_dir: Path, config: dict[str, Any]) -> "RunOutputs":
        """Reopen a run directory to continue after its last completed stage; ValueError says why not."""
        path = Path(run_dir).expanduser() / "results.json"
        previous = read_results(path)
        stages, old_config = previous["stages"], previous["config"]
        if not stages:
            raise ValueError(f"resume-from: {path} has no completed stage")
        changed = sorted(k for k in config if k not in RESUME_MAY_DIFFER and old_config.get(k) != config[k])
        if changed:
            raise ValueError(f"resume-from: {path} was made with other settings: "
                             + ", ".join(f"{k} {old_config.get(k)!r} -> {config[k]!r}" for k in changed))
        outputs = cls(path.parent, config, stages)
        outputs.base = dict(previous.get("base", {}))
        if not outputs.checkpoint_path(stages[-1]["stage"]).is_file():
            raise ValueError(f"resume-from: {outputs.checkpoint_path(stages[-1]['stage'])} is missing")
        return outputs

    @property
    def results_path(self) -> Path:
        return self.dir / "results.json"

    def checkpoint_path(self, stage: int) -> Path:
        return self.dir / "checkpoints" / f"stage-{stage}.safetensors"

    def decoder_path(self, stage: int) -> Path:
        """The server's MAE decoder after ``stage`` (a curation rule's; never sent to a node)."""
        return self.dir / "checkpoints" / f"stage-{stage}.decoder.safetensors"

    def add_stage(self, entry: dict[str, Any]) -> None:
        self.stages.append(entry)
        write_json_atomic(self.results_path, {"config": self.config, "base": self.base, "tasks": self.tasks,
                                              "stages": self.stages, "summary": summarize(self.stages)})

    def save_checkpoint(self, stage: int, backbone: dict[str, torch.Tensor],
                        decoder: dict[str, torch.Tensor] | None = None) -> Path:
        """The base after ``stage`` (and the server's decoder beside it, written first)."""
        metadata = {"model": str(self.config["model"]), "image-size": str(self.config["image-size"]),
                    "stage": str(stage), "format": "timm VisionTransformer state dict, num_classes=0"}
        if decoder is not None:
            save_backbone(self.decoder_path(stage), decoder, {"model": str(self.config["model"])})
        path = self.checkpoint_path(stage)
        save_backbone(path, backbone, metadata)
        return path

    def describe_base(self, source: str) -> None:
        """Name the stage-0 base in results.json, with its checkpoint's sha256: runs that share a base
        show the same hash."""
        self.base = {"from": source, "sha256": hashlib.sha256(self.checkpoint_path(0).read_bytes()).hexdigest()}

    def mark_latest(self) -> None:
        """Point ``<output-dir>/latest`` at this run, atomically; called when the run completes, so a
        run that fails never takes the link from the last good one."""
        tmp = self.dir.parent / f".latest-{self.dir.name}"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(self.dir.name, target_is_directory=True)
        os.replace(tmp, self.dir.parent / "latest")

    def plot(self) -> Path:
        path = self.dir / "accuracy_gain.png"
        plot_accuracy_gain(self.stages, summarize(self.stages), path)
        return path


# ------------------------------------------------------------------ reading results.json back
MAX_RESULTS_BYTES = 64 * 2**20  # a results.json of thousands of stages is a few MB


def read_results(path: Path) -> dict[str, Any]:
    """A ``results.json`` read back (to resume, to summarise, to report), checked as untrusted:
    the types and ranges of every field that is used, stages numbered 0, 1, ... in order; each task's
    scores name their split (``_read_scores``). ValueError with one line naming the file and the field
    otherwise."""
    try:
        if path.stat().st_size > MAX_RESULTS_BYTES:
            raise ValueError(f"larger than {MAX_RESULTS_BYTES} bytes")
        payload = json.loads(path.read_text(), parse_constant=_no_constant)
        _check_results(payload)
    except (OSError, ValueError, RecursionError) as err:
        raise ValueError(f"{path}: not a valid results.json ({_first_line(err)})") from None
    return payload


def config_value(results_path: Path, config: dict[str, Any], key: str, default: Any,
                 ok: Callable[[Any], bool], why: str) -> Any:
    """``config[key]`` (``default`` when missing) of a checked results.json, for a reader that uses a key
    ``read_results`` does not check; ValueError (one line, naming the file) when not ``ok``."""
    value = config.get(key, default)
    if not ok(value):
        raise ValueError(f"{results_path}: not a valid results.json (config.{key} = {str(value)[:40]!r}: {why})")
    return value


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


def _first_line(err: BaseException) -> str:
    return (str(err).splitlines() or [type(err).__name__])[0][:200]


def _expect(ok: bool, where: str, value: Any, why: str) -> None:
    if not ok:
        raise ValueError(f"{where} = {str(value)[:40]!r}: {why}")


def _is_number(value: Any, low: float = -math.inf, high: float = math.inf, none: bool = False) -> bool:
    if value is None:
        return none
    return isinstance(value, (int, float)) and not isinstance(value, bool) and low <= value <= high


MAX_PRIVACY_EVENTS = 10_000


def _check_events(events: Any, where: str) -> None:
    """``stages[i].privacy_events``: a bounded list of {party, noise_multiplier, sample_rate, steps}, as
    ``PrivacyLedger.spend`` takes them when a resumed run replays them."""
    if not isinstance(events, list) or len(events) > MAX_PRIVACY_EVENTS:
        raise ValueError(f"{where} must be a list of at most {MAX_PRIVACY_EVENTS} events")
    for event in events:
        ok = (isinstance(event, dict) and set(event) == {"party", "noise_multiplier", "sample_rate", "steps"}
              and isinstance(event["party"], str) and len(event["party"]) <= 200
              and _is_number(event["noise_multiplier"], 0, math.inf) and event["noise_multiplier"] > 0
              and math.isfinite(event["noise_multiplier"])
              and _is_number(event["sample_rate"], 0, 1) and event["sample_rate"] > 0
              and type(event["steps"]) is int and 0 < event["steps"] <= 10**9)
        if not ok:
            raise ValueError(f"{where}: {str(event)[:60]!r} is not a privacy event")


def _check_tasks(tasks: Any) -> None:
    """``tasks``: {name: {modality, n_classes, label_kind, classes}} (optional; older files lack it)."""
    _expect(isinstance(tasks, dict), "tasks", tasks, "must be an object")
    for name, facts in tasks.items():
        at = f"tasks[{name[:40]!r}]"
        _expect(isinstance(facts, dict), at, facts, "must be an object")
        _expect(isinstance(facts.get("modality"), str), f"{at}.modality", facts.get("modality"), "must be a string")
        _expect(type(facts.get("n_classes")) is int and facts["n_classes"] >= 1, f"{at}.n_classes",
                facts.get("n_classes"), "must be an integer >= 1")
        classes = facts.get("classes")
        _expect(isinstance(classes, list) and all(isinstance(c, str) for c in classes), f"{at}.classes", classes,
                "must be a list of strings")


def _check_results(payload: Any) -> None:
    _expect(isinstance(payload, dict), "top level", type(payload).__name__, "must be an object")
    _expect(isinstance(payload.get("config"), dict), "config", payload.get("config"), "must be an object")
    _check_tasks(payload.get("tasks", {}))
    split = payload["config"].get("eval-split", "test")  # the split every stage's scores are of, unless they say
    _expect(split in EVAL_SPLITS, "config.eval-split", split, f"must be one of {', '.join(EVAL_SPLITS)}")
    stages = payload.get("stages")
    _expect(isinstance(stages, list), "stages", stages, "must be a list")
    for index, stage in enumerate(stages):
        where = f"stages[{index}]"
        _expect(isinstance(stage, dict), where, stage, "must be an object")
        _expect(stage.get("stage") == index and isinstance(stage.get("stage"), int), f"{where}.stage",
                stage.get("stage"), f"must be {index} (stages in order from 0)")
        _expect("mean_accuracy" in stage, f"{where}.mean_accuracy", None, "is missing")
        for key in ("mean_accuracy", "mean_accuracy_held_out"):
            _expect(_is_number(stage.get(key), 0, 1, none=True), f"{where}.{key}", stage.get(key),
                    "must be a number in [0, 1] or null")
        _expect(_is_number(stage.get("train_loss"), none=True), f"{where}.train_loss", stage.get("train_loss"),
                "must be a number or null")
        for key in ("participants", "rejected"):
            _expect(isinstance(stage.get(key), list) and all(isinstance(v, str) for v in stage[key]),
                    f"{where}.{key}", stage.get(key), "must be a list of strings")
        for key in ("bytes_up", "bytes_down"):
            _expect(_is_number(stage.get(key), 0) and isinstance(stage[key], int), f"{where}.{key}", stage.get(key),
                    "must be an integer >= 0")
        _expect(_is_number(stage.get("seconds"), 0), f"{where}.seconds", stage.get("seconds"), "must be a number >= 0")
        if "epsilon" in stage:
            _expect(_is_number(stage["epsilon"], 0), f"{where}.epsilon", stage["epsilon"], "must be a number >= 0")
            _expect(_is_number(stage.get("delta"), 0, 1), f"{where}.delta", stage.get("delta"), "must be in [0, 1]")
            _check_events(stage.get("privacy_events"), f"{where}.privacy_events")
        per_task = stage.get("per_task")
        _expect(isinstance(per_task, dict), f"{where}.per_task", per_task, "must be an object")
        stage["per_task"] = {task: _read_scores(scores, f"{where}.per_task[{task[:40]!r}]", split)
                             for task, scores in per_task.items()}


def _read_scores(scores: Any, at: str, split: str) -> dict[str, Any]:
    """One task's scores at one stage, checked, naming the split they are of (``split``, the run's
    eval-split, when they do not) and, when the file counts them, ``n_scored`` examples. A file from
    before both were named has ``n_test``: it counted that split's examples, the val split's with
    ``eval-split = val``."""
    _expect(isinstance(scores, dict), at, scores, "must be an object")
    for key in ("accuracy", "auc"):
        _expect(_is_number(scores.get(key), 0, 1, none=True), f"{at}.{key}", scores.get(key),
                "must be a number in [0, 1] or null")
    _expect(isinstance(scores.get("held_out"), bool), f"{at}.held_out", scores.get("held_out"),
            "must be true or false")
    read = dict(scores)
    read.setdefault("split", split)
    _expect(read["split"] in EVAL_SPLITS, f"{at}.split", read["split"], f"must be one of {', '.join(EVAL_SPLITS)}")
    old = "n_test" in read and "n_scored" not in read
    count = "n_test" if old else "n_scored"
    if count in read:
        _expect(type(read[count]) is int and read[count] >= 0, f"{at}.{count}", read[count], "must be an integer >= 0")
    if old:
        read["n_scored"] = read.pop("n_test")
    if "site_epsilon" in read:
        _expect(_is_number(read["site_epsilon"], 0), f"{at}.site_epsilon", read["site_epsilon"],
                "must be a number >= 0")
    return read
