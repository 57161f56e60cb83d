"""What travels in a message, both ways: model arrays in the transport dtype, and the node's instructions."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord

from .config import ConfigError, read_keys
from .task import TrainSettings, resolve_device
from .transport import decode, encode


def to_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {name: array.numpy() for name, array in record.items()}


def to_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({name: Array(np.ascontiguousarray(value)) for name, value in arrays.items()})


def pack(arrays: Mapping[str, np.ndarray | torch.Tensor], transport_dtype: str) -> ArrayRecord:
    """float arrays or tensors -> an ArrayRecord in the transport dtype."""
    plain = {k: v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else v for k, v in arrays.items()}
    return to_record(encode(plain, transport_dtype))


def unpack(record: ArrayRecord, transport_dtype: str) -> dict[str, np.ndarray]:
    """An ArrayRecord in the transport dtype -> float32 arrays (ValueError if it is not)."""
    return decode(to_numpy(record), transport_dtype)


def unpack_torch(record: ArrayRecord, transport_dtype: str) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.require(v, requirements=["W"])) for k, v in unpack(record, transport_dtype).items()}


@dataclass(frozen=True)
class Instructions:
    """Everything a node needs for one message besides its data, sent in the message's ``config`` record.

    Keys are the run-config names (and checks) of the same settings; ``epochs`` is the local
    epochs of a train message, or the probe / fine-tune epochs of an evaluate message.
    """

    model: str
    image_size: int
    transport_dtype: str
    device: str
    epochs: int
    lr: float
    weight_decay: float
    batch_size: int
    seed: int
    eval_mode: str
    node_metrics: bool
    compile: bool

    def to_record(self) -> ConfigRecord:
        return ConfigRecord({f.name.replace("_", "-"): getattr(self, f.name) for f in dataclasses.fields(self)})

    @classmethod
    def from_record(cls, record: Mapping[str, object]) -> "Instructions":
        """Read and check a message's ``config`` record; ConfigError (one line) names a bad key."""
        values = read_keys(record, [f.name.replace("_", "-") for f in dataclasses.fields(cls) if f.name != "epochs"])
        epochs = record.get("epochs")
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise ConfigError(f"message config: 'epochs' = {epochs!r}: must be an integer >= 1")
        return cls(epochs=epochs, **values)

    def train_settings(self) -> TrainSettings:
        return TrainSettings(self.epochs, self.lr, self.weight_decay, self.batch_size, self.seed,
                             resolve_device(self.device), self.compile)
