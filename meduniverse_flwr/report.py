"""The per-stage table of each run and where its files are; over several runs, the report across
seeds and strategies (tables, paired tests, Fig. 3 over seeds, per-task gain heatmap).

    python -m meduniverse_flwr.report outputs/latest [more run dirs, results.json files, Hydra job or sweep dirs]
    python -m meduniverse_flwr.report multirun/2025-01-01/12-00-00 --out report

A directory without a ``results.json`` of its own (a Hydra sweep, an ``output-dir``) stands for the
first ``results.json`` on each branch below it, symlinks not followed (``latest`` would count a run
twice; a Hydra job directory's copy stands for the run in its ``runs/``).

Every ``results.json`` is read with ``results.read_results`` (checked as untrusted): a bad one is
one line on stderr and exit status 2, after the good ones are printed and reported.

With two or more distinct runs, ``report.md``, ``fig3_gain.png`` and ``gain_heatmap.png`` are
written to ``--out``, by default ``report/`` in the runs' common parent directory (``./report``
when that is the filesystem root). Runs are grouped by (``strategy``, ``held-out``), one run per
seed; the numbers are in ``stats``. When every run read is an arrival run (``schedule = "arrival"``),
``arrival_report`` writes the report instead.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import stats
from .config import declared_defaults, split_list
from .results import read_results, summarize
from .tracking import MLFLOW_POINTER, TENSORBOARD_DIR, read_pointer
from .validation import safe_label

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


def locate(path: Path) -> tuple[Path, Path]:
    """(results.json, the directory holding the run's other files) for a run directory, a
    results.json, or a Hydra job directory (its run lives in ``runs/latest``)."""
    results = path if path.name == "results.json" else path / "results.json"
    job_run = results.parent / "runs" / "latest"
    return results, job_run if job_run.is_dir() else results.parent


def _natural(name: str) -> tuple[bool, int, str]:
    """Hydra job directories 0, 1, ..., 10 in numeric order."""
    return (not name.isdigit(), int(name) if name.isdigit() else 0, name)


def find_runs(path: Path) -> list[tuple[Path, Path]]:
    """``locate`` for every run ``path`` stands for (see the module docstring); a path with no
    results.json anywhere is returned as is, so that reading it names the problem."""
    if path.name == "results.json" or (path / "results.json").exists() or not path.is_dir():
        return [locate(path)]
    found = []
    for root, dirs, files in os.walk(path):  # symlinks to directories are not entered
        if "results.json" in files:
            found.append(locate(Path(root)))
            dirs.clear()
        dirs.sort(key=_natural)
    return found or [locate(path)]


def run_text(results_path: Path, run_dir: Path, stages: list[dict[str, Any]]) -> str:
    """The table, the final p-value and the run's files."""
    if not stages:
        return f"{results_path}: no completed stage yet"
    p_value = summarize(stages)["p_value"]
    lines = [f"{results_path}", format_table(stages),
             "final vs stage 0, paired t-test over tasks: p = " + ("-" if p_value is None else f"{p_value:.3g}")]
    return "\n".join(lines + run_files(run_dir))


def report(path: Path) -> str:
    """``run_text`` of one run; ValueError (one line) for a bad results.json."""
    results_path, run_dir = locate(path)
    return run_text(results_path, run_dir, read_results(results_path)["stages"])


# ------------------------------------------------------------------ several runs
CENTRALIZED = "centralized (pools data: breaks privacy, upper reference)"
# keys that may differ between the runs of one group without making them different experiments
SAME_EXPERIMENT_KEYS = ("seed", "output-dir", "resume-from", "device", "stage-timeout", "tracker", "num-stages")
# settings that make a run a variant of its strategy (privacy, robustness): named in its group's label
# when they differ from the declared defaults
VARIANT_KEYS = ("aggregation", "trim-fraction", "max-update-ratio", "on-excess-update", "dp", "dp-clip-norm",
                "dp-noise-multiplier", "dp-delta", "dp-secure-noise", "attack-nodes", "attack-factor")


ATTACK_SHOWN = ("aggregation", "max-update-ratio", "attack-factor")


def variant(config: dict[str, Any]) -> str:
    """`` [key=value, ...]`` for the VARIANT_KEYS a run sets away from their declared defaults ("" for
    none); settings that do nothing are left out (dp-* with dp off, a trim of another rule, an attack
    factor without attackers), and an attacked run always names its attack and defence (ATTACK_SHOWN)."""
    defaults = declared_defaults()
    attacked = config.get("attack-nodes", 0) != 0
    shown = []
    for key in VARIANT_KEYS:
        value = config.get(key, defaults[key])
        idle = ((key.startswith("dp-") and config.get("dp", "off") == "off")
                or (key == "trim-fraction" and config.get("aggregation") != "trimmed-mean")
                or (key == "attack-factor" and not attacked))
        if not idle and (value != defaults[key] or attacked and key in ATTACK_SHOWN):
            shown.append(f"{key}={value:g}" if isinstance(value, float) else f"{key}={value}")
    return f" [{', '.join(shown)}]" if shown else ""


@dataclass(frozen=True)
class Run:
    results_path: Path
    strategy: str
    held_out: tuple[str, ...]
    seed: int
    config: dict[str, Any]
    stages: list[dict[str, Any]]
    variant: str = ""  # ``variant(config)``

    @property
    def group(self) -> stats.GroupKey:
        """(strategy and its variant settings, held-out tasks)."""
        return self.strategy + self.variant, self.held_out


def _config_value(results_path: Path, config: dict[str, Any], key: str, default: Any,
                  ok: Callable[[Any], bool], why: str) -> Any:
    value = config.get(key, default)
    if not ok(value):
        raise ValueError(f"{results_path}: not a valid results.json (config.{key} = {str(value)[:40]!r}: {why})")
    return value


def read_run(results_path: Path) -> Run:
    """A checked results.json and the config fields that group it; ValueError (one line) otherwise.
    A run written before ``strategy`` existed was stage-wise; missing keys take their declared defaults."""
    payload = read_results(results_path)
    config = payload["config"]
    strategy = _config_value(results_path, config, "strategy", "stagewise",
                             lambda v: isinstance(v, str) and v != "", "must be a strategy name")
    seed = _config_value(results_path, config, "seed", 0,
                         lambda v: isinstance(v, int) and not isinstance(v, bool), "must be an integer")
    held_out = _config_value(results_path, config, "held-out", "",
                             lambda v: isinstance(v, str) or isinstance(v, list) and all(isinstance(t, str) for t in v),
                             "must be a comma-separated string or a list of task names")
    names = split_list(held_out) if isinstance(held_out, str) else tuple(t.strip() for t in held_out if t.strip())
    return Run(results_path, strategy, tuple(sorted(names)), seed, config, payload["stages"], variant(config))


def strategy_label(strategy: str) -> str:
    """A group's strategy (with its variant settings) for tables and legends."""
    return CENTRALIZED + strategy[len("centralized"):] if strategy.startswith("centralized") else safe_label(strategy)


def group_label(key: stats.GroupKey) -> str:
    strategy, held_out = key
    return strategy_label(strategy) + (f" [held out: {safe_label(', '.join(held_out))}]" if held_out else "")


def _md(text: str) -> str:
    return text.replace("|", "\\|")


@dataclass(frozen=True)
class Group:
    """The runs of one (strategy, held-out) group, one per seed, over the stages common to the report."""
    runs: list[Run]
    trained: list[stats.Scores]    # per stage: (task, seed) -> accuracy, trained tasks
    held_out: list[stats.Scores]   # the same for held-out tasks
    mean_curves: list[list[float | None]]  # per seed: mean accuracy (trained tasks) per stage


def _scores(runs: list[Run], stage: int, held_out: bool) -> stats.Scores:
    return {(task, run.seed): scores["accuracy"] for run in runs
            for task, scores in run.stages[stage]["per_task"].items() if scores["held_out"] == held_out}


def _group_order(key: stats.GroupKey) -> tuple[int, str, tuple[str, ...]]:
    """The method first, the centralized reference last, the rest as named."""
    strategy, held_out = key
    return ({"stagewise": 0, "centralized": 2}.get(strategy.split(" [")[0], 1), strategy, held_out)


def build_groups(runs: list[Run], num_stages: int) -> dict[stats.GroupKey, Group]:
    members: dict[stats.GroupKey, list[Run]] = {}
    for run in sorted(runs, key=lambda r: (_group_order(r.group), r.seed)):
        members.setdefault(run.group, []).append(run)
    return {key: Group(group, [_scores(group, s, False) for s in range(num_stages)],
                       [_scores(group, s, True) for s in range(num_stages)],
                       [[run.stages[s]["mean_accuracy"] for s in range(num_stages)] for run in group])
            for key, group in members.items()}


def distinct_runs(runs: list[Run]) -> tuple[list[Run], list[str]]:
    """One run per (group, seed), the first given; unfinished runs (fewer stages than their
    ``num-stages``: failed, stopped or still running) are left out. Notes say why."""
    kept: dict[tuple[stats.GroupKey, int], Run] = {}
    notes = []
    for run in runs:
        planned = run.config.get("num-stages")
        if not run.stages or isinstance(planned, int) and len(run.stages) <= planned:
            notes.append(f"{run.results_path}: unfinished ({len(run.stages)} of "
                         f"{planned + 1 if isinstance(planned, int) else '?'} stages), left out")
        elif (run.group, run.seed) in kept:
            if run.results_path.resolve() != kept[run.group, run.seed].results_path.resolve():
                notes.append(f"{run.results_path}: same strategy, held-out tasks and seed as "
                             f"{kept[run.group, run.seed].results_path}, left out")
        else:
            kept[run.group, run.seed] = run
    return list(kept.values()), notes


def config_notes(groups: dict[stats.GroupKey, Group]) -> list[str]:
    """Settings that differ between the runs of one group: they are not seeds of one experiment."""
    notes = []
    for key, group in groups.items():
        keys = {k for run in group.runs for k in run.config} - set(SAME_EXPERIMENT_KEYS)
        differ = sorted(k for k in keys if len({repr(run.config.get(k)) for run in group.runs}) > 1)
        if differ:
            notes.append(f"runs of {group_label(key)} differ in {safe_label(', '.join(differ))}")
    return notes


# ------------------------------------------------------------------ report.md
def _spread_cell(spread: stats.Spread, seeds: int) -> str:
    if spread.mean is None:
        return "-"
    cell = f"{spread.mean:.4f}" + ("" if spread.std is None else f" ± {spread.std:.4f}")
    return cell + ("" if spread.n == seeds else f" (n={spread.n})")


def _p_cell(p: float | None) -> str:
    return "-" if p is None else f"{p:.3g}"


def md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(_md(h) for h in header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(_md(c) for c in row) + " |" for row in rows])


