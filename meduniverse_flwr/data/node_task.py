"""A node's task: its card and its train / val / test tensors, read from its source, sharded, and
cached on disk per node (``data.cache``)."""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from meduniverse_flwr import registry
from meduniverse_flwr.data.cache import CACHE_DIR, CacheError, cache_path, read_task, source_hash, write_task
from meduniverse_flwr.data.npz import SPLITS, DataError, Split
from meduniverse_flwr.data.options import DataOptions, write_dir
from meduniverse_flwr.data.partition import archive_of
from meduniverse_flwr.wire.card import TaskCard

logger = logging.getLogger("flwr")


@dataclass(frozen=True)
class TaskData:
    images: torch.Tensor  # uint8, N x C x S x S
    labels: torch.Tensor  # int64 N (binary / multiclass) or float32 N x L (multilabel)

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class NodeTask:
    card: TaskCard
    train: TaskData
    val: TaskData
    test: TaskData


def to_image_tensor(images: np.ndarray, image_size: int) -> torch.Tensor:
    """uint8 N x S x S (x 3) -> uint8 N x C x size x size (C = 1 or 3), once per load.

    No copy beyond the one that brings a memory-mapped file into RAM: grayscale
    stays one channel (``learn.finetune.to_input`` repeats it per batch for the 3-channel
    model) and RGB stays a channels-last view.
    """
    tensor = torch.from_numpy(np.require(images, requirements=["W"]))  # copies read-only memmaps once
    tensor = tensor.unsqueeze(1) if tensor.ndim == 3 else tensor.permute(0, 3, 1, 2)
    if tensor.shape[-1] != image_size:
        resized = F.interpolate(tensor.float(), size=(image_size, image_size), mode="bilinear", antialias=True)
        tensor = resized.round().clamp(0, 255).byte()
    return tensor


def to_task_data(split: Split, label_kind: str, image_size: int) -> TaskData:
    labels = torch.from_numpy(split.labels)
    labels = labels.float() if label_kind == "multilabel" else labels[:, 0].long()
    return TaskData(to_image_tensor(split.images, image_size), labels)


def parse_entry(entry: str, default_source: str) -> tuple[str, str]:
    """``registry.parse_entry`` with the data error of this package."""
    try:
        return registry.parse_entry(entry, default_source)
    except registry.UnknownSource as err:
        raise DataError(str(err)) from None


def load_dataset(entry: str, options: DataOptions) -> tuple[TaskCard, dict[str, Split]]:
    """A dataset entry's card (n-train / n-test of the whole dataset) and splits, from its source."""
    source, spec = parse_entry(entry, options.source)
    return registry.resolve(registry.SOURCES[source].loader)(spec, options)


@functools.lru_cache(maxsize=4)
def load_node_task(entry: str, shard: int, n_shards: int, options: DataOptions) -> NodeTask:
    """A node's task: shard ``shard`` of ``n_shards`` of the dataset ``entry``. Cached per process,
    and decoded on disk (``data.cache``), since a deployed node starts a process per message."""
    source, spec = parse_entry(entry, options.source)
    directory = write_dir(options) / CACHE_DIR
    # where the cache lies is not what it holds
    key = json.dumps([entry, shard, n_shards, {**dataclasses.asdict(options), "cache": ""}])
    try:
        # hashed before decoding: a source that changes meanwhile is decoded again on the next load
        read = registry.resolve(registry.SOURCES[source].paths)(spec, options)
        path = cache_path(directory, key, source_hash(read, directory))
    except CacheError as err:
        logger.warning("%s; node data not cached", err)
        return decode_node_task(entry, shard, n_shards, options)
    if path.is_file():
        try:
            return _cached_task(path, key, options.image_size)
        except CacheError as err:
            logger.warning("%s; decoding the dataset again", err)
    task = decode_node_task(entry, shard, n_shards, options)
    try:
        write_task(path, key, dataclasses.asdict(task.card), {name: getattr(task, name).images for name in SPLITS},
                   {name: getattr(task, name).labels for name in SPLITS})
    except CacheError as err:  # e.g. a read-only data root: the run goes on, uncached
        logger.warning("%s", err)
    return task


def _cached_task(path: Path, key: str, image_size: int) -> NodeTask:
    card, images, labels = read_task(path, key, image_size)
    return NodeTask(TaskCard(**card), *(TaskData(images[name], labels[name]) for name in SPLITS))


def decode_node_task(entry: str, shard: int, n_shards: int, options: DataOptions) -> NodeTask:
    """A node's task read from its source: decoded, resized, its public-archive share dropped, and sharded."""
    card, splits = load_dataset(entry, options)
    if options.archive_share > 0:
        train = splits["train"]
        keep = np.setdiff1d(np.arange(len(train)), archive_of(card.name, len(train), options.archive_share))
        splits = {**splits, "train": Split(train.images[keep], train.labels[keep])}
    if n_shards > 1:
        shard_of = registry.resolve(registry.PARTITIONS[options.partition])
        splits = {name: Split(split.images[idx], split.labels[idx]) for name, split in splits.items()
                  for idx in [shard_of(split, card, name, shard, n_shards, options)]}
        for name, split in splits.items():
            if len(split) == 0:
                raise DataError(f"dataset '{entry}': shard {shard} of {n_shards} has an empty {name} split; "
                                f"use fewer nodes or a larger dirichlet-alpha")
    tensors = {name: to_task_data(splits[name], card.label_kind, options.image_size) for name in SPLITS}
    card = dataclasses.replace(card, n_train=len(tensors["train"]), n_test=len(tensors["test"]),
                               n_val=len(tensors["val"]))
    return NodeTask(card, tensors["train"], tensors["val"], tensors["test"])
