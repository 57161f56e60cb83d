"""Training-loader throughput vs the training step it feeds, at 28 and 64 px.

    python benchmarks/loader_throughput.py [--threads 1]

The loader is exactly what ``task.fit`` does per batch: gather a shuffled
batch of uint8 images, convert to float in [-1, 1] (grayscale repeated to 3
channels), random horizontal flips. The step is a full vit-micro training step
(forward, backward, AdamW) on that batch. Target: loader < 10% of a step.
"""

import argparse
import time

import numpy as np
import torch

from meduniverse_flwr.data.node_task import to_image_tensor
from meduniverse_flwr.learn.augment import random_flip
from meduniverse_flwr.learn.finetune import task_loss, to_input
from meduniverse_flwr.learn.model import create_model

BATCH = 64


def measure(image_size: int, channels: int, batches: int) -> tuple[float, float]:
    rng = np.random.default_rng(0)
    shape = (4000, image_size, image_size) + ((3,) if channels == 3 else ())
    images = to_image_tensor(rng.integers(0, 256, shape, dtype=np.uint8), image_size)
    labels = torch.from_numpy(rng.integers(0, 4, 4000))
    generator = torch.Generator().manual_seed(0)
    order = torch.randperm(len(images), generator=generator)
    device = torch.device("cpu")

    def load(b):
        index = order[(b * BATCH) % (len(images) - BATCH):][:BATCH]
        return random_flip(to_input(images[index], device), generator), labels[index]

    started = time.perf_counter()
    prepared = [load(b) for b in range(batches)]
    loader_seconds = (time.perf_counter() - started) / batches

    torch.manual_seed(0)
    model = create_model("vit-micro", image_size, num_classes=4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for b, (x, y) in enumerate(prepared + prepared[:2]):
        if b == 2:
            started = time.perf_counter()
        loss = task_loss(model(x), y, "multiclass")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    step_seconds = (time.perf_counter() - started) / batches
    return loader_seconds, step_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 = one simulated node's share)")
    parser.add_argument("--batches", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), batch {BATCH}")
    for size in (28, 64):
        for channels in (1, 3):
            loader, step = measure(size, channels, args.batches)
            print(f"{size:3d} px, {channels} ch: loader {1 / loader:8.0f} batches/s ({1e3 * loader:.2f} ms), "
                  f"step {1 / step:6.1f} batches/s ({1e3 * step:.1f} ms), loader/step = {100 * loader / step:.1f}%")


if __name__ == "__main__":
    main()