def _task_rows(columns: list[tuple[stats.Scores, list[float | None], int]]) -> list[list[str]]:
    """Rows: each task (trained in some column) then ``mean``; a column is (scores, mean accuracy per
    seed, number of seeds)."""
    per_column = [stats.by_task(scores) for scores, _, _ in columns]
    tasks = dict.fromkeys(task for spreads in per_column for task in spreads)
    rows = [[safe_label(task)] + [_spread_cell(spreads.get(task, stats.Spread(None, None, 0)), seeds)
                                  for spreads, (_, _, seeds) in zip(per_column, columns)] for task in tasks]
    rows.append(["mean"] + [_spread_cell(stats.mean_std(means), seeds) for _, means, seeds in columns])
    return rows


def final_stage_table(groups: dict[stats.GroupKey, Group], final: int) -> str:
    columns = [(g.trained[final], [c[final] for c in g.mean_curves], len(g.runs)) for g in groups.values()]
    rows = _task_rows(columns)
    for row in rows:  # a blank would read as "no score": say why there is none
        row[1:] = ["held out" if row[0] in {safe_label(t) for t in held} else cell
                   for cell, (_, held) in zip(row[1:], groups)]
    return md_table(["task"] + [group_label(k) for k in groups], rows)


def stages_table(group: Group, num_stages: int) -> str:
    columns = [(group.trained[s], [c[s] for c in group.mean_curves], len(group.runs)) for s in range(num_stages)]
    return md_table(["task"] + [f"stage {s}" for s in range(num_stages)], _task_rows(columns))


