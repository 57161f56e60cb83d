"""The L2 norm of each stage's base checkpoint, per run (EXPERIMENTS.md: how much noise site-level DP adds).

    python docs/experiments/base_norms.py multirun/dp-site
"""

import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

for root in sys.argv[1:]:
    for checkpoints in sorted(Path(root).glob("*/runs/*/checkpoints")):
        if checkpoints.parent.is_symlink():  # runs/latest names a run already listed
            continue
        stages = sorted(checkpoints.glob("stage-*.safetensors"), key=lambda path: int(path.stem.split("-")[1]))
        norms = [np.sqrt(sum(float(np.vdot(v, v)) for v in load_file(path).values())) for path in stages]
        print(checkpoints.parents[2].name, checkpoints.parent.name, " ".join(f"{norm:.1f}" for norm in norms))
