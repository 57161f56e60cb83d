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
from .embedded import TASKS as EMBEDDED_TASKS
from .embedded import load_embedded
from .npz import SPLITS, DataError, Split
from .partition import iid_shard, node_dataset

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
    """uint8 N x S x S (x 3) -> uint8 N x 3 x size x size, done once per load.

    One universal model serves grayscale and colour modalities, so grayscale
    images are repeated over three channels.
    """
    tensor = torch.from_numpy(np.ascontiguousarray(images))
    tensor = tensor.unsqueeze(1).expand(-1, 3, -1, -1) if tensor.ndim == 3 else tensor.permute(0, 3, 1, 2)
    if tensor.shape[-1] != image_size:
        resized = F.interpolate(tensor.float(), size=(image_size, image_size), mode="bilinear", antialias=True)
        tensor = resized.round().clamp(0, 255).byte()
    return tensor.contiguous()


def to_task_data(split: Split, label_kind: str, image_size: int) -> TaskData:
    labels = torch.from_numpy(split.labels)
    labels = labels.float() if label_kind == "multilabel" else labels[:, 0].long()
    return TaskData(to_image_tensor(split.images, image_size), labels)


def _shard_seed(seed: int, dataset: str, split: str) -> int:
    return zlib.crc32(f"{seed}:{dataset}:{split}".encode())


@functools.lru_cache(maxsize=4)
def load_node_task(
    data: str, data_root: str, datasets: tuple[str, ...], image_size: int, seed: int,
    partition_id: int, num_partitions: int,
) -> NodeTask:
    """The task this node holds. Cached, so a node process loads its data once per run."""
    dataset, shard, n_shards = node_dataset(partition_id, num_partitions, datasets)
    if data != "embedded":
        raise DataError(f"data '{data}': unknown source, choose 'embedded'")
    if dataset not in EMBEDDED_TASKS:
        raise DataError(f"dataset '{dataset}': not in the embedded universe {sorted(EMBEDDED_TASKS)}")
    info = EMBEDDED_TASKS[dataset]
    splits = load_embedded(dataset, Path(data_root) if data_root else DEFAULT_ROOT)
    label_kind = info.label_kind
    if n_shards > 1:
        splits = {name: Split(split.images[idx], split.labels[idx]) for name, split in splits.items()
                  for idx in [iid_shard(len(split), shard, n_shards, _shard_seed(seed, dataset, name))]}
    tensors = {name: to_task_data(splits[name], label_kind, image_size) for name in SPLITS}
    card = TaskCard(dataset, info.modality, len(info.classes), label_kind, len(tensors["train"]))
    return NodeTask(card, tensors["train"], tensors["val"], tensors["test"])
