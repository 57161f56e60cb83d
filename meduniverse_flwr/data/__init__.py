"""Data for one node: its task card and its train / val / test tensors."""

from __future__ import annotations

import functools
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F

from ..metrics import LABEL_KINDS
from .dicom import load_dicom_folder
from .embedded import TASKS as EMBEDDED_TASKS
from .embedded import load_embedded
from .folder import load_folder
from .medmnist import flag_of, load_medmnist
from .npz import SPLITS, DataError, Split
from .partition import dirichlet_shard, iid_shard

DEFAULT_ROOT = Path.home() / ".cache" / "meduniverse_flwr"


@dataclass(frozen=True)
class TaskCard:
    """What a node tells the server about its task (never its data)."""

    name: str
    modality: str
    n_classes: int
    label_kind: str
    n_train: int

    def to_record(self) -> dict[str, Any]:
        return {"name": self.name, "modality": self.modality, "n-classes": self.n_classes,
                "label-kind": self.label_kind, "n-train": self.n_train}

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> "TaskCard":
        """Parse a card from a node's reply; ValueError names what is wrong."""
        try:
            card = cls(str(record["name"]), str(record["modality"]), int(record["n-classes"]),
                       str(record["label-kind"]), int(record["n-train"]))
        except KeyError as err:
            raise ValueError(f"task card is missing {err}") from None
        except (TypeError, ValueError) as err:
            raise ValueError(f"task card has a malformed field ({err})") from None
        if card.label_kind not in LABEL_KINDS:
            raise ValueError(f"task card '{card.name}': label kind '{card.label_kind}' not in {LABEL_KINDS}")
        if card.n_classes < (1 if card.label_kind == "multilabel" else 2):
            raise ValueError(f"task card '{card.name}': n-classes {card.n_classes} is too small")
        if card.n_train < 1:
            raise ValueError(f"task card '{card.name}': n-train {card.n_train} must be >= 1")
        return card


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


SOURCES = ("embedded", "medmnist", "folder", "dicom")


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


def cache_root(data_root: str) -> Path:
    """Where the embedded data and pretrained bases are cached: ``data-root`` or the default."""
    return Path(data_root).expanduser() if data_root else DEFAULT_ROOT


def options_from(config) -> DataOptions:
    """The data options of a ``RunConfig``."""
    return DataOptions(config.data, config.data_root, config.image_size, config.seed, config.partition,
                       config.dirichlet_alpha, config.download, config.skip_unreadable)


def parse_entry(entry: str, default_source: str) -> tuple[str, str]:
    """``"medmnist:pneumoniamnist"`` -> (medmnist, pneumoniamnist); a bare name takes ``default_source``."""
    source, sep, spec = entry.partition(":")
    if not sep:
        source, spec = default_source, entry
    if source not in SOURCES:
        raise DataError(f"dataset '{entry}': unknown source '{source}', choose one of {SOURCES}")
    return source, spec


def dataset_name(entry: str, default_source: str) -> str:
    """The task name a dataset entry gets on its card (and in results / held-out lists)."""
    source, spec = parse_entry(entry, default_source)
    if source == "medmnist":
        return flag_of(Path(spec)) if spec.endswith(".npz") or "/" in spec else spec
    return Path(spec).expanduser().name if source in ("folder", "dicom") else spec


def load_dataset(entry: str, options: DataOptions) -> tuple[TaskCard, dict[str, Split]]:
    """A dataset entry's card (n-train of the whole dataset) and splits, from whichever source."""
    source, spec = parse_entry(entry, options.source)
    if source == "embedded":
        if spec not in EMBEDDED_TASKS:
            raise DataError(f"dataset '{spec}': not in the embedded universe {sorted(EMBEDDED_TASKS)}")
        info = EMBEDDED_TASKS[spec]
        splits = load_embedded(spec, cache_root(options.root))
        card = TaskCard(spec, info.modality, len(info.classes), info.label_kind, len(splits["train"]))
    elif source == "medmnist":
        flag, info, splits = load_medmnist(spec, options.root, options.image_size, options.download)
        card = TaskCard(flag, info.modality, info.n_classes, info.label_kind, len(splits["train"]))
    else:
        path = Path(spec).expanduser()
        if not path.is_absolute() and options.root:
            path = Path(options.root).expanduser() / spec
        loader = load_folder if source == "folder" else load_dicom_folder
        classes, label_kind, splits = loader(path, options.image_size, options.skip_unreadable)
        modality = "images (site folder)" if source == "folder" else "DICOM"
        card = TaskCard(path.name, modality, len(classes), label_kind, len(splits["train"]))
    return card, splits


def _shard_seed(seed: int, dataset: str, split: str) -> int:
    return zlib.crc32(f"{seed}:{dataset}:{split}".encode())


def _stratify_by(labels: np.ndarray) -> np.ndarray:
    """One class per example for label-skew partitioning (multilabel: its first positive label)."""
    if labels.shape[1] == 1:
        return labels[:, 0]
    return np.where(labels.any(axis=1), labels.argmax(axis=1), labels.shape[1])


def shard_indices(split: Split, card: TaskCard, split_name: str, shard: int, n_shards: int,
                  options: DataOptions) -> np.ndarray:
    split_seed = _shard_seed(options.seed, card.name, split_name)
    if options.partition == "dirichlet":
        return dirichlet_shard(_stratify_by(split.labels), shard, n_shards, options.dirichlet_alpha,
                               _shard_seed(options.seed, card.name, "proportions"), split_seed)
    return iid_shard(len(split), shard, n_shards, split_seed)


@functools.lru_cache(maxsize=4)
def load_node_task(entry: str, shard: int, n_shards: int, options: DataOptions) -> NodeTask:
    """A node's task: shard ``shard`` of ``n_shards`` of the dataset ``entry``. Cached, so a
    node process reads its data once per run, not once per message."""
    card, splits = load_dataset(entry, options)
    if n_shards > 1:
        splits = {name: Split(split.images[idx], split.labels[idx]) for name, split in splits.items()
                  for idx in [shard_indices(split, card, name, shard, n_shards, options)]}
        for name, split in splits.items():
            if len(split) == 0:
                raise DataError(f"dataset '{entry}': shard {shard} of {n_shards} has an empty {name} split; "
                                f"use fewer nodes or a larger dirichlet-alpha")
    tensors = {name: to_task_data(splits[name], card.label_kind, options.image_size) for name in SPLITS}
    card = TaskCard(card.name, card.modality, card.n_classes, card.label_kind, len(tensors["train"]))
    return NodeTask(card, tensors["train"], tensors["val"], tensors["test"])
