"""A node's decoded data on disk: a deployed SuperNode starts a fresh ClientApp process for every
message, which would otherwise read, decode, resize and shard the node's dataset again each time.

One safetensors file per task (dataset entry, shard, data options) under ``<data root>/node-cache/``:
the uint8 images and the labels of each split, with the task card and the key as JSON metadata.
Its name is ``<task hash>-<source hash>``, the source hash covering the size and modification
time of every file the dataset is read from, so a changed source is decoded again (and the stale
file replaced), never read stale.

A file is read back as untrusted: no pickle anywhere (safetensors), the key must be the one asked
for, and every tensor must have the dtype and shape its card implies (checked before any tensor
is read), with labels within its classes; anything else is a one-line ``CacheError``.
"""

from __future__ import annotations

import hashlib
import json
import os
import reprlib
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from meduniverse_flwr.common.files import write_atomic
from meduniverse_flwr.data.npz import SPLITS
from meduniverse_flwr.learn.metrics import LABEL_KINDS

CACHE_DIR = "node-cache"
FORMAT = "meduniverse-flwr node task v3"  # bump when what is cached, or how, changes
# How images lie in memory, kept so that a cached task computes exactly as a decoded one (an RGB
# file gives a channels-last view): the stored order, and the permute back to N x C x S x S.
LAYOUTS = {"nchw": (0, 1, 2, 3), "nhwc": (0, 3, 1, 2)}
CARD_TYPES = {"name": str, "modality": str, "n_classes": int, "label_kind": str, "n_train": int, "n_test": int,
              "n_val": int, "classes": list}  # classes: a tuple on the card, a list in JSON


class CacheError(ValueError):
    """A cache file (or its source) cannot be used; the message names it and the problem."""


def _files(folder: Path, skip: Path) -> list[Path]:
    """Every file below ``folder`` in a fixed order, leaving out the folder ``skip``."""
    found = []
    for parent, folders, files in os.walk(folder):
        folders[:] = sorted(name for name in folders if Path(parent, name) != skip)
        found += [Path(parent, name) for name in sorted(files)]
    return found


def source_hash(paths: tuple[Path, ...], skip: Path) -> str:
    """A hash of the size and modification time of each of ``paths`` (a file, or every file below
    a folder except those under ``skip``, the cache itself); CacheError if one cannot be listed."""
    return hashlib.sha256(json.dumps([_listing(path, skip) for path in paths]).encode()).hexdigest()[:16]


def _listing(path: Path, skip: Path) -> list:
    try:
        files = [path] if path.is_file() else _files(path, skip) if path.is_dir() else []
        listing = [(str(file.relative_to(path)), stat.st_size, stat.st_mtime_ns)
                   for file in files for stat in [file.stat()]]
    except OSError as err:
        raise CacheError(f"data source {path}: cannot be listed ({err})") from None
    return [path.exists(), listing]


def cache_path(directory: Path, key: str, source: str) -> Path:
    return directory / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}-{source}.safetensors"


def _stored(images: torch.Tensor) -> tuple[str, torch.Tensor]:
    if not images.is_contiguous() and images.permute(0, 2, 3, 1).is_contiguous():
        return "nhwc", images.permute(0, 2, 3, 1)
    return "nchw", images.contiguous()


def write_task(path: Path, key: str, card: dict, images: dict[str, torch.Tensor],
               labels: dict[str, torch.Tensor]) -> None:
    """Write atomically (a killed node never leaves half a file) and drop the task's stale files;
    CacheError if it cannot be written."""
    stored = {split: _stored(images[split]) for split in SPLITS}
    tensors = {f"{split}_images": tensor for split, (_, tensor) in stored.items()}
    tensors |= {f"{split}_labels": labels[split].contiguous() for split in SPLITS}
    metadata = {"format": FORMAT, "key": key, "card": json.dumps(card),
                "layouts": json.dumps({split: layout for split, (layout, _) in stored.items()})}
    try:
        write_atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
        for stale in path.parent.glob(f"{path.name.split('-')[0]}-*.safetensors"):
            if stale != path:
                stale.unlink(missing_ok=True)
    except (OSError, SafetensorError) as err:
        raise CacheError(f"node data cache {path}: not written ({' '.join(str(err).split())})") from None


