"""What ``augment = "crop-flip"`` (MAE's random resized crop + flip, augment.py) costs against today's flip.

    python benchmarks/augment_speed.py [--threads 2] [--sizes 64,224]

Per image size: the augmentation alone on float batches of 64 (images/s), and ``task.fit`` of a
vit-micro (patch 8 at 64 px, 16 at 224 px) for one epoch with each recipe (images/s). Target, set
before measuring: crop-flip's fine-tuning at >= 0.9x flip's at both sizes.
"""

import argparse
import time

import numpy as np
import torch

from meduniverse_flwr.data.node_task import TaskData, to_image_tensor
from meduniverse_flwr.learn.augment import augmented
from meduniverse_flwr.learn.finetune import TrainSettings, fit
from meduniverse_flwr.learn.model import create_model

BATCH = 64


def augment_rate(recipe: str, size: int, repeats: int) -> float:
    x, generator = torch.rand(BATCH, 3, size, size) * 2 - 1, torch.Generator().manual_seed(0)
    augmented(x, recipe, generator)  # warm-up
    started = time.perf_counter()
    for _ in range(repeats):
        augmented(x, recipe, generator)
    return BATCH * repeats / (time.perf_counter() - started)


def fit_rate(recipe: str, size: int, examples: int) -> float:
    rng = np.random.default_rng(0)
    data = TaskData(to_image_tensor(rng.integers(0, 256, (examples, size, size, 3), dtype=np.uint8), size),
                    torch.from_numpy(rng.integers(0, 4, examples)))
    torch.manual_seed(0)
    model = create_model("vit-micro", size, num_classes=4)
    settings = TrainSettings(1, 1e-3, 0.05, BATCH, 0, torch.device("cpu"), augment=recipe)
    started = time.perf_counter()
    fit(model, data, "multiclass", settings)
    return examples / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sizes", default="64,224")
    parser.add_argument("--examples", type=int, default=512)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for size in (int(s) for s in args.sizes.split(",")):
        alone = {recipe: augment_rate(recipe, size, 20) for recipe in ("flip", "crop-flip")}
        fit_rate("flip", size, BATCH * 2)  # warm-up: the first fit pays for allocations and kernels
        trained = {recipe: fit_rate(recipe, size, args.examples) for recipe in ("flip", "crop-flip")}
        print(f"{size} px: augmentation alone flip {alone['flip']:,.0f} / crop-flip {alone['crop-flip']:,.0f} "
              f"images/s; fine-tuning flip {trained['flip']:,.0f} / crop-flip {trained['crop-flip']:,.0f} images/s "
              f"({trained['crop-flip'] / trained['flip']:.2f}x; target >= 0.9x)", flush=True)


if __name__ == "__main__":
    main()
