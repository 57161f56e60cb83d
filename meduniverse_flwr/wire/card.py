"""The task card: what a node tells the server about its task (never its data), and the bounds of
what it may say, shared by the node that describes its task (a sidecar, ``data.layout``) and the server
that checks the card it receives (``server.validation.parse_card``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# A head of 768 x 1000 float32 is 3 MB; no medical label space comes near 1000 classes.
MAX_CLASSES = 1000
# Class counts per label kind: binary is a 2-column softmax; multilabel may have a single label.
CLASS_RANGE = {"binary": (2, 2), "multiclass": (2, MAX_CLASSES), "multilabel": (1, MAX_CLASSES)}
# Modality and class names are free text shown in log lines: printable (no control characters), this long at most.
MAX_TEXT_LENGTH = 64


def is_card_text(value: object) -> bool:
    """A modality or class name as a card may carry it."""
    return isinstance(value, str) and 0 < len(value) <= MAX_TEXT_LENGTH and value.isprintable()


@dataclass(frozen=True)
class TaskCard:
    """What a node tells the server about its task (never its data); the server parses it with
    ``validation.parse_card``."""

    name: str
    modality: str
    n_classes: int
    label_kind: str
    n_train: int
    n_test: int
    n_val: int
    classes: tuple[str, ...] = ()  # class names in label order, where the source has them

    def to_record(self) -> dict[str, Any]:
        record = {"name": self.name, "modality": self.modality, "n-classes": self.n_classes,
                  "label-kind": self.label_kind, "n-train": self.n_train, "n-test": self.n_test, "n-val": self.n_val}
        if self.classes:  # optional: a card without names stays the one older nodes send
            record["classes"] = list(self.classes)  # a ConfigRecord holds lists, not tuples
        return record
