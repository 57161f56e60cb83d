"""What a task card may say: one set of bounds for the node that describes its task (a sidecar,
``data.layout``) and the server that checks the card it receives (``validation.parse_card``)."""

from __future__ import annotations

# A head of 768 x 1000 float32 is 3 MB; no medical label space comes near 1000 classes.
MAX_CLASSES = 1000
# Class counts per label kind: binary is a 2-column softmax; multilabel may have a single label.
CLASS_RANGE = {"binary": (2, 2), "multiclass": (2, MAX_CLASSES), "multilabel": (1, MAX_CLASSES)}
# Modality and class names are free text shown in log lines: printable (no control characters), this long at most.
MAX_TEXT_LENGTH = 64


def is_card_text(value: object) -> bool:
    """A modality or class name as a card may carry it."""
    return isinstance(value, str) and 0 < len(value) <= MAX_TEXT_LENGTH and value.isprintable()
