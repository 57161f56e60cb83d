"""``report.md`` of a multi-run report: accuracy by strategy and stage (mean ± std over seeds), the
paired tests, held-out tasks, privacy; and the markdown pieces ``arrival`` shares."""

from __future__ import annotations

from meduniverse_flwr.common.text import safe_label
from meduniverse_flwr.registry import STRATEGIES
from meduniverse_flwr.report import stats
from meduniverse_flwr.report.groups import Group, Run, final_epsilons, group_label, strategy_label, variant_of


def escape_md(text: str) -> str:
    """``|`` would end a table cell."""
    return text.replace("|", "\\|")


def p_cell(p: float | None) -> str:
    return "-" if p is None else f"{p:.3g}"


def md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(escape_md(h) for h in header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(escape_md(c) for c in row) + " |" for row in rows])


def _spread_cell(spread: stats.Spread, seeds: int) -> str:
    if spread.mean is None:
        return "-"
    cell = f"{spread.mean:.4f}" + ("" if spread.std is None else f" ± {spread.std:.4f}")
    return cell + ("" if spread.n == seeds else f" (n={spread.n})")


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
        if c.held_out:
            scope = group_label(a) if a[1] else f"{strategy_label(a[0])} [every held-out set pooled]"
            return f"{scope}, held-out tasks: stage {a_stage} vs 0"
        if a == b:
            return f"{group_label(a)}: stage {a_stage} vs 0"
        return f"{group_label(a)} vs {group_label(b)} (stage {a_stage})"

    rows = [[name(c), str(c.test.n), "-" if c.test.mean_diff is None else f"{c.test.mean_diff:+.4f}",
             p_cell(c.test.wilcoxon_p), p_cell(c.test.ttest_p), p_cell(c.holm_p)] for c in comparisons]
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
          "than the group's have a score. `mean` is each run's mean accuracy over its trained tasks."
          + "".join(f" `{strategy_label(name)}`: one site pools every site's data, so it is a reference, not a "
                    "federated method." for name, entry in STRATEGIES.items() if entry.breaks_privacy))
TESTS_NOTE = ("Pairs: (task, seed), trained tasks scored in both; in the `held-out tasks` rows, the held-out "
              "tasks (never trained on), pooled over a strategy's held-out sets where it says so. Wilcoxon signed-rank (two-sided) is the primary "
              "test, Holm-adjusted across the comparisons of this table; the paired t-test is shown beside it. "
              "p = 1 when every difference is zero; - when fewer than 2 pairs (or, for t, no variance).")
FIGURES_NOTE = ("Figures: `fig3_gain.png` (mean accuracy gain over stage 0 per stage, ± std over seeds), "
                "`gain_heatmap.png` (per-task gain, final stage minus stage 0, mean over seeds); with variants "
                "(privacy, robustness settings) also `final_accuracy.png` (mean accuracy at stage 0 and the final "
                "stage per group) and, with differential privacy, `accuracy_vs_epsilon.png`.")
PRIVACY_NOTE = ("Epsilon: the run's cumulative epsilon at the final stage (the worst protected party: the "
                "federation at the site level, the worst site at the example level), at the run's delta, by "
                "Opacus's RDP accountant; - without differential privacy (no guarantee).")


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
    parts += [f"- note: {escape_md(note)}" for note in notes] + ([""] if notes else [])
    parts += [f"## Accuracy at the final stage ({final}), by strategy", "", final_stage_table(groups, final), ""]
    if any(variant_of(key) for key in groups):
        parts += ["## Accuracy, gain and privacy by group", "", PRIVACY_NOTE, "", privacy_table(groups, final), ""]
    parts += ["## Paired tests", "", TESTS_NOTE, "", comparisons_table(comparisons), ""]
    held_out = held_out_table(groups, final)
    if held_out is not None:
        parts += ["## Held-out tasks (never trained on: domain generalisation)", "", held_out, ""]
    for key, group in groups.items():
        parts += [f"## Accuracy by stage: {escape_md(group_label(key))}", "", stages_table(group, num_stages), ""]
    parts += ["## Wall time per run (sum of stage seconds)", "", wall_time_table(runs), ""]
    return "\n".join(parts + [FIGURES_NOTE, ""])
