"""The figures of a multi-run report: Fig. 3 over seeds, the per-task gain heatmap and, with variants,
accuracy per group and against the privacy budget."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

from meduniverse_flwr.common.text import safe_label
from meduniverse_flwr.report import stats
from meduniverse_flwr.report.groups import Group, breaks_privacy, final_epsilons, group_label
from meduniverse_flwr.report.plots import pyplot, save_figure


def plot_gain_over_seeds(groups: dict[stats.GroupKey, Group], num_stages: int, path: Path) -> None:
    """Fig. 3 over seeds: per strategy, the mean accuracy gain over stage 0 per stage, ± std band."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 4.5), dpi=120)
    stages = list(range(num_stages))
    for key, group in groups.items():
        spreads = stats.gain_spreads(group.mean_curves)
        mean = [float("nan") if s.mean is None else 100 * s.mean for s in spreads]
        std = [0.0 if s.std is None else 100 * s.std for s in spreads]
        dashed = "--" if breaks_privacy(key[0]) else "-"  # a reference, not a federation
        label = textwrap.fill(f"{group_label(key)} ({len(group.runs)} seeds)", 34)
        (line,) = ax.plot(stages, mean, dashed, marker="o", label=label)
        ax.fill_between(stages, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                        color=line.get_color(), alpha=0.2)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(stages)
    ax.set_xlabel("stage (0 = starting base)")
    ax.set_ylabel("mean accuracy gain over stage 0 (points)")
    ax.set_title("Accuracy gain per stage, trained tasks (mean ± std over seeds)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))  # outside: the lines stay visible
    fig.tight_layout()
    save_figure(fig, path)


def plot_gain_heatmap(groups: dict[stats.GroupKey, Group], final: int, path: Path) -> None:
    """Per-task gain (final stage minus stage 0, mean over seeds), tasks x strategies, centred at 0."""
    import numpy as np

    plt = pyplot()
    gains = [stats.task_gains(g.trained[final], g.trained[0]) for g in groups.values()]
    tasks = list(dict.fromkeys(task for per_task in gains for task in per_task))
    values = np.array([[np.nan if gains_of.get(t) is None or gains_of[t].mean is None else 100 * gains_of[t].mean
                        for gains_of in gains] for t in tasks], dtype=float).reshape(len(tasks), len(gains))
    if not tasks:  # nothing scored in every seed's stage 0 and final stage: an empty grid, said so
        values = np.full((1, len(gains)), np.nan)
        tasks = ["(no scores)"]
    limit = max(float(np.nanmax(np.abs(values))) if np.isfinite(values).any() else 0.0, 1e-6)
    fig, ax = plt.subplots(figsize=(2.5 + 1.4 * len(gains), 2.5 + 0.45 * len(tasks)), dpi=120)
    image = ax.imshow(values, cmap="RdBu", vmin=-limit, vmax=limit, aspect="auto")
    held_out = [key[1] for key in groups]
    for (row, column), value in np.ndenumerate(values):
        dark = abs(value) > 0.6 * limit  # on the saturated ends, white text stays readable
        text = "held out" if tasks[row] in held_out[column] else "-" if np.isnan(value) else f"{value:+.1f}"
        ax.text(column, row, text, ha="center", va="center", fontsize=8, color="white" if dark else "black")
    ax.set_xticks(range(len(gains)), [textwrap.fill(group_label(k), 18) for k in groups], fontsize=7)
    ax.set_yticks(range(len(tasks)), [safe_label(t) for t in tasks], fontsize=8)
    ax.set_xlabel("strategy")
    ax.set_ylabel("task")
    ax.set_title(f"Accuracy gain, stage {final} minus stage 0 (points, mean over seeds)", fontsize=9)
    fig.colorbar(image, ax=ax, label="gain (points)")
    fig.tight_layout()
    save_figure(fig, path)


def plot_final_accuracy(groups: dict[stats.GroupKey, Group], final: int, path: Path) -> None:
    """Per group, the mean accuracy at stage 0 and at the final stage (mean ± std over seeds)."""
    plt = pyplot()
    labels = [textwrap.fill(group_label(k), 60) for k in groups]
    fig, ax = plt.subplots(figsize=(9, 1.5 + 0.55 * len(groups)), dpi=120)
    lowest = 100.0
    for offset, stage, name in ((-0.2, 0, "stage 0"), (0.2, final, f"stage {final}")):
        spreads = [stats.mean_std(c[stage] for c in g.mean_curves) for g in groups.values()]
        ax.barh([i + offset for i in range(len(groups))], [100 * (s.mean or 0.0) for s in spreads], height=0.4,
                xerr=[100 * (s.std or 0.0) for s in spreads], label=name)
        lowest = min([lowest] + [100 * (s.mean - (s.std or 0.0)) for s in spreads if s.mean is not None])
    ax.set_xlim(left=max(0.0, 5 * math.floor(lowest / 5) - 5))  # the differences, not the common bulk
    ax.set_yticks(range(len(groups)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("mean accuracy over trained tasks (%), mean ± std over seeds")
    ax.set_title("Accuracy per group at stage 0 and at the final stage")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def plot_accuracy_vs_epsilon(groups: dict[stats.GroupKey, Group], final: int, path: Path) -> None:
    """Final mean accuracy (± std over seeds) against the final epsilon, one series per DP level; runs
    without DP at the right edge, marked infinity."""
    plt = pyplot()
    points: dict[str, list[tuple[float, float, float]]] = {}
    no_dp = []
    for key, group in groups.items():
        spread = stats.mean_std(c[final] for c in group.mean_curves)
        if spread.mean is None:
            continue
        epsilons = [e for e in final_epsilons(group, final) if e is not None]
        level = str(group.runs[0].config.get("dp", "off"))
        if epsilons:
            points.setdefault(level, []).append((max(epsilons), 100 * spread.mean, 100 * (spread.std or 0.0)))
        else:
            no_dp.append((100 * spread.mean, 100 * (spread.std or 0.0), group_label(key)))
    finite = [x for series in points.values() for x, _, _ in series]
    right = 2 * max(finite, default=1.0)
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for level, series in sorted(points.items()):
        series.sort()
        ax.errorbar([x for x, _, _ in series], [y for _, y, _ in series], yerr=[e for _, _, e in series],
                    marker="o", capsize=3, label=f"dp = {level}")
    for y, err, label in no_dp:
        ax.errorbar([right], [y], yerr=[err], marker="s", capsize=3, label=textwrap.fill(f"no DP: {label}", 40))
    starts = [c[0] for g in groups.values() for c in g.mean_curves if c[0] is not None]
    if starts:  # what the stages gain is measured from
        ax.axhline(100 * sum(starts) / len(starts), color="gray", linestyle="--", linewidth=1,
                   label="stage 0 (the starting base), mean over runs")
    ax.set_xscale("log")
    ax.set_xlabel(f"epsilon after stage {final} (log scale; no DP drawn at the right edge, epsilon = infinity)")
    ax.set_ylabel(f"mean accuracy at stage {final} (%)")
    ax.set_title("Accuracy against the privacy budget (mean ± std over seeds)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)
