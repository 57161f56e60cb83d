"""MAE vs SimMIM pretraining throughput (images/s), measured side by side in one run.

    python benchmarks/pretrain_throughput.py [--model vit-micro] [--image-size 28] [--threads 2]

Both train the same timm encoder with the defaults of ``PretrainSettings``
(MAE: 75% masking, 64-wide 1-block decoder; SimMIM: 60% masking, linear head)
on random images, full training steps (forward, backward, AdamW), after warm-up.
"""

import argparse
import platform
import time

import torch

from meduniverse_flwr.learn.model import create_backbone
from meduniverse_flwr.server.pretrain import PretrainSettings, build_mim, random_masking


def images_per_second(method: str, model: str, image_size: int, batch_size: int, steps: int,
                      decoder_dim: int, decoder_depth: int) -> float:
    torch.manual_seed(0)
    settings = PretrainSettings(method=method, batch_size=batch_size, decoder_dim=decoder_dim,
                                decoder_depth=decoder_depth)
    mim = build_mim(create_backbone(model, image_size), settings)
    optimizer = torch.optim.AdamW(mim.parameters(), lr=1e-4)
    images = torch.randn(batch_size, 3, image_size, image_size)
    generator = torch.Generator().manual_seed(0)
    for step in range(steps + 3):  # 3 warm-up steps
        if step == 3:
            started = time.perf_counter()
        visible, mask = random_masking(batch_size, mim.num_patches, settings.effective_mask_ratio, generator)
        loss, _ = mim(images, visible, mask)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return batch_size * steps / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="vit-micro")
    parser.add_argument("--image-size", type=int, default=28)
    parser.add_argument("--batch-size", type=int, default=PretrainSettings().batch_size)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--decoder-dim", type=int, default=PretrainSettings().decoder_dim)
    parser.add_argument("--decoder-depth", type=int, default=PretrainSettings().decoder_depth)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rates = {m: images_per_second(m, args.model, args.image_size, args.batch_size, args.steps,
                                  args.decoder_dim, args.decoder_depth) for m in ("simmim", "mae")}
    print(f"{platform.processor() or platform.machine()}, {args.threads} threads, torch {torch.__version__}")
    print(f"{args.model} {args.image_size}px batch {args.batch_size}, MAE decoder "
          f"{args.decoder_dim}x{args.decoder_depth}: "
          f"SimMIM {rates['simmim']:.0f} img/s, MAE {rates['mae']:.0f} img/s, "
          f"MAE/SimMIM = {rates['mae'] / rates['simmim']:.2f} (target >= 2.5)")


if __name__ == "__main__":
    main()
