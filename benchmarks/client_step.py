"""The ClientApp's fine-tuning loop vs a bare timm training loop, images/s side by side.

    python benchmarks/client_step.py [--threads 1] [--image-size 28]

Both train the same vit-micro (same init, batch 64, AdamW) for the same number
of examples. Ours is ``task.fit`` on in-memory uint8 images (per-batch
conversion, random flips, warm-up + cosine schedule, loss bookkeeping); the
bare loop gets ready float tensors and does nothing but forward, backward and
step. Target: ours / bare >= 0.95.
"""

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

from meduniverse_flwr.data.node_task import TaskData, to_image_tensor
from meduniverse_flwr.learn.finetune import TrainSettings, fit
from meduniverse_flwr.learn.model import create_model

BATCH = 64


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--image-size", type=int, default=28)
    parser.add_argument("--examples", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    images = to_image_tensor(rng.integers(0, 256, (args.examples, args.image_size, args.image_size, 3),
                                         dtype=np.uint8), args.image_size)
    labels = torch.from_numpy(rng.integers(0, 4, args.examples))
    data = TaskData(images, labels)
    ready = [(images[i:i + BATCH].float() / 127.5 - 1, labels[i:i + BATCH]) for i in range(0, args.examples, BATCH)]

    def ours() -> float:
        torch.manual_seed(0)
        model = create_model("vit-micro", args.image_size, num_classes=4)
        started = time.perf_counter()
        fit(model, data, "multiclass", TrainSettings(1, 1e-3, 0.05, BATCH, 0, torch.device("cpu")))
        return args.examples / (time.perf_counter() - started)

    def bare() -> float:
        torch.manual_seed(0)
        model = create_model("vit-micro", args.image_size, num_classes=4).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
        started = time.perf_counter()
        for x, y in ready:
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return args.examples / (time.perf_counter() - started)

    ours(), bare()  # warm-up
    rates = {"ours": [], "bare": []}
    for _ in range(args.repeats):  # interleaved, so drift hits both alike
        rates["ours"].append(ours())
        rates["bare"].append(bare())
    o, b = np.median(rates["ours"]), np.median(rates["bare"])
    print(f"torch {torch.__version__}, {args.threads} thread(s), vit-micro {args.image_size}px, batch {BATCH}")
    print(f"ClientApp loop {o:.0f} img/s, bare timm loop {b:.0f} img/s, ratio {o / b:.3f} (target >= 0.95)")


if __name__ == "__main__":
    main()
