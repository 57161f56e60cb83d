"""What a stage costs on a real (TLS + node authentication) deployment, all on 127.0.0.1.

    python benchmarks/deployment_stage.py [--stages 2] [--datasets ct-tissue,histology-stain,brain-tissue]

Starts the launcher's local deployment (one SuperLink, one SuperNode per dataset),
runs ``flwr run . meduniverse-local`` with a random base, and prints each stage's
wall time from ``results.json`` next to the model's size on the wire: Flower
moves every array of a message as its own object (one request each), which is
why the object count matters.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from simulation.flower import finish_flwr_run, free_port, run_status, start_flwr_run

from deploy.launch import LOCAL_CONNECTION, LocalDeployment
from meduniverse_flwr.messages import pack
from meduniverse_flwr.model import create_backbone


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stages", type=int, default=2)
    parser.add_argument("--datasets", default="ct-tissue,histology-stain,brain-tissue")
    parser.add_argument("--local-epochs", type=int, default=1)
    args = parser.parse_args()

    record = pack(create_backbone("vit-micro", 28).state_dict(), "fp32")
    print(f"vit-micro backbone: {len(record)} arrays, {len(get_all_nested_objects(record))} Flower objects, "
          f"{record.count_bytes() / 1e6:.1f} MB")
    datasets = args.datasets.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        link = LocalDeployment(root / "link", datasets, str(root / "data"), root / "flwr-home", port=free_port(),
                               node_ports=[free_port() for _ in datasets])
        started = time.monotonic()
        link.start()
        try:
            print(f"deployment up in {time.monotonic() - started:.1f}s ({len(datasets)} SuperNodes)")
            config = (f"num-stages={args.stages} clients-per-stage={len(datasets)} local-epochs={args.local_epochs} "
                      f"pretrain='none' data-root='{root / 'data'}' output-dir='runs'")
            started = time.monotonic()
            run_id, output = finish_flwr_run(start_flwr_run(link.env, config, root / "run.log",
                                                            connection=LOCAL_CONNECTION), root / "run.log")
            total = time.monotonic() - started
            status = run_status(link.env, run_id)
            if status != "finished:completed":
                raise SystemExit(f"run {run_id} ended {status}:\n{output[-2000:]}")
            stages = json.loads((root / "link" / "runs" / "latest" / "results.json").read_text())["stages"]
        finally:
            link.stop()
    for stage in stages:
        print(f"stage {stage['stage']}: {stage['seconds']:6.1f}s  mean accuracy {stage['mean_accuracy']:.4f}")
    print(f"flwr run total {total:.1f}s")


if __name__ == "__main__":
    main()
