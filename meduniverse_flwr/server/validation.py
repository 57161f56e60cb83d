"""Validation of everything a node sends the server: task cards, training and evaluation replies.

A node is not trusted. Its values reach the aggregate, the results, log lines and
plots only through this module, which either returns them parsed and bounded or
raises ``Rejected`` with a one-line reason (printable, short: safe to log as is).
Pure functions on plain values (Mappings, numpy arrays, ``TaskCard``); no Flower.

- ``parse_card(record) -> TaskCard``: a node's card with strict types and the bounds below.
- ``admit_cards(cards) -> (admitted, refused)``: nodes sharing a task name must share its
  signature (modality, n-classes, label-kind), else all of them are refused.
- ``check_train_reply(base, arrays, metrics, card, *, max_update_ratio, on_excess) -> TrainUpdate``:
  arrays that fit the base, a weight within the node's card, an update no larger than
  ``max_update_ratio`` times the base (rejected or clipped beyond), optional metrics bounded.
- ``check_eval_reply(metrics, card, split) -> EvalScore``: accuracy and AUC in [0, 1], n-scored as on the card.

Integers on a card must be real ``int`` (not bool, float or str); metrics may carry a
count as an integral float (metric records hold ints and floats alike).
"""

from __future__ import annotations

import math
import re
import sys
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from meduniverse_flwr.common.text import one_line, quote
from meduniverse_flwr.learn.metrics import LABEL_KINDS
from meduniverse_flwr.registry import ON_EXCESS
from meduniverse_flwr.server.norms import Arrays, array_norm, clip_update, relative_update_norm
from meduniverse_flwr.wire.card import CLASS_RANGE, MAX_TEXT_LENGTH, TaskCard, is_card_text

# n-train / n-test / num-examples: past the largest medical image collections (a few million);
# a larger claim only serves to dominate the example-weighted mean.
MAX_EXAMPLES = 10**8
# Task names fit a log line and a plot legend.
MAX_NAME_LENGTH = 64
# ASCII letters and digits, then also ``._+-`` and inner spaces: no control characters (forged log
# lines, ANSI codes), no ``$`` or ``\`` (matplotlib mathtext), no look-alike Unicode, no ``..``-style names.
NAME_PATTERN = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._+\- ]*[A-Za-z0-9._+\-])?")
CARD_FIELDS = ("name", "modality", "n-classes", "label-kind", "n-train", "n-test", "n-val")
# Fields a card may leave out: "classes", the class names in label order (n-classes of them, each
# bounded as the modality is: they reach log lines and plots too).
OPTIONAL_CARD_FIELDS = ("classes",)
# A reason is one log line.
MAX_REASON_LENGTH = 200

# Upper bound of unbounded optional metrics (loss, seconds): a larger int has no float value.
_FLOAT_MAX = sys.float_info.max


class Rejected(ValueError):
    """What a node sent cannot be used; ``str(err)`` is a one-line reason, safe to log as is."""

    def __init__(self, reason: str) -> None:
        line = one_line(reason)
        super().__init__(line if len(line) <= MAX_REASON_LENGTH else line[: MAX_REASON_LENGTH - 3] + "...")


@dataclass(frozen=True, eq=False)  # eq would compare arrays element-wise
class TrainUpdate:
    """A training reply fit to aggregate."""

    arrays: dict[str, np.ndarray]  # the backbone to fold in (the clipped one if ``excess``)
    num_examples: int  # its weight under the ``weighted`` rule, within the node's n-train
    update_ratio: float  # ||arrays - base|| / ||base|| as received
    excess: str | None  # why the update was scaled down to max-update-ratio; None if it was not
    train_loss: float | None  # optional metrics: None when missing or malformed
    val_accuracy: float | None
    val_auc: float | None
    seconds: float | None

    @property
    def clipped(self) -> bool:
        return self.excess is not None


@dataclass(frozen=True)
class EvalScore:
    """An evaluation reply's scores for the node's task."""

    accuracy: float
    auc: float | None  # None: undefined on the node's scored split (a class is absent)
    n_scored: int  # examples scored: the card's count of the split asked for
    site_epsilon: float | None = None  # what a site with a privacy floor says it has spent (site_ledger.py)


