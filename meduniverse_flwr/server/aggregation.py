"""Stage-wise aggregation of backbones: pure functions on ``{name: ndarray}`` maps.

No Flower and no torch here. The server folds each valid reply into a
``RunningAggregate`` as it arrives (memory stays flat in the number of
replies), then mixes the result with the previous base. The fold does not depend on
the order in which replies arrive, so a run gives the same base however its nodes race. The robust
rules (coordinate-wise ``median``, ``trimmed-mean``) and the model-merging rule ``ties`` (for
backbones fine-tuned on different tasks) need every reply of a stage at once: a
``BufferedAggregate`` keeps them (K backbones in server memory, measured in benchmarks/README.md).
Whether an update may be aggregated at all is ``validation``'s (``check_update``, and its norms: ``norms``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Protocol

import numpy as np

Arrays = Mapping[str, np.ndarray]

# Streaming rule -> the weight of one update given its example count.
WEIGHTS: dict[str, Callable[[float], float]] = {
    "mean": lambda num_examples: 1.0,
    "weighted": float,
}


def update_weight(rule: str, num_examples: float) -> float:
    """The weight of one update under a streaming ``rule``: 1 for ``mean``, its example count for ``weighted``."""
    if rule not in WEIGHTS:
        raise ValueError(f"aggregation '{rule}': not a streaming rule, choose one of {tuple(WEIGHTS)}")
    return WEIGHTS[rule](num_examples)


class RunningAggregate:
    """Weighted sum, one update at a time; ``result()`` is the weighted mean.

    Each term (a float32 value times an integer weight below 2**29) is exact in float64, and the
    sum is kept as a float64 pair (sum, error) through Knuth's TwoSum, whose error term is exact
    unless one coordinate's terms span over 2**50 in magnitude. ``result()`` rounds that exact sum
    once, so it is the same for every arrival order, where a plain float64 sum differs in its last
    bits, and after rounding to float32 now and then in a weight.
    """

    def __init__(self, rule: str) -> None:
        update_weight(rule, 1)  # reject an unknown rule now, not at the first reply
        self.rule = rule
        self.count = 0
        self.total_weight = 0.0
        self._sums: dict[str, np.ndarray] = {}
        self._errors: dict[str, np.ndarray] = {}
        self._dtypes: dict[str, np.dtype] = {}

    def add(self, update: Arrays, num_examples: float) -> None:
        weight = update_weight(self.rule, num_examples)
        if not (np.isfinite(weight) and weight > 0):
            raise ValueError(f"update weight must be finite and > 0, got {weight}")
        for name, arr in update.items():
            if name not in self._sums:
                self._sums[name] = np.zeros(arr.shape, dtype=np.float64)
                self._errors[name] = np.zeros(arr.shape, dtype=np.float64)
                self._dtypes[name] = arr.dtype
            _two_sum_into(self._sums[name], self._errors[name], np.asarray(arr), weight)
        self.count += 1
        self.total_weight += weight

    def result(self) -> dict[str, np.ndarray]:
        if self.count == 0:
            raise ValueError("no update was aggregated")
        return {k: ((s + self._errors[k]) / self.total_weight).astype(self._dtypes[k]) for k, s in self._sums.items()}


# Elements per step of the fold: its three scratch arrays stay in the CPU cache, and no
# temporary of a whole array is allocated per reply.
FOLD_CHUNK = 1 << 15


def _two_sum_into(total: np.ndarray, error: np.ndarray, values: np.ndarray, weight: float) -> None:
    """total += values * weight in place (float64), and the exact rounding error of each addition
    (Knuth's TwoSum) into ``error``."""
    totals, errors, flat = total.reshape(-1), error.reshape(-1), values.reshape(-1)
    term, new_total, virtual = np.empty((3, min(FOLD_CHUNK, flat.size)))
    for start in range(0, flat.size, FOLD_CHUNK):
        part = slice(start, start + FOLD_CHUNK)
        n = len(flat[part])
        t, s, v, old = term[:n], new_total[:n], virtual[:n], totals[part]
        np.multiply(flat[part], weight, out=t, dtype=np.float64)
        np.add(old, t, out=s)
        np.subtract(s, old, out=v)
        # exact error = (old - (s - v)) + (t - v); that last addition is exact too
        np.subtract(t, v, out=t)
        np.subtract(s, v, out=v)
        np.subtract(old, v, out=v)
        np.add(v, t, out=t)
        np.add(errors[part], t, out=errors[part])
        old[...] = s


def coordinate_median(stacked: np.ndarray) -> np.ndarray:
    """The median of each coordinate over the first axis (K updates), in their dtype."""
    return np.median(stacked, axis=0).astype(stacked.dtype)


def trimmed_mean(stacked: np.ndarray, trim_fraction: float) -> np.ndarray:
    """Per coordinate, the mean of the K values left after dropping the ``floor(trim_fraction * K)``
    smallest and as many largest (Yin et al. 2018; Flower's ``FedTrimmedAvg`` cuts the same count)."""
    count = len(stacked)
    cut = int(trim_fraction * count)
    if not 0 <= 2 * cut < count:
        raise ValueError(f"trim-fraction {trim_fraction} leaves no update of {count}")
    kept = np.sort(stacked, axis=0)[cut:count - cut]
    return kept.mean(axis=0, dtype=np.float64).astype(stacked.dtype)


class BufferedAggregate:
    """Keeps every update (unweighted) until ``result()`` combines them coordinate by coordinate.

    Memory grows with K: one backbone per reply, plus one array of K rows at a time while combining.
    The result does not depend on arrival order (each coordinate's values are sorted).
    """

    def __init__(self, combine: Callable[[np.ndarray], np.ndarray]) -> None:
        self.combine = combine
        self.count = 0
        self._updates: list[Arrays] = []

    def add(self, update: Arrays, num_examples: float) -> None:
        self._updates.append(update)
        self.count += 1

    def result(self) -> dict[str, np.ndarray]:
        if self.count == 0:
            raise ValueError("no update was aggregated")
        return {name: self.combine(np.stack([update[name] for update in self._updates]))
                for name in self._updates[0]}


class Aggregate(Protocol):
    count: int

    def add(self, update: Arrays, num_examples: float) -> None: ...

    def result(self) -> dict[str, np.ndarray]: ...


def ties_merge(deltas: np.ndarray, density: float) -> np.ndarray:
    """TIES-merging (Yadav et al., NeurIPS 2023) of K task vectors stacked on the first axis (one tensor).

    Trim: each task vector keeps its ``ceil(density * size)`` largest-magnitude coordinates (ties at the
    threshold kept), the rest become 0. Elect: each coordinate's sign is that of the trimmed vectors' sum.
    Disjoint merge: the mean of the kept values that agree with the elected sign (0 where none do).
    Sums are taken over each coordinate's sorted values, so the result does not depend on the order
    of the K vectors.
    """
    flat = deltas.reshape(len(deltas), -1).astype(np.float64)
    keep = max(1, math.ceil(density * flat.shape[1]))
    magnitude = np.abs(flat)
    threshold = np.partition(magnitude, flat.shape[1] - keep, axis=1)[:, flat.shape[1] - keep][:, None]
    trimmed = np.sort(np.where(magnitude >= threshold, flat, 0.0), axis=0)
    sign = np.sign(trimmed.sum(axis=0))
    agree = (np.sign(trimmed) == sign) & (trimmed != 0.0)
    count = agree.sum(axis=0)
    merged = np.where(agree, trimmed, 0.0).sum(axis=0) / np.maximum(count, 1)
    return merged.reshape(deltas.shape[1:]).astype(deltas.dtype)


class TiesAggregate(BufferedAggregate):
    """Buffers the K backbones; ``result()`` is the base plus the TIES merge of their task vectors
    (backbone - base), so that ``mix(base, result, server_mix)`` scales the merged vector by server-mix."""

    def __init__(self, base: Arrays, density: float) -> None:
        super().__init__(lambda stacked: stacked)
        self.base, self.density = base, density

    def result(self) -> dict[str, np.ndarray]:
        if self.count == 0:
            raise ValueError("no update was aggregated")
        return {name: (ref + ties_merge(np.stack([update[name] - ref for update in self._updates]),
                                        self.density)).astype(ref.dtype)
                for name, ref in self.base.items()}


class Teachers(BufferedAggregate):
    """Keeps the stage's K backbones as they came for a curation rule (``registry.CURATION_RULES``), which
    trains the next base from them on the server's corpus; ``result()`` is never the next base."""

    def __init__(self) -> None:
        super().__init__(lambda stacked: stacked)

    @property
    def updates(self) -> list[Arrays]:
        return list(self._updates)

    def result(self) -> dict[str, np.ndarray]:
        raise ValueError("a curation rule's teachers are not combined into a base; its curator trains one")


# Aggregation rule (``aggregation``) -> a new stage aggregate given the stage's base, ``trim-fraction``
# and ``merge-density``; config validation reads the keys. ``mean`` / ``weighted`` stream;
# ``median`` / ``trimmed-mean`` / ``ties`` buffer the K replies and ignore example counts (a site
# cannot buy weight by claiming more examples); ``distill`` buffers them as teachers for its curator.
RULES: dict[str, Callable[[Arrays, float, float], Aggregate]] = {
    "mean": lambda base, trim_fraction, density: RunningAggregate("mean"),
    "weighted": lambda base, trim_fraction, density: RunningAggregate("weighted"),
    "median": lambda base, trim_fraction, density: BufferedAggregate(coordinate_median),
    "trimmed-mean": lambda base, trim_fraction, density: BufferedAggregate(
        lambda stacked: trimmed_mean(stacked, trim_fraction)),
    "ties": lambda base, trim_fraction, density: TiesAggregate(base, density),
    "distill": lambda base, trim_fraction, density: Teachers(),
}


def new_aggregate(rule: str, trim_fraction: float = 0.0, merge_density: float = 1.0,
                  base: Arrays | None = None) -> Aggregate:
    """A stage's aggregate; ``base`` (the stage's starting backbone) is needed by ``ties`` only."""
    if rule not in RULES:
        raise ValueError(f"aggregation '{rule}': unknown, choose one of {tuple(RULES)}")
    if rule == "ties" and base is None:
        raise ValueError("aggregation 'ties' merges task vectors: it needs the stage's base")
    return RULES[rule](base, trim_fraction, merge_density)


def aggregate(updates: Iterable[tuple[Arrays, float]], rule: str, trim_fraction: float = 0.0,
              merge_density: float = 1.0, base: Arrays | None = None) -> dict[str, np.ndarray]:
    """Batch form: the aggregate of ``(arrays, num_examples)`` pairs, in the given order."""
    running = new_aggregate(rule, trim_fraction, merge_density, base)
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
