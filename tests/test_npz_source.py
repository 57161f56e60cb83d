"""The npz source: any MedMNIST-layout file is a dataset named by its stem, described by an optional
JSON sidecar; class names on the card, through the server's check and the node data cache."""

import json
import os
import pathlib

import numpy as np
import pytest
import yaml
from conftest import ROOT, write_medmnist
from safetensors import safe_open
from safetensors.torch import save_file

from meduniverse_flwr.data import medmnist, node_task
from meduniverse_flwr.data.cache import CACHE_DIR
from meduniverse_flwr.data.layout import MAX_SIDECAR_BYTES
from meduniverse_flwr.data.medmnist import FLAGS
from meduniverse_flwr.data.node_task import load_dataset, load_node_task
from meduniverse_flwr.data.npz import DataError
from meduniverse_flwr.data.options import DataOptions
from meduniverse_flwr.registry import dataset_name
from meduniverse_flwr.server.validation import Rejected, parse_card

SIZES = {"train": 10, "val": 4, "test": 6}


def write_file(path, labels_of=lambda count: np.arange(count) % 3, rgb=False, seed=0) -> pathlib.Path:
    """A MedMNIST-layout file at ``path`` (any name); ``labels_of(count)`` gives a split's labels."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, count in SIZES.items():
        arrays[f"{split}_images"] = rng.integers(0, 256, (count, 28, 28, 3) if rgb else (count, 28, 28), np.uint8)
        arrays[f"{split}_labels"] = labels_of(count)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)
    return path


def write_sidecar(path, values) -> pathlib.Path:
    sidecar = path.with_suffix(".json")
    sidecar.write_bytes(values if isinstance(values, bytes) else json.dumps(values).encode())
    return sidecar


def card_of(entry, root, source="embedded"):
    return load_dataset(entry, DataOptions(source=source, root=str(root)))[0]


@pytest.mark.parametrize("labels_of", [lambda n: np.arange(n) % 3, lambda n: (np.arange(n) % 3)[:, None]],
                         ids=["flat N", "N x 1"])
def test_a_file_of_any_name_loads_as_npz_entry_and_as_bare_path(labels_of, tmp_path):
    path = write_file(tmp_path / "sites" / "pbc-blood.npz", labels_of)
    options = DataOptions(source="medmnist", root=str(tmp_path / "root"))  # a bare .npz ignores the default
    for entry in (f"npz:{path}", str(path)):
        task = load_node_task(entry, 0, 1, options)
        card = task.card
        assert (card.name, card.modality, card.n_classes, card.label_kind, card.classes) == \
            ("pbc-blood", "unknown", 3, "multiclass", ())
        assert (card.n_train, card.n_val, card.n_test) == (10, 4, 6)
        assert task.train.labels.tolist() == [0, 1, 2, 0, 1, 2, 0, 1, 2, 0]
        assert task.train.images.shape == (10, 1, 28, 28)
        assert dataset_name(entry, "medmnist") == dataset_name(entry, "embedded") == "pbc-blood"
    assert "classes" not in card.to_record() and parse_card(card.to_record()) == card


def test_a_relative_path_resolves_under_data_root(tmp_path):
    write_file(tmp_path / "sites" / "site-b.npz", rgb=True)
    card, splits = load_dataset("npz:sites/site-b.npz", DataOptions(root=str(tmp_path)))
    assert card.name == "site-b" and splits["test"].images.shape == (6, 28, 28, 3)
    assert card_of("sites/site-b.npz", tmp_path, source="folder").name == "site-b"


def test_a_medmnist_path_keeps_its_flag_card_and_a_bare_one_is_read_by_npz(tmp_path):
    path = write_medmnist(tmp_path, "pneumoniamnist")
    flagged = card_of(f"medmnist:{path}", tmp_path)
    assert (flagged.name, flagged.modality, flagged.label_kind) == ("pneumoniamnist", "chest X-ray", "binary")
    bare = card_of(str(path), tmp_path, source="medmnist")
    assert (bare.name, bare.modality, bare.n_classes, bare.label_kind) == ("pneumoniamnist", "unknown", 2, "binary")


@pytest.mark.parametrize("labels, n_classes, label_kind", [
    (lambda n: np.zeros(n, int), 2, "binary"),  # one class seen: still a 2-class head
    (lambda n: np.arange(n) % 2, 2, "binary"),
    (lambda n: np.full(n, 4), 5, "multiclass"),  # largest label + 1
])
def test_without_a_sidecar_the_class_count_comes_from_the_labels(labels, n_classes, label_kind, tmp_path):
    card = card_of(f"npz:{write_file(tmp_path / 'x.npz', labels)}", tmp_path)
    assert (card.modality, card.n_classes, card.label_kind, card.classes) == ("unknown", n_classes, label_kind, ())


def test_labels_past_the_largest_class_count_fail_naming_the_file(tmp_path):
    path = write_file(tmp_path / "huge.npz", lambda n: np.full(n, 1000))
    with pytest.raises(DataError, match=r"huge.npz: 'train_labels': label 1000 out of range \(0..999\)"):
        card_of(f"npz:{path}", tmp_path)


def test_a_sidecar_names_modality_classes_and_label_kind(tmp_path):
    path = write_file(tmp_path / "pbc-blood.npz", lambda n: np.arange(n) % 3)
    names = ["basophil", "eosinophil", "lymphocyte", "monocyte"]  # class 3 absent from the file
    write_sidecar(path, {"modality": "blood cell microscopy", "classes": names, "label-kind": "multiclass"})
    card = card_of(f"npz:{path}", tmp_path)
    assert (card.modality, card.n_classes, card.label_kind, card.classes) == \
        ("blood cell microscopy", 4, "multiclass", tuple(names))
    record = card.to_record()
    assert record["classes"] == names and type(record["classes"]) is list
    assert parse_card(record) == card


def test_a_sidecar_alone_can_make_a_task_binary_or_multilabel(tmp_path):
    binary = write_file(tmp_path / "lesion.npz", lambda n: np.zeros(n, int))
    write_sidecar(binary, {"classes": ["benign", "malignant"]})
    assert card_of(f"npz:{binary}", tmp_path).label_kind == "binary"
    multi = write_file(tmp_path / "findings.npz", lambda n: np.eye(3, dtype=int)[np.arange(n) % 3])
    write_sidecar(multi, {"label-kind": "multilabel"})
    card = card_of(f"npz:{multi}", tmp_path)
    assert (card.n_classes, card.label_kind, card.classes) == (3, "multilabel", ())
    task = load_node_task(f"npz:{multi}", 0, 1, DataOptions(root=str(tmp_path)))
    assert task.train.labels.shape == (10, 3) and task.train.labels.dtype.is_floating_point
    write_sidecar(multi, {"label-kind": "multilabel", "classes": ["effusion", "nodule"]})  # 3 columns, 2 names
    with pytest.raises(DataError, match="findings.npz: 'train_labels' has 3 columns, expected 2 labels"):
        card_of(f"npz:{multi}", tmp_path)


def test_labels_outside_the_sidecar_classes_fail_naming_the_file(tmp_path):
    path = write_file(tmp_path / "x.npz", lambda n: np.arange(n) % 3)
    write_sidecar(path, {"classes": ["a", "b"]})
    with pytest.raises(DataError, match=r"x.npz: 'train_labels': label 2 out of range \(0..1\)"):
        card_of(f"npz:{path}", tmp_path)


BAD_SIDECARS = {
    "not JSON": (b"{modality: CT}", "not UTF-8 JSON"),
    "not UTF-8": (b'{"modality": "\xff"}', "not UTF-8 JSON"),
    "nested too deep": (b"[" * 60000, "not UTF-8 JSON"),
    "too large": (b" " * MAX_SIDECAR_BYTES + b"{}", "larger than 64 KiB"),
    "not an object": (b'["CT"]', "not a JSON object"),
    "unknown key": ({"modality": "CT", "colour": "red"}, "unknown key 'colour'"),
    "modality not a string": ({"modality": 3}, "'modality' must be a string"),
    "modality too long": ({"modality": "x" * 65}, "'modality' must be a string of 1..64"),
    "modality with a newline": ({"modality": "CT\nforged line"}, "'modality' must be a string"),
    "classes not a list": ({"classes": "a,b"}, "'classes' must be a list of strings"),
    "a class not a string": ({"classes": ["a", 2]}, "'classes' must be a list of strings"),
    "no classes": ({"classes": []}, "'classes' has 0 names, expected 1..1000"),
    "too many classes": ({"classes": [f"c{i}" for i in range(1001)]}, "'classes' has 1001 names"),
    "a class name too long": ({"classes": ["a", "b" * 65]}, "'classes' name 1 'bbbbb"),
    "an empty class name": ({"classes": ["a", ""]}, "'classes' name 1 '' is not 1..64 printable"),
    "unknown label kind": ({"label-kind": "ordinal"}, "'label-kind' must be one of binary, multiclass, multilabel"),
    "binary of 3 classes": ({"label-kind": "binary", "classes": ["a", "b", "c"]},
                            "'classes' has 3 name(s), a binary task needs exactly 2"),
    "multiclass of 1 class": ({"classes": ["a"]}, "'classes' has 1 name(s), a multiclass task needs at least 2"),
}


@pytest.mark.parametrize("case", BAD_SIDECARS)
def test_a_bad_sidecar_fails_in_one_line_naming_it_and_the_key(case, tmp_path):
    path = write_file(tmp_path / "site.npz")
    content, message = BAD_SIDECARS[case]
    sidecar = write_sidecar(path, content)
    with pytest.raises(DataError) as err:
        card_of(f"npz:{path}", tmp_path)
    assert str(err.value).startswith(f"sidecar {sidecar}: ") and message in str(err.value)
    assert str(err.value).isprintable() and len(str(err.value)) < 200



def test_the_embedded_source_sends_its_class_names(data_root):
    card = card_of("embedded:fundus-vessel", data_root)
    assert card.classes == ("background", "vessel")
    assert parse_card(card.to_record()) == card


def record(**fields) -> dict:
    return {"name": "pbc-blood", "modality": "microscopy", "n-classes": 2, "label-kind": "binary",
            "n-train": 10, "n-test": 6, "n-val": 4, **fields}


def test_the_server_accepts_cards_with_and_without_class_names():
    assert parse_card(record()).classes == ()
    assert parse_card(record(classes=["benign", "malignant tumour"])).classes == ("benign", "malignant tumour")


@pytest.mark.parametrize("classes, reason", [
    (["benign"], "classes is ['benign'], expected a list of 2 names"),
    (["a", "b", "c"], "expected a list of 2 names"),
    ([], "classes is [], expected a list of 2 names"),
    ("benign,malignant", "expected a list of 2 names"),
    (("a", "b"), "expected a list of 2 names"),  # a ConfigRecord gives lists
    (["benign", 1], "classes name 1 1 is not 1..64 printable characters"),
    (["benign", "m" * 65], "classes name 1 'mmmm"),
    (["benign", "bad\x1b[2J"], "classes name 1 'bad\\x1b[2J' is not"),
    (["", "b"], "classes name 0 '' is not"),
])
def test_the_server_rejects_bad_class_names_in_one_line(classes, reason):
    with pytest.raises(Rejected) as err:
        parse_card(record(classes=classes))
    assert reason in str(err.value) and str(err.value).isprintable()


def cache_files(root) -> list[pathlib.Path]:
    return sorted((pathlib.Path(root) / CACHE_DIR).glob("*.safetensors"))


def test_the_node_cache_keeps_class_names(tmp_path, monkeypatch):
    path = write_file(tmp_path / "pbc-blood.npz")
    write_sidecar(path, {"modality": "microscopy", "classes": ["a", "b", "c"]})
    options = DataOptions(root=str(tmp_path / "root"))
    decoded = load_node_task.__wrapped__(f"npz:{path}", 0, 1, options)
    assert len(cache_files(options.root)) == 1
    monkeypatch.setattr(node_task, "decode_node_task", lambda *args: pytest.fail("decoded again"))
    cached = load_node_task.__wrapped__(f"npz:{path}", 0, 1, options)
    assert cached.card == decoded.card and cached.card.classes == ("a", "b", "c")


def test_a_cached_card_with_the_wrong_number_of_class_names_is_decoded_again(tmp_path, caplog):
    path = write_file(tmp_path / "pbc-blood.npz")
    write_sidecar(path, {"classes": ["a", "b", "c"]})
    options = DataOptions(root=str(tmp_path / "root"))
    decoded = load_node_task.__wrapped__(f"npz:{path}", 0, 1, options)
    [cached] = cache_files(options.root)
    with safe_open(cached, framework="pt") as handle:
        metadata, tensors = handle.metadata(), {name: handle.get_tensor(name) for name in handle.keys()}
    metadata["card"] = json.dumps({**json.loads(metadata["card"]), "classes": ["a", "b"]})
    save_file(tensors, cached, metadata=metadata)
    assert load_node_task.__wrapped__(f"npz:{path}", 0, 1, options).card == decoded.card
    assert "card's class names are not 3 strings; decoding the dataset again" in caplog.text


def test_a_changed_added_or_removed_sidecar_is_read_again(tmp_path):
    path = write_file(tmp_path / "site.npz")
    options = DataOptions(root=str(tmp_path / "root"))

    def modality() -> str:
        return load_node_task.__wrapped__(f"npz:{path}", 0, 1, options).card.modality

    assert modality() == "unknown"
    sidecar = write_sidecar(path, {"modality": "CT"})
    assert modality() == "CT"
    stat = sidecar.stat()
    write_sidecar(path, {"modality": "MR"})  # same size: only its modification time tells
    os.utime(sidecar, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert modality() == "MR"
    sidecar.unlink()
    assert modality() == "unknown"
    assert len(cache_files(options.root)) == 1  # each stale file replaced


def test_the_medmnist8_preset_loads_every_dataset_from_local_files(tmp_path, monkeypatch):
    preset = yaml.safe_load((ROOT / "conf" / "experiment" / "medmnist8.yaml").read_text())
    assert preset["defaults"][0] == "arrival-cpu" and preset["download"] is True
    entries = preset["datasets"]
    assert len(entries) == len(set(entries)) == preset["federation"]["num_supernodes"] == 8
    flags = [entry.removeprefix("medmnist:") for entry in entries]
    for flag in flags:
        write_medmnist(tmp_path, flag, n=(6, 3, 4))
    monkeypatch.setattr(medmnist, "_download", lambda *args: pytest.fail("downloaded"))
    options = DataOptions(source="medmnist", root=str(tmp_path), image_size=28, download=True)
    for entry, flag in zip(entries, flags):
        card = load_node_task(entry, 0, 1, options).card
        assert (card.name, card.modality, card.n_classes, card.label_kind) == \
            (flag, FLAGS[flag].modality, FLAGS[flag].n_classes, FLAGS[flag].label_kind)
        assert (card.n_train, card.n_val, card.n_test) == (6, 3, 4)
        assert parse_card(card.to_record()) == card
    assert len({FLAGS[flag].modality for flag in flags}) == 8
