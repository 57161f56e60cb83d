"""Which task a simulated node holds, and its share of that task's examples."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def node_dataset(partition_id: int, num_partitions: int, datasets: Sequence[str]) -> tuple[str, int, int]:
    """Partition ``p`` holds ``datasets[p % T]``; nodes sharing a dataset each get one shard.

    Returns ``(dataset, shard, n_shards)``.
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
