"""Training augmentation of a batch, on its device, with no per-image Python loop.

``flip`` (every image size below 64 px, today's recipe): each image flipped horizontally with
probability 1/2. ``crop-flip`` (from 64 px; MAE's and SSL-FL's fine-tuning recipe): a random
resized crop (area share in [0.08, 1], aspect ratio in [3/4, 4/3], as torchvision's
``RandomResizedCrop``), then the flip. The crops of a batch are one ``affine_grid`` +
``grid_sample`` call; a box that does not fit is clamped to the image instead of torchvision's ten
retries. ``auto`` picks by image size. Random numbers come from the caller's generator, so a
seeded run repeats.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from meduniverse_flwr.registry import AUGMENTATIONS

CROP_FROM = 64  # image sizes from which ``auto`` crops: at 28 px a crop loses most of the lesion
SCALE, RATIO = (0.08, 1.0), (3 / 4, 4 / 3)


def augmentation_for(augment: str, image_size: int) -> str:
    """The recipe ``augment`` means at ``image_size`` (``auto`` resolved)."""
    if augment not in AUGMENTATIONS:
        raise ValueError(f"augment '{augment}': must be one of {AUGMENTATIONS}")
    if augment == "auto":
        return "crop-flip" if image_size >= CROP_FROM else "flip"
    return augment


def augmented(x: torch.Tensor, recipe: str, generator: torch.Generator) -> torch.Tensor:
    """``x`` (float N x C x S x S) through ``recipe`` (``flip`` or ``crop-flip``)."""
    if recipe == "crop-flip":
        x = random_resized_crop(x, generator)
    return random_flip(x, generator)


def random_flip(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Flip each image horizontally with probability 1/2 (one batched op)."""
    flip = torch.rand(len(x), generator=generator) < 0.5
    return torch.where(flip.to(x.device)[:, None, None, None], x.flip(-1), x)


def random_resized_crop(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Per image, a box of random area share and aspect ratio at a random place, resized back to the
    image's size (bilinear)."""
    n = len(x)
    area = torch.empty(n).uniform_(*SCALE, generator=generator)
    aspect = torch.empty(n).uniform_(math.log(RATIO[0]), math.log(RATIO[1]), generator=generator).exp()
    width, height = (area * aspect).sqrt().clamp(max=1.0), (area / aspect).sqrt().clamp(max=1.0)
    # box centres in the [-1, 1] coordinates of affine_grid, so that the box stays inside the image
    centre_x = (torch.rand(n, generator=generator) * 2 - 1) * (1 - width)
    centre_y = (torch.rand(n, generator=generator) * 2 - 1) * (1 - height)
    zero = torch.zeros(n)
    theta = torch.stack([torch.stack([width, zero, centre_x], 1), torch.stack([zero, height, centre_y], 1)], 1)
    grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
