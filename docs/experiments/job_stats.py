"""What a sweep's jobs spent and how far their clients moved the base, from committed results.json.

    python docs/experiments/job_stats.py docs/experiments/arrival2/*/results.json

Prints the jobs' stage seconds (total, and the range per job: thread-seconds when each process ran
one thread) and the clients' ``update_ratio`` (||update - base|| / ||base||, per accepted train reply):
median, min and max.
"""

import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from meduniverse_flwr.server.results import read_results  # noqa: E402


def main(paths: list[str]) -> None:
    runs = [read_results(Path(path)) for path in paths]
    seconds = [sum(stage["seconds"] for stage in run["stages"]) for run in runs]
    ratios = [node["update_ratio"] for run in runs for stage in run["stages"] for node in stage.get("nodes", [])
              if node.get("update_ratio") is not None]
    print(f"{len(runs)} jobs: {sum(seconds):.0f} s in their stages (per job {min(seconds):.0f}-{max(seconds):.0f})")
    if ratios:
        print(f"update_ratio over {len(ratios)} train replies: median {statistics.median(ratios):.4f} "
              f"(min {min(ratios):.4f}, max {max(ratios):.4f})")


if __name__ == "__main__":
    main(sys.argv[1:])
