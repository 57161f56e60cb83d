"""``meduniverse_flwr.stats``: spread over seeds, paired tests (exactly scipy's), Holm, comparisons."""

import warnings

import pytest
from scipy import stats as scipy_stats

from meduniverse_flwr.stats import (
    PairedTest,
    Spread,
    by_task,
    comparisons,
    gain_spreads,
    holm,
    mean_std,
    paired,
    paired_test,
    task_gains,
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
