"""The report of the arrival protocol (``schedule = "arrival"``): what a task gains from the base it
is sent when it arrives, over the MIM base (the paper's Fig. 3), across seeds, arms and label budgets.

    python -m meduniverse_flwr.report.arrival multirun/2025-01-01/12-00-00 --out report

Runs are found and read as ``report`` does (``run_finder.find_runs``, ``results.read_results``); a bad
results.json is one line on stderr and exit status 2. ``report.main`` hands its runs here when every
one is an arrival run.

A task ``t`` that trains at stage ``a`` of a stage-wise run was sent base ``a - 1``; its arrival gain
is its score from that base minus its score from the MIM base (stage 0 of the same run), so 0 at
``a = 1``. A control run (``num-stages = 0``: random init, a base pretrained longer) scores only its
own base; its gain for ``t`` is that score minus the MIM base's score of ``t`` in a stage-wise run
of the same seed, eval-labels, datasets and eval-mode (the reference), at ``t``'s arrival stage there.
The unit is (task, seed); scores are in points (x 100). Arms are grouped per ``eval-labels`` level.

Written to ``--out`` (default ``report/`` in the runs' common parent): ``report.md``,
``fig3_gain.png`` and ``arrival.json`` (the numbers of every table). The runs are read in
``arrival_runs``, the numbers computed in ``arrival_analysis`` (the statistics in ``stats``); this
module writes them.
"""

from __future__ import annotations

import dataclasses
import sys
import textwrap
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from meduniverse_flwr.common.files import write_json_atomic, write_text_atomic
from meduniverse_flwr.common.text import safe_label
from meduniverse_flwr.report.arrival_analysis import (
    METRICS,
    TARGET_GAIN,
    Analysis,
    ArmResult,
    Estimate,
    Versus,
    analyse,
    task_cards,
)
from meduniverse_flwr.report.arrival_runs import ArrivalRun, level_label, level_order, read_run, usable_runs
from meduniverse_flwr.report.markdown import escape_md, md_table, p_cell
from meduniverse_flwr.report.plots import pyplot, save_figure
from meduniverse_flwr.report.run_finder import default_out, find_runs, parse_report_args

CLASSES_SHOWN = 6


# ------------------------------------------------------------------ report.md
def _num(value: float | None, fmt: str = "+.2f") -> str:
    return "-" if value is None else format(value, fmt)


def _ci(low: float | None, high: float | None) -> str:
    return "-" if low is None else f"[{low:+.2f}, {high:+.2f}]"


def _estimate_cell(e: Estimate) -> str:
    return "-" if e.mean is None else f"{e.mean:+.2f} {_ci(e.low, e.high)} (n={e.n})"


LEGEND = (
    "Unit: one (task, seed). Arrival gain of a task that trains at stage a: its score from the base it was "
    "sent (base a - 1, a fresh head on the eval-labels budget) minus its score from the MIM base (stage 0 of the "
    "same run); 0 at a = 1 by construction. A control's gain: its base's score minus the MIM base's score in "
    "the reference stage-wise run (same seed, eval-labels, datasets, eval-mode), at the task's arrival stage "
    "there. Scores and gains in points (x 100); accuracy and AUC (accuracy cannot see a change in a task at "
    "its majority class).")
TESTS_NOTE = (
    "Pooled over the pairs arriving at stage >= 2. Wilcoxon signed-rank (two-sided, against 0) is the primary "
    "test, Holm-adjusted across every row of this table (arms x levels x metrics) and of the arm-against-arm "
    "table; the one-sample t-test is "
    "beside it. Task-level p: each task's gains averaged over seeds, then Wilcoxon over the task means (a task "
    "counts once: the random-effects view). 95% CI: percentile cluster bootstrap over tasks (10,000 "
    "resamples of the tasks with replacement, every seed of a drawn task kept; seeded). SD: of the pairs "
    "(ddof 1). Detectable: the smallest mean gain a two-sided paired t-test at alpha 0.05 finds with power "
    f"0.8 at this n and SD, (t(0.975, n-1) + t(0.8, n-1)) x SD / sqrt(n); pairs for {TARGET_GAIN:g} points: "
    f"the smallest n where that is <= {TARGET_GAIN:g} points. p = 1 when every gain is 0; - with fewer than 2 "
    "pairs (or, for t, no variance).")
