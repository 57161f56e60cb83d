"""The pretraining loop: training with a per-epoch resume point, and its outputs (settings: ``settings``).

The encoder is exactly the timm ViT backbone the federation uses (``learn.model.create_backbone``), so
the pretrained weights move into stage 0 with no conversion. Labels are never read. A run writes
to its ``out_dir``: ``encoder.safetensors`` (load it with ``pretrain=<path>``), the resume state
(``state.py``), ``log.json`` and ``reconstruction.png``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from timm.models.vision_transformer import VisionTransformer

from meduniverse_flwr import registry
from meduniverse_flwr.common.files import write_json_atomic
from meduniverse_flwr.learn.finetune import autocast, cosine_with_warmup, resolve_device, to_input
from meduniverse_flwr.learn.model import create_backbone, save_backbone
from meduniverse_flwr.server.pretrain.models import MaskedImageModel, patchify, random_masking, unpatchify
from meduniverse_flwr.server.pretrain.settings import PretrainSettings
from meduniverse_flwr.server.pretrain.state import load_state, save_state
from meduniverse_flwr.wire.seeds import derive_seed

logger = logging.getLogger("flwr")
DECODER_FILE = "decoder.safetensors"  # MAE's decoder, which a curation rule continues (never sent to a node)


def build_mim(encoder: VisionTransformer, settings: PretrainSettings) -> MaskedImageModel:
    """The MIM model of ``settings.method`` around ``encoder``."""
    return registry.resolve(registry.PRETRAIN_METHODS[settings.method])(encoder, settings)


@dataclass
class PretrainResult:
    encoder_path: Path
    losses: list[float]
    images_per_second: list[float]


def _settings_key(model_name: str, image_size: int, settings: PretrainSettings, n_images: int) -> dict:
    return {"model": model_name, "image_size": image_size, "n_images": n_images, **dataclasses.asdict(settings)}


def pretrain(
    model_name: str, image_size: int, images: torch.Tensor, settings: PretrainSettings, out_dir: Path,
    device: str = "auto", on_epoch_end: Callable[[int, float], None] | None = None,
) -> PretrainResult:
    """Pretrain ``model_name`` on uint8 ``images`` (N x 3 x S x S); resume from ``out_dir/state.json``.

    Every epoch ends with an atomic checkpoint, so a killed run continues from
    the last finished epoch (same settings required) and ends with the same
    weights as an uninterrupted one.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dev = resolve_device(device)
    torch.manual_seed(settings.seed)
    mim = build_mim(create_backbone(model_name, image_size), settings).to(dev)
    optimizer = torch.optim.AdamW(mim.parameters(), lr=settings.lr, weight_decay=settings.weight_decay,
                                  betas=(0.9, 0.95))
    steps_per_epoch = math.ceil(len(images) / settings.batch_size)
    key = _settings_key(model_name, image_size, settings, len(images))
    start_epoch, losses, speeds = load_state(out_dir, key, settings.epochs, steps_per_epoch, mim, optimizer)
    if start_epoch:
        logger.info("pretrain: resuming %s from epoch %d of %d", settings.method, start_epoch, settings.epochs)
    schedule = _lr_schedule(optimizer, settings, steps_per_epoch, start_epoch * steps_per_epoch)

    ratio = settings.effective_mask_ratio
    on_device = images.to(dev)  # once, not per batch
    for epoch in range(start_epoch, settings.epochs):
        # per-epoch generator: the same batches and masks whether or not the run was resumed
        generator = torch.Generator().manual_seed(derive_seed(settings.seed, "pretrain", epoch))
        order = torch.randperm(len(images), generator=generator)
        mim.train()
        order = order.to(dev)
        total, started = torch.zeros((), dtype=torch.float64, device=dev), time.perf_counter()
        for start in range(0, len(images), settings.batch_size):
            batch = to_input(on_device[order[start : start + settings.batch_size]], dev, settings.input_norm)
            visible, mask = random_masking(len(batch), mim.num_patches, ratio, generator)
            with autocast(dev) if settings.bf16 else nullcontext():
                loss, _ = mim(batch, visible.to(dev), mask.to(dev))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.detach().double() * len(batch)  # stays on the device: no sync per step
        losses.append(total.item() / len(images))
        speeds.append(len(images) / (time.perf_counter() - started))
        remaining = (settings.epochs - epoch - 1) * len(images) / float(np.mean(speeds[start_epoch:]))
        logger.info("pretrain %s epoch %d/%d: loss %.4f, %.0f images/s, ETA %.0fs", settings.method, epoch + 1,
                    settings.epochs, losses[-1], speeds[-1], remaining)
        save_state(out_dir, mim, optimizer, {"key": key, "epoch": epoch + 1, "losses": losses,
                                             "images_per_second": speeds})
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, losses[-1])

    encoder_path = out_dir / "encoder.safetensors"
    save_backbone(encoder_path, mim.encoder.state_dict(),
                  {"model": model_name, "image-size": str(image_size), "pretrain": settings.method,
                   "epochs": str(settings.epochs), "mask-ratio": str(ratio)})
    if settings.method == "mae":
        decoder = {k: v for k, v in mim.state_dict().items() if not k.startswith("encoder.")}
        save_backbone(out_dir / DECODER_FILE, decoder, {"model": model_name, "image-size": str(image_size)})
    write_json_atomic(out_dir / "log.json", {**key, "losses": losses, "images_per_second": speeds})
    spread = torch.linspace(0, len(images) - 1, 6).long()  # across the corpus, not one dataset
    save_reconstruction_figure(mim, images[spread], ratio, settings.seed, out_dir / "reconstruction.png",
                               settings.input_norm)
    return PretrainResult(encoder_path, losses, speeds)


