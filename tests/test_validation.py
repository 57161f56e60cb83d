"""meduniverse_flwr.server.validation: what a node sends is parsed and bounded, or rejected on one line.

Unit tests replay the values found by tampering with replies (each one passed through or
crashed the server before); property tests (hypothesis, derandomized: the same examples on
every run of a commit) generate cards and replies, valid and invalid, and check the layer
against an independent statement of what is valid.
"""

import io
import math
import re
import string
from collections import defaultdict

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from meduniverse_flwr.common.text import QUOTE_LENGTH, quote, safe_label
from meduniverse_flwr.learn.metrics import LABEL_KINDS
from meduniverse_flwr.server.aggregation import RunningAggregate
from meduniverse_flwr.server.norms import relative_update_norm, update_norm
from meduniverse_flwr.server.validation import (
    CARD_FIELDS,
    CLASS_RANGE,
    MAX_EXAMPLES,
    MAX_NAME_LENGTH,
    MAX_REASON_LENGTH,
    MAX_TEXT_LENGTH,
    ON_EXCESS,
    EvalScore,
    Rejected,
    admit_cards,
    check_eval_reply,
    check_train_reply,
    parse_card,
)
from meduniverse_flwr.wire.card import TaskCard

# Deterministic (the same examples for the same commit, in CI too) and no example database in the checkout.
PROPERTY = settings(max_examples=300, deadline=None, derandomize=True, database=None)
F32_MAX = float(np.finfo(np.float32).max)


def make_card(name="ct-tissue", modality="CT", n_classes=4, label_kind="multiclass", n_train=100, n_test=20,
              n_val=10):
    """Every TaskCard in these tests: the one place to change if its fields change."""
    return TaskCard(name, modality, n_classes, label_kind, n_train, n_test, n_val)


def card_record(**fields) -> dict:
    """A card record as a node sends it; keyword arguments use make_card's names."""
    record = {"name": "ct-tissue", "modality": "CT", "n-classes": 4, "label-kind": "multiclass",
              "n-train": 100, "n-test": 20, "n-val": 10}
    record.update({key.replace("_", "-"): value for key, value in fields.items()})
    return record


def one_line(reason: str) -> str:
    """``reason``, checked to be a non-empty, printable (no newline, no escape code), short line."""
    assert reason and reason.isprintable() and len(reason) <= MAX_REASON_LENGTH, repr(reason)
    return reason


def rejection(function, *args, **kwargs) -> str:
    """The one-line reason ``function`` rejects its input for."""
    with pytest.raises(Rejected) as caught:
        function(*args, **kwargs)
    return one_line(str(caught.value))


CARD = make_card()
BASE = {"w": np.random.default_rng(0).normal(size=(4, 4)).astype(np.float32),
        "b": np.random.default_rng(1).normal(size=4).astype(np.float32)}
GOOD_EVAL = {"accuracy": 0.75, "auc": 0.8, "n-scored": 20}


def train(arrays, metrics=None, *, ratio=0.5, on_excess="reject", base=BASE, card=CARD):
    metrics = {"num-examples": 10} if metrics is None else metrics
    return check_train_reply(base, arrays, metrics, card, max_update_ratio=ratio, on_excess=on_excess)


def nudged(base, size):
    """``base`` moved by ``size`` x its norm, in one fixed direction."""
    direction = {name: np.ones(a.shape) for name, a in base.items()}
    scale = size * np.linalg.norm(np.concatenate([a.ravel() for a in base.values()]).astype(np.float64))
    scale /= math.sqrt(sum(d.size for d in direction.values()))
    return {name: (a.astype(np.float64) + scale * direction[name]).astype(a.dtype) for name, a in base.items()}


# ----------------------------------------------------------------------------- training replies
@pytest.mark.parametrize("value", [1e30, F32_MAX, -F32_MAX])
def test_an_update_of_huge_values_is_rejected(value):
    arrays = {name: np.full_like(a, value) for name, a in BASE.items()}
    with np.errstate(all="raise"):  # no overflow on the way to the verdict
        assert "update norm is" in rejection(train, arrays)


@pytest.mark.parametrize("value", [1e30, F32_MAX, -F32_MAX])
def test_an_update_of_huge_values_is_clipped_to_the_bound(value):
    arrays = {name: np.full_like(a, value) for name, a in BASE.items()}
    with np.errstate(all="raise"):
        update = train(arrays, on_excess="clip")
    assert update.clipped and "scaled down" in one_line(update.excess)
    assert update.update_ratio > 1e30 and all(np.isfinite(a).all() for a in update.arrays.values())
    assert relative_update_norm(BASE, update.arrays) == pytest.approx(0.5, rel=1e-5)


