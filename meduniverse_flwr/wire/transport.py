"""Model arrays on the wire: fp32 as is, or halved to bf16 / fp16 (``transport-dtype``).

NumPy has no bfloat16, so bf16 travels as the upper 16 bits of each float32
(round to nearest even), in a uint16 array. Pure functions, no Flower.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np


def _to_bf16_bits(x: np.ndarray) -> np.ndarray:
    bits = np.ascontiguousarray(x).view(np.uint32)
    rounding = ((bits >> 16) & 1) + np.uint32(0x7FFF)  # round half to even
    rounded = np.where(np.isnan(x), bits | np.uint32(0x00400000), bits + rounding)  # keep NaN a NaN
    return (rounded >> 16).astype(np.uint16)


def _from_bf16_bits(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


@dataclass(frozen=True)
class Encoding:
    wire_dtype: type
    encode: Callable[[np.ndarray], np.ndarray]  # float32 -> what is sent
    decode: Callable[[np.ndarray], np.ndarray]  # what was received -> float32


# Encodings by name (``transport-dtype``).
TRANSPORT_DTYPES = {
    "fp32": Encoding(np.float32, lambda x: x, lambda x: x),
    "fp16": Encoding(np.float16, lambda x: x.astype(np.float16), lambda x: x.astype(np.float32)),
    "bf16": Encoding(np.uint16, _to_bf16_bits, _from_bf16_bits),
}


def _encoding(transport_dtype: str) -> Encoding:
    if transport_dtype not in TRANSPORT_DTYPES:
        raise ValueError(f"transport-dtype '{transport_dtype}': unknown, choose one of {tuple(TRANSPORT_DTYPES)}")
    return TRANSPORT_DTYPES[transport_dtype]


def encode(arrays: Mapping[str, np.ndarray], transport_dtype: str) -> dict[str, np.ndarray]:
    """float arrays -> what is sent."""
    encoding = _encoding(transport_dtype)
    return {k: encoding.encode(np.asarray(v, dtype=np.float32)) for k, v in arrays.items()}


def decode(arrays: Mapping[str, np.ndarray], transport_dtype: str) -> dict[str, np.ndarray]:
    """What was received -> float32 arrays; a wrong dtype for the agreed encoding is a ValueError."""
    encoding = _encoding(transport_dtype)
    out = {}
    for name, value in arrays.items():
        if value.dtype != encoding.wire_dtype:
            raise ValueError(f"'{name}' arrived as {value.dtype}, expected {np.dtype(encoding.wire_dtype)} "
                             f"({transport_dtype})")
        out[name] = encoding.decode(value)
    return out
