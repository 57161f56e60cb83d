"""``meduniverse_flwr.report.stats``: spread over seeds, paired tests (exactly scipy's), Holm, comparisons."""

import warnings

import numpy as np
import pytest
from scipy import stats as scipy_stats

from meduniverse_flwr.report.stats import (
    PairedTest,
    Spread,
    bootstrap_ci,
    by_task,
    comparisons,
    detectable_effect,
    gain_spreads,
    gain_test,
    holm,
    mean_std,
    paired,
    paired_test,
    pairs_needed,
    task_gains,
    task_level_test,
)

AFTER = [0.80, 0.90, 0.70, 0.85, 0.60, 0.75, 0.66]
BEFORE = [0.70, 0.80, 0.72, 0.80, 0.50, 0.70, 0.61]


@pytest.fixture(autouse=True)
def no_warnings():
    """Degenerate inputs are handled by design: any warning is a failure."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


def test_mean_and_sample_std_over_seeds_ignore_missing_values():
    spread = mean_std([0.8, None, 0.9, 1.0])
    assert spread.mean == pytest.approx(0.9) and spread.std == pytest.approx(0.1) and spread.n == 3  # ddof=1
    assert mean_std([0.7]) == Spread(0.7, None, 1)
    assert mean_std([None]) == mean_std([]) == Spread(None, None, 0)


def test_paired_tests_are_exactly_scipys():
    test = paired_test(AFTER, BEFORE)
    assert test.wilcoxon_p == scipy_stats.wilcoxon(AFTER, BEFORE).pvalue
    assert test.ttest_p == scipy_stats.ttest_rel(AFTER, BEFORE).pvalue
    assert test.n == 7 and test.mean_diff == pytest.approx(0.43 / 7)
    assert test.wilcoxon_p == pytest.approx(2 * 2 / 2**7)  # one negative difference, of the smallest rank


@pytest.mark.parametrize("after, before, expected", [
    ([], [], PairedTest(0, None, None, None)),
    ([0.8], [0.7], PairedTest(1, pytest.approx(0.1), None, None)),       # fewer than 2 pairs
    ([0.8, 0.6, 0.5], [0.8, 0.6, 0.5], PairedTest(3, 0.0, 1.0, 1.0)),    # nothing changed
])
def test_degenerate_inputs_are_explicit(after, before, expected):
    assert paired_test(after, before) == expected


def test_equal_nonzero_differences_have_a_wilcoxon_p_and_no_t():
    after, before = [0.5, 0.6, 0.7, 0.8], [0.25, 0.35, 0.45, 0.55]
    test = paired_test(after, before)
    assert test.ttest_p is None and test.wilcoxon_p == scipy_stats.wilcoxon(after, before).pvalue == 0.125


def test_unequal_lengths_are_an_error():
    with pytest.raises(ValueError):
        paired_test([0.1, 0.2], [0.1])


def test_holm_against_a_hand_computed_example():
    # sorted 0.005, 0.01, 0.03, 0.04 -> x4, x3, x2, x1 = 0.02, 0.03, 0.06, 0.04 -> running max 0.06
    assert holm([0.01, 0.04, None, 0.03, 0.005]) == pytest.approx([0.03, 0.06, None, 0.06, 0.02])
    assert holm([0.5, 0.6]) == [1.0, 1.0]  # capped at 1, and never below a smaller p's
    assert holm([0.2]) == [0.2] and holm([None]) == [None] and holm([]) == []


def test_pairs_are_the_task_seed_keys_scored_in_both():
    after = {("a", 0): 0.9, ("a", 1): 0.8, ("b", 0): None, ("c", 0): 0.5}
    before = {("a", 1): 0.6, ("a", 0): 0.7, ("b", 0): 0.4, ("c", 0): None}
    assert paired(after, before) == ([0.9, 0.8], [0.7, 0.6])


def scores(values, seeds=(0, 1, 2)):
    """(task, seed) -> accuracy from {task: [one value per seed]}."""
    return {(task, seed): v for task, per_seed in values.items() for seed, v in zip(seeds, per_seed)}


def test_comparisons_final_vs_stage0_then_stagewise_vs_the_others_holm_across_all():
    base = scores({"a": [0.5, 0.5, 0.5], "b": [0.6, 0.6, 0.6]})
    stagewise = scores({"a": [0.7, 0.6, 0.8], "b": [0.7, 0.9, 0.65]})
    fedavg = scores({"a": [0.6, 0.55, 0.5], "b": [0.6, 0.7, 0.6]})
    groups = {("stagewise", ()): [base, stagewise], ("fedavg", ()): [base, fedavg],
              ("fedavg", ("c",)): [base, fedavg]}  # no stagewise run holds c out: no cross comparison
    result = comparisons(groups, final_stage=1)
    assert [(c.after, c.before) for c in result] == [
        ((("stagewise", ()), 1), (("stagewise", ()), 0)), ((("fedavg", ()), 1), (("fedavg", ()), 0)),
        ((("fedavg", ("c",)), 1), (("fedavg", ("c",)), 0)), ((("stagewise", ()), 1), (("fedavg", ()), 1))]
    after, before = list(stagewise.values()), list(fedavg.values())
    keys = sorted(stagewise)
    assert result[3].test == paired_test([stagewise[k] for k in keys], [fedavg[k] for k in keys])
    assert result[3].test.ttest_p == scipy_stats.ttest_rel(after, before).pvalue  # order of pairs is irrelevant
    assert [c.holm_p for c in result] == holm([c.test.wilcoxon_p for c in result])



def test_held_out_tasks_are_compared_per_set_then_pooled_over_a_strategys_sets_holm_across_all():
    """Leave one task out: each set's held-out task at the final stage vs stage 0, then every set's
    pairs of a strategy together (the LOTO p-value), in the same Holm family as the trained tasks."""
    trained = scores({"b": [0.6, 0.6, 0.6]})
    groups = {("stagewise", ("a",)): [trained, trained], ("stagewise", ("b",)): [trained, trained]}
    held = {("stagewise", ("a",)): [scores({"a": [0.5, 0.6, 0.7]}), scores({"a": [0.4, 0.62, 0.5]})],
            ("stagewise", ("b",)): [scores({"b": [0.8, 0.7, 0.9]}), scores({"b": [0.7, 0.71, 0.6]})],
            ("stagewise", ()): [{}, {}]}  # a group holding nothing out has no held-out row
    result = comparisons(groups, final_stage=1, held_out=held)
    assert [(c.after[0], c.held_out) for c in result] == [
        (("stagewise", ("a",)), False), (("stagewise", ("b",)), False),
        (("stagewise", ("a",)), True), (("stagewise", ("b",)), True), (("stagewise", ()), True)]
    assert result[2].test == paired_test([0.4, 0.62, 0.5], [0.5, 0.6, 0.7])
    pooled = result[4].test
    assert pooled.n == 6 and pooled.mean_diff == pytest.approx((-0.1 + 0.02 - 0.2 - 0.1 + 0.01 - 0.3) / 6)
    assert pooled.wilcoxon_p == scipy_stats.wilcoxon([0.4, 0.62, 0.5, 0.7, 0.71, 0.6],
                                                     [0.5, 0.6, 0.7, 0.8, 0.7, 0.9]).pvalue
    assert [c.holm_p for c in result] == holm([c.test.wilcoxon_p for c in result])
    only_a = {("stagewise", ("a",)): held[("stagewise", ("a",))]}
    one_set = comparisons({("stagewise", ("a",)): [trained, trained]}, 1, held_out=only_a)
    assert [c.held_out for c in one_set] == [False, True]  # one set: nothing to pool

def test_gain_over_stage0_per_seed_then_spread_and_per_task_gains():
    spreads = gain_spreads([[0.5, 0.6, 0.7], [0.4, 0.6, None], [0.6, 0.6, 0.8]])
    assert spreads[0] == Spread(0.0, 0.0, 3)
    assert spreads[1].mean == pytest.approx(0.1) and spreads[1].std == pytest.approx(0.1)
    assert spreads[2].mean == pytest.approx(0.2) and spreads[2].std == pytest.approx(0.0) and spreads[2].n == 2
    gains = task_gains(scores({"a": [0.7, 0.9, 0.8], "b": [0.5, None, 0.5]}),
                       scores({"a": [0.5, 0.6, 0.7], "b": [0.5, 0.4, 0.6]}))
    assert gains["a"].mean == pytest.approx(0.2) and gains["a"].std == pytest.approx(0.1)
    assert gains["b"].mean == pytest.approx(-0.05) and gains["b"].n == 2
    assert list(by_task(scores({"z": [0.1], "a": [0.2]}, seeds=(3,)))) == ["z", "a"]


# ------------------------------------------------------------------ gains against zero, clusters, power
GAINS = [3.0, -1.0, 5.0, 2.0, 9.0, 0.5, 4.0, -2.5, 6.0]
TASKS = ["a", "a", "a", "b", "b", "b", "c", "c", "c"]  # three seeds per task


def test_gain_tests_against_zero_are_scipys_wilcoxon_and_one_sample_t():
    test = gain_test(GAINS)
    assert test.wilcoxon_p == scipy_stats.wilcoxon(GAINS).pvalue
    assert test.ttest_p == pytest.approx(scipy_stats.ttest_1samp(GAINS, 0).pvalue, rel=1e-12)
    assert test.n == 9 and test.mean_diff == pytest.approx(sum(GAINS) / 9)
    assert gain_test([0.0, 0.0]) == PairedTest(2, 0.0, 1.0, 1.0) and gain_test([]) == PairedTest(0, None, None, None)


def test_bootstrap_with_one_value_per_cluster_is_scipys_percentile_bootstrap():
    values = GAINS[:6]
    low, high = bootstrap_ci(values, ["t1", "t2", "t3", "t4", "t5", "t6"], n_resamples=2000, seed=3)
    expected = scipy_stats.bootstrap((np.asarray(values),), np.mean, method="percentile", n_resamples=2000,
                                     rng=np.random.default_rng(3)).confidence_interval
    assert (low, high) == pytest.approx((expected.low, expected.high), rel=1e-12)


def test_cluster_bootstrap_resamples_whole_tasks():
    # equal cluster sizes: the pooled mean of a resample is the mean of its task means
    means = [np.mean(GAINS[i:i + 3]) for i in (0, 3, 6)]
    expected = scipy_stats.bootstrap((np.asarray(means),), np.mean, method="percentile", confidence_level=0.9,
                                     rng=np.random.default_rng(0)).confidence_interval
    assert bootstrap_ci(GAINS, TASKS, level=0.9, n_resamples=9999) == pytest.approx((expected.low, expected.high))
    # unequal sizes: every value of a drawn task counts, so a task with more seeds weighs more
    values, clusters = [0.0, 0.0, 0.0, 1.0], ["big", "big", "big", "small"]
    drawn = np.random.default_rng(0).integers(0, 2, (500, 2))  # clusters in sorted order: big, small
    pooled = [np.mean([v for d in row for v, c in zip(values, clusters) if c == ["big", "small"][d]]) for row in drawn]
    assert bootstrap_ci(values, clusters, n_resamples=500, level=0.5) == pytest.approx(
        tuple(np.quantile(pooled, [0.25, 0.75])))
    low, high = bootstrap_ci(GAINS, TASKS)
    assert low < np.mean(GAINS) < high and (low, high) == bootstrap_ci(GAINS[::-1], TASKS[::-1])  # seeded
    nine = list(range(9))
    assert bootstrap_ci(GAINS, nine, n_resamples=100, seed=1) != bootstrap_ci(GAINS, nine, n_resamples=100)
    assert bootstrap_ci([], []) == (None, None) and bootstrap_ci([2.0], ["a"]) == (2.0, 2.0)
    with pytest.raises(ValueError):
        bootstrap_ci([1.0], [])


def test_task_level_test_averages_seeds_then_tests_the_tasks():
    result = task_level_test(GAINS, TASKS)
    assert result.means == pytest.approx({"a": 7 / 3, "b": 11.5 / 3, "c": 7.5 / 3}) and result.n == 3
    assert result.wilcoxon_p == scipy_stats.wilcoxon(list(result.means.values())).pvalue == 0.25  # 3 of one sign
    assert task_level_test([1.0, 2.0], ["a", "a"]).wilcoxon_p is None  # one task: no test


def test_detectable_effect_and_pairs_needed():
    t = scipy_stats.t
    # sd 2, 10 pairs: (t(0.975, 9) + t(0.8, 9)) x 2 / sqrt(10) = (2.2622 + 0.8834) x 0.6325
    assert detectable_effect(2.0, 10) == pytest.approx((t.ppf(0.975, 9) + t.ppf(0.8, 9)) * 2 / np.sqrt(10))
    assert detectable_effect(2.0, 10) == pytest.approx(1.9894, abs=1e-4)
    assert detectable_effect(2.0, 10, alpha=0.01, power=0.9) == pytest.approx(
        (t.ppf(0.995, 9) + t.ppf(0.9, 9)) * 2 / np.sqrt(10))
    assert detectable_effect(2.0, 1) is None
    assert pairs_needed(2.0, 2.0) == 10  # 9 pairs detect 2.13 points, 10 detect 1.99
    assert detectable_effect(2.0, 9) > 2.0 >= detectable_effect(2.0, 10)
    assert pairs_needed(3.0, detectable_effect(3.0, 137)) == 137 and pairs_needed(0.0, 1.0) == 2
    with pytest.raises(ValueError):
        pairs_needed(1.0, 0.0)