def test_an_update_whose_norm_overflows_float64_is_rejected_even_when_clipping():
    base, arrays = {"w": np.array([1e308, 1.0])}, {"w": np.array([-1e308, 1.0])}
    assert "update norm is inf" in rejection(train, arrays, base=base, on_excess="clip")


def test_zero_arrays_claiming_a_trillion_examples_are_rejected():
    zeros = {name: np.zeros_like(a) for name, a in BASE.items()}
    reason = rejection(train, zeros, {"num-examples": 1e12}, ratio=2.0)
    assert reason == "num-examples is 1000000000000.0, expected a whole number in 1..100"


def test_zero_arrays_move_the_base_by_its_whole_norm():
    zeros = {name: np.zeros_like(a) for name, a in BASE.items()}
    assert relative_update_norm(BASE, zeros) == pytest.approx(1.0)
    assert rejection(train, zeros, ratio=0.5).startswith("update norm is 1 x the base norm")


@pytest.mark.parametrize("value", [0, -5.0, 101, 2.5, math.nan, math.inf, True, "5", None, [1, 2], 1e12, 10**30])
def test_num_examples_must_be_a_whole_number_within_the_cards_n_train(value):
    assert rejection(train, nudged(BASE, 0.1), {"num-examples": value}).startswith(f"num-examples is {quote(value)}")


@pytest.mark.parametrize("value, weight", [(1, 1), (100, 100), (7.0, 7)])
def test_num_examples_within_n_train_is_the_weight(value, weight):
    update = train(nudged(BASE, 0.1), {"num-examples": value})
    assert update.num_examples == weight and type(update.num_examples) is int


def test_an_update_within_the_bound_is_accepted_as_sent():
    arrays = nudged(BASE, 0.4)
    update = train(arrays, ratio=0.5)
    assert not update.clipped and update.excess is None
    assert update.update_ratio == pytest.approx(0.4, rel=1e-5)
    assert all(update.arrays[name] is arrays[name] for name in BASE) and set(update.arrays) == set(BASE)


def test_a_clipped_update_keeps_its_direction():
    arrays = nudged(BASE, 3.0)
    update = train(arrays, ratio=0.5, on_excess="clip")
    sent = np.concatenate([(arrays[n].astype(np.float64) - BASE[n]).ravel() for n in BASE])
    kept = np.concatenate([(update.arrays[n].astype(np.float64) - BASE[n]).ravel() for n in BASE])
    assert update.update_ratio == pytest.approx(3.0, rel=1e-5)
    assert np.linalg.norm(kept) == pytest.approx(np.linalg.norm(sent) / 6, rel=1e-5)
    assert kept @ sent / (np.linalg.norm(kept) * np.linalg.norm(sent)) == pytest.approx(1.0, abs=1e-6)


def test_malformed_optional_metrics_become_none_not_a_rejection():
    metrics = {"num-examples": 10, "train-loss": -1.0, "val-accuracy": 1.5, "val-auc": math.nan, "seconds": "3"}
    update = train(nudged(BASE, 0.1), metrics)
    assert (update.train_loss, update.val_accuracy, update.val_auc, update.seconds) == (None, None, None, None)
    metrics = {"num-examples": 10, "train-loss": 0.7, "val-accuracy": 1, "val-auc": 0.25, "seconds": 3}
    update = train(nudged(BASE, 0.1), metrics)
    assert (update.train_loss, update.val_accuracy, update.val_auc, update.seconds) == (0.7, 1.0, 0.25, 3.0)


def test_a_reply_that_is_not_records_is_rejected():
    assert rejection(train, nudged(BASE, 0.1), [("num-examples", 10)]) == "metrics is a list, expected a record"
    assert rejection(train, list(BASE.items())) == "arrays is a list, expected a record"


def test_bad_options_are_programming_errors_not_rejections():
    for options in ({"max_update_ratio": 0.5, "on_excess": "ignore"}, {"max_update_ratio": 0.0, "on_excess": "clip"},
                    {"max_update_ratio": math.nan, "on_excess": "reject"}):
        with pytest.raises(ValueError) as caught:
            check_train_reply(BASE, BASE, {"num-examples": 1}, CARD, **options)
        assert not isinstance(caught.value, Rejected)


