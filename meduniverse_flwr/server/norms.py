"""Norms of an update against its base, without overflow, and clipping an update to a norm: pure NumPy.

The server bounds what one node can move the base by (``validation.check_train_reply``: ``max-update-ratio``)
and clips each site's update for site-level DP (``privacy``) with these."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import numpy as np

Arrays = Mapping[str, np.ndarray]


def _norm(parts: Iterable[np.ndarray]) -> float:
    """L2 norm of float64 ``parts`` taken together; inf if a part is not finite.

    Each part is divided by its largest magnitude before squaring and the parts are
    combined relative to the largest of those, so squares never overflow: the
    result is inf only when the norm itself exceeds the float64 range.
    """
    peaks_and_squares = []
    for part in parts:
        peak = float(np.max(np.abs(part), initial=0.0))
        if not math.isfinite(peak):
            return math.inf
        if peak > 0.0:
            scaled = part / peak
            peaks_and_squares.append((peak, float(np.vdot(scaled, scaled))))
    if not peaks_and_squares:
        return 0.0
    top = max(peak for peak, _ in peaks_and_squares)
    return top * math.sqrt(sum(squares * (peak / top) ** 2 for peak, squares in peaks_and_squares))



def array_norm(arrays: Arrays) -> float:
    """||arrays||: the L2 norm over all arrays, in float64."""
    return _norm(np.asarray(arr, dtype=np.float64) for arr in arrays.values())



def update_norm(base: Arrays, arrays: Arrays) -> float:
    """||arrays - base|| over all arrays, in float64, without overflow.

    ``arrays`` must pass ``check_update(base, arrays)``. Float32 inputs always give a
    finite norm; inf means the difference itself overflows float64 (float64 inputs near
    their maximum) and must be treated as too large.
    """
    with np.errstate(over="ignore", invalid="ignore"):  # an overflowing difference is reported as inf
        return _norm(np.subtract(arrays[name], base[name], dtype=np.float64) for name in base)



def relative_update_norm(base: Arrays, arrays: Arrays) -> float:
    """||arrays - base|| / ||base||; against a zero base, 0 for no change and inf for any."""
    delta, reference = update_norm(base, arrays), array_norm(base)
    if reference == 0.0:
        return 0.0 if delta == 0.0 else math.inf
    return delta / reference



def clip_update(base: Arrays, arrays: Arrays, max_norm: float) -> dict[str, np.ndarray]:
    """``arrays`` with the delta from ``base`` scaled down to norm ``max_norm`` (unchanged if within it).

    The direction of the update is kept; each value lies between the base's and the update's, in the
    update's dtype, so it stays finite. ValueError if the update norm is not finite (no direction to keep).
    """
    if not max_norm >= 0.0:
        raise ValueError(f"max_norm must be >= 0, got {max_norm}")
    norm = update_norm(base, arrays)
    if not math.isfinite(norm):
        raise ValueError("the update norm overflows float64; it cannot be clipped")
    if norm <= max_norm:
        return dict(arrays)
    scale = max_norm / norm
    clipped = {}
    for name, arr in arrays.items():
        ref = base[name].astype(np.float64)
        clipped[name] = (ref + (arr.astype(np.float64) - ref) * scale).astype(arr.dtype)
    return clipped
