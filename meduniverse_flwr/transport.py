"""Model arrays on the wire: fp32 as is, or halved to bf16 / fp16 (``transport-dtype``).

NumPy has no bfloat16, so bf16 travels as the upper 16 bits of each float32
(round to nearest even), in a uint16 array. Pure functions, no Flower.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from .config import TRANSPORT_DTYPES


def encode(arrays: Mapping[str, np.ndarray], transport_dtype: str) -> dict[str, np.ndarray]:
    """float arrays -> what is sent."""
    if transport_dtype == "fp32":
        return {k: np.asarray(v, dtype=np.float32) for k, v in arrays.items()}
    if transport_dtype == "fp16":
        return {k: np.asarray(v, dtype=np.float16) for k, v in arrays.items()}
    if transport_dtype == "bf16":
        return {k: _to_bf16_bits(np.asarray(v, dtype=np.float32)) for k, v in arrays.items()}
    raise ValueError(f"transport-dtype '{transport_dtype}': unknown, choose one of {TRANSPORT_DTYPES}")


def decode(arrays: Mapping[str, np.ndarray], transport_dtype: str) -> dict[str, np.ndarray]:
    """What was received -> float32 arrays; a wrong dtype for the agreed encoding is a ValueError."""
    expected = {"fp32": np.float32, "fp16": np.float16, "bf16": np.uint16}[transport_dtype]
    out = {}
    for name, value in arrays.items():
        if value.dtype != expected:
            raise ValueError(f"'{name}' arrived as {value.dtype}, expected {np.dtype(expected)} ({transport_dtype})")
        out[name] = _from_bf16_bits(value) if transport_dtype == "bf16" else value.astype(np.float32, copy=False)
    return out


def _to_bf16_bits(x: np.ndarray) -> np.ndarray:
    bits = np.ascontiguousarray(x).view(np.uint32)
    rounding = ((bits >> 16) & 1) + np.uint32(0x7FFF)  # round half to even
    rounded = np.where(np.isnan(x), bits | np.uint32(0x00400000), bits + rounding)  # keep NaN a NaN
    return (rounded >> 16).astype(np.uint16)


def _from_bf16_bits(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)