# --------------------------------------------------------------------------- evaluation replies
@pytest.mark.parametrize(
    "metrics, reason",
    [
        ({"n-scored": math.inf}, "n-scored is inf, expected 20"),
        ({"n-scored": math.nan}, "n-scored is nan, expected 20"),
        ({"n-scored": 1e12}, "n-scored is 1000000000000.0, expected 20"),
        ({"n-scored": 21}, "n-scored is 21, expected 20"),
        ({"n-scored": 20.5}, "n-scored is 20.5"),
        ({"n-scored": "20"}, "n-scored is '20'"),
        ({"n-scored": None}, "n-scored is None"),
        ({"auc": 7.0}, "auc is 7.0, expected a number in [0, 1]"),
        ({"auc": math.inf}, "auc is inf"),
        ({"auc": -0.1}, "auc is -0.1"),
        ({"auc": "0.5"}, "auc is '0.5'"),
        ({"auc": True}, "auc is True"),
        ({"auc": None}, "auc is None"),
        ({"accuracy": 1.5}, "accuracy is 1.5, expected a number in [0, 1]"),
        ({"accuracy": math.nan}, "accuracy is nan"),
        ({"accuracy": False}, "accuracy is False"),
    ],
)
def test_evaluation_replies_out_of_range_are_rejected_with_a_reason(metrics, reason):
    assert rejection(check_eval_reply, {**GOOD_EVAL, **metrics}, CARD).startswith(reason)


def test_an_undefined_auc_is_none():
    assert check_eval_reply({**GOOD_EVAL, "auc": math.nan}, CARD) == EvalScore(0.75, None, 20)


def test_an_evaluation_reply_in_range_is_scored():
    score = check_eval_reply({"accuracy": 1, "auc": 0, "n-scored": 20.0}, CARD)
    assert score == EvalScore(1.0, 0.0, 20) and type(score.n_scored) is int and type(score.accuracy) is float


# --------------------------------------------------------------------------------- task cards
@pytest.mark.parametrize(
    "fields, reason",
    [
        ({"n_classes": math.inf}, "n-classes is inf, expected an int in 2..1000"),
        ({"n_classes": 10**9}, "n-classes is 1000000000"),
        ({"n_classes": 2**62}, "n-classes is 4611686018427387904"),
        ({"n_classes": 5e6}, "n-classes is 5000000.0"),
        ({"n_classes": 5_000_000}, "n-classes is 5000000,"),
        ({"n_classes": 10**5000}, "n-classes is <int>"),
        ({"n_classes": 2.5}, "n-classes is 2.5"),
        ({"n_classes": 4.0}, "n-classes is 4.0"),
        ({"n_classes": "4"}, "n-classes is '4'"),
        ({"n_classes": True}, "n-classes is True"),
        ({"n_train": 10**18}, "n-train is 1000000000000000000, expected an int in 1..100000000"),
        ({"n_train": 1e18}, "n-train is 1e+18"),
        ({"n_train": 0}, "n-train is 0"),
        ({"n_test": 0}, "n-test is 0"),
        ({"label_kind": "ordinal"}, "label-kind 'ordinal' is not one of binary, multiclass, multilabel"),
        ({"label_kind": ["binary"]}, "label-kind ['binary']"),
        ({"label_kind": "binary"}, "n-classes is 4, expected an int in 2..2"),
        ({"n_classes": 1}, "n-classes is 1, expected an int in 2..1000"),
        ({"name": "ct\n\x1b[31mINFO server: all good"}, "name 'ct\\n\\x1b[31mINFO server: all good' is not"),
        ({"name": "evil$\\undefinedcommand$"}, "name 'evil$\\\\undefinedcommand$'"),
        ({"name": ""}, "name ''"),
        ({"name": "a" * 65}, "name 'aaaa"),
        ({"name": "ct "}, "name 'ct '"),
        ({"name": ".."}, "name '..'"),
        ({"name": "ev$il"}, "name 'ev$il'"),
        ({"name": "ev\\il"}, "name 'ev\\\\il'"),
        ({"name": "\u0441t-tissue"}, "name '\u0441t-tissue'"),  # a Cyrillic look-alike
        ({"name": "ct\u202etissue"}, "name 'ct\\u202etissue'"),
        ({"name": 7}, "name 7"),
        ({"modality": "CT\nINFO"}, "modality 'CT\\nINFO' is not 1..64 printable characters"),
        ({"modality": ""}, "modality ''"),
        ({"modality": "x" * 65}, "modality 'xxx"),
        ({"modality": None}, "modality None"),
    ],
)
def test_a_card_out_of_bounds_is_rejected_with_a_reason(fields, reason):
    assert rejection(parse_card, card_record(**fields)).startswith(reason)