FIGURE_NOTE = ("Figure: `fig3_gain.png`, mean arrival gain per arrival stage with its 95% CI band, one line per "
               "arm (controls dashed), a column per eval-labels level, a row per metric. "
               "Numbers of every table: `arrival.json`.")


def pooled_table(results: list[ArmResult]) -> str:
    rows = [[level_label(r.eval_labels), r.arm, r.metric, str(p.n_pairs), str(p.n_tasks), _num(p.mean),
             _num(p.sd, ".2f"), _ci(p.low, p.high), p_cell(p.wilcoxon_p), p_cell(p.holm_p),
             p_cell(p.ttest_p), p_cell(p.task_level_p), _num(p.detectable_effect, ".2f"),
             "-" if p.pairs_needed is None else str(p.pairs_needed)]
            for r in results for p in [r.pooled]]
    return md_table(["level", "arm", "metric", "n pairs", "n tasks", "mean gain", "SD", "95% CI",
                            "Wilcoxon p", "Holm p", "t-test p", "task-level p", "detectable",
                            f"pairs for {TARGET_GAIN:g} points"], rows)


def versus_table(versus: list[Versus]) -> str:
    rows = [[level_label(v.eval_labels), v.arm, v.against, v.metric, str(p.n_pairs), str(p.n_tasks), _num(p.mean),
             _ci(p.low, p.high), p_cell(p.wilcoxon_p), p_cell(p.holm_p), p_cell(p.ttest_p),
             p_cell(p.task_level_p)] for v in versus for p in [v.pooled]]
    return md_table(["level", "arm", "against", "metric", "n pairs", "n tasks", "mean difference", "95% CI",
                            "Wilcoxon p", "Holm p", "t-test p", "task-level p"], rows)


def _stage_table(results: list[ArmResult], field: str) -> str:
    per_arm = [(r.arm, {e.stage: e for e in getattr(r, field)}) for r in results]
    stages = sorted({s for _, by_stage in per_arm for s in by_stage})
    rows = [[arm] + [_estimate_cell(by_stage[s]) if s in by_stage else "-" for s in stages]
            for arm, by_stage in per_arm if by_stage]
    return md_table(["arm"] + [f"stage {s}" for s in stages], rows)


def absolute_table(results: list[ArmResult]) -> str:
    rows = [[r.arm, str(r.absolute.n), _num(r.absolute.score, ".2f"), _num(r.absolute.mim, ".2f"),
             _num(r.pooled.mean)] for r in results]
    return md_table(["arm", "n pairs", "score from the arm's base", "score from the MIM base", "gain"], rows)


def _classes(classes: list[str]) -> str:
    shown = ", ".join(safe_label(c) for c in classes[:CLASSES_SHOWN])
    return (shown + f", ... (+{len(classes) - CLASSES_SHOWN})" if len(classes) > CLASSES_SHOWN else shown) or "-"


def per_task_table(results: list[ArmResult], cards: dict[str, dict[str, Any]]) -> str:
    tasks = sorted({task for r in results for task in r.per_task})
    rows = []
    for task in tasks:
        card = cards.get(task, {"modality": "", "classes": []})
        cells = [safe_label(task), safe_label(card["modality"]) or "-", _classes(card["classes"])]
        for r in results:
            cell = r.per_task.get(task)
            cells.append("-" if cell is None else f"{cell['mean']:+.2f} (n={cell['n']})")
        rows.append(cells)
    return md_table(["task", "modality", "classes"] + [r.arm for r in results], rows)


def runs_table(analysis: Analysis) -> str:
    rows = [[str(run.results_path), run.arm, level_label(run.eval_labels), str(run.seed), str(len(run.stages)),
             str(analysis.references.get(run.results_path, "-"))] for run in analysis.runs]
    return md_table(["results.json", "arm", "level", "seed", "stages", "MIM reference (controls)"], rows)


