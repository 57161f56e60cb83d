"""What keeps a deployed node's fixed cost per message down (benchmarks/deployment_stage.py measures it):
a message's arrays packed into one Flower object per ``pack`` call and read back as untrusted; the
node's decoded data cached on disk for the next message's fresh process, read back as untrusted and
computing exactly as freshly decoded data; no plotting or data-building package imported on a node;
a shorter SuperExec task poll."""

import io
import json
import logging
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, write_medmnist
from flwr.app import Array, ArrayRecord
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.superexec.run_superexec import _TASK_POLL_INTERVAL_ENV
from safetensors import safe_open
from safetensors.torch import save_file
from test_strategy import _Stage
from test_untrusted_files import PlantedPickle

from deploy import launch
from meduniverse_flwr.client_app import app as client_app
from meduniverse_flwr.config import RunConfig
from meduniverse_flwr.data import cache, node_task
from meduniverse_flwr.data.cache import CACHE_DIR
from meduniverse_flwr.data.node_task import decode_node_task, load_node_task
from meduniverse_flwr.data.options import DataOptions
from meduniverse_flwr.learn.model import create_backbone, to_tensors
from meduniverse_flwr.server.strategy.stagewise import StageWise
from meduniverse_flwr.wire.messages import MAX_INDEX_CHARS, PACKED, pack, to_numpy, unpack
from meduniverse_flwr.wire.transport import TRANSPORT_DTYPES
from simulation.inprocess import InProcessGrid

# -------------------------------------------------------------------------------------- packing


@pytest.fixture(scope="module")
def backbone():
    torch.manual_seed(0)
    return {name: tensor.numpy() for name, tensor in create_backbone("vit-micro", 28).state_dict().items()}


@pytest.mark.parametrize("transport_dtype", TRANSPORT_DTYPES)
def test_a_packed_record_is_a_few_objects_and_unpacks_bit_exactly(backbone, transport_dtype):
    record = pack(backbone, transport_dtype)
    assert len(get_all_nested_objects(record)) == 3  # record, array, one chunk; one array per name: 65
    encoding = TRANSPORT_DTYPES[transport_dtype]
    arrays = unpack(record, transport_dtype)
    assert list(arrays) == list(backbone)
    for name, value in backbone.items():  # as if each array had travelled alone
        np.testing.assert_array_equal(arrays[name], encoding.decode(encoding.encode(value)))
        assert arrays[name].dtype == np.float32
    tensors = to_tensors(unpack(record, transport_dtype))
    tensors["cls_token"].add_(1.0)  # writable, and not a view of another array
    assert torch.equal(tensors["pos_embed"], torch.from_numpy(arrays["pos_embed"]))


def test_records_of_several_packs_merge_like_dicts(backbone):
    head = {"head.weight": np.ones((3, 64), np.float32), "head.bias": np.zeros(3, np.float32)}
    merged = unpack(ArrayRecord({**pack(backbone, "fp32"), **pack(head, "fp32")}), "fp32")
    assert list(merged) == [*backbone, *head]
    newer = {"head.weight": np.full((3, 64), 2.0, np.float32), "head.bias": np.ones(3, np.float32)}
    assert unpack(ArrayRecord({**pack(head, "fp32"), **pack(newer, "fp32")}), "fp32")["head.bias"][0] == 1.0
    assert unpack(pack({}, "bf16"), "bf16") == {}


def _npz_array() -> Array:
    """An Array whose bytes are an .npz archive: np.load opens it without an error, as an NpzFile."""
    buffer = io.BytesIO()
    np.savez(buffer, a=np.zeros(2))
    return Array(dtype="float32", shape=(2,), stype="numpy.ndarray", data=buffer.getvalue())


def _pickled_array(marker: pathlib.Path) -> Array:
    buffer = io.BytesIO()
    np.save(buffer, np.array([PlantedPickle(marker)], dtype=object), allow_pickle=True)
    return Array(dtype="object", shape=(1,), stype="numpy.ndarray", data=buffer.getvalue())


def _packed(index, data) -> ArrayRecord:
    return ArrayRecord({PACKED + (index if isinstance(index, str) else json.dumps(index)): Array(data)})


