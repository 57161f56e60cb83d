"""Which task a simulated node holds, and its share of that task's examples."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def node_dataset(partition_id: int, num_partitions: int, datasets: Sequence[str]) -> tuple[str, int, int]:
    """Partition ``p`` holds dataset entry ``datasets[p % T]``; nodes sharing an entry each get one shard.

    Returns ``(entry, shard, n_shards)``.
    """
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition-id {partition_id} is outside 0..{num_partitions - 1}")
    n_tasks = len(datasets)
    task_index = partition_id % n_tasks
    n_shards = len(range(task_index, num_partitions, n_tasks))
    return datasets[task_index], partition_id // n_tasks, n_shards


def iid_shard(n_examples: int, shard: int, n_shards: int, seed: int) -> np.ndarray:
    """Indices of one of ``n_shards`` disjoint, covering, seeded random shards (sorted)."""
    order = np.random.default_rng(seed).permutation(n_examples)
    return np.sort(np.array_split(order, n_shards)[shard])


def dirichlet_shard(labels: np.ndarray, shard: int, n_shards: int, alpha: float, seed: int, split_seed: int) -> np.ndarray:
    """Indices of one label-skewed shard: each class is divided among shards by Dirichlet(alpha) proportions.

    The proportions depend only on ``seed`` (so a node's train, val and test
    splits share its label mix); ``split_seed`` shuffles within each split.
    Shards are disjoint and together cover every index.
    """
    classes = np.unique(labels)
    proportions = np.random.default_rng(seed).dirichlet(np.full(n_shards, alpha), size=len(classes))
    shuffle = np.random.default_rng(split_seed)
    mine = []
    for c, share in zip(classes, proportions):
        members = shuffle.permutation(np.flatnonzero(labels == c))
        cuts = np.round(np.cumsum(share)[:-1] * len(members)).astype(int)
        mine.append(np.split(members, cuts)[shard])
    return np.sort(np.concatenate(mine))
