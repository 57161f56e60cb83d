import numpy as np
import pytest

from meduniverse_flwr.learn.metrics import accuracy, auc, average_ranks, binary_auc, paired_p_value


def test_binary_auc_hand_computed_with_a_tie():
    labels = np.array([0, 0, 1, 1])
    scores = np.array([0.1, 0.4, 0.35, 0.8])
    # pairs (pos, neg): (0.35 > 0.1), (0.35 < 0.4), (0.8 > 0.1), (0.8 > 0.4) -> 3/4
    assert binary_auc(labels, scores) == pytest.approx(0.75)
    assert binary_auc(np.array([0, 1]), np.array([0.5, 0.5])) == pytest.approx(0.5)
    assert np.isnan(binary_auc(np.array([1, 1]), np.array([0.2, 0.3])))


def test_multiclass_accuracy_and_one_vs_rest_auc():
    labels = np.array([0, 1, 2, 2])
    probs = np.array([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.1, 0.5, 0.4], [0.1, 0.2, 0.7]])
    assert accuracy(labels, probs, "multiclass") == pytest.approx(0.75)
    # class 0: 1.0; class 1: positive 0.7 vs negatives 0.1, 0.5, 0.2 -> 1.0; class 2: 0.4, 0.7 vs 0.1, 0.1 -> 1.0
    assert auc(labels, probs, "multiclass") == pytest.approx(1.0)
    probs_bad = probs[:, ::-1]
    assert auc(labels, probs_bad, "multiclass") < 0.5


def test_binary_uses_the_positive_column():
    labels = np.array([0, 1, 1])
    probs = np.array([[0.9, 0.1], [0.4, 0.6], [0.6, 0.4]])
    assert accuracy(labels, probs, "binary") == pytest.approx(2 / 3)
    assert auc(labels, probs, "binary") == pytest.approx(1.0)


def test_multilabel_per_label_mean():
    labels = np.array([[1, 0], [0, 0], [1, 1]])
    probs = np.array([[0.9, 0.2], [0.2, 0.6], [0.4, 0.7]])
    assert accuracy(labels, probs, "multilabel") == pytest.approx(4 / 6)
    # label 0: positives 0.9, 0.4 vs 0.2 -> 1.0; label 1: positive 0.7 vs 0.2, 0.6 -> 1.0
    assert auc(labels, probs, "multilabel") == pytest.approx(1.0)


def test_paired_p_value():
    before = [0.70, 0.80, 0.60, 0.75]
    after = [0.74, 0.85, 0.62, 0.80]
    p = paired_p_value(after, before)
    assert 0 < p < 0.05
    assert paired_p_value([0.5], [0.4]) is None
    assert paired_p_value([0.5, 0.6], [0.4, 0.5]) is None  # constant difference: no variance


def test_average_ranks_match_scipy_with_ties():
    from scipy import stats

    rng = np.random.default_rng(0)
    values = rng.integers(0, 5, 40).astype(float)  # many ties
    assert np.array_equal(average_ranks(values), stats.rankdata(values))
    assert np.array_equal(average_ranks(np.array([0.3, 0.1, 0.2])), [3.0, 1.0, 2.0])
