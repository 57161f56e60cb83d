"""Any MedMNIST-layout ``.npz`` file as a dataset (entry ``npz:<path>``, or a bare ``<path>.npz``).

The file may have any name; its task is named after the file's stem. An optional sidecar
``<stem>.json`` beside it describes the task::

    {"modality": "blood cell microscopy", "classes": ["basophil", "eosinophil"], "label-kind": "binary"}

Every key is optional. Without ``classes`` the class count comes from the labels (largest label
+ 1, at least 2; a multilabel file: its label columns); without ``label-kind`` a task of 2
classes is binary, else multiclass (multilabel only when the sidecar says so); without
``modality`` it is "unknown". A bad sidecar is a one-line ``DataError`` naming it and the key.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from meduniverse_flwr.data.npz import DataError, Split, label_columns, read_npz
from meduniverse_flwr.learn.metrics import LABEL_KINDS
from meduniverse_flwr.wire.card import CLASS_RANGE, MAX_CLASSES, MAX_TEXT_LENGTH, is_card_text

SIDECAR_KEYS = ("modality", "classes", "label-kind")
MAX_SIDECAR_BYTES = 64 * 1024  # a sidecar is a few names; a larger file is a mistake, never read whole
UNKNOWN_MODALITY = "unknown"
QUOTE_LENGTH = 40


@dataclass(frozen=True)
class Sidecar:
    """What a sidecar says; empty ``classes`` / ``label_kind``: derived from the labels."""

    modality: str = UNKNOWN_MODALITY
    classes: tuple[str, ...] = ()
    label_kind: str = ""


@dataclass(frozen=True)
class Layout:
    """A file's task description: the sidecar's, completed from the labels."""

    modality: str
    classes: tuple[str, ...]  # class names in label order; () when the sidecar gives none
    n_classes: int
    label_kind: str


def sidecar_path(path: Path) -> Path:
    """``/data/pbc-blood.npz`` -> ``/data/pbc-blood.json``."""
    return Path(path).with_suffix(".json")


def load_layout(path: Path) -> tuple[Layout, dict[str, Split]]:
    """A MedMNIST-layout file's task description and checked splits."""
    path = Path(path)
    sidecar = read_sidecar(sidecar_path(path))
    if sidecar.label_kind == "multilabel":
        n_classes = len(sidecar.classes) or label_columns(path)
        splits = read_npz(path, n_classes, "multilabel")
        return Layout(sidecar.modality, sidecar.classes, n_classes, "multilabel"), splits
    # one read, labels bounded by what is known; the class count then follows from them
    bound = len(sidecar.classes) or (2 if sidecar.label_kind == "binary" else MAX_CLASSES)
    splits = read_npz(path, bound, "multiclass")
    n_classes = len(sidecar.classes) or max(2, 1 + max(int(split.labels.max()) for split in splits.values()))
    label_kind = sidecar.label_kind or ("binary" if n_classes == 2 else "multiclass")
    return Layout(sidecar.modality, sidecar.classes, n_classes, label_kind), splits


def read_sidecar(path: Path) -> Sidecar:
    """The sidecar at ``path``, checked; the defaults when there is none."""
    if not path.is_file():
        return Sidecar()
    values = _read_object(path)
    unknown = [key for key in values if key not in SIDECAR_KEYS]
    if unknown:
        raise DataError(f"sidecar {path}: unknown key {_quote(unknown[0])}, expected {', '.join(SIDECAR_KEYS)}")
    modality = values.get("modality", UNKNOWN_MODALITY)
    if not is_card_text(modality):
        raise DataError(f"sidecar {path}: 'modality' must be a string of 1..{MAX_TEXT_LENGTH} printable characters")
    classes = _classes(path, values["classes"]) if "classes" in values else ()
    label_kind = values.get("label-kind", "")
    if "label-kind" in values and label_kind not in LABEL_KINDS:
        raise DataError(f"sidecar {path}: 'label-kind' must be one of {', '.join(LABEL_KINDS)}, "
                        f"got {_quote(label_kind)}")
    kind = label_kind or ("binary" if len(classes) == 2 else "multiclass")
    low, high = CLASS_RANGE[kind]
    if classes and not low <= len(classes) <= high:
        raise DataError(f"sidecar {path}: 'classes' has {len(classes)} name(s), a {kind} task needs "
                        f"{f'exactly {low}' if low == high else f'at least {low}'}")
    return Sidecar(modality, classes, label_kind)


def _read_object(path: Path) -> dict:
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_SIDECAR_BYTES + 1)
    except OSError as err:
        raise DataError(f"sidecar {path}: cannot be read ({err.strerror})") from None
    if len(data) > MAX_SIDECAR_BYTES:
        raise DataError(f"sidecar {path}: larger than {MAX_SIDECAR_BYTES // 1024} KiB")
    try:
        values = json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError) as err:  # bad UTF-8 or JSON, a huge integer, deep nesting
        raise DataError(f"sidecar {path}: not UTF-8 JSON ({_quote(str(err))})") from None
    if not isinstance(values, dict):
        raise DataError(f"sidecar {path}: not a JSON object")
    return values


def _classes(path: Path, classes: object) -> tuple[str, ...]:
    if not (isinstance(classes, list) and all(isinstance(name, str) for name in classes)):
        raise DataError(f"sidecar {path}: 'classes' must be a list of strings")
    if not 1 <= len(classes) <= MAX_CLASSES:
        raise DataError(f"sidecar {path}: 'classes' has {len(classes)} names, expected 1..{MAX_CLASSES}")
    for index, name in enumerate(classes):
        if not is_card_text(name):
            raise DataError(f"sidecar {path}: 'classes' name {index} {_quote(name)} is not 1..{MAX_TEXT_LENGTH} "
                            f"printable characters")
    return tuple(classes)


def _quote(value: object) -> str:
    """A short one-line repr for a message (repr escapes newlines and control characters)."""
    text = repr(value)
    return text if len(text) <= QUOTE_LENGTH else text[: QUOTE_LENGTH - 3] + "..."