HOSTILE = {
    "index not JSON": (lambda m: _packed("[[", np.zeros(1, np.float32)), "index is not JSON"),
    "index not a list": (lambda m: _packed({"a": [1]}, np.zeros(1, np.float32)), "index is not a list"),
    "float size": (lambda m: _packed([["a", [1.0]]], np.zeros(1, np.float32)), "is not [name, shape]"),
    "negative size": (lambda m: _packed([["a", [-1]], ["b", [2]]], np.zeros(1, np.float32)), "is not [name, shape]"),
    "bool size": (lambda m: _packed([["a", [True]]], np.zeros(1, np.float32)), "is not [name, shape]"),
    "name not a string": (lambda m: _packed([[7, [1]]], np.zeros(1, np.float32)), "is not [name, shape]"),
    "too many dimensions": (lambda m: _packed([["a", [1] * 9]], np.zeros(1, np.float32)), "is not [name, shape]"),
    "name twice in an index": (lambda m: _packed([["a", [1]], ["a", [1]]], np.zeros(2, np.float32)),
                               "names an array twice"),
    "name twice across entries": (lambda m: ArrayRecord({**_packed([["a", [1]]], np.zeros(1, np.float32)),
                                                         **_packed([["a", [1]], ["b", [0]]], np.zeros(1, np.float32))}),
                                  "'a' appears twice"),
    "more values than the index": (lambda m: _packed([["a", [2]]], np.zeros(3, np.float32)), "holds 3 values"),
    "fewer values than the index": (lambda m: _packed([["a", [10**12]]], np.zeros(3, np.float32)), "holds 3 values"),
    "buffer not flat": (lambda m: _packed([["a", [4]]], np.zeros((2, 2), np.float32)), "expected a flat buffer"),
    "wrong dtype": (lambda m: _packed([["a", [2]]], np.zeros(2, np.float64)), "'a' arrived as float64"),
    "mixed entries": (lambda m: ArrayRecord({**_packed([["a", [1]]], np.zeros(1, np.float32)),
                                             "b": Array(np.zeros(1, np.float32))}), "mixes packed"),
    "index too long": (lambda m: _packed("[" + " " * MAX_INDEX_CHARS + "]", np.zeros(0, np.float32)), "longer than"),
    "npz, not npy": (lambda m: ArrayRecord({PACKED + '[["a",[2]]]': _npz_array()}), "is not an array"),
    "pickled objects": (lambda m: ArrayRecord({PACKED + '[["a",[1]]]': _pickled_array(m)}), "cannot be read"),
}


@pytest.mark.parametrize("case", HOSTILE)
def test_a_hostile_packed_record_is_a_one_line_value_error(case, tmp_path):
    build, reason = HOSTILE[case]
    marker = tmp_path / "code-ran"
    with pytest.raises(ValueError, match=re.escape(reason)) as err:
        unpack(build(marker), "fp32")
    assert "\n" not in str(err.value) and len(str(err.value)) < 300
    assert not marker.exists()


def test_the_server_rejects_a_hostile_packed_reply_and_accepts_an_honest_one():
    stage = _Stage()
    base = {name: tensor.numpy() for name, tensor in stage.base.items()}
    hostile = stage.reply(1)
    hostile.content.array_records["arrays"] = _packed([["cls_token", [1, 1, 10**9]]], np.zeros(3, np.float32))
    assert not stage.strategy.accept_train_reply(hostile)
    assert stage.strategy.outcome.rejected[0].startswith("node 1: arrays cannot be decoded (packed entry")
    assert stage.strategy.outcome.rejected[0].endswith("holds 3 values, its index names 1000000000)")
    honest = stage.reply(2)
    honest.content.array_records["arrays"] = pack(base, "fp32")
    assert stage.strategy.accept_train_reply(honest)


# ----------------------------------------------------------------------------- node data cache

SITES = {"gray": ("pneumoniamnist", 0), "rgb": ("bloodmnist", 1), "multilabel": ("chestmnist", 2)}


@pytest.fixture
def site(tmp_path):
    """A MedMNIST file per kind of images and labels, and the data options of a node reading it."""
    def make(kind: str) -> tuple[str, DataOptions]:
        flag, seed = SITES[kind]
        (tmp_path / "site").mkdir(exist_ok=True)
        entry = f"medmnist:{write_medmnist(tmp_path / 'site', flag, n=(40, 10, 12), seed=seed)}"
        return entry, DataOptions(root=str(tmp_path / "data-root"))
    return make


