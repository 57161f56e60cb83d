"""Data for one node: its task card and its train / val / test tensors."""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F

from .cache import CACHE_DIR, CacheError, cache_path, read_task, source_hash, write_task
from .dicom import load_dicom_folder
from .embedded import TASKS as EMBEDDED_TASKS
from .embedded import load_embedded, task_path
from .folder import load_folder
from .layout import load_layout, sidecar_path
from .medmnist import load_medmnist, resolve
from .npz import SPLITS, DataError, Split
from .partition import archive_indices, dirichlet_shard, iid_shard
from .. import registry
from ..registry import PARTITIONS, SOURCES, dataset_name  # noqa: F401 (the data registries, re-exported)

DEFAULT_ROOT = Path.home() / ".cache" / "meduniverse_flwr"
logger = logging.getLogger("flwr")


@dataclass(frozen=True)
class TaskCard:
    """What a node tells the server about its task (never its data); the server parses it with
    ``validation.parse_card``."""

    name: str
    modality: str
    n_classes: int
    label_kind: str
    n_train: int
    n_test: int
    n_val: int
    classes: tuple[str, ...] = ()  # class names in label order, where the source has them

    def to_record(self) -> dict[str, Any]:
        record = {"name": self.name, "modality": self.modality, "n-classes": self.n_classes,
                  "label-kind": self.label_kind, "n-train": self.n_train, "n-test": self.n_test, "n-val": self.n_val}
        if self.classes:  # optional: a card without names stays the one older nodes send
            record["classes"] = list(self.classes)  # a ConfigRecord holds lists, not tuples
        return record


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
    stays one channel (``task.to_input`` repeats it per batch for the 3-channel
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


@dataclass(frozen=True)
class DataOptions:
    """How dataset entries are found and read (hashable: node data are cached per process)."""

    source: str = "embedded"  # the source of entries without a "source:" prefix
    root: str = ""
    image_size: int = 28
    seed: int = 0
    partition: str = "iid"  # how nodes sharing a dataset split it: iid | dirichlet
    dirichlet_alpha: float = 0.5
    download: bool = False
    skip_unreadable: bool = False
    archive_share: float = 0.0  # share of each train split set apart for the server (never the node's)
    cache: str = ""  # where a node writes (decoded data, extracted embedded tasks); "" = cache_root(root)


def cache_root(data_root: str) -> Path:
    """Where the embedded data and pretrained bases are cached: ``data-root`` or the default."""
    return Path(data_root).expanduser() if data_root else DEFAULT_ROOT


def write_dir(options: DataOptions) -> Path:
    """Where a node with these options writes: its cache directory, else under its data root."""
    return Path(options.cache).expanduser() if options.cache else cache_root(options.root)


def options_from(values: Mapping[str, Any], image_size: int) -> DataOptions:
    """Data options from run-config values (snake_case, as ``config.read_keys`` returns them)."""
    return DataOptions(values["data"], values["data_root"], image_size, values["seed"], values["partition"],
                       values["dirichlet_alpha"], values["download"], values["skip_unreadable"],
                       values["archive_share"])


def parse_entry(entry: str, default_source: str) -> tuple[str, str]:
    """``registry.parse_entry`` with the data error of this package."""
    try:
        return registry.parse_entry(entry, default_source)
    except registry.UnknownSource as err:
        raise DataError(str(err)) from None


def _counts(splits: dict[str, Split]) -> tuple[int, int, int]:
    """A card's n-train, n-test, n-val."""
    return len(splits["train"]), len(splits["test"]), len(splits["val"])


def embedded_source(spec: str, options: DataOptions) -> tuple[TaskCard, dict[str, Split]]:
    if spec not in EMBEDDED_TASKS:
        raise DataError(f"dataset '{spec}': not in the embedded universe {sorted(EMBEDDED_TASKS)}")
    info = EMBEDDED_TASKS[spec]
    splits = load_embedded(spec, write_dir(options))
    return TaskCard(spec, info.modality, len(info.classes), info.label_kind, *_counts(splits), info.classes), splits


def medmnist_source(spec: str, options: DataOptions) -> tuple[TaskCard, dict[str, Split]]:
    flag, info, splits = load_medmnist(spec, options.root, options.image_size, options.download)
    return TaskCard(flag, info.modality, info.n_classes, info.label_kind, *_counts(splits)), splits


def _site_path(spec: str, options: DataOptions) -> Path:
    path = Path(spec).expanduser()
    return Path(options.root).expanduser() / spec if not path.is_absolute() and options.root else path


def folder_source(spec: str, options: DataOptions) -> tuple[TaskCard, dict[str, Split]]:
    path = _site_path(spec, options)
    classes, label_kind, splits = load_folder(path, options.image_size, options.skip_unreadable)
    return TaskCard(path.name, "images (site folder)", len(classes), label_kind, *_counts(splits)), splits


def dicom_source(spec: str, options: DataOptions) -> tuple[TaskCard, dict[str, Split]]:
    path = _site_path(spec, options)
    classes, label_kind, splits = load_dicom_folder(path, options.image_size, options.skip_unreadable)
    return TaskCard(path.name, "DICOM", len(classes), label_kind, *_counts(splits)), splits


def npz_source(spec: str, options: DataOptions) -> tuple[TaskCard, dict[str, Split]]:
    path = _site_path(spec, options)
    layout, splits = load_layout(path)
    return TaskCard(path.stem, layout.modality, layout.n_classes, layout.label_kind, *_counts(splits),
                    layout.classes), splits


def npz_paths(spec: str, options: DataOptions) -> tuple[Path, ...]:
    path = _site_path(spec, options)
    return path, sidecar_path(path)  # a sidecar added, edited or removed changes the task too


def embedded_paths(spec: str, options: DataOptions) -> tuple[Path, ...]:
    return (task_path(write_dir(options), spec),)


def medmnist_paths(spec: str, options: DataOptions) -> tuple[Path, ...]:
    return (resolve(spec, options.root, options.image_size)[1],)


def site_paths(spec: str, options: DataOptions) -> tuple[Path, ...]:
    return (_site_path(spec, options),)


def load_dataset(entry: str, options: DataOptions) -> tuple[TaskCard, dict[str, Split]]:
    """A dataset entry's card (n-train / n-test of the whole dataset) and splits, from its source."""
    source, spec = parse_entry(entry, options.source)
    return registry.resolve(SOURCES[source].loader)(spec, options)


def _shard_seed(seed: int, dataset: str, split: str) -> int:
    return zlib.crc32(f"{seed}:{dataset}:{split}".encode())


def stratify_by(labels: np.ndarray) -> np.ndarray:
    """One class per example, for label-skew partitioning and stratified scoring labels (multilabel: its first
    positive label)."""
    if labels.shape[1] == 1:
        return labels[:, 0]
    return np.where(labels.any(axis=1), labels.argmax(axis=1), labels.shape[1])


def iid_partition(split: Split, card: TaskCard, split_name: str, shard: int, n_shards: int,
         options: DataOptions) -> np.ndarray:
    return iid_shard(len(split), shard, n_shards, _shard_seed(options.seed, card.name, split_name))


def dirichlet_partition(split: Split, card: TaskCard, split_name: str, shard: int, n_shards: int,
               options: DataOptions) -> np.ndarray:
    return dirichlet_shard(stratify_by(split.labels), shard, n_shards, options.dirichlet_alpha,
                           _shard_seed(options.seed, card.name, "proportions"),
                           _shard_seed(options.seed, card.name, split_name))


def archive_of(name: str, n_train: int, share: float) -> np.ndarray:
    """The train-split indices of dataset ``name`` in the server's public archive: fixed per dataset
    (not per run seed), as a hospital's archive would be."""
    return archive_indices(n_train, share, zlib.crc32(f"archive:{name}".encode()))


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
        path = cache_path(directory, key, source_hash(registry.resolve(SOURCES[source].paths)(spec, options), directory))
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
        splits = {name: Split(split.images[idx], split.labels[idx]) for name, split in splits.items()
                  for idx in [registry.resolve(PARTITIONS[options.partition])(split, card, name, shard, n_shards, options)]}
        for name, split in splits.items():
            if len(split) == 0:
                raise DataError(f"dataset '{entry}': shard {shard} of {n_shards} has an empty {name} split; "
                                f"use fewer nodes or a larger dirichlet-alpha")
    tensors = {name: to_task_data(splits[name], card.label_kind, options.image_size) for name in SPLITS}
    card = dataclasses.replace(card, n_train=len(tensors["train"]), n_test=len(tensors["test"]),
                               n_val=len(tensors["val"]))
    return NodeTask(card, tensors["train"], tensors["val"], tensors["test"])