def test_a_card_with_missing_or_unknown_fields_is_rejected():
    record = card_record()
    del record["n-test"]
    assert rejection(parse_card, record) == "task card lacks n-test"
    assert rejection(parse_card, {**card_record(), "n_classes": 4}) == "task card has unknown fields 'n_classes'"
    assert rejection(parse_card, [("name", "ct")]) == "task card is a list, expected a record"


@pytest.mark.parametrize(
    "fields",
    [{}, {"label_kind": "multilabel", "n_classes": 1}, {"label_kind": "binary", "n_classes": 2},
     {"name": "site A.v2_final+1"}, {"name": "a" * MAX_NAME_LENGTH}, {"modality": "images (site folder)"},
     {"modality": "Röntgen"}, {"n_classes": 1000, "n_train": MAX_EXAMPLES, "n_test": 1}],
)
def test_a_card_within_bounds_is_accepted(fields):
    assert parse_card(card_record(**fields)) == make_card(**fields)


def test_a_card_a_node_sends_parses_back():
    card = make_card(name="fundus-vessel", label_kind="binary", n_classes=2)
    assert parse_card(card.to_record()) == card


def test_every_label_kind_has_a_class_range():
    assert set(CLASS_RANGE) == set(LABEL_KINDS)


def test_a_task_name_claimed_with_two_signatures_refuses_every_claimant():
    cards = {1: make_card(), 2: make_card(n_classes=7), 3: make_card(name="brain-tissue"),
             4: make_card(n_train=5, n_test=3), 5: make_card(name="brain-tissue", modality="MR")}
    admitted, refused = admit_cards(cards)
    assert admitted == {} and sorted(refused) == [1, 2, 3, 4, 5]
    assert one_line(refused[1]) == ("task 'ct-tissue' is claimed with 2 different signatures (modality, "
                                    "n-classes, label-kind) by nodes 1, 2, 4; none of them is admitted")
    assert refused[2] == refused[4] == refused[1] and "nodes 3, 5" in refused[5]


def test_nodes_sharing_a_task_with_one_signature_are_admitted():
    cards = {7: make_card(n_train=50, n_test=9), 3: make_card(), 4: make_card(name="brain-tissue")}
    assert admit_cards(cards) == ({3: cards[3], 4: cards[4], 7: cards[7]}, {})


# ------------------------------------------------------------------------ labels and reasons
@pytest.mark.parametrize("name", ["ct\n\x1b[31mINFO forged", "evil$\\undefinedcommand$", "ct\u202e", "\ud800", "\\x1b"])
def test_a_safe_label_is_one_printable_line(name):
    label = safe_label(name)
    assert label.isprintable() and "$" not in label.replace("\\$", "")


def test_a_safe_label_is_plotted_literally():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    label = safe_label("evil$\\undefinedcommand$")  # raw, matplotlib's mathtext fails to parse it
    fig, ax = plt.subplots()
    try:
        ax.bar([label], [1.0], label=label)
        ax.set_title(label)
        ax.legend()
        fig.savefig(io.BytesIO(), format="png")
    finally:
        plt.close(fig)


def test_quoted_values_are_short_single_lines():
    class Shouting:
        def __repr__(self):
            return "line one\nline two \x1b[31m" + "!" * 100

    for value in ["x" * 10**6, 10**5000, Shouting(), list(range(10**5)), np.zeros((100, 100)), b"\x00\n" * 100]:
        text = quote(value)
        assert text.isprintable() and len(text) <= QUOTE_LENGTH, text
    assert quote(10**5000) == "<int>"


def test_a_rejection_is_one_line_whatever_it_is_given():
    assert one_line(str(Rejected("decode failed:\n\x1b[2J" + "x" * 1000))).startswith("decode failed:\\n\\x1b[2J")


# ---------------------------------------------------------------------- property-based tests
# Values of the wrong type, out of bounds, NaN / inf, huge, and some that happen to be valid.
junk = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(-10, 2000),
    st.sampled_from([0, -1, 2**62, 10**5000, MAX_EXAMPLES, MAX_EXAMPLES + 1, 1001]),
    st.floats(), st.sampled_from([math.nan, math.inf, -math.inf, 1e12, 1e18, 1e30, 2.5, 4.0, 5e6, F32_MAX]),
    st.text(max_size=70), st.binary(max_size=8), st.lists(st.integers(), max_size=3), st.sampled_from(LABEL_KINDS),
)

NAME_FIRST = string.ascii_letters + string.digits
NAME_CHARS = NAME_FIRST + "._+-"
names = st.builds(lambda first, rest: (first + rest).rstrip(" "), st.sampled_from(NAME_FIRST),
                  st.text(NAME_CHARS + " ", max_size=MAX_NAME_LENGTH - 1))
