"""The L2 norm of each stage's base checkpoint, per run, as JSON on stdout (EXPERIMENTS.md: how much
noise site-level DP adds; the checkpoints are too large to commit, this summary is
docs/experiments/dp-site-base-norms.json).

    python docs/experiments/base_norms.py multirun/dp-site > docs/experiments/dp-site-base-norms.json
"""

import json
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

from meduniverse_flwr.server.results import read_results

rows = []
for root in sys.argv[1:]:
    for checkpoints in sorted(Path(root).glob("*/runs/*/checkpoints")):
        if checkpoints.parent.is_symlink():  # runs/latest names a run already listed
            continue
        config = read_results(checkpoints.parent / "results.json")["config"]
        stages = sorted(checkpoints.glob("stage-*.safetensors"), key=lambda path: int(path.stem.split("-")[1]))
        norms = [np.sqrt(sum(float(np.vdot(v, v)) for v in load_file(path).values())) for path in stages]
        rows.append({"run": f"{checkpoints.parents[2].name}/{checkpoints.parent.name}", "seed": config["seed"],
                     "dp-noise-multiplier": config["dp-noise-multiplier"],
                     "base_norm_per_stage": [round(norm, 1) for norm in norms]})
print(json.dumps(rows, indent=1))
