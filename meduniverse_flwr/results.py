"""Run outputs: ``results.json`` (rewritten after every stage), stage checkpoints and the gain plot.

Layout under ``<output-dir>/<run-name>/`` (``<output-dir>/latest`` points at the newest run):
``results.json``, ``accuracy_gain.png``, ``checkpoints/stage-<s>.safetensors``.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .metrics import paired_p_value
from .model import save_backbone
from .strategy import StageLog


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def stage_entry(stage: int, log: StageLog, seconds: float) -> dict[str, Any]:
    """One item of ``results.json``'s ``stages`` list."""
    trained = [m["accuracy"] for m in log.per_task.values() if not m["held_out"]]
    held_out = [m["accuracy"] for m in log.per_task.values() if m["held_out"]]
    entry: dict[str, Any] = {
        "stage": stage,
        "participants": log.participants,
        "per_task": log.per_task,
        "mean_accuracy": _mean(trained),
    }
    if held_out:
        entry["mean_accuracy_held_out"] = _mean(held_out)
    entry.update({"train_loss": log.train_loss, "rejected": log.rejected, "bytes_up": log.bytes_up,
                  "bytes_down": log.bytes_down, "seconds": round(seconds, 3)})
    return entry


def summarize(stages: list[dict[str, Any]]) -> dict[str, Any]:
    """Accuracy gain of every stage over stage 0, and the final stage's paired p-value over tasks."""
    base, last = stages[0], stages[-1]
    gains = [None if s["mean_accuracy"] is None or base["mean_accuracy"] is None
             else s["mean_accuracy"] - base["mean_accuracy"] for s in stages]
    tasks = [t for t, m in base["per_task"].items() if not m["held_out"] and t in last["per_task"]]
    p_value = None
    if len(stages) > 1:
        p_value = paired_p_value([last["per_task"][t]["accuracy"] for t in tasks],
                                 [base["per_task"][t]["accuracy"] for t in tasks])
    return {"accuracy_gain": gains, "p_value": p_value, "p_value_test": "paired t-test over tasks, final stage vs 0"}


def _json_safe(value: Any) -> Any:
    """NaN / Inf are not JSON: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_json_atomic(path: Path, payload: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(_json_safe(payload), indent=2, allow_nan=False) + "\n")
    tmp.replace(path)


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

    @classmethod
    def create(cls, output_dir: Path, run_name: str, config: dict[str, Any]) -> "RunOutputs":
        root = Path(output_dir)
        (root / run_name).mkdir(parents=True, exist_ok=False)
        tmp = root / f".latest-{run_name}"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(run_name, target_is_directory=True)
        os.replace(tmp, root / "latest")
        return cls(root / run_name, config, [])

    @classmethod
    def resume(cls, run_dir: Path, config: dict[str, Any]) -> "RunOutputs":
        """Reopen a run directory to continue after its last completed stage; ValueError says why not."""
        path = Path(run_dir).expanduser() / "results.json"
        try:
            previous = json.loads(path.read_text())
            stages, old_config = previous["stages"], previous["config"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ValueError(f"resume-from: {path} is not a readable results.json ({err})") from None
        if not stages:
            raise ValueError(f"resume-from: {path} has no completed stage")
        changed = sorted(k for k in config if k not in RESUME_MAY_DIFFER and old_config.get(k) != config[k])
        if changed:
            raise ValueError(f"resume-from: {path} was made with other settings: "
                             + ", ".join(f"{k} {old_config.get(k)!r} -> {config[k]!r}" for k in changed))
        outputs = cls(path.parent, config, stages)
        if not outputs.checkpoint_path(stages[-1]["stage"]).is_file():
            raise ValueError(f"resume-from: {outputs.checkpoint_path(stages[-1]['stage'])} is missing")
        return outputs

    @property
    def results_path(self) -> Path:
        return self.dir / "results.json"

    def checkpoint_path(self, stage: int) -> Path:
        return self.dir / "checkpoints" / f"stage-{stage}.safetensors"

    def add_stage(self, entry: dict[str, Any]) -> None:
        self.stages.append(entry)
        write_json_atomic(self.results_path,
                          {"config": self.config, "stages": self.stages, "summary": summarize(self.stages)})

    def save_checkpoint(self, stage: int, backbone: dict[str, torch.Tensor]) -> Path:
        metadata = {"model": str(self.config["model"]), "image-size": str(self.config["image-size"]),
                    "stage": str(stage), "format": "timm VisionTransformer state dict, num_classes=0"}
        path = self.checkpoint_path(stage)
        save_backbone(path, backbone, metadata)
        return path

    def plot(self) -> Path:
        path = self.dir / "accuracy_gain.png"
        plot_accuracy_gain(self.stages, summarize(self.stages), path)
        return path


def plot_accuracy_gain(stages: list[dict[str, Any]], summary: dict[str, Any], path: Path) -> None:
    """The paper's Fig. 3: mean accuracy gain over the MIM base (stage 0), per stage, plus each task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [s["stage"] for s in stages]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for task, base in stages[0]["per_task"].items():
        ys = [100 * (s["per_task"][task]["accuracy"] - base["accuracy"]) if task in s["per_task"] else np.nan
              for s in stages]
        style = ":" if base["held_out"] else "-"
        ax.plot(x, ys, style, marker=".", alpha=0.5, label=task + (" (held out)" if base["held_out"] else ""))
    gains = [np.nan if g is None else 100 * g for g in summary["accuracy_gain"]]
    ax.bar(x, gains, color="tab:blue", alpha=0.35, label="mean gain (trained tasks)")
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(x)
    ax.set_xlabel("stage (0 = starting base)")
    ax.set_ylabel("accuracy gain over stage 0 (points)")
    p_value = summary["p_value"]
    ax.set_title("MedUniverse stage-wise gain" + (f"  (final p = {p_value:.3g})" if p_value is not None else ""))
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
