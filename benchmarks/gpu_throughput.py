"""Fine-tuning and pretraining throughput on a GPU: the ClientApp's loop vs a bare timm loop.

    python benchmarks/gpu_throughput.py                 # on a CUDA machine: the table in benchmarks/README.md
    python benchmarks/gpu_throughput.py --smoke         # tiny sizes, any device (checks the script runs)

For each (model, image size, batch) the same work three ways, images/s:
(a) ``task.fit``: what a node runs per train message (uint8 images moved to the
    device once, per-batch conversion and flips, bf16 autocast, AdamW with
    warm-up + cosine, loss bookkeeping);
(b) a bare timm loop: same model, batch and precision, ready float tensors on the
    device, nothing but forward, backward and step;
(c) ``task.fit`` with 4x the batch, and with ``torch.compile``.
Model FLOP/s = images/s x (forward + backward FLOPs per image, counted by
``torch.utils.flop_counter``), against the chip's dense bf16 peak (``--peak-tflops``).
Then MAE pretraining images/s, fp32 vs bf16 autocast (``pretrain.pretrain`` does the latter on CUDA).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from meduniverse_flwr.data.node_task import NodeTask, TaskData
from meduniverse_flwr.learn.evaluate import evaluate_base
from meduniverse_flwr.learn.finetune import EVAL_PROTOCOLS, TrainSettings, autocast, fit, resolve_device, train_on_task
from meduniverse_flwr.learn.model import create_backbone, create_model, embed_dim, new_head_state
from meduniverse_flwr.server.pretrain import PretrainSettings, pretrain
from meduniverse_flwr.wire.card import TaskCard

CLASSES = 8


def synthetic(n: int, size: int) -> TaskData:
    rng = np.random.default_rng(0)
    return TaskData(torch.from_numpy(rng.integers(0, 256, (n, 3, size, size), dtype=np.uint8)),
                    torch.from_numpy(rng.integers(0, CLASSES, n)))


def flops_per_image(name: str, size: int, device: torch.device) -> float:
    """Forward + backward FLOPs of one training step, per image (bf16 autocast on CUDA)."""
    model = create_model(name, size, num_classes=CLASSES).to(device)
    x = torch.randn(4, 3, size, size, device=device)
    with FlopCounterMode(display=False) as counter, autocast(device):
        F.cross_entropy(model(x).float(), torch.zeros(4, dtype=torch.long, device=device)).backward()
    return counter.get_total_flops() / 4


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def ours(name: str, size: int, data: TaskData, batch: int, device: torch.device, compiled: bool) -> float:
    torch.manual_seed(0)
    model = create_model(name, size, num_classes=CLASSES)
    settings = TrainSettings(1, 1e-3, 0.05, batch, 0, device, compiled)
    fit(model, data, "multiclass", settings)  # warm-up (and compilation)
    sync(device)
    started = time.perf_counter()
    fit(model, data, "multiclass", settings)
    sync(device)
    return len(data) / (time.perf_counter() - started)


def bare(name: str, size: int, data: TaskData, batch: int, device: torch.device) -> float:
    torch.manual_seed(0)
    model = create_model(name, size, num_classes=CLASSES).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    images = (data.images.to(device).float() / 127.5 - 1)
    labels = data.labels.to(device)

    def epoch() -> None:
        for start in range(0, len(images), batch):
            with autocast(device):
                loss = F.cross_entropy(model(images[start:start + batch]).float(), labels[start:start + batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    epoch()
    sync(device)
    started = time.perf_counter()
    epoch()
    sync(device)
    return len(images) / (time.perf_counter() - started)


def node_paths(device: torch.device) -> dict[str, float]:
    """A node's whole train and evaluation paths on ``device`` (what device=auto picks), timed."""
    card = TaskCard("synthetic", "test", CLASSES, "multiclass", 512, 256, 128)
    task = NodeTask(card, synthetic(512, 28), synthetic(128, 28), synthetic(256, 28))
    base = create_backbone("vit-tiny", 28).state_dict()
    head = new_head_state(embed_dim("vit-tiny"), CLASSES, 0)
    settings = TrainSettings(2, 1e-3, 0.05, 64, 0, device)
    seconds = {}
    started = time.perf_counter()
    backbone, _, metrics = train_on_task("vit-tiny", 28, task, {**base, **head}, settings, validate=True)
    seconds["train_on_task"] = time.perf_counter() - started
    assert all(v.device.type == "cpu" for v in backbone.values()) and np.isfinite(metrics["train-loss"])
    for protocol in EVAL_PROTOCOLS:
        started = time.perf_counter()
        scores = evaluate_base("vit-tiny", 28, task, backbone, protocol, settings)
        seconds[protocol] = time.perf_counter() - started
        assert 0 <= scores["accuracy"] <= 1
    return {k: round(v, 2) for k, v in seconds.items()}


def pretrain_rate(name: str, size: int, n: int, device: str, bf16: bool) -> float:
    images = synthetic(n, size).images
    settings = PretrainSettings(method="mae", epochs=2, batch_size=256, warmup_epochs=0, bf16=bf16)
    with tempfile.TemporaryDirectory() as out:
        result = pretrain(name, size, images, settings, Path(out), device)
    return result.images_per_second[-1]  # the second epoch: after warm-up


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on any device")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H100/H200 SXM: 989)")
    parser.add_argument("--out", type=Path, default=None, help="also write the rows as JSON here")
    args = parser.parse_args()
    device = resolve_device("auto")
    cases = ([("vit-micro", 28, 16, 64)] if args.smoke else
             [("vit-tiny", 28, 64, 8192), ("vit-base", 224, 64, 1024)])
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"device {name}, torch {torch.__version__}")
    print(json.dumps({"node_paths_seconds": node_paths(device)}), flush=True)
    rows = []
    for model, size, batch, n in cases:
        data = synthetic(n, size)
        flops = flops_per_image(model, size, device)
        row = {"model": model, "image_size": size, "batch": batch, "gflops_per_image": flops / 1e9,
               "a_fit": ours(model, size, data, batch, device, False), "b_bare": bare(model, size, data, batch, device),
               "c_fit_4x_batch": ours(model, size, data, 4 * batch, device, False),
               "c_fit_compiled": ours(model, size, data, batch, device, True)}
        row["a_over_b"] = row["a_fit"] / row["b_bare"]
        best = max(row["a_fit"], row["c_fit_4x_batch"], row["c_fit_compiled"])
        row["mfu_a"] = row["a_fit"] * flops / (args.peak_tflops * 1e12)
        row["mfu_best"] = best * flops / (args.peak_tflops * 1e12)
        rows.append(row)
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
        if args.out:  # written as it goes: a run cut short still leaves its rows
            args.out.write_text(json.dumps({"device": name, "torch": torch.__version__, "fine_tuning": rows}, indent=2))
    pre_n, pre_size, pre_model = (512, 28, "vit-micro") if args.smoke else (16384, 28, "vit-tiny")
    pretraining = {"model": pre_model, "image_size": pre_size, "batch": 256,
                   "mae_fp32": pretrain_rate(pre_model, pre_size, pre_n, str(device), False),
                   "mae_bf16": pretrain_rate(pre_model, pre_size, pre_n, str(device), True)}
    print(json.dumps({k: round(v, 1) if isinstance(v, float) else v for k, v in pretraining.items()}), flush=True)
    if args.out:
        args.out.write_text(json.dumps({"device": name, "torch": torch.__version__, "fine_tuning": rows,
                                        "pretraining": pretraining}, indent=2))


if __name__ == "__main__":
    main()
