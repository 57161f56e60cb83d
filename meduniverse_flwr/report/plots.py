"""Figures: a run's gain plot (the paper's Fig. 3 for one run), and how every figure is drawn and saved.

matplotlib is imported inside ``pyplot``: a run or a report that draws nothing never loads it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from meduniverse_flwr.common.files import write_atomic
from meduniverse_flwr.common.text import safe_label


def pyplot():
    """matplotlib's pyplot on the Agg backend: figures go to files, and a ServerApp has no display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> None:
    """Write ``fig`` to ``path`` atomically (a half-written PNG is never left), then free it."""
    try:
        write_atomic(path, fig.savefig)
    finally:
        pyplot().close(fig)


def plot_accuracy_gain(stages: list[dict[str, Any]], summary: dict[str, Any], path: Path) -> None:
    """The paper's Fig. 3: mean accuracy gain over the MIM base (stage 0), per stage, plus each task."""
    plt = pyplot()
    x = [s["stage"] for s in stages]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for task, base in stages[0]["per_task"].items():
        ys = [100 * (s["per_task"][task]["accuracy"] - base["accuracy"])
              if s["per_task"].get(task, {}).get("accuracy") is not None and base["accuracy"] is not None else np.nan
              for s in stages]
        style = ":" if base["held_out"] else "-"
        # names come from nodes: escaped, so that '$' or '\' cannot start mathtext
        ax.plot(x, ys, style, marker=".", alpha=0.5,
                label=safe_label(task) + (" (held out)" if base["held_out"] else ""))
    gains = [np.nan if g is None else 100 * g for g in summary["accuracy_gain"]]
    ax.bar(x, gains, color="tab:blue", alpha=0.35, label="mean gain (trained tasks)")
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(x)
    ax.set_xlabel("stage (0 = starting base)")
    ax.set_ylabel("accuracy gain over stage 0 (points)")
    p_value = summary["p_value"]
    ax.set_title("MedUniverse stage-wise gain" + (f"  (p = {p_value:.3g})" if p_value is not None else ""))
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    save_figure(fig, path)
