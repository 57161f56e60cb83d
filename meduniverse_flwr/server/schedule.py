"""Which tasks train in which stage (``schedule``): pure functions, no Flower.

``every-stage``: every stage samples from all trainable nodes (the same sites retrain).
``arrival`` (the paper's protocol): each stage brings ``clients-per-stage`` tasks that have not
trained yet; each task trains once, on the base it is sent. The order is a seeded permutation,
rotated by ``clients-per-stage`` places from one seed to the next, so that over a block of
``ceil(T / K)`` consecutive seeds each task arrives at each stage equally often (exactly, when K
divides T); every block of seeds draws a new permutation, so the pairs that arrive together vary.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from meduniverse_flwr.wire.seeds import derive_seed


def arrival_order(tasks: Sequence[str], per_stage: int, seed: int) -> list[str]:
    """The order in which ``tasks`` arrive, ``per_stage`` at a time, for run seed ``seed``."""
    names = sorted(tasks)
    if not names:
        return []
    period = math.ceil(len(names) / per_stage)
    block, turn = divmod(seed, period)
    order = [names[int(i)] for i in np.random.default_rng(derive_seed(block, "arrival")).permutation(len(names))]
    shift = (turn * per_stage) % len(names)
    return order[shift:] + order[:shift]


def arrivals(order: Sequence[str], per_stage: int, stage: int) -> list[str]:
    """The tasks that train in ``stage`` (1, 2, ...)."""
    return list(order[(stage - 1) * per_stage: stage * per_stage])


def trained_by(order: Sequence[str], per_stage: int, stage: int) -> set[str]:
    """The tasks that have trained once ``stage`` has ended (none after stage 0)."""
    return set(order[: stage * per_stage])