BAD_NAME_CHARS = "\n\r\x1b\x00$\\\u202e\u2028\ud800é\u0441"  # control, mathtext, bidi, surrogate, non-ASCII


@st.composite
def names_with_a_bad_char(draw) -> str:
    name = draw(names)
    at = draw(st.integers(0, len(name)))
    return name[:at] + draw(st.sampled_from(BAD_NAME_CHARS)) + name[at:]


bad_names = st.one_of(
    st.text(max_size=80), st.just(""), names.map(lambda n: n + " "), names.map(lambda n: "." + n),
    names.map(lambda n: n + "\n\x1b[31mINFO forged"), st.text(NAME_CHARS, min_size=MAX_NAME_LENGTH + 1, max_size=90),
    names_with_a_bad_char(),
)
modalities = st.text(st.characters(exclude_categories=("C", "Z"), include_characters=" "), min_size=1,
                     max_size=MAX_TEXT_LENGTH)
bad_modalities = st.one_of(st.text(max_size=80), st.text(min_size=MAX_TEXT_LENGTH + 1, max_size=90),
                           modalities.map(lambda m: m + "\n"), modalities.map(lambda m: "\x1b[2J" + m))
FIELD_JUNK = {"name": st.one_of(bad_names, junk), "modality": st.one_of(bad_modalities, junk)}
# Class counts per label kind, stated here independently of CLASS_RANGE.
CLASSES = {"binary": (2, 2), "multiclass": (2, 1000), "multilabel": (1, 1000)}


def is_count(value, low, high) -> bool:
    return type(value) is int and low <= value <= high


def card_is_valid(record) -> bool:
    if not isinstance(record, dict) or set(record) != set(CARD_FIELDS):
        return False
    name, modality, kind = record["name"], record["modality"], record["label-kind"]
    return (isinstance(name, str) and 1 <= len(name) <= 64 and name[0] in NAME_FIRST and name[-1] != " "
            and all(ch in NAME_CHARS + " " for ch in name)
            and isinstance(modality, str) and 1 <= len(modality) <= 64 and modality.isprintable()
            and isinstance(kind, str) and kind in CLASSES and is_count(record["n-classes"], *CLASSES[kind])
            and all(is_count(record[field], 1, 10**8) for field in ("n-train", "n-test", "n-val")))


@st.composite
def valid_card_records(draw) -> dict:
    kind = draw(st.sampled_from(LABEL_KINDS))
    return {"name": draw(names), "modality": draw(modalities), "n-classes": draw(st.integers(*CLASSES[kind])),
            "label-kind": kind, "n-train": draw(st.integers(1, MAX_EXAMPLES)),
            "n-test": draw(st.integers(1, MAX_EXAMPLES)), "n-val": draw(st.integers(1, MAX_EXAMPLES))}


@st.composite
def card_records(draw) -> dict:
    """A valid record, or one with a field replaced by junk, dropped, or an unknown field added."""
    record = draw(valid_card_records())
    change = draw(st.sampled_from(("none", "replace", "replace", "replace", "drop", "add")))
    field = draw(st.sampled_from(CARD_FIELDS))
    if change == "replace":
        record[field] = draw(FIELD_JUNK.get(field, junk))
    elif change == "drop":
        del record[field]
    elif change == "add":
        record[draw(st.one_of(st.text(max_size=12), st.integers()))] = draw(junk)
    return record


@PROPERTY
@given(card_records())
def test_a_card_is_accepted_exactly_when_valid(record):
    if card_is_valid(record):
        assert parse_card(record) == make_card(record["name"], record["modality"], record["n-classes"],
                                               record["label-kind"], record["n-train"], record["n-test"],
                                               record["n-val"])
    else:
        rejection(parse_card, record)


@PROPERTY
@given(st.one_of(names, names_with_a_bad_char(),
                 st.text(st.sampled_from(NAME_CHARS + " " + BAD_NAME_CHARS), max_size=70)),
       st.one_of(modalities, bad_modalities))
def test_a_card_name_and_modality_are_accepted_exactly_when_valid(name, modality):
    record = card_record(name=name, modality=modality)
    if card_is_valid(record):
        assert parse_card(record) == make_card(name=name, modality=modality)
    else:
        rejection(parse_card, record)


@PROPERTY
@given(st.one_of(st.dictionaries(st.one_of(st.sampled_from(CARD_FIELDS), st.text(max_size=8)), junk, max_size=8),
                 junk))
def test_any_card_record_is_parsed_or_rejected_on_one_line(record):
    try:
        card = parse_card(record)
    except Rejected as err:
        one_line(str(err))
    else:
        assert card_is_valid(record) and card.name == record["name"]


