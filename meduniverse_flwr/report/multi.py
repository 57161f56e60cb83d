"""The per-stage table of each run and where its files are (``run_table``); over several runs, the
report across seeds and strategies (tables, paired tests, Fig. 3 over seeds, per-task gain heatmap:
``groups``, ``markdown``, ``figures``).

    python -m meduniverse_flwr.report outputs/latest [more run dirs, results.json files, Hydra job or sweep dirs]
    python -m meduniverse_flwr.report multirun/2025-01-01/12-00-00 --out report

Runs are found by ``run_finder`` (a sweep or an ``output-dir`` stands for every run below it).

Every ``results.json`` is read with ``results.read_results`` (checked as untrusted): a bad one is
one line on stderr and exit status 2, after the good ones are printed and reported.

With two or more distinct runs, ``report.md``, ``fig3_gain.png`` and ``gain_heatmap.png`` are
written to ``--out``, by default ``report/`` in the runs' common parent directory (``./report``
when that is the filesystem root). Runs are grouped by (``strategy``, ``held-out``), one run per
seed; the numbers are in ``stats``. When every run read is an arrival run (``schedule = "arrival"``),
``report.arrival`` writes the report instead.
"""

from __future__ import annotations

import sys
from pathlib import Path

from meduniverse_flwr.common.files import write_text_atomic
from meduniverse_flwr.report import arrival, stats
from meduniverse_flwr.report.figures import (
    plot_accuracy_vs_epsilon,
    plot_final_accuracy,
    plot_gain_heatmap,
    plot_gain_over_seeds,
)
from meduniverse_flwr.report.groups import (
    Run,
    build_groups,
    config_notes,
    distinct_runs,
    final_epsilons,
    read_run,
    variant_of,
)
from meduniverse_flwr.report.markdown import report_markdown
from meduniverse_flwr.report.run_finder import default_out, find_runs, parse_report_args
from meduniverse_flwr.report.run_table import run_text


def write_report(runs: list[Run], out: Path, notes: list[str]) -> list[Path]:
    """report.md (with ``notes``) and both figures of ``runs`` (distinct, with stages) in ``out``; the
    paths written."""
    lengths = {len(run.stages) for run in runs}
    num_stages = min(lengths)
    if len(lengths) > 1:
        notes = [*notes, (f"runs have {min(lengths)} to {max(lengths)} stages: "
                          f"the report uses stages 0..{num_stages - 1}, common to all")]
    groups = build_groups(runs, num_stages)
    comparisons = stats.comparisons({k: g.trained for k, g in groups.items()}, num_stages - 1,
                                    held_out={k: g.held_out for k, g in groups.items()})
    paths = [out / "report.md", out / "fig3_gain.png", out / "gain_heatmap.png"]
    markdown = report_markdown(runs, groups, num_stages, comparisons, notes + config_notes(groups))
    write_text_atomic(paths[0], markdown)
    plot_gain_over_seeds(groups, num_stages, paths[1])
    plot_gain_heatmap(groups, num_stages - 1, paths[2])
    if any(variant_of(key) for key in groups):
        paths.append(out / "final_accuracy.png")
        plot_final_accuracy(groups, num_stages - 1, paths[-1])
    if any(e is not None for g in groups.values() for e in final_epsilons(g, num_stages - 1)):
        paths.append(out / "accuracy_vs_epsilon.png")
        plot_accuracy_vs_epsilon(groups, num_stages - 1, paths[-1])
    return paths


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
        # arrival runs are compared across arms by seed and label budget: a report of their own
        return max(status, arrival.report_paths([run.results_path for run in runs], args.out))
    runs, notes = distinct_runs(runs)
    for note in notes:
        print(f"report: {note}", file=sys.stderr)
    if runs and (args.out is not None or len(runs) > 1):
        written = write_report(runs, args.out or default_out(runs), notes)
        print("report: " + ", ".join(str(path) for path in written))
    return status