def _lr_schedule(optimizer: torch.optim.Optimizer, settings: PretrainSettings, steps_per_epoch: int,
                 done_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Warm-up + cosine per step, positioned after ``done_steps`` steps (the lr is a pure function of it)."""
    for group in optimizer.param_groups:
        group["initial_lr"] = settings.lr  # what LambdaLR needs to start part-way
    factor = cosine_with_warmup(settings.epochs * steps_per_epoch, settings.warmup_epochs / max(settings.epochs, 1))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor, last_epoch=done_steps - 1)


@torch.no_grad()
def save_reconstruction_figure(mim: MaskedImageModel, images: torch.Tensor, ratio: float, seed: int,
                               path: Path, norm: str = "symmetric") -> None:
    """Rows: original / masked / reconstruction (visible patches pasted back, as MAE shows it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    device = next(mim.parameters()).device
    mim.eval()
    x = to_input(images, device, norm)
    mean, std = (torch.tensor(values, device=device)[:, None, None] for values in registry.INPUT_NORMS[norm])
    visible, mask = random_masking(len(x), mim.num_patches, ratio, torch.Generator().manual_seed(seed))
    _, pred = mim(x, visible.to(device), mask.to(device))
    target = patchify(x, mim.patch)
    if mim.norm_pix_loss:  # undo the per-patch normalisation with the true patch statistics
        pred = pred * (target.var(-1, keepdim=True) + 1e-6).sqrt() + target.mean(-1, keepdim=True)
    m = mask.to(device)[..., None]
    masked = unpatchify(torch.where(m, torch.zeros_like(target), target), mim.patch)
    recon = unpatchify(torch.where(m, pred, target), mim.patch)
    rows = [x, masked, recon]
    fig, axes = plt.subplots(3, len(x), figsize=(1.6 * len(x), 5), squeeze=False)
    for r, (name, row) in enumerate(zip(("original", "masked", "reconstruction"), rows)):
        for c in range(len(x)):
            axes[r, c].imshow((row[c] * std + mean).permute(1, 2, 0).float().cpu().clamp(0, 1).numpy())
            axes[r, c].axis("off")
        axes[r, 0].set_title(name, fontsize=8, loc="left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
