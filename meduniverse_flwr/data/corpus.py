"""Unlabeled image corpora for server-side pretraining (labels are never used)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import DataOptions, load_dataset, to_image_tensor

PRETRAIN_SPLITS = ("train", "val")  # never test: stage-0 evaluation must not have seen it


def load_corpus(entries: Sequence[str], options: DataOptions) -> torch.Tensor:
    """uint8 N x 3 x S x S: the train and val images of every dataset entry (any source)."""
    parts = []
    for entry in entries:
        _, splits = load_dataset(entry, options)
        for split in PRETRAIN_SPLITS:
            images = to_image_tensor(splits[split].images, options.image_size)
            parts.append(images.expand(-1, 3, -1, -1))  # grayscale and colour in one batch
    if not parts:
        raise ValueError("pretrain corpus: no dataset given")
    return torch.cat(parts)
