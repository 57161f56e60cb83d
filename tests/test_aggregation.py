import re

import numpy as np
import pytest

from meduniverse_flwr.aggregation import RunningAggregate, aggregate, check_update, mix


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


def test_mix_interpolates_with_the_previous_base():
    result = mix(A, B, 0.25)
    np.testing.assert_allclose(result["w"], [[2.0, 3.0], [4.0, 5.0]])
    np.testing.assert_array_equal(mix(A, B, 1.0)["w"], B["w"])
    with pytest.raises(ValueError, match="server-mix"):
        mix(A, B, 0.0)


@pytest.mark.parametrize(
    "update, reason",
    [
        ({"w": A["w"]}, "missing keys \\['b'\\]"),
        ({**A, "head.weight": np.zeros(2, np.float32)}, "unexpected keys"),
        ({"w": np.zeros((2, 3), np.float32), "b": A["b"]}, "shape \\(2, 3\\)"),
        ({"w": A["w"], "b": np.array([np.nan], np.float32)}, "NaN"),
        ({"w": A["w"].astype(np.int64), "b": A["b"]}, "dtype int64"),
    ],
)
def test_check_update_names_the_problem(update, reason):
    problem = check_update(A, update)
    assert problem is not None
    assert re.search(reason, problem)
    assert check_update(A, B) is None


def test_bad_weight_and_rule_are_rejected():
    running = RunningAggregate("weighted")
    with pytest.raises(ValueError, match="> 0"):
        running.add(A, 0)
    assert running.count == 0
    with pytest.raises(ValueError, match="unknown"):
        RunningAggregate("median-ish")
    with pytest.raises(ValueError, match="no update"):
        running.result()
