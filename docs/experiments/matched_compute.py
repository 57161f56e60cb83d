"""The MAE-longer control's size, from the compute the stages measured: how many epochs of MAE
continuation on the server's corpus cost what a stage-wise arm spent in its stages.

    python docs/experiments/matched_compute.py <stage-wise arm's job dirs...> --control <weight-0 job dirs...>

Spent: per run, the sum over its stages of every node's training seconds (``stages[].nodes[].seconds``)
and the server's own (``server_seconds``, a curation rule's training), averaged over the runs. One
continuation epoch: the weight-0 control's ``server_seconds`` per stage over its ``distill-epochs``
(the same loop on the same corpus, without teachers). Every run must come from the same machine and
thread count (the sweep states both): the seconds are then thread-seconds in one unit. Prints the
``pretrain_continue_epochs`` that matches, rounded up.
"""

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from meduniverse_flwr.server.results import read_results  # noqa: E402


def spent(results: dict) -> float:
    return sum(sum(node["seconds"] or 0.0 for node in stage["nodes"]) + stage.get("server_seconds", 0.0)
               for stage in results["stages"][1:])


def epoch_seconds(results: dict) -> float:
    stages = results["stages"][1:]
    return sum(stage["server_seconds"] for stage in stages) / (len(stages) * results["config"]["distill-epochs"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("arm", nargs="+", type=Path, help="job dirs (results.json) of the arm to match")
    parser.add_argument("--control", nargs="+", type=Path, required=True, help="job dirs of its weight-0 control")
    args = parser.parse_args()
    arm = [spent(read_results(path / "results.json")) for path in args.arm]
    control = [read_results(path / "results.json") for path in args.control]
    if any(c["config"]["distill-weight"] != 0 or not c["stages"][1:] for c in control):
        parser.error("--control: runs of a distill arm with distill-weight 0 and at least one stage")
    per_epoch = sum(epoch_seconds(c) for c in control) / len(control)
    mean = sum(arm) / len(arm)
    print(f"stages spent {mean:.1f} s per run (min {min(arm):.1f}, max {max(arm):.1f}, {len(arm)} runs); "
          f"one continuation epoch {per_epoch:.1f} s ({len(control)} runs)")
    print(f"pretrain_continue_epochs: {math.ceil(mean / per_epoch)}")


if __name__ == "__main__":
    main()
