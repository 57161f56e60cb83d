"""How good a pretrained stage-0 base is: linear probe per task, random init vs MIM settings.

    python benchmarks/pretrain_probe.py '{"method": "mae", "epochs": 10}' '{"method": "simmim", "epochs": 10}'

Each argument is a JSON object of ``PretrainSettings`` fields. Pretrains on the
train and val images of the 4 embedded tasks, then scores each base with the
federation's stage-0 protocol (linear probe, 30 epochs, same seed) on every
task's test split; a seeded random base is the reference.
"""

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from meduniverse_flwr.config import RunConfig
from meduniverse_flwr.data.corpus import load_corpus
from meduniverse_flwr.data.node_task import load_node_task
from meduniverse_flwr.data.options import options_from
from meduniverse_flwr.learn.evaluate import evaluate_base
from meduniverse_flwr.learn.finetune import TrainSettings
from meduniverse_flwr.learn.model import create_backbone
from meduniverse_flwr.server.pretrain import PretrainSettings, pretrain


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("settings", nargs="*", default=['{"method": "mae", "epochs": 10}'])
    parser.add_argument("--data-root", default="")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    config = RunConfig.with_defaults(data_root=args.data_root)
    options = options_from(vars(config), config.image_size)
    tasks = [load_node_task(entry, 0, 1, options) for entry in config.datasets]

    def probe(backbone) -> str:
        scores = {t.card.name: evaluate_base(config.model, config.image_size, t, backbone, "linear-probe",
                                             TrainSettings(config.probe_epochs, config.lr, 0.05, 64, 1,
                                                           torch.device("cpu")))["accuracy"] for t in tasks}
        mean = sum(scores.values()) / len(scores)
        return f"mean {mean:.4f}  " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items())

    torch.manual_seed(0)
    print(f"random init: {probe(create_backbone(config.model, config.image_size).state_dict())}", flush=True)
    corpus = load_corpus(config.datasets, options)
    for text in args.settings:
        settings = PretrainSettings(**json.loads(text))
        started = time.perf_counter()
        result = pretrain(config.model, config.image_size, corpus, settings, Path(tempfile.mkdtemp()))
        print(f"{text} ({time.perf_counter() - started:.0f} s): {probe(load_file(result.encoder_path))}", flush=True)


if __name__ == "__main__":
    main()