def parse_card(record: Mapping[str, object]) -> TaskCard:
    """A node's task card from its record (keys ``CARD_FIELDS``, optionally ``OPTIONAL_CARD_FIELDS``);
    Rejected names the first problem."""
    if not isinstance(record, Mapping):
        raise Rejected(f"task card is a {type(record).__name__}, expected a record")
    missing = [field for field in CARD_FIELDS if field not in record]
    if missing:
        raise Rejected(f"task card lacks {', '.join(missing)}")
    unknown = sorted(quote(key) for key in record if key not in CARD_FIELDS + OPTIONAL_CARD_FIELDS)
    if unknown:
        raise Rejected(f"task card has unknown fields {', '.join(unknown[:3])}{', ...' if len(unknown) > 3 else ''}")
    name = record["name"]
    if not (isinstance(name, str) and len(name) <= MAX_NAME_LENGTH and NAME_PATTERN.fullmatch(name)):
        raise Rejected(f"name {quote(name)} is not 1..{MAX_NAME_LENGTH} of A-Z a-z 0-9 . _ + - and inner spaces")
    modality = record["modality"]
    if not is_card_text(modality):
        raise Rejected(f"modality {quote(modality)} is not 1..{MAX_TEXT_LENGTH} printable characters")
    label_kind = record["label-kind"]
    if not (isinstance(label_kind, str) and label_kind in LABEL_KINDS):
        raise Rejected(f"label-kind {quote(label_kind)} is not one of {', '.join(LABEL_KINDS)}")
    low, high = CLASS_RANGE[label_kind]
    n_classes = _card_count(record, "n-classes", low, high)
    n_train = _card_count(record, "n-train", 1, MAX_EXAMPLES)
    n_test = _card_count(record, "n-test", 1, MAX_EXAMPLES)
    n_val = _card_count(record, "n-val", 1, MAX_EXAMPLES)
    classes = _card_classes(record["classes"], n_classes) if "classes" in record else ()
    return TaskCard(name, modality, n_classes, label_kind, n_train, n_test, n_val, classes)


def admit_cards(cards: Mapping[int, TaskCard]) -> tuple[dict[int, TaskCard], dict[int, str]]:
    """Split parsed cards (by node id) into (admitted, refusal reason per node id).

    Nodes sharing a task name must agree on its signature (modality, n-classes, label-kind).
    Every node of a name claimed with different signatures is refused: the server cannot
    tell the honest one, and merging them would mix two tasks under one name.
    """
    nodes_by_name: dict[str, list[int]] = defaultdict(list)
    for node in sorted(cards):
        nodes_by_name[cards[node].name].append(node)
    admitted, refused = {}, {}
    for name, nodes in nodes_by_name.items():
        signatures = {(cards[n].modality, cards[n].n_classes, cards[n].label_kind) for n in nodes}
        if len(signatures) == 1:
            admitted.update((node, cards[node]) for node in nodes)
            continue
        shown = ", ".join(map(str, nodes[:5])) + (", ..." if len(nodes) > 5 else "")
        reason = (f"task {quote(name)} is claimed with {len(signatures)} different signatures (modality, "
                  f"n-classes, label-kind) by nodes {shown}; none of them is admitted")
        refused.update((node, reason) for node in nodes)
    return dict(sorted(admitted.items())), dict(sorted(refused.items()))


def _key_list(keys: Iterable[object]) -> str:
    """Up to three keys a node sent, each repr-quoted and cut short: a reason stays one short line."""
    ordered = sorted(keys, key=repr)  # keys of mixed types do not compare with each other
    shown = ", ".join(repr(key)[:40] for key in ordered[:3])
    return f"[{shown}{', ...' if len(ordered) > 3 else ''}]"



def check_update(reference: Arrays, update: Arrays) -> str | None:
    """Why ``update`` cannot be aggregated against ``reference``, or None if it can.

    Same keys, arrays of the reference's shapes and dtypes (the base is float), finite values.
    """
    missing = set(reference) - set(update)
    if missing:
        return f"missing keys {_key_list(missing)}"
    extra = set(update) - set(reference)
    if extra:
        return f"unexpected keys {_key_list(extra)}"
    for name, ref in reference.items():
        arr = update[name]
        if not isinstance(arr, np.ndarray):
            return f"'{name}' is a {type(arr).__name__}, expected an array"
        if arr.shape != ref.shape:
            return f"'{name}' has shape {arr.shape}, expected {ref.shape}"
        if arr.dtype != ref.dtype:  # also keeps a node from choosing the aggregate's dtype (the first update's)
            return f"'{name}' has dtype {str(arr.dtype)[:40]}, expected {ref.dtype}"
        if not np.isfinite(arr).all():
            return f"'{name}' contains NaN or Inf"
    return None


