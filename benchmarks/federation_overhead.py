"""What the federation costs over the bare computation: ``flwr run`` vs a plain loop.

    python benchmarks/federation_overhead.py [--stages 6] [--local-epochs 2]

The same work, the same seed and settings (embedded universe, 4 tasks,
vit-micro, random stage-0 base, linear-probe evaluation after every stage):

(a) ``flwr run`` in simulation: a SuperLink started here, 4 SuperNodes with one
    CPU each (two train at once, one torch thread each), timed from starting
    the SuperLink to the run's final status, so process and Ray start-up count;
(b) one Python process calling the same library functions in a loop (torch's
    default threads, 2 on this machine), no Flower at all.

Prints both wall times and (a)/(b). Target: <= 1.15 for ~3 minutes of compute.
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from meduniverse_flwr.config import RunConfig
from meduniverse_flwr.data.node_task import load_node_task
from meduniverse_flwr.data.options import options_from
from meduniverse_flwr.learn.evaluate import evaluate_base
from meduniverse_flwr.learn.finetune import TrainSettings, train_on_task
from meduniverse_flwr.learn.model import create_backbone, embed_dim, new_head_state
from meduniverse_flwr.server.aggregation import RunningAggregate, mix
from meduniverse_flwr.wire.seeds import derive_seed
from simulation.flower import flwr_run, local_superlink, run_status


def plain_loop(config: RunConfig) -> list[float]:
    """Stage-wise training and evaluation with no Flower; returns mean accuracy per stage."""
    device = torch.device("cpu")
    tasks = [load_node_task(entry, 0, 1, options_from(vars(config), config.image_size)) for entry in config.datasets]
    torch.manual_seed(config.seed)
    base = {k: v.numpy() for k, v in create_backbone(config.model, config.image_size).state_dict().items()}

    def evaluate() -> float:
        accuracies = []
        for task in tasks:
            settings = TrainSettings(config.probe_epochs, config.lr, config.weight_decay, config.batch_size,
                                     derive_seed(config.seed, "evaluate", task.card.name), device)
            backbone = {k: torch.from_numpy(v.copy()) for k, v in base.items()}
            accuracies.append(evaluate_base(config.model, config.image_size, task, backbone, config.eval_mode,
                                            settings)["accuracy"])
        return sum(accuracies) / len(accuracies)

    means = [evaluate()]
    for stage in range(1, config.num_stages + 1):
        running = RunningAggregate(config.aggregation)
        for task in tasks:
            head = new_head_state(embed_dim(config.model), task.card.n_classes, derive_seed(config.seed, stage, "head", task.card.name))
            state = {**{k: torch.from_numpy(v.copy()) for k, v in base.items()}, **head}
            settings = TrainSettings(config.local_epochs, config.lr, config.weight_decay, config.batch_size,
                                     derive_seed(config.seed, stage, "train", task.card.name), device)
            backbone, _, metrics = train_on_task(config.model, config.image_size, task, state, settings,
                                              validate=config.node_metrics)
            running.add({k: v.numpy() for k, v in backbone.items()}, metrics["num-examples"])
        base = mix(base, running.result(), config.server_mix)
        means.append(evaluate())
    return means


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stages", type=int, default=6)
    parser.add_argument("--local-epochs", type=int, default=2)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="federation-overhead-"))
    # the setting its recorded numbers were measured in: every stage retrains the 4 sites, linear probe
    overrides = {"num_stages": args.stages, "local_epochs": args.local_epochs, "pretrain": "none",
                 "schedule": "every-stage", "clients_per_stage": 4, "aggregation": "weighted", "client_lr": 0.001,
                 "client_layer_decay": 1.0, "eval_mode": "linear-probe", "eval_epochs": 1, "eval_labels": 0,
                 "data_root": str(work / "data"), "output_dir": str(work / "outputs")}
    config = RunConfig.with_defaults(**overrides)
    plain_loop(RunConfig.with_defaults(**{**overrides, "num_stages": 1, "local_epochs": 1}))  # builds the data cache

    started = time.perf_counter()
    plain_means = plain_loop(config)
    plain_seconds = time.perf_counter() - started

    text = " ".join(f"{k.replace('_', '-')}={json.dumps(v) if isinstance(v, str) else v}"
                    for k, v in overrides.items())
    started = time.perf_counter()
    with local_superlink(work / "flwr-home", cwd=work) as link:
        run_id, _ = flwr_run(link.env, text.replace('"', "'"), "num-supernodes=4 client-resources-num-cpus=1")
        status = run_status(link.env, run_id)
    flower_seconds = time.perf_counter() - started
    results = json.loads((work / "outputs" / "latest" / "results.json").read_text())
    flower_means = [s["mean_accuracy"] for s in results["stages"]]

    print(f"work: {args.stages} stages x 4 clients x {args.local_epochs} epochs (+ linear-probe evaluations)")
    print(f"(b) plain loop : {plain_seconds:7.1f} s   mean accuracy per stage {[round(m, 4) for m in plain_means]}")
    print(f"(a) flwr run   : {flower_seconds:7.1f} s   status {status}, per stage {[round(m, 4) for m in flower_means]}")
    print(f"(a)/(b) = {flower_seconds / plain_seconds:.3f} (target <= 1.15)")


if __name__ == "__main__":
    main()
