"""Lay out the eight shared datasets for the arrival experiments: each ``.npz`` linked into one folder,
with the sidecar ``<stem>.json`` (modality, class names, label kind) made from ``datasets.json``.

    python docs/experiments/shared_sidecars.py ../shared/data ~/.cache/meduniverse_flwr/shared8

The folder is the experiments' ``data_root`` (conf/experiment/arrival-cpu.yaml); the node data cache and
the pretrained bases are written there too, so it must be writable (the shared folder is not).
"""

import json
import sys
from pathlib import Path

source, target = Path(sys.argv[1]).resolve(), Path(sys.argv[2]).expanduser()
target.mkdir(parents=True, exist_ok=True)
for name, facts in json.loads((source / "datasets.json").read_text()).items():
    link = target / facts["file"]
    if not link.exists():
        link.symlink_to(source / facts["file"])
    sidecar = {"modality": facts["modality"], "classes": facts["classes"], "label-kind": facts["label_kind"]}
    (target / f"{Path(facts['file']).stem}.json").write_text(json.dumps(sidecar, indent=1) + "\n")
    print(f"{link}: {facts['modality']}, {len(facts['classes'])} classes")