def comparisons_table(comparisons: list[stats.Comparison]) -> str:
    def name(c: stats.Comparison) -> str:
        (a, a_stage), (b, _) = c.after, c.before
        if a == b:
            return f"{group_label(a)}: stage {a_stage} vs 0"
        return f"{group_label(a)} vs {group_label(b)} (stage {a_stage})"

    rows = [[name(c), str(c.test.n), "-" if c.test.mean_diff is None else f"{c.test.mean_diff:+.4f}",
             _p_cell(c.test.wilcoxon_p), _p_cell(c.test.ttest_p), _p_cell(c.holm_p)] for c in comparisons]
    return md_table(["comparison", "n pairs", "mean diff", "Wilcoxon p", "t-test p", "Holm p (Wilcoxon)"], rows)


def held_out_table(groups: dict[stats.GroupKey, Group], final: int) -> str | None:
    """Per held-out task (of each held-out set): accuracy at stage 0 and at the final stage, per strategy."""
    rows_keys = dict.fromkeys((held, task) for (_, held) in groups for task in held)
    if not rows_keys:
        return None
    strategies = list(dict.fromkeys(strategy for strategy, held in groups if held))
    header = ["held-out task"] + [f"{strategy_label(s)} stage {stage}" for s in strategies for stage in (0, final)]
    rows = []
    for held, task in rows_keys:
        others = [t for t in held if t != task]
        row = [safe_label(task) + (f" (held out with {safe_label(', '.join(others))})" if others else "")]
        for strategy in strategies:
            group = groups.get((strategy, held))
            for stage in (0, final):
                values = [] if group is None else [v for (t, _), v in group.held_out[stage].items() if t == task]
                row.append(_spread_cell(stats.mean_std(values), 0 if group is None else len(group.runs)))
        rows.append(row)
    return md_table(header, rows)


