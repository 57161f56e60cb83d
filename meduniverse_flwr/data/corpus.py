"""Unlabeled image corpora for server-side pretraining (labels are never read)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from . import DEFAULT_ROOT, to_image_tensor
from ..config import split_list
from .embedded import TASKS, load_embedded
from .npz import read_images

PRETRAIN_SPLITS = ("train", "val")  # never test: stage-0 evaluation must not have seen it


def load_corpus(spec: str, data_root: str, image_size: int, datasets: Sequence[str] = ()) -> torch.Tensor:
    """uint8 N x 3 x S x S images.

    ``spec`` is ``"embedded"`` (the train and val images of ``datasets``, or of
    every embedded task) or a comma list of MedMNIST ``.npz`` files.
    """
    if spec == "embedded":
        root = Path(data_root) if data_root else DEFAULT_ROOT
        names = list(datasets) or sorted(TASKS)
        arrays = [load_embedded(name, root)[split].images for name in names for split in PRETRAIN_SPLITS]
    else:
        arrays = [read_images(Path(path), PRETRAIN_SPLITS) for path in split_list(spec)]
    if not arrays:
        raise ValueError(f"pretrain corpus '{spec}': no images")
    return torch.cat([to_image_tensor(images, image_size) for images in arrays])