def _sections(analysis: Analysis) -> Iterable[tuple[int, str, list[ArmResult]]]:
    """(level, metric, that level's results for that metric in arm order)."""
    keys = dict.fromkeys((r.eval_labels, r.metric) for r in analysis.results)
    for level, metric in sorted(keys, key=lambda k: (level_order(k[0]), METRICS.index(k[1]))):
        yield level, metric, [r for r in analysis.results if (r.eval_labels, r.metric) == (level, metric)]


def report_markdown(analysis: Analysis) -> str:
    seeds = ", ".join(str(s) for s in sorted({run.seed for run in analysis.runs})) or "-"
    arms = list(dict.fromkeys(r.arm for r in analysis.results))
    parts = ["# MedUniverse arrival report", "",
             f"{len(analysis.runs)} runs, {len(arms)} arms ({_md_list(arms)}); seeds {seeds}.", "", LEGEND, ""]
    parts += [f"- note: {escape_md(note)}" for note in analysis.notes] + ([""] if analysis.notes else [])
    parts += ["## Arrival gain, arrival stages >= 2 pooled", "", TESTS_NOTE, "", pooled_table(analysis.results), ""]
    if analysis.versus:
        parts += ["## Arm against arm, arrival stages >= 2 pooled", "",
                  "Each arm's score minus the `against` arm's score of the same (task, seed): the arm's base "
                  "against that arm's base for the same arriving task. Every arm is compared with the first "
                  "stage-wise arm, and every stage-wise arm with each control pretrained longer (the federation "
                  "against the same compute spent on MIM). Tests and CI as above; Holm in one family with the "
                  "table above.", "", versus_table(analysis.versus), ""]
    sections = list(_sections(analysis))
    for level, metric, results in sections:
        parts += [f"## Arrival gain by arrival stage: {metric}, {level_label(level)}", "",
                  "Mean gain (points) [95% CI] (n pairs).", "", _stage_table(results, "per_stage"), ""]
    for level, metric, results in sections:
        parts += [f"## Scores of the arriving tasks (stage >= 2): {metric}, {level_label(level)}", "",
                  "Mean score (points): stage-wise arms from the base each task was sent, controls from their "
                  "base; the MIM base of the same (task, seed).", "", absolute_table(results), ""]
    cards = task_cards(analysis.runs)
    for level, metric, results in sections:
        parts += [f"## Arrival gain per task (stage >= 2, mean over seeds): {metric}, {level_label(level)}", "",
                  per_task_table(results, cards), ""]
    for field, title, what in (("unseen", "Unseen tasks", "every task not yet trained"),
                               ("held_out", "Held-out tasks", "every held-out task")):
        for level, metric, results in sections:
            shown = [r for r in results if getattr(r, field)]
            if shown:
                parts += [f"## {title} at each stage: {metric}, {level_label(level)}", "",
                          f"Stage-wise arms: mean over {what} scored at stage s of its score at s minus its score "
                          "at stage 0 (points) [95% CI] (n).", "", _stage_table(shown, field), ""]
    parts += ["## Runs read", "", runs_table(analysis), "", FIGURE_NOTE, ""]
    return "\n".join(parts)


def _md_list(items: list[str]) -> str:
    return escape_md(", ".join(items)) or "none"