def wall_time_table(runs: list[Run]) -> str:
    rows = [[str(run.results_path), strategy_label(run.group[0]), safe_label(", ".join(run.held_out)) or "-",
             str(run.seed), str(len(run.stages)), f"{sum(s['seconds'] for s in run.stages):.1f}"] for run in runs]
    return md_table(["results.json", "strategy", "held out", "seed", "stages", "seconds"], rows)


LEGEND = ("Cells: accuracy, mean ± std over seeds (sample std; none with one seed); `(n=k)` when fewer seeds "
          "than the group's have a score. `mean` is each run's mean accuracy over its trained tasks. "
          f"`{CENTRALIZED}`: one site pools every site's data, so it is a reference, not a federated method.")
TESTS_NOTE = ("Pairs: (task, seed), trained tasks scored in both. Wilcoxon signed-rank (two-sided) is the primary "
              "test, Holm-adjusted across the comparisons of this table; the paired t-test is shown beside it. "
              "p = 1 when every difference is zero; - when fewer than 2 pairs (or, for t, no variance).")
FIGURES_NOTE = ("Figures: `fig3_gain.png` (mean accuracy gain over stage 0 per stage, ± std over seeds), "
                "`gain_heatmap.png` (per-task gain, final stage minus stage 0, mean over seeds); with variants "
                "(privacy, robustness settings) also `final_accuracy.png` (mean accuracy at stage 0 and the final "
                "stage per group) and, with differential privacy, `accuracy_vs_epsilon.png`.")