def assert_same_task(got, expected) -> None:
    """Same card, and the same tensors down to dtype and memory layout (layout decides which kernels run)."""
    assert got.card == expected.card
    for split in ("train", "val", "test"):
        for field in ("images", "labels"):
            a, b = getattr(getattr(got, split), field), getattr(getattr(expected, split), field)
            assert torch.equal(a, b) and a.dtype == b.dtype and a.stride() == b.stride(), (split, field)


def cache_files(options: DataOptions) -> list[pathlib.Path]:
    return sorted((pathlib.Path(options.root) / CACHE_DIR).glob("*.safetensors"))


@pytest.mark.parametrize("kind", SITES)
@pytest.mark.parametrize("shard, n_shards", [(0, 1), (1, 2)])
def test_a_cached_task_is_the_decoded_task_and_no_decode_reads_it(kind, shard, n_shards, site, monkeypatch):
    entry, options = site(kind)
    decoded = decode_node_task(entry, shard, n_shards, options)
    assert_same_task(load_node_task.__wrapped__(entry, shard, n_shards, options), decoded)  # decodes, writes
    assert len(cache_files(options)) == 1
    monkeypatch.setattr(node_task, "decode_node_task", lambda *args: pytest.fail("decoded again"))
    assert_same_task(load_node_task.__wrapped__(entry, shard, n_shards, options), decoded)


def test_a_node_computes_the_same_from_its_cache(tmp_path, run_config, monkeypatch):
    """A train stage and an evaluation, decoded then from the cache (lru emptied between): same bits."""
    sites = ",".join(f"medmnist:{write_medmnist(tmp_path, flag, n=(32, 8, 8), seed=i)}"
                     for i, flag in enumerate(("pneumoniamnist", "bloodmnist")))
    config = run_config(datasets=sites, clients_per_stage=2, probe_epochs=2, data_root=str(tmp_path / "root"))

    def stage():
        load_node_task.cache_clear()
        strategy = StageWise(RunConfig.from_run_config(config))
        grid = InProcessGrid(client_app, config, num_nodes=2)
        base = ArrayRecord(create_backbone("vit-micro", 28).state_dict())
        new_base, _ = strategy.run_train_stage(grid, 1, base)
        strategy.run_evaluation(grid, 1, new_base)
        return to_numpy(new_base), strategy.take_outcome()

    torch.manual_seed(0)
    decoded_base, decoded = stage()
    assert len(list((tmp_path / "root" / CACHE_DIR).glob("*.safetensors"))) == 2
    monkeypatch.setattr(node_task, "decode_node_task", lambda *args: pytest.fail("decoded again"))
    torch.manual_seed(0)
    cached_base, cached = stage()
    load_node_task.cache_clear()
    assert all(np.array_equal(cached_base[name], decoded_base[name]) for name in decoded_base)
    assert [(n.task, n.train_loss, n.val_accuracy) for n in cached.nodes] == \
        [(n.task, n.train_loss, n.val_accuracy) for n in decoded.nodes]
    assert cached.per_task == decoded.per_task


def _rewrite(path: pathlib.Path, change) -> None:
    """The cache file with its tensors or metadata changed, written back as valid safetensors."""
    with safe_open(path, framework="pt") as handle:
        metadata, tensors = handle.metadata(), {name: handle.get_tensor(name) for name in handle.keys()}
    change(tensors, metadata)
    save_file(tensors, path, metadata=metadata)


def _card_change(**fields):
    return lambda tensors, metadata: metadata.update(card=json.dumps({**json.loads(metadata["card"]), **fields}))


TAMPERED = {
    "not safetensors": (lambda path, marker: path.write_bytes(b"\x00" * 64), "unreadable"),
    "a planted pickle": (lambda path, marker: torch.save(PlantedPickle(marker), path), "unreadable"),
    "labels outside the classes": (lambda path, marker: _rewrite(
        path, lambda t, m: t.update(train_labels=t["train_labels"] + 100)), "outside the card's 8 classes"),
    "images of another size": (lambda path, marker: _rewrite(
        path, lambda t, m: t.update(val_images=t["val_images"][:, :14, :14].contiguous())), "expected N x 1|3 x 28"),
    "float images": (lambda path, marker: _rewrite(
        path, lambda t, m: t.update(test_images=t["test_images"].float())), "'test_images' is F32"),
    "an extra tensor": (lambda path, marker: _rewrite(
        path, lambda t, m: t.update(extra=torch.zeros(1))), "holds tensors"),
    "a card that lies about n-train": (lambda path, marker: _rewrite(path, _card_change(n_train=7)),
                                       "n-train / n-val / n-test differ"),
    "a card with a bool class count": (lambda path, marker: _rewrite(path, _card_change(n_classes=True)),
                                       "not a task card"),
    "another task's file": (lambda path, marker: _rewrite(
        path, lambda t, m: m.update(key=m["key"].replace('"medmnist', '"other'))), "written for another task"),
}


