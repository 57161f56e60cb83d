import itertools
import math
import re

import numpy as np
import pytest

from meduniverse_flwr.server.aggregation import (
    RULES,
    RunningAggregate,
    aggregate,
    mix,
    new_aggregate,
    trimmed_mean,
    update_weight,
)


def arrays(w, b):
    return {"w": np.array(w, dtype=np.float32), "b": np.array(b, dtype=np.float32)}


A = arrays([[1.0, 2.0], [3.0, 4.0]], [0.0])
B = arrays([[5.0, 6.0], [7.0, 8.0]], [4.0])


def test_mean_is_the_plain_average():
    result = aggregate([(A, 10), (B, 30)], "mean")
    np.testing.assert_array_equal(result["w"], [[3.0, 4.0], [5.0, 6.0]])
    np.testing.assert_array_equal(result["b"], [2.0])


def test_weighted_uses_example_counts():
    # (10 * A + 30 * B) / 40 = 0.25 A + 0.75 B
    result = aggregate([(A, 10), (B, 30)], "weighted")
    np.testing.assert_allclose(result["w"], [[4.0, 5.0], [6.0, 7.0]])
    np.testing.assert_allclose(result["b"], [3.0])
    assert result["w"].dtype == np.float32


def test_weighted_three_unequal_clients():
    c = arrays([[0.0, 0.0], [0.0, 0.0]], [-6.0])
    # weights 1, 2, 3 -> (A + 2B + 0) / 6
    result = aggregate([(A, 1), (B, 2), (c, 3)], "weighted")
    np.testing.assert_allclose(result["w"], [[11 / 6, 14 / 6], [17 / 6, 20 / 6]], rtol=1e-6)
    np.testing.assert_allclose(result["b"], [(0 + 8 - 18) / 6], rtol=1e-6)


def test_streaming_equals_batch_exactly():
    rng = np.random.default_rng(0)
    updates = [({"w": rng.normal(size=(7, 5)).astype(np.float32)}, int(n)) for n in rng.integers(1, 500, 6)]
    running = RunningAggregate("weighted")
    for update, n in updates:
        running.add(update, n)
    np.testing.assert_array_equal(running.result()["w"], aggregate(updates, "weighted")["w"])


def test_the_fold_is_exact_so_arrival_order_does_not_matter():
    """The result is the exact weighted sum rounded once (math.fsum's), for every arrival order;
    a plain float64 fold gives 0 or 2**-60 / 3 for the first column, depending on the order."""
    rng = np.random.default_rng(0)
    columns = [np.array([1.0, 2.0**-60, -1.0], np.float32)]  # a spread no float64 sum keeps
    columns += [(rng.normal(size=3) * 10.0 ** rng.integers(-8, 8, 3)).astype(np.float32) for _ in range(400)]
    values = np.stack(columns, axis=1)
    weights = [3, 700_001, 2**28]
    for rule, rule_weights in (("mean", [1.0] * 3), ("weighted", weights)):
        exact = [math.fsum(float(values[i, j]) * rule_weights[i] for i in range(3)) for j in range(values.shape[1])]
        expected = (np.array(exact) / sum(rule_weights)).astype(np.float32)
        for order in itertools.permutations(range(3)):
            result = aggregate([({"w": values[i]}, weights[i]) for i in order], rule)["w"]
            np.testing.assert_array_equal(result, expected)
    assert aggregate([({"w": values[i]}, 1) for i in (0, 1, 2)], "mean")["w"][0] == np.float32(2.0**-60 / 3)


def test_mix_interpolates_with_the_previous_base():
    result = mix(A, B, 0.25)
    np.testing.assert_allclose(result["w"], [[2.0, 3.0], [4.0, 5.0]])
    np.testing.assert_array_equal(mix(A, B, 1.0)["w"], B["w"])
    with pytest.raises(ValueError, match="server-mix"):
        mix(A, B, 0.0)


