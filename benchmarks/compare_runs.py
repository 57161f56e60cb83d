"""Compare federation settings on the same universe: one in-process run per override set.

    python benchmarks/compare_runs.py '{}' '{"transport-dtype": "bf16"}' '{"pretrain": "none"}'

Each argument is a JSON object of run-config overrides on top of
``[tool.flwr.app.config]``. Runs go through the real ServerApp and ClientApp
handlers on an in-process grid (``simulation/inprocess.py``: same results as
``flwr run``, without Ray start-up). Prints mean accuracy per stage, the
final gain and bytes per stage. ``--nodes`` sets the number of simulated nodes.
"""

import argparse
import json
import logging
import tempfile
import tomllib
from pathlib import Path

from flwr.app import Context, RecordDict

from meduniverse_flwr import server_app
from meduniverse_flwr.client_app import app as client_app
from simulation.hostile_app import app as hostile_app
from simulation.inprocess import InProcessGrid

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="+", help="JSON objects of run-config overrides")
    parser.add_argument("--nodes", type=int, default=4)
    args = parser.parse_args()
    logging.getLogger("flwr").setLevel(logging.WARNING)
    with open(ROOT / "pyproject.toml", "rb") as handle:
        defaults = tomllib.load(handle)["tool"]["flwr"]["app"]["config"]
    for text in args.overrides:
        overrides = json.loads(text)
        config = {**defaults, "output-dir": tempfile.mkdtemp(prefix="compare-runs-"), **overrides}
        app = hostile_app if config["attack-nodes"] > 0 else client_app  # as simulation.run picks
        grid = InProcessGrid(app, config, args.nodes)
        server_app.main(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=config))
        results = json.loads((Path(config["output-dir"]) / "latest" / "results.json").read_text())
        means = [round(s["mean_accuracy"], 4) for s in results["stages"]]
        print(f"{json.dumps(overrides)}: mean accuracy per stage {means}, final gain "
              f"{results['summary']['accuracy_gain'][-1]:+.4f}, bytes down/up stage 1: "
              f"{results['stages'][1]['bytes_down']:,} / {results['stages'][1]['bytes_up']:,}", flush=True)


if __name__ == "__main__":
    main()
