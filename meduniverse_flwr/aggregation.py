"""Stage-wise aggregation of backbones: pure functions on ``{name: ndarray}`` maps.

No Flower and no torch here. The server folds each valid reply into a
``RunningAggregate`` as it arrives (memory stays flat in the number of
replies), then mixes the result with the previous base.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

Arrays = Mapping[str, np.ndarray]
RULES = ("mean", "weighted")


def check_update(reference: Arrays, update: Arrays) -> str | None:
    """Why ``update`` cannot be aggregated against ``reference``, or None if it can."""
    missing = sorted(set(reference) - set(update))
    if missing:
        return f"missing keys {missing[:3]}{'...' if len(missing) > 3 else ''}"
    extra = sorted(set(update) - set(reference))
    if extra:
        return f"unexpected keys {extra[:3]}{'...' if len(extra) > 3 else ''}"
    for name, ref in reference.items():
        arr = update[name]
        if arr.shape != ref.shape:
            return f"'{name}' has shape {arr.shape}, expected {ref.shape}"
        if not np.issubdtype(arr.dtype, np.floating):
            return f"'{name}' has dtype {arr.dtype}, expected a float type"
        if not np.isfinite(arr).all():
            return f"'{name}' contains NaN or Inf"
    return None


def update_weight(rule: str, num_examples: float) -> float:
    """The weight of one update: 1 for ``mean``, its example count for ``weighted``."""
    if rule == "mean":
        return 1.0
    if rule == "weighted":
        return float(num_examples)
    raise ValueError(f"aggregation '{rule}': unknown, choose one of {RULES}")


class RunningAggregate:
    """Weighted sum in float64, one update at a time; ``result()`` is the weighted mean."""

    def __init__(self, rule: str) -> None:
        update_weight(rule, 1)  # reject an unknown rule now, not at the first reply
        self.rule = rule
        self.count = 0
        self.total_weight = 0.0
        self._sums: dict[str, np.ndarray] = {}
        self._dtypes: dict[str, np.dtype] = {}

    def add(self, update: Arrays, num_examples: float) -> None:
        weight = update_weight(self.rule, num_examples)
        if not (np.isfinite(weight) and weight > 0):
            raise ValueError(f"update weight must be finite and > 0, got {weight}")
        for name, arr in update.items():
            if name not in self._sums:
                self._sums[name] = np.zeros(arr.shape, dtype=np.float64)
                self._dtypes[name] = arr.dtype
            # in-place multiply-add: no temporary of the whole backbone
            np.add(self._sums[name], np.multiply(arr, weight, dtype=np.float64), out=self._sums[name])
        self.count += 1
        self.total_weight += weight

    def result(self) -> dict[str, np.ndarray]:
        if self.count == 0:
            raise ValueError("no update was aggregated")
        return {k: (s / self.total_weight).astype(self._dtypes[k]) for k, s in self._sums.items()}


def aggregate(updates: Iterable[tuple[Arrays, float]], rule: str) -> dict[str, np.ndarray]:
    """Batch form: the aggregate of ``(arrays, num_examples)`` pairs, in the given order."""
    running = RunningAggregate(rule)
    for arrays, num_examples in updates:
        running.add(arrays, num_examples)
    return running.result()


def mix(base: Arrays, aggregate_: Arrays, server_mix: float) -> dict[str, np.ndarray]:
    """Next base = (1 - server_mix) * base + server_mix * aggregate."""
    if not 0.0 < server_mix <= 1.0:
        raise ValueError(f"server-mix must be in (0, 1], got {server_mix}")
    if server_mix == 1.0:
        return {k: np.asarray(v) for k, v in aggregate_.items()}
    return {
        k: ((1.0 - server_mix) * base[k].astype(np.float64) + server_mix * aggregate_[k].astype(np.float64)).astype(
            base[k].dtype
        )
        for k in base
    }