PRIVACY_NOTE = ("Epsilon: the run's cumulative epsilon at the final stage (the worst protected party: the "
                "federation at the site level, the worst site at the example level), at the run's delta, by "
                "Opacus's RDP accountant; - without differential privacy (no guarantee).")


def final_epsilons(group: Group, final: int) -> list[float | None]:
    """Each run's cumulative epsilon at ``final`` (None without DP)."""
    return [run.stages[final].get("epsilon") for run in group.runs]


def privacy_table(groups: dict[stats.GroupKey, Group], final: int) -> str:
    rows = []
    for key, group in groups.items():
        epsilons = [e for e in final_epsilons(group, final) if e is not None]
        gains = stats.gain_spreads(group.mean_curves)
        rows.append([group_label(key), f"{max(epsilons):.3f}" if epsilons else "-",
                     _spread_cell(stats.mean_std(c[final] for c in group.mean_curves), len(group.runs))]
                    + [_spread_cell(gains[stage], len(group.runs)) for stage in range(1, final + 1)])
    return md_table(["group", "epsilon (final)", f"mean accuracy, stage {final}"]
                    + [f"gain over stage 0, stage {stage}" for stage in range(1, final + 1)], rows)


def report_markdown(runs: list[Run], groups: dict[stats.GroupKey, Group], num_stages: int,
                    comparisons: list[stats.Comparison], notes: list[str]) -> str:
    final = num_stages - 1
    seeds = ", ".join(str(seed) for seed in sorted({run.seed for run in runs}))
    parts = ["# MedUniverse report", "",
             (f"{len(runs)} runs in {len(groups)} groups (strategy, held-out tasks); seeds {seeds}; "
              f"stages 0..{final} (0 = the starting base)."), LEGEND, ""]
    parts += [f"- note: {_md(note)}" for note in notes] + ([""] if notes else [])
    parts += [f"## Accuracy at the final stage ({final}), by strategy", "", final_stage_table(groups, final), ""]
    if any(variant_of(key) for key in groups):
        parts += ["## Accuracy, gain and privacy by group", "", PRIVACY_NOTE, "", privacy_table(groups, final), ""]
    parts += ["## Paired tests", "", TESTS_NOTE, "", comparisons_table(comparisons), ""]
    held_out = held_out_table(groups, final)
    if held_out is not None:
        parts += ["## Held-out tasks (never trained on: domain generalisation)", "", held_out, ""]
    for key, group in groups.items():
        parts += [f"## Accuracy by stage: {_md(group_label(key))}", "", stages_table(group, num_stages), ""]
    parts += ["## Wall time per run (sum of stage seconds)", "", wall_time_table(runs), ""]
    return "\n".join(parts + [FIGURES_NOTE, ""])


# ------------------------------------------------------------------ figures
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp)
    tmp.replace(path)


def plot_gain_over_seeds(groups: dict[stats.GroupKey, Group], num_stages: int, path: Path) -> None:
    """Fig. 3 over seeds: per strategy, the mean accuracy gain over stage 0 per stage, ± std band."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 4.5), dpi=120)
    stages = list(range(num_stages))
    for key, group in groups.items():
        spreads = stats.gain_spreads(group.mean_curves)
        mean = [float("nan") if s.mean is None else 100 * s.mean for s in spreads]
        std = [0.0 if s.std is None else 100 * s.std for s in spreads]
        dashed = "--" if key[0] == "centralized" else "-"
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
    _save(fig, path)
    plt.close(fig)


def plot_gain_heatmap(groups: dict[stats.GroupKey, Group], final: int, path: Path) -> None:
    """Per-task gain (final stage minus stage 0, mean over seeds), tasks x strategies, centred at 0."""
    import numpy as np

    plt = _pyplot()
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
    _save(fig, path)
    plt.close(fig)


def variant_of(key: stats.GroupKey) -> bool:
    return " [" in key[0]


def plot_final_accuracy(groups: dict[stats.GroupKey, Group], final: int, path: Path) -> None:
    """Per group, the mean accuracy at stage 0 and at the final stage (mean ± std over seeds)."""
    plt = _pyplot()
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
    _save(fig, path)
    plt.close(fig)


def plot_accuracy_vs_epsilon(groups: dict[stats.GroupKey, Group], final: int, path: Path) -> None:
    """Final mean accuracy (± std over seeds) against the final epsilon, one series per DP level; runs
    without DP at the right edge, marked infinity."""
    plt = _pyplot()
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
    _save(fig, path)
    plt.close(fig)


# ------------------------------------------------------------------ the whole report
def default_out(runs: list[Run]) -> Path:
    """``report/`` in the runs' common parent directory; ``./report`` when that is the filesystem root."""
    common = Path(os.path.commonpath([run.results_path.absolute().parent for run in runs]))
    return Path("report") if common == Path(common.anchor) else common / "report"


