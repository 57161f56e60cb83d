"""The default federation (pyproject's declared config, 4 nodes) in-process from the source tree at argv[1], its
stages as JSON on stdout: two trees (e.g. a `git worktree` of an older commit) give the same stages when a
change keeps the default run as it was.

    python docs/experiments/default_stages.py /tmp/old /tmp/out-old > old.json
"""
import json
import sys
import tomllib
from pathlib import Path

root, out = Path(sys.argv[1]), sys.argv[2]
sys.path.insert(0, str(root))
from flwr.app import Context, RecordDict  # noqa: E402

from meduniverse_flwr import server_app  # noqa: E402
from meduniverse_flwr.client_app import app  # noqa: E402
from simulation.inprocess import InProcessGrid  # noqa: E402

assert Path(server_app.__file__).is_relative_to(root), server_app.__file__
config = tomllib.load(open(root / "pyproject.toml", "rb"))["tool"]["flwr"]["app"]["config"]
config.update({"output-dir": out, "data-root": f"/tmp/default-cache-{root.name}"})
server_app.main(InProcessGrid(app, config, 4), Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                                                       run_config=config))
stages = json.load(open(f"{out}/latest/results.json"))["stages"]
print(json.dumps([{"stage": s["stage"], "participants": s["participants"], "per_task": s["per_task"],
                   "mean_accuracy": s["mean_accuracy"]} for s in stages]))