@st.composite
def card_sets(draw) -> dict:
    nodes = draw(st.lists(st.integers(0, 10**6), unique=True, max_size=8))
    return {node: make_card(name=draw(st.sampled_from("abc")), modality=draw(st.sampled_from(("CT", "MR"))),
                            n_classes=draw(st.sampled_from((3, 4))), n_train=draw(st.integers(1, 100)),
                            n_test=draw(st.integers(1, 100)))
            for node in nodes}


@PROPERTY
@given(card_sets())
def test_nodes_are_admitted_exactly_when_their_task_name_has_one_signature(cards):
    signatures = defaultdict(set)
    for card in cards.values():
        signatures[card.name].add((card.modality, card.n_classes, card.label_kind))
    admitted, refused = admit_cards(cards)
    assert admitted == {node: card for node, card in cards.items() if len(signatures[card.name]) == 1}
    assert set(refused) == set(cards) - set(admitted)
    assert all(one_line(reason) for reason in refused.values())


SHAPES = {"w": (2, 3), "b": (3,), "g": (1, 2, 2)}
OPTIONAL = {"train-loss": math.inf, "val-accuracy": 1.0, "val-auc": 1.0, "seconds": math.inf}  # key -> upper bound
FAULTS = ("missing key", "extra key", "shape", "dtype", "not an array", "nan", "inf", "huge", "float32 max",
          "excess", "num-examples", "metrics not a record")
EXCESS = {"huge", "float32 max", "excess"}  # faults that "clip" scales down instead of rejecting


def norm(arrays) -> float:
    return float(np.linalg.norm(np.concatenate([np.ravel(a).astype(np.float64) for a in arrays.values()])))


def count_is_valid(value, n_train) -> bool:
    return type(value) in (int, float) and 1 <= value <= n_train and float(value).is_integer()


@st.composite
def bases(draw) -> dict:
    keys = draw(st.lists(st.sampled_from(sorted(SHAPES)), min_size=2, max_size=3, unique=True))
    base = {key: draw(hnp.arrays(np.float32, SHAPES[key], elements=st.floats(-10, 10, width=32))) for key in keys}
    base[keys[0]].flat[0] = 1.0  # a base of norm 0 gives updates no scale
    return base


@st.composite
def train_replies(draw, base, card, ratio):
    """(arrays, metrics, fault): a reply from the node with ``card``; valid exactly when fault is None."""
    fault = draw(st.one_of(st.none(), st.sampled_from(FAULTS)))
    direction = {key: draw(hnp.arrays(np.float64, a.shape, elements=st.floats(-1, 1))) for key, a in base.items()}
    next(iter(direction.values())).flat[0] = 1.0  # never the zero vector
    size = draw(st.floats(1.05, 1e6)) if fault == "excess" else draw(st.floats(0.0, 0.99))
    scale = size * ratio * norm(base) / norm(direction)
    arrays = {key: (a.astype(np.float64) + scale * direction[key]).astype(np.float32) for key, a in base.items()}
    count = draw(st.sampled_from((int, float)))(draw(st.integers(1, card.n_train)))
    metrics = {"num-examples": count,
               **draw(st.dictionaries(st.sampled_from(sorted(OPTIONAL)), st.one_of(st.floats(0, 2), junk)))}
    key = draw(st.sampled_from(sorted(arrays)))
    at = draw(st.integers(0, arrays[key].size - 1))
    if fault == "missing key":
        del arrays[key]
    elif fault == "extra key":
        arrays["head.weight"] = np.zeros((2, 3), np.float32)
    elif fault == "shape":
        arrays[key] = np.append(arrays[key], np.float32(0.0))
    elif fault == "dtype":
        arrays[key] = arrays[key].astype(draw(st.sampled_from((np.float64, np.float16, np.int32, np.complex64))))
    elif fault == "not an array":
        arrays[key] = arrays[key].tolist()
    elif fault in ("nan", "inf", "huge"):
        infinity = draw(st.sampled_from((math.inf, -math.inf)))
        arrays[key].flat[at] = {"nan": math.nan, "inf": infinity, "huge": 1e30}[fault]
    elif fault == "float32 max":
        arrays[key][...] = draw(st.sampled_from((F32_MAX, -F32_MAX)))
    elif fault == "num-examples":
        metrics["num-examples"] = draw(st.one_of(junk, st.sampled_from((0, card.n_train + 1, 1e12, 2.5, math.nan))))
        if draw(st.booleans()):
            del metrics["num-examples"]
        elif count_is_valid(metrics["num-examples"], card.n_train):
            fault = None  # junk that happens to be a valid count
    elif fault == "metrics not a record":
        metrics = list(metrics.items())
    return arrays, metrics, fault