def write_report(runs: list[Run], out: Path, notes: list[str]) -> list[Path]:
    """report.md (with ``notes``) and both figures of ``runs`` (distinct, with stages) in ``out``; the
    paths written."""
    lengths = {len(run.stages) for run in runs}
    num_stages = min(lengths)
    if len(lengths) > 1:
        notes = [*notes, (f"runs have {min(lengths)} to {max(lengths)} stages: "
                          f"the report uses stages 0..{num_stages - 1}, common to all")]
    groups = build_groups(runs, num_stages)
    comparisons = stats.comparisons({k: g.trained for k, g in groups.items()}, num_stages - 1)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "report.md", out / "fig3_gain.png", out / "gain_heatmap.png"]
    markdown = report_markdown(runs, groups, num_stages, comparisons, notes + config_notes(groups))
    tmp = paths[0].with_suffix(".md.tmp")
    tmp.write_text(markdown)
    tmp.replace(paths[0])
    plot_gain_over_seeds(groups, num_stages, paths[1])
    plot_gain_heatmap(groups, num_stages - 1, paths[2])
    if any(variant_of(key) for key in groups):
        paths.append(out / "final_accuracy.png")
        plot_final_accuracy(groups, num_stages - 1, paths[-1])
    if any(e is not None for g in groups.values() for e in final_epsilons(g, num_stages - 1)):
        paths.append(out / "accuracy_vs_epsilon.png")
        plot_accuracy_vs_epsilon(groups, num_stages - 1, paths[-1])
    return paths


def parse_report_args(prog: str, doc: str, out_help: str, argv: list[str] | None) -> argparse.Namespace:
    """A report CLI's arguments: the paths to read runs from, and ``--out``."""
    parser = argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", type=Path,
                        help="run directories, results.json files, Hydra job or sweep directories")
    parser.add_argument("--out", type=Path, default=None, help=out_help)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_report_args("python -m meduniverse_flwr.report", __doc__,
                             "where report.md and the figures go (default: report/ in the runs' common parent; "
                             "with one run, given --out only)", argv)
    status, runs = 0, []
    for path in args.paths:
        for results_path, run_dir in find_runs(path):
            try:
                run = read_run(results_path)
            except ValueError as err:
                print(f"report: {err}", file=sys.stderr)
                status = 2
                continue
            print(run_text(results_path, run_dir, run.stages), end="\n\n")
            runs.append(run)
    if runs and all(run.config.get("schedule") == "arrival" for run in runs):
        from . import arrival_report  # imported here: it builds on this module

        # arrival runs are compared across arms by seed and label budget: a report of their own
        return max(status, arrival_report.report_paths([run.results_path for run in runs], args.out))
    runs, notes = distinct_runs(runs)
    for note in notes:
        print(f"report: {note}", file=sys.stderr)
    if runs and (args.out is not None or len(runs) > 1):
        written = write_report(runs, args.out or default_out(runs), notes)
        print("report: " + ", ".join(str(path) for path in written))
    return status


if __name__ == "__main__":
    sys.exit(main())
