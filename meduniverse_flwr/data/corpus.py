"""Unlabeled image corpora for server-side pretraining (labels are never used)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from meduniverse_flwr.data.node_task import load_dataset, to_image_tensor
from meduniverse_flwr.data.options import DataOptions
from meduniverse_flwr.data.partition import archive_of

PRETRAIN_SPLITS = ("train", "val")  # never test: stage-0 evaluation must not have seen it
# The corpus entry that stands for the public-archive share (``archive-share``) of every training dataset.
ARCHIVE = "archive"


def load_corpus(entries: Sequence[str], options: DataOptions, archived: Sequence[str] = ()) -> torch.Tensor:
    """uint8 N x 3 x S x S: the train and val images of every dataset entry (any source); the entry
    ``archive`` adds the public-archive share of the train split of each of the ``archived`` entries,
    which their nodes drop (``data.decode_node_task``), so the corpus and the clients never share an image."""
    parts = []
    for entry in entries:
        if entry == ARCHIVE:
            for dataset in archived:
                card, splits = load_dataset(dataset, options)
                train = splits["train"]
                parts.append(to_image_tensor(train.images[archive_of(card.name, len(train), options.archive_share)],
                                             options.image_size))
            continue
        _, splits = load_dataset(entry, options)
        parts += [to_image_tensor(splits[split].images, options.image_size) for split in PRETRAIN_SPLITS]
    if not parts:
        raise ValueError("pretrain corpus: no dataset given")
    return torch.cat([images.expand(-1, 3, -1, -1) for images in parts])  # grayscale and colour in one batch
