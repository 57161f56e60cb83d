"""One run at a glance: its per-stage table and where its files are, as the ServerApp logs them after
every stage and ``python -m meduniverse_flwr.report`` prints them for each run it reads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from meduniverse_flwr.common.text import safe_label
from meduniverse_flwr.server.results import summarize
from meduniverse_flwr.server.tracking import MLFLOW_POINTER, TENSORBOARD_DIR, read_pointer

Column = tuple[str, list[str]]


def _cells(values: list[Any], fmt: str) -> list[str]:
    """Formatted numbers, ``-`` for a missing one (a task without a valid score, stage 0's train loss)."""
    return ["-" if value is None else format(value, fmt) for value in values]


def _tasks(stages: list[dict[str, Any]]) -> dict[str, bool]:
    """Every task of the run, in first-seen order, and whether it is held out."""
    tasks: dict[str, bool] = {}
    for stage in stages:
        for task, scores in stage["per_task"].items():
            tasks.setdefault(task, scores["held_out"])
    return tasks


def table_columns(stages: list[dict[str, Any]]) -> list[Column]:
    """(header, cells) per column: stage, mean accuracy (trained tasks), held-out mean when there is
    one, each task's accuracy, gain over stage 0, train loss, seconds."""
    def column(key: str, fmt: str) -> list[str]:
        return _cells([s.get(key) for s in stages], fmt)

    columns = [("stage", [str(s["stage"]) for s in stages]), ("mean acc", column("mean_accuracy", ".4f"))]
    if any("mean_accuracy_held_out" in s for s in stages):
        columns.append(("held-out mean", column("mean_accuracy_held_out", ".4f")))
    for task, held_out in _tasks(stages).items():
        scores = [s["per_task"].get(task, {}).get("accuracy") for s in stages]
        columns.append((safe_label(task) + (" (held out)" if held_out else ""), _cells(scores, ".4f")))
    columns += [("gain", _cells(summarize(stages)["accuracy_gain"], "+z.4f")),
                ("train loss", column("train_loss", ".4f")), ("seconds", column("seconds", ".1f"))]
    if any("epsilon" in s for s in stages):
        columns.append(("epsilon", column("epsilon", ".3f")))
    return columns


def format_table(stages: list[dict[str, Any]]) -> str:
    """The columns of ``table_columns`` as an aligned text table, one row per stage."""
    columns = table_columns(stages)
    widths = [max(len(header), *(len(cell) for cell in cells)) for header, cells in columns]
    header = " | ".join(name.rjust(width) for (name, _), width in zip(columns, widths))
    rows = [" | ".join(cells[i].rjust(width) for (_, cells), width in zip(columns, widths))
            for i in range(len(stages))]
    return "\n".join([header, "-+-".join("-" * width for width in widths), *rows])


def run_files(run_dir: Path) -> list[str]:
    """Where the run's plot, checkpoints and tracker output are, one line each (only those present)."""
    lines = []
    plot = run_dir / "accuracy_gain.png"
    if plot.is_file():
        lines.append(f"plot:        {plot}")
    checkpoints = sorted((run_dir / "checkpoints").glob("stage-*.safetensors"))
    if checkpoints:
        lines.append(f"checkpoints: {run_dir / 'checkpoints'} ({len(checkpoints)} stages)")
    tensorboard = run_dir / TENSORBOARD_DIR
    if tensorboard.is_dir():
        lines.append(f"tensorboard: tensorboard --logdir {tensorboard}")
    pointer = read_pointer(run_dir / MLFLOW_POINTER)
    if pointer is not None:  # its strings come from a file: escaped before they reach the terminal
        lines.append(f"mlflow:      run {safe_label(pointer['run_id'])}: "
                     f"mlflow ui --backend-store-uri {safe_label(pointer['tracking_uri'])}")
    return lines


def run_text(results_path: Path, run_dir: Path, stages: list[dict[str, Any]]) -> str:
    """The table, the final p-value and the run's files."""
    if not stages:
        return f"{results_path}: no completed stage yet"
    p_value = summarize(stages)["p_value"]
    lines = [f"{results_path}", format_table(stages),
             "final vs stage 0, paired t-test over tasks: p = " + ("-" if p_value is None else f"{p_value:.3g}")]
    return "\n".join(lines + run_files(run_dir))