# ------------------------------------------------------------------ figure, JSON, the whole report
def plot_gain(analysis: Analysis, path: Path) -> None:
    """Fig. 3: mean arrival gain per arrival stage with its 95% CI band, a line per arm, a column per
    eval-labels level, a row per metric that has a score."""
    plt = pyplot()
    sections = [s for s in _sections(analysis) if any(e.mean is not None for r in s[2] for e in r.per_stage)]
    levels = sorted({level for level, _, _ in sections}, key=level_order) or [0]
    metrics = [m for m in METRICS if any(metric == m for _, metric, _ in sections)] or ["accuracy"]
    colors = {arm: f"C{i % 10}" for i, arm in enumerate(dict.fromkeys(r.arm for r in analysis.results))}
    fig, axes = plt.subplots(len(metrics), len(levels), figsize=(5 * len(levels) + 2, 3.8 * len(metrics)),
                             dpi=120, squeeze=False)
    for row, metric in enumerate(metrics):
        for column, level in enumerate(levels):
            ax = axes[row][column]
            for r in (r for lv, m, rs in sections if (lv, m) == (level, metric) for r in rs):
                shown = [e for e in r.per_stage if e.mean is not None]
                x = [e.stage for e in shown]
                label = textwrap.fill(f"{r.arm} ({len(r.seeds)} seeds)", 30)
                ax.plot(x, [e.mean for e in shown], "--" if r.control else "-", marker="o", color=colors[r.arm],
                        label=label)
                ax.fill_between(x, [e.low for e in shown], [e.high for e in shown], color=colors[r.arm], alpha=0.2)
            ax.axhline(0, color="black", linewidth=0.8)
            ax.set_title(f"{metric}, {level_label(level)}", fontsize=9)
            ax.set_xlabel("arrival stage")
            ax.set_ylabel(f"mean arrival gain, {metric} (points)")
            ax.xaxis.get_major_locator().set_params(integer=True)
    legend = {label: handle for ax in axes.flat for handle, label in zip(*ax.get_legend_handles_labels())}
    if legend:  # every arm once, also one missing from the top right panel; outside, the lines stay visible
        axes[0][-1].legend(legend.values(), legend.keys(), fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.suptitle("Arrival gain over the MIM base (mean over (task, seed), 95% CI, bootstrap over tasks)", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)


def analysis_json(analysis: Analysis) -> dict[str, Any]:
    return {"unit": "(task, seed); scores and gains in points (x 100)",
            "target_gain_points": TARGET_GAIN,
            "runs": [{"results": str(run.results_path), "arm": run.arm, "eval_labels": run.eval_labels,
                      "seed": run.seed, "stages": len(run.stages),
                      "reference": str(analysis.references[run.results_path])
                      if run.results_path in analysis.references else None} for run in analysis.runs],
            "notes": analysis.notes,
            "tasks": task_cards(analysis.runs),
            "results": [dataclasses.asdict(r) for r in analysis.results],
            "versus": [dataclasses.asdict(v) for v in analysis.versus]}


def write_report(runs: list[ArrivalRun], out: Path, notes: Iterable[str] = ()) -> list[Path]:
    """report.md, fig3_gain.png and arrival.json of ``runs`` in ``out``; the paths written."""
    kept, skipped = usable_runs(runs)
    analysis = analyse(kept, [*notes, *skipped])
    paths = [out / "report.md", out / "fig3_gain.png", out / "arrival.json"]
    write_text_atomic(paths[0], report_markdown(analysis))
    plot_gain(analysis, paths[1])
    write_json_atomic(paths[2], analysis_json(analysis))
    return paths


def report_paths(paths: list[Path], out: Path | None) -> int:
    """Read every run ``paths`` stand for, write the report (to ``out``, or ``run_finder.default_out``);
    exit status 2 when a results.json was bad (one line each on stderr), else 0."""
    status, runs = 0, []
    for path in paths:
        for results_path, _ in find_runs(path):
            try:
                runs.append(read_run(results_path))
            except ValueError as err:
                print(f"arrival_report: {err}", file=sys.stderr)
                status = 2
    if runs:
        written = write_report(runs, out or default_out(runs))
        print("arrival_report: " + ", ".join(str(path) for path in written))
    return status


def main(argv: list[str] | None = None) -> int:
    args = parse_report_args("python -m meduniverse_flwr.report.arrival", __doc__,
                             "where report.md, fig3_gain.png and arrival.json go (default: report/ in the "
                             "runs' common parent)", argv)
    return report_paths(args.paths, args.out)


if __name__ == "__main__":
    sys.exit(main())