def test_bad_weight_and_rule_are_rejected():
    running = RunningAggregate("weighted")
    with pytest.raises(ValueError, match="> 0"):
        running.add(A, 0)
    assert running.count == 0
    with pytest.raises(ValueError, match="not a streaming rule"):
        RunningAggregate("median")
    with pytest.raises(ValueError, match="no update"):
        running.result()


def test_streaming_rules_map_a_rule_to_its_weight():
    assert sorted(RULES) == ["distill", "mean", "median", "ties", "trimmed-mean", "weighted"]
    assert update_weight("mean", 30) == 1.0 and update_weight("weighted", 30) == 30.0
    with pytest.raises(ValueError, match=re.escape("choose one of ('mean', 'weighted')")):
        update_weight("median", 1)
    with pytest.raises(ValueError, match="unknown"):
        new_aggregate("median-ish")
    with pytest.raises(ValueError, match="needs the stage's base"):
        new_aggregate("ties")
    teachers = new_aggregate("distill")  # keeps the backbones for its curator, combines nothing
    teachers.add({"w": np.ones(2, np.float32)}, 3)
    assert teachers.count == 1 and np.array_equal(teachers.updates[0]["w"], np.ones(2))
    with pytest.raises(ValueError, match="its curator trains one"):
        teachers.result()


def test_median_and_trimmed_mean_against_hand_computed_values():
    updates = [({"w": np.array([1.0, 10.0, -3.0], np.float32)}, 5), ({"w": np.array([2.0, 20.0, -1.0], np.float32)}, 1),
               ({"w": np.array([4.0, 30.0, -2.0], np.float32)}, 1), ({"w": np.array([3.0, 40.0, 0.0], np.float32)}, 100)]
    # coordinate-wise over the 4 updates, example counts ignored: sorted (1,2,3,4), (10,20,30,40), (-3,-2,-1,0)
    np.testing.assert_array_equal(aggregate(updates, "median")["w"], [2.5, 25.0, -1.5])
    # trim-fraction 0.25 of K=4: one value cut at each end -> mean of the middle two (the median here)
    np.testing.assert_array_equal(aggregate(updates, "trimmed-mean", 0.25)["w"], [2.5, 25.0, -1.5])
    # 0.2 x 4 = 0.8 -> nothing cut: the plain mean
    np.testing.assert_array_equal(aggregate(updates, "trimmed-mean", 0.2)["w"], [2.5, 25.0, -1.5])
    five = updates + [({"w": np.array([100.0, 0.0, 9.0], np.float32)}, 1)]
    # K=5, 0.2 -> one cut per end: (2,3,4), (10,20,30), (-2,-1,0)
    np.testing.assert_array_equal(aggregate(five, "trimmed-mean", 0.2)["w"], [3.0, 20.0, -1.0])
    np.testing.assert_array_equal(aggregate(five, "median")["w"], [3.0, 20.0, -1.0])
    assert aggregate(five, "median")["w"].dtype == np.float32


def test_trimmed_mean_on_skewed_values_is_neither_the_median_nor_the_mean():
    # skewed columns arriving unsorted (the cases above are symmetric, where all three rules agree):
    # the median, the plain mean, cutting one end only, or not sorting each give another value
    rows = np.array([[6.0, -1.0], [0.0, -20.0], [20.0, -2.0], [1.0, 0.0], [2.0, -6.0]], np.float32)
    five = [({"w": row}, n) for row, n in zip(rows, (1, 50, 1, 7, 1))]
    # K=5, 0.2 -> one cut per end: (1, 2, 6) and (-6, -2, -1); median (2, -2), mean (5.8, -5.8)
    np.testing.assert_array_equal(aggregate(five, "trimmed-mean", 0.2)["w"], [3.0, -3.0])
    four = five[:4]  # sorted (0, 1, 6, 20) and (-20, -2, -1, 0)
    # K=4, 0.25 -> one cut per end: (1, 6) and (-2, -1), which at K=4 is the median; mean (6.75, -5.75)
    np.testing.assert_array_equal(aggregate(four, "trimmed-mean", 0.25)["w"], [3.5, -1.5])
    # K=4, 0.2 -> floor(0.8) = 0 cut: the plain mean, not the median
    np.testing.assert_array_equal(aggregate(four, "trimmed-mean", 0.2)["w"], [6.75, -5.75])