@pytest.mark.parametrize("case", TAMPERED)
def test_a_tampered_cache_file_is_refused_in_one_line_and_decoded_again(case, site, tmp_path, caplog):
    entry, options = site("rgb")
    decoded = decode_node_task(entry, 0, 1, options)
    load_node_task.__wrapped__(entry, 0, 1, options)
    [path] = cache_files(options)
    tamper, reason = TAMPERED[case]
    marker = tmp_path / "code-ran"
    tamper(path, marker)
    with caplog.at_level(logging.WARNING, logger="flwr"):
        assert_same_task(load_node_task.__wrapped__(entry, 0, 1, options), decoded)
    [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warning.startswith(f"node data cache {path}: ") and reason in warning
    assert warning.endswith("; decoding the dataset again") and "\n" not in warning
    assert not marker.exists()
    caplog.clear()
    assert_same_task(load_node_task.__wrapped__(entry, 0, 1, options), decoded)  # written again, read back
    assert not caplog.records


def test_a_changed_source_is_decoded_again_and_its_stale_file_removed(site, monkeypatch):
    entry, options = site("gray")
    first = load_node_task.__wrapped__(entry, 0, 1, options)
    [stale] = cache_files(options)
    path = pathlib.Path(entry.split(":", 1)[1])
    write_medmnist(path.parent, "pneumoniamnist", n=(40, 10, 12), seed=99)
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))  # same size, newer
    changed = load_node_task.__wrapped__(entry, 0, 1, options)
    assert not torch.equal(changed.train.images, first.train.images)
    assert_same_task(changed, decode_node_task(entry, 0, 1, options))
    assert stale not in cache_files(options) and len(cache_files(options)) == 1


def test_an_unwritable_cache_leaves_the_node_uncached_not_failed(site, monkeypatch, caplog):
    entry, options = site("gray")

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Read-only file system")

    monkeypatch.setattr(cache, "save_file", read_only)
    with caplog.at_level(logging.WARNING, logger="flwr"):
        assert_same_task(load_node_task.__wrapped__(entry, 0, 1, options), decode_node_task(entry, 0, 1, options))
    assert "not written ([Errno 13] Read-only file system)" in caplog.text
    assert not cache_files(options)


# --------------------------------------------------------------------------------------- imports

def test_a_node_imports_no_plotting_or_data_building_package(site):
    """The ClientApp module and a node's task load leave SciPy, matplotlib and the embedded
    universe's builders (scikit-image, nilearn, pydicom) unimported: each costs import time in
    every message's fresh process. pydicom is imported only to read a ``dicom:`` source."""
    entry, options = site("rgb")
    heavy = ("scipy", "matplotlib", "skimage", "nilearn", "pydicom", "sklearn", "pandas")
    code = ("import sys; import meduniverse_flwr.client_app; from meduniverse_flwr.data.node_task import DataOptions, "
            f"load_node_task; load_node_task({entry!r}, 0, 1, DataOptions(root={options.root!r})); "
            f"print([m for m in {heavy!r} if m in sys.modules])")
    loaded = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert loaded.stdout.strip() == "[]"


# ------------------------------------------------------------------------------------- SuperNode

def test_a_supernode_polls_for_tasks_four_times_a_second_unless_told_otherwise(monkeypatch):
    assert list(launch.SUPEREXEC_POLL) == [_TASK_POLL_INTERVAL_ENV]  # the variable Flower's SuperExec reads
    assert launch.supernode_env({"PATH": "x"}) == {"PATH": "x", _TASK_POLL_INTERVAL_ENV: "0.25"}
    assert launch.supernode_env({_TASK_POLL_INTERVAL_ENV: "2"}) == {_TASK_POLL_INTERVAL_ENV: "2"}
    started = []
    monkeypatch.setattr(os, "execve", lambda path, args, env: started.append(env))
    launch.main(["supernode", "--superlink", "127.0.0.1:1", "--dataset", "ct-tissue", "--insecure"])
    assert started[0][_TASK_POLL_INTERVAL_ENV] == "0.25"
