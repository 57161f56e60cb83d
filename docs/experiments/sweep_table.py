"""One row per run of a sweep: the run-config keys that differ between its runs, then the mean
accuracy and AUC over the run's tasks at one stage, and the replies each stage rejected
(EXPERIMENTS.md: choosing the scoring recipe on validation data, from the committed results.json
files of `arrival-val`; what the norm bound rejects, from those of `attack-norm-bound`).

    python docs/experiments/sweep_table.py docs/experiments/arrival-val --stage 0
    python docs/experiments/sweep_table.py docs/experiments/attack-norm-bound
"""

import argparse
from pathlib import Path

import numpy as np

from meduniverse_flwr.report.run_finder import find_runs
from meduniverse_flwr.server.results import read_results


def mean_of(per_task: dict, metric: str) -> str:
    values = [scores[metric] for scores in per_task.values() if not scores["held_out"]]
    return "-" if not values or None in values else f"{np.mean(values):.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", type=Path, help="sweep or run directories, results.json files")
    parser.add_argument("--stage", type=int, default=-1, help="the stage scored (default: the last)")
    args = parser.parse_args()
    runs = [read_results(results) for path in args.paths for results, _ in find_runs(path)]
    keys = sorted({key for run in runs for key in run["config"]})
    varying = [key for key in keys if len({repr(run["config"].get(key)) for run in runs}) > 1
               and key not in ("output-dir", "resume-from")]
    print("| " + " | ".join(varying + ["mean accuracy", "mean AUC", "replies rejected, stage 1, 2, ..."]) + " |")
    print("|" + "---|" * (len(varying) + 3))
    for run in sorted(runs, key=lambda r: tuple(r["config"].get(key) for key in varying)):
        per_task = run["stages"][args.stage]["per_task"]
        cells = [str(run["config"].get(key)) for key in varying] + [mean_of(per_task, m) for m in ("accuracy", "auc")]
        cells.append(" / ".join(str(len(stage["rejected"])) for stage in run["stages"][1:]) or "-")
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