@st.composite
def train_stages(draw, max_replies=1):
    """(base, card, max_update_ratio, replies): one stage's base and replies to it."""
    base = draw(bases())
    card = make_card(n_train=draw(st.integers(1, 1000)))
    ratio = draw(st.floats(0.01, 10.0))
    replies = draw(st.lists(train_replies(base, card, ratio), min_size=1, max_size=max_replies))
    return base, card, ratio, replies


def assert_optional_metrics(update, metrics):
    """Each optional metric is its value when a finite number in [0, bound], else None."""
    for key, high in OPTIONAL.items():
        value = metrics.get(key)
        try:
            number = float(value) if type(value) in (int, float) else math.nan
        except OverflowError:  # an int past the float range
            number = math.nan
        expected = number if math.isfinite(number) and 0 <= number <= high else None
        assert getattr(update, key.replace("-", "_")) == expected, (key, value)


@PROPERTY
@given(train_stages())
def test_a_train_reply_is_accepted_as_sent_exactly_when_valid(stage):
    base, card, ratio, [(arrays, metrics, fault)] = stage
    if fault is None:
        update = check_train_reply(base, arrays, metrics, card, max_update_ratio=ratio, on_excess="reject")
        assert not update.clipped and update.update_ratio <= ratio
        assert set(update.arrays) == set(base) and all(update.arrays[key] is arrays[key] for key in base)
        assert update.num_examples == metrics["num-examples"] and type(update.num_examples) is int
        assert_optional_metrics(update, metrics)
    else:
        rejection(check_train_reply, base, arrays, metrics, card, max_update_ratio=ratio, on_excess="reject")


@PROPERTY
@given(train_stages())
def test_in_clip_mode_only_an_oversized_update_is_scaled_down_to_the_bound(stage):
    base, card, ratio, [(arrays, metrics, fault)] = stage
    if fault is not None and fault not in EXCESS:
        rejection(check_train_reply, base, arrays, metrics, card, max_update_ratio=ratio, on_excess="clip")
        return
    update = check_train_reply(base, arrays, metrics, card, max_update_ratio=ratio, on_excess="clip")
    assert update.clipped == (fault is not None)
    assert all(np.isfinite(a).all() and a.dtype == np.float32 for a in update.arrays.values())
    # float32 rounding of the clipped arrays is the only slack
    assert update_norm(base, update.arrays) <= ratio * norm(base) + 1e-6 * (1 + ratio) * norm(base)
    if update.clipped:
        sent = np.concatenate([(arrays[k].astype(np.float64) - base[k]).ravel() for k in base])
        kept = np.concatenate([(update.arrays[k].astype(np.float64) - base[k]).ravel() for k in base])
        assert kept @ sent / (np.linalg.norm(kept) * np.linalg.norm(sent)) > 0.9999


@PROPERTY
@given(train_stages(max_replies=6))
def test_an_aggregate_of_accepted_replies_holds_exactly_the_valid_ones(stage):
    base, card, ratio, replies = stage
    accepted, valid = RunningAggregate("weighted"), RunningAggregate("weighted")
    for arrays, metrics, fault in replies:
        try:
            update = check_train_reply(base, arrays, metrics, card, max_update_ratio=ratio, on_excess="reject")
        except Rejected:
            pass
        else:
            accepted.add(update.arrays, update.num_examples)
        if fault is None:
            valid.add(arrays, metrics["num-examples"])
    assert accepted.count == valid.count
    if valid.count:
        for key, value in valid.result().items():
            np.testing.assert_array_equal(accepted.result()[key], value)


@PROPERTY
@given(train_stages(max_replies=6))
def test_in_clip_mode_no_set_of_replies_moves_the_base_past_the_bound(stage):
    base, card, ratio, replies = stage
    running = RunningAggregate("weighted")
    for arrays, metrics, _ in replies:
        try:
            update = check_train_reply(base, arrays, metrics, card, max_update_ratio=ratio, on_excess="clip")
        except Rejected:
            continue
        running.add(update.arrays, update.num_examples)
    if running.count:
        result = running.result()
        assert all(np.isfinite(a).all() for a in result.values())
        assert update_norm(base, result) <= ratio * norm(base) + 1e-6 * (1 + ratio) * norm(base)