def check_train_reply(
    base: Arrays, arrays: Arrays, metrics: Mapping[str, object], card: TaskCard, *,
    max_update_ratio: float, on_excess: str,
) -> TrainUpdate:
    """A training reply from the node with ``card``, checked against the stage's ``base``.

    ``arrays`` must match the base's keys, shapes and dtypes and be finite; ``num-examples`` must
    be a whole number in 1..card.n_train (it is the update's weight). An update with
    ||arrays - base|| > max_update_ratio x ||base|| is rejected (``on_excess="reject"``) or scaled
    down to that norm (``"clip"``, reason in ``TrainUpdate.excess``); one whose norm overflows is
    always rejected. Optional metrics (train-loss, val-accuracy, val-auc, seconds) that are missing
    or out of range become None. ValueError (not Rejected) for a bad ``max_update_ratio`` / ``on_excess``.
    """
    if on_excess not in ON_EXCESS:
        raise ValueError(f"on_excess '{on_excess}': unknown, choose one of {ON_EXCESS}")
    if not max_update_ratio > 0:
        raise ValueError(f"max_update_ratio must be > 0, got {max_update_ratio}")
    _require_record(metrics, "metrics")
    _require_record(arrays, "arrays")
    problem = check_update(base, arrays)
    if problem is not None:
        raise Rejected(problem)
    num_examples = _whole_number(metrics.get("num-examples"), "num-examples", 1, card.n_train)
    ratio = relative_update_norm(base, arrays)
    excess = None
    if not ratio <= max_update_ratio:
        excess = f"update norm is {ratio:.3g} x the base norm, above max-update-ratio {max_update_ratio:g}"
        if on_excess == "reject" or math.isinf(ratio):  # an infinite norm has no direction to keep
            raise Rejected(excess)
        excess += "; scaled down to it"
        arrays = clip_update(base, arrays, max_update_ratio * array_norm(base))
    return TrainUpdate(
        arrays=dict(arrays),
        num_examples=num_examples,
        update_ratio=ratio,
        excess=excess,
        train_loss=_optional(metrics, "train-loss", _FLOAT_MAX),
        val_accuracy=_optional(metrics, "val-accuracy", 1.0),
        val_auc=_optional(metrics, "val-auc", 1.0),
        seconds=_optional(metrics, "seconds", _FLOAT_MAX),
    )


def check_eval_reply(metrics: Mapping[str, object], card: TaskCard, eval_split: str = "test") -> EvalScore:
    """An evaluation reply from the node with ``card``, scored on its ``eval_split``.

    accuracy: a number in [0, 1]; auc: a number in [0, 1], or NaN for "undefined on this split"
    (a class absent from the node's split), returned as None; n-scored: a whole number equal to the
    card's count of that split (so a node cannot outweigh others sharing its task).
    """
    _require_record(metrics, "metrics")
    accuracy = _fraction(metrics.get("accuracy"), "accuracy")
    auc = metrics.get("auc")
    auc = None if isinstance(auc, float) and math.isnan(auc) else _fraction(auc, "auc")
    expected = card.n_val if eval_split == "val" else card.n_test
    n_scored = _whole_number(metrics.get("n-scored"), "n-scored", expected, expected)
    return EvalScore(accuracy, auc, n_scored, _optional(metrics, "site-epsilon", _FLOAT_MAX))


def _require_record(value: object, what: str) -> None:
    if not isinstance(value, Mapping):
        raise Rejected(f"{what} is a {type(value).__name__}, expected a record")


def _card_count(record: Mapping[str, object], field: str, low: int, high: int) -> int:
    """A count on a card: a real int (not bool, float or str) in low..high."""
    value = record[field]
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise Rejected(f"{field} is {quote(value)}, expected an int in {low}..{high}")
    return value


def _card_classes(classes: object, n_classes: int) -> tuple[str, ...]:
    """A card's class names: a list of exactly ``n_classes`` strings, each bounded as a modality."""
    if not (isinstance(classes, list) and len(classes) == n_classes):
        raise Rejected(f"classes is {quote(classes)}, expected a list of {n_classes} names")
    for index, name in enumerate(classes):
        if not is_card_text(name):
            raise Rejected(f"classes name {index} {quote(name)} is not 1..{MAX_TEXT_LENGTH} printable characters")
    return tuple(classes)


def _whole_number(value: object, field: str, low: int, high: int) -> int:
    """A count in a metric record: an int or an integral float (not bool), in low..high."""
    number = int(value) if isinstance(value, float) and value.is_integer() else value  # NaN/inf stay floats
    if isinstance(number, bool) or not isinstance(number, int) or not low <= number <= high:
        expected = f"{low}" if low == high else f"a whole number in {low}..{high}"
        raise Rejected(f"{field} is {quote(value)}, expected {expected}")
    return number


def _fraction(value: object, field: str) -> float:
    """A number (not bool) in [0, 1]; NaN and inf fail the comparison."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise Rejected(f"{field} is {quote(value)}, expected a number in [0, 1]")
    return float(value)


def _optional(metrics: Mapping[str, object], key: str, high: float) -> float | None:
    """An optional metric in [0, high], or None when missing or malformed (not worth a rejection)."""
    value = metrics.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= high:
        return None
    return float(value)
