"""Model arrays in Flower records, in the run's transport dtype (both sides use these)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

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