@st.composite
def arbitrary_train_replies(draw):
    """(base, arrays, metrics): arrays of any dtype, shape and values; metrics of anything."""
    base = draw(bases())
    dtypes = st.sampled_from((np.float32, np.float64, np.float16, np.longdouble, np.int64, np.bool_, np.complex64))
    shapes = st.sampled_from([a.shape for a in base.values()] + [(3,), ()])
    arrays = {key: draw(hnp.arrays(draw(dtypes), draw(shapes))) for key in base}
    if draw(st.booleans()):
        arrays[draw(st.text(max_size=5))] = draw(hnp.arrays(np.float32, (2,)))
    keys = st.one_of(st.sampled_from(["num-examples", *OPTIONAL]), st.text(max_size=5))
    metrics = draw(st.one_of(st.dictionaries(keys, junk, max_size=6), junk))
    return base, arrays, metrics


@PROPERTY
@given(arbitrary_train_replies(), st.sampled_from(ON_EXCESS))
def test_any_train_reply_is_accepted_or_rejected_on_one_line(reply, on_excess):
    base, arrays, metrics = reply
    try:
        update = check_train_reply(base, arrays, metrics, CARD, max_update_ratio=0.5, on_excess=on_excess)
    except Rejected as err:
        one_line(str(err))
    else:
        assert all(update.arrays[k].dtype == a.dtype and np.isfinite(update.arrays[k]).all() for k, a in base.items())
        assert 1 <= update.num_examples <= CARD.n_train


def score_is_valid(metrics, n_test) -> bool:
    def fraction(value):
        return type(value) in (int, float) and 0 <= value <= 1

    auc = metrics.get("auc")
    return (fraction(metrics.get("accuracy")) and (fraction(auc) or (type(auc) is float and math.isnan(auc)))
            and type(metrics.get("n-scored")) in (int, float) and metrics["n-scored"] == n_test)


@st.composite
def eval_replies(draw):
    card = make_card(n_test=draw(st.integers(1, MAX_EXAMPLES)))
    metrics = {
        "accuracy": draw(st.one_of(st.floats(0, 1), st.integers(0, 1), junk)),
        "auc": draw(st.one_of(st.floats(0, 1), st.just(math.nan), junk)),
        "n-scored": draw(st.one_of(st.just(card.n_test), st.just(float(card.n_test)),
                                 st.integers(card.n_test - 2, card.n_test + 2), junk)),
    }
    for key in draw(st.lists(st.sampled_from(sorted(metrics)), max_size=1)):
        del metrics[key]
    return card, metrics


@PROPERTY
@given(eval_replies())
def test_an_evaluation_reply_is_scored_exactly_when_valid(reply):
    card, metrics = reply
    if score_is_valid(metrics, card.n_test):
        score = check_eval_reply(metrics, card)
        assert score.accuracy == float(metrics["accuracy"]) and score.n_scored == card.n_test
        assert type(score.n_scored) is int
        assert score.auc is None if math.isnan(float(metrics["auc"])) else score.auc == float(metrics["auc"])
    else:
        rejection(check_eval_reply, metrics, card)


@PROPERTY
@given(st.one_of(st.dictionaries(st.one_of(st.sampled_from(["accuracy", "auc", "n-scored"]), st.text(max_size=5)),
                                 junk, max_size=5), junk))
def test_any_evaluation_reply_is_scored_or_rejected_on_one_line(metrics):
    try:
        score = check_eval_reply(metrics, CARD)
    except Rejected as err:
        one_line(str(err))
    else:
        assert 0 <= score.accuracy <= 1 and (score.auc is None or 0 <= score.auc <= 1) and score.n_scored == CARD.n_test


def unescape(label: str) -> str:
    """The inverse of safe_label."""
    def one(match):
        code = match.group(1)
        return chr(int(code[1:], 16)) if code[0] in "xuU" else {"n": "\n", "r": "\r", "t": "\t"}.get(code, code)

    return re.sub(r"\\(x[0-9a-f]{2}|u[0-9a-f]{4}|U[0-9a-f]{8}|[nrt\\$])", one, label)


@PROPERTY
@given(st.one_of(st.text(), st.text(st.sampled_from("\ud800\n\r\t$\\\x1b\x85\xa0\u202e\u2028a x"))))
def test_a_safe_label_is_printable_never_mathtext_and_reversible(text):
    label = safe_label(text)
    assert label.isprintable()
    assert label.count("$") == label.count("\\$")  # matplotlib's own test: no unescaped $, so no mathtext
    assert unescape(label) == text


def test_an_evaluation_on_val_counts_the_val_split():
    card = make_card()
    assert check_eval_reply({**GOOD_EVAL, "n-scored": 10}, card, "val").n_scored == 10
    with pytest.raises(Rejected, match="n-scored is 20, expected 10"):
        check_eval_reply(GOOD_EVAL, card, "val")