@pytest.mark.parametrize("rule", ["median", "trimmed-mean"])
def test_robust_rules_reject_one_outlier_where_the_mean_follows_it(rule):
    rng = np.random.default_rng(0)
    honest = [({"w": (1.0 + 0.01 * rng.standard_normal(100)).astype(np.float32)}, 1) for _ in range(4)]
    for attack in (-1.0, 1e6):  # sign-flipped, and scaled far out
        updates = honest + [({"w": np.full(100, attack, np.float32)}, 1)]
        assert np.abs(aggregate(updates, "mean")["w"] - 1.0).max() > 0.3
        assert np.abs(aggregate(updates, rule, 0.2)["w"] - 1.0).max() < 0.05


@pytest.mark.parametrize("rule", ["median", "trimmed-mean"])
def test_robust_rules_do_not_depend_on_arrival_order(rule):
    rng = np.random.default_rng(1)
    updates = [({"w": rng.standard_normal(50).astype(np.float32)}, 1) for _ in range(5)]
    results = {aggregate([updates[i] for i in order], rule, 0.2)["w"].tobytes()
               for order in itertools.permutations(range(5))}
    assert len(results) == 1


def test_a_trim_that_leaves_nothing_is_an_error():
    with pytest.raises(ValueError, match="leaves no update"):
        trimmed_mean(np.zeros((2, 3), np.float32), 0.5)


def _exact_weighted_mean(values, weights):
    """The weighted mean from math.fsum's exact sums, rounded as ``result()`` rounds it."""
    sums = [math.fsum(float(v[j]) * w for v, w in zip(values, weights)) for j in range(len(values[0]))]
    return (np.array(sums) / sum(weights)).astype(np.float32)


@pytest.mark.parametrize("chunk", [8, 16, 1 << 15])
def test_the_fold_gives_the_rounded_exact_sum_in_every_order(monkeypatch, chunk):
    """Large-and-tiny values, cancellations, zeros, subnormals, weights up to 2**29, over chunk
    boundaries: every arrival order gives the rounded exact sum, bit for bit."""
    import meduniverse_flwr.server.aggregation as aggregation_module

    monkeypatch.setattr(aggregation_module, "FOLD_CHUNK", chunk)
    rng = np.random.default_rng(7)
    n = 96
    calm = [rng.normal(size=n).astype(np.float32) for _ in range(4)]
    big = (rng.normal(size=n) * 10.0 ** rng.integers(0, 30, n)).astype(np.float32)
    spread = [big, -big, (rng.normal(size=n) * 1e-30).astype(np.float32),
              (rng.normal(size=n) * 1e-44).astype(np.float32)]  # cancellation, tiny, subnormal
    for values in (calm, spread):
        for v in values[::2]:
            v[rng.random(n) < 0.3] = 0.0
        values[0][: n // 2] = 0.0
        for rule, weights in (("mean", [1, 1, 1, 1]), ("weighted", [3, 7, 1, 5]),
                              ("weighted", [2**29 - 1, 1, 700_001, 2**28])):
            expected = _exact_weighted_mean(values, weights)
            for order in itertools.permutations(range(4)):
                running = RunningAggregate(rule)
                for i in order:
                    running.add({"w": values[i].reshape(8, 12)}, weights[i])
                np.testing.assert_array_equal(running.result()["w"].reshape(-1).view(np.uint32),
                                              expected.view(np.uint32))