def read_task(path: Path, key: str, image_size: int) -> tuple[dict, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(card fields, images, labels per split) of a file written for ``key``; CacheError if it is not one."""
    try:
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
            if metadata.get("format") != FORMAT or metadata.get("key") != key:
                raise CacheError("written for another task or format")
            card = _card(json.loads(metadata["card"]))
            layouts = _layouts(json.loads(metadata["layouts"]))
            shapes = {name: (handle.get_slice(name).get_dtype(), tuple(handle.get_slice(name).get_shape()))
                      for name in handle.keys()}
            _check_shapes(shapes, card, layouts, image_size)
            tensors = {name: handle.get_tensor(name) for name in shapes}
    except CacheError as err:
        raise CacheError(f"node data cache {path}: {err}") from None
    except (SafetensorError, OSError, ValueError, KeyError) as err:
        raise CacheError(f"node data cache {path}: unreadable ({' '.join(str(err).split())})") from None
    labels = {split: tensors[f"{split}_labels"] for split in SPLITS}
    _check_labels(path, labels, card)
    images = {split: tensors[f"{split}_images"].permute(LAYOUTS[layouts[split]]) for split in SPLITS}
    return card, images, labels


def _card(card: object) -> dict:
    if not (isinstance(card, dict) and card.keys() == CARD_TYPES.keys()
            and all(type(card[field]) is kind for field, kind in CARD_TYPES.items())):
        raise CacheError("card is not a task card")
    if card["label_kind"] not in LABEL_KINDS or card["n_classes"] < 1:
        raise CacheError(f"card has label kind {card['label_kind']!r} with {card['n_classes']} classes")
    names = card["classes"]
    if not (all(type(name) is str for name in names) and len(names) in (0, card["n_classes"])):
        raise CacheError(f"card's class names are not {card['n_classes']} strings")
    return {**card, "classes": tuple(names)}


def _layouts(layouts: object) -> dict[str, str]:
    if not (isinstance(layouts, dict) and layouts.keys() == set(SPLITS)
            and all(layout in LAYOUTS for layout in layouts.values())):
        raise CacheError("layouts are not one of nchw / nhwc per split")
    return layouts


def _check_shapes(shapes: dict[str, tuple[str, tuple[int, ...]]], card: dict, layouts: dict[str, str],
                  image_size: int) -> None:
    """Exactly the tensors of a task, with the dtypes and shapes that ``card`` and ``image_size`` imply."""
    expected = {f"{split}_{part}" for split in SPLITS for part in ("images", "labels")}
    if shapes.keys() != expected:
        raise CacheError(f"holds tensors {reprlib.repr(sorted(shapes))}, expected {sorted(expected)}")
    multilabel = card["label_kind"] == "multilabel"
    channels = set()
    for split in SPLITS:
        dtype, stored = shapes[f"{split}_images"]
        if dtype != "U8" or len(stored) != 4:
            raise CacheError(f"'{split}_images' is {dtype} {list(stored)}, expected uint8 N x C x S x S")
        n, c, height, width = (stored[axis] for axis in LAYOUTS[layouts[split]])
        channels.add(c)
        if n < 1 or c not in (1, 3) or height != image_size or width != image_size:
            raise CacheError(f"'{split}_images' has shape {[n, c, height, width]}, expected N x 1|3 x "
                             f"{image_size} x {image_size}")
        label_shape = (n, card["n_classes"]) if multilabel else (n,)
        if shapes[f"{split}_labels"] != ("F32" if multilabel else "I64", label_shape):
            raise CacheError(f"'{split}_labels' is {shapes[f'{split}_labels']}, expected {list(label_shape)} "
                             f"{'float32' if multilabel else 'int64'}")
    if len(channels) != 1:
        raise CacheError(f"splits have different channel counts {sorted(channels)}")
    if [card[f"n_{split}"] for split in SPLITS] != [shapes[f"{split}_labels"][1][0] for split in SPLITS]:
        raise CacheError("card's n-train / n-val / n-test differ from its splits")


def _check_labels(path: Path, labels: dict[str, torch.Tensor], card: dict) -> None:
    for split, values in labels.items():
        if card["label_kind"] == "multilabel":
            bad = (values != 0) & (values != 1)
        else:
            bad = (values < 0) | (values >= card["n_classes"])
        if bad.any():
            raise CacheError(f"node data cache {path}: '{split}_labels' holds {values[bad][0].item()}, outside "
                             f"the card's {card['n_classes']} classes")
