import numpy as np
import pytest
import torch

from meduniverse_flwr.data.embedded import SPLIT_SIZES, TASKS, load_embedded, task_path
from meduniverse_flwr.data.node_task import load_node_task, to_task_data
from meduniverse_flwr.data.npz import DataError, Split, read_npz, write_npz
from meduniverse_flwr.data.options import DataOptions
from meduniverse_flwr.data.partition import dirichlet_shard, iid_shard, node_dataset
from meduniverse_flwr.server.validation import Rejected, parse_card
from meduniverse_flwr.wire.card import TaskCard


@pytest.mark.parametrize("name", sorted(TASKS))
def test_embedded_tasks_are_balanced_medmnist_files(name, data_root):
    splits = load_embedded(name, data_root)
    task = TASKS[name]
    assert task_path(data_root, name).is_file()
    for split_name, split in splits.items():
        assert split.images.dtype == np.uint8 and split.images.shape[1:3] == (28, 28)
        counts = np.bincount(split.labels[:, 0], minlength=len(task.classes))
        assert len(counts) == len(task.classes) and counts.min() == counts.max()  # balanced
        assert len(split) >= SPLIT_SIZES[split_name] - len(task.classes)
    # a second load reads the cache and gives the same bytes
    again = load_embedded(name, data_root)
    assert np.array_equal(again["test"].images, splits["test"].images)


def test_embedded_universe_spans_modalities_and_class_counts():
    assert len({t.modality for t in TASKS.values()}) >= 3
    assert len({len(t.classes) for t in TASKS.values()}) >= 3


def test_node_task_shards_a_dataset_between_nodes(data_root):
    options = DataOptions(root=str(data_root))
    whole = load_node_task("ct-tissue", 0, 1, options)
    assert whole.card.name == "ct-tissue"
    assert whole.train.images.shape == (whole.card.n_train, 1, 28, 28)  # CT: grayscale, one channel
    half_a, half_b = (load_node_task("embedded:ct-tissue", shard, 2, options) for shard in (0, 1))
    assert half_a.card.name == half_b.card.name == "ct-tissue"
    assert half_a.card.n_train + half_b.card.n_train == whole.card.n_train
    assert not torch.equal(half_a.train.images[:10], half_b.train.images[:10])


def test_dirichlet_partition_is_disjoint_covering_seeded_and_skewed():
    labels = np.repeat(np.arange(4), 250)
    shards = [dirichlet_shard(labels, s, 5, alpha=0.3, seed=1, split_seed=2) for s in range(5)]
    assert sorted(np.concatenate(shards).tolist()) == list(range(1000))
    assert np.array_equal(shards[3], dirichlet_shard(labels, 3, 5, alpha=0.3, seed=1, split_seed=2))
    mixes = np.array([np.bincount(labels[s], minlength=4) / max(len(s), 1) for s in shards])
    assert mixes.max(axis=1).mean() > 0.5  # alpha 0.3: most shards are dominated by one class
    iid_mixes = np.array([np.bincount(labels[s], minlength=4) / len(s) for s in
                          (iid_shard(1000, k, 5, seed=2) for k in range(5))])
    assert iid_mixes.max(axis=1).mean() < 0.4


def test_partitioning_is_disjoint_covering_and_seeded():
    assert node_dataset(5, 6, ("a", "b", "c", "d")) == ("b", 1, 2)
    assert node_dataset(3, 6, ("a", "b", "c", "d")) == ("d", 0, 1)
    shards = [iid_shard(103, s, 3, seed=7) for s in range(3)]
    assert sorted(np.concatenate(shards).tolist()) == list(range(103))
    assert np.array_equal(shards[0], iid_shard(103, 0, 3, seed=7))
    assert not np.array_equal(shards[0], iid_shard(103, 0, 3, seed=8))
    with pytest.raises(ValueError, match="partition-id 6"):
        node_dataset(6, 6, ("a",))


def test_to_task_data_unifies_channels_and_size():
    gray = Split(np.full((4, 28, 28), 200, np.uint8), np.array([[0], [1], [1], [0]]))
    data = to_task_data(gray, "binary", 64)
    assert data.images.shape == (4, 1, 64, 64) and data.images.dtype == torch.uint8  # repeated per batch
    assert int(data.images.min()) == 200 and data.labels.dtype == torch.int64
    rgb = Split(np.zeros((2, 28, 28, 3), np.uint8), np.array([[1, 0, 1], [0, 0, 1]]))
    multi = to_task_data(rgb, "multilabel", 28)
    assert multi.images.shape == (2, 3, 28, 28) and multi.labels.shape == (2, 3)


def _splits(n=6, size=28, labels=None):
    labels = np.arange(n)[:, None] % 2 if labels is None else labels
    return {s: Split(np.zeros((n, size, size), np.uint8), labels) for s in ("train", "val", "test")}


def test_write_then_read_round_trip(tmp_path):
    # distinct pixels and labels per split (not zeros): a dropped row, a changed value, a lossy dtype
    # or splits read in the wrong slot all come back different
    rng = np.random.default_rng(0)
    written = {s: Split(rng.integers(0, 256, (6, 28, 28), dtype=np.uint8), rng.integers(0, 2, (6, 1)))
               for s in ("train", "val", "test")}
    path = tmp_path / "toy.npz"
    write_npz(path, written)
    splits = read_npz(path, 2, "binary")
    assert sorted(splits) == sorted(written)
    for name, split in written.items():
        assert splits[name].images.dtype == np.uint8 and splits[name].labels.dtype == np.int64
        np.testing.assert_array_equal(splits[name].images, split.images)
        np.testing.assert_array_equal(splits[name].labels, split.labels)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda a: a.pop("val_labels"), "missing key 'val_labels'"),
        (lambda a: a.update(train_images=a["train_images"].astype(np.float32)), "dtype float32, expected uint8"),
        (lambda a: a.update(test_images=np.zeros((6, 28, 27), np.uint8)), "shape \\(6, 28, 27\\)"),
        (lambda a: a.update(train_labels=np.full((6, 1), 5)), "label 5 out of range \\(0..1\\)"),
        (lambda a: a.update(val_images=np.zeros((0, 28, 28), np.uint8), val_labels=np.zeros((0, 1), int)),
         "'val_images' is empty"),
    ],
)
def test_malformed_files_fail_with_one_line_naming_file_and_problem(tmp_path, mutate, message):
    arrays = {f"{s}_{k}": getattr(split, k) for s, split in _splits().items() for k in ("images", "labels")}
    mutate(arrays)
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(DataError, match=message) as err:
        read_npz(path, 2, "binary")
    assert "bad.npz" in str(err.value) and "\n" not in str(err.value)


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(DataError, match="nothere.npz: not found"):
        read_npz(tmp_path / "nothere.npz", 2, "binary")
    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(b"PK\x03\x04garbage")
    with pytest.raises(DataError, match="corrupt.npz: not a readable"):
        read_npz(corrupt, 2, "binary")


def test_task_card_round_trip_and_rejection():
    card = TaskCard("ct-tissue", "CT", 4, "multiclass", 1000, 400, 200)
    assert parse_card(card.to_record()) == card
    with pytest.raises(Rejected, match="lacks n-train"):
        parse_card({k: v for k, v in card.to_record().items() if k != "n-train"})
    with pytest.raises(Rejected, match="label-kind 'ordinal'"):
        parse_card({**card.to_record(), "label-kind": "ordinal"})
