"""Which task a simulated node holds, and its share of that task's examples."""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np

from meduniverse_flwr.data.npz import Split
from meduniverse_flwr.data.options import DataOptions
from meduniverse_flwr.wire.card import TaskCard


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


def archive_indices(n_examples: int, share: float, seed: int) -> np.ndarray:
    """The ``round(share * n)`` examples (sorted indices) of a train split set apart as the server's public
    archive: the server pretrains on them, the node never trains or scores on them."""
    count = int(round(share * n_examples))
    return np.sort(np.random.default_rng(seed).permutation(n_examples)[:count])


def stratified_subset(classes: np.ndarray, count: int, seed: int) -> np.ndarray:
    """``count`` indices (sorted) drawn without replacement, each class in proportion to its share
    (largest remainders, at least one per class when ``count`` allows); all indices if ``count``
    is 0 or not below the number of examples."""
    n = len(classes)
    if count == 0 or count >= n:
        return np.arange(n)
    values, sizes = np.unique(classes, return_counts=True)
    quota = sizes * count / n
    taken = np.floor(quota).astype(int)
    if count >= len(values):  # every class gets a label before any gets a second one
        taken = np.maximum(taken, 1)
    while taken.sum() > count:  # the class furthest over its quota gives one back
        taken[np.argmax(np.where(taken > 1, taken - quota, -np.inf))] -= 1
    while taken.sum() < count:  # largest remainders first
        taken[np.argmax(np.where(taken < sizes, quota - taken, -np.inf))] += 1
    rng = np.random.default_rng(seed)
    picked = [rng.permutation(np.flatnonzero(classes == value))[:k] for value, k in zip(values, taken)]
    return np.sort(np.concatenate(picked))


def _shard_seed(seed: int, dataset: str, split: str) -> int:
    return zlib.crc32(f"{seed}:{dataset}:{split}".encode())


def stratify_by(labels: np.ndarray) -> np.ndarray:
    """One class per example, for label-skew partitioning and stratified scoring labels (multilabel: its first
    positive label)."""
    if labels.shape[1] == 1:
        return labels[:, 0]
    return np.where(labels.any(axis=1), labels.argmax(axis=1), labels.shape[1])


def iid_partition(split: Split, card: TaskCard, split_name: str, shard: int, n_shards: int,
         options: DataOptions) -> np.ndarray:
    return iid_shard(len(split), shard, n_shards, _shard_seed(options.seed, card.name, split_name))


def dirichlet_partition(split: Split, card: TaskCard, split_name: str, shard: int, n_shards: int,
               options: DataOptions) -> np.ndarray:
    return dirichlet_shard(stratify_by(split.labels), shard, n_shards, options.dirichlet_alpha,
                           _shard_seed(options.seed, card.name, "proportions"),
                           _shard_seed(options.seed, card.name, split_name))


def archive_of(name: str, n_train: int, share: float) -> np.ndarray:
    """The train-split indices of dataset ``name`` in the server's public archive: fixed per dataset
    (not per run seed), as a hospital's archive would be."""
    return archive_indices(n_train, share, zlib.crc32(f"archive:{name}".encode()))
