"""Statistics of several runs (seeds x strategies): spread over seeds, paired tests, Holm correction,
cluster-bootstrap intervals over tasks and the power of a paired design.

Pure functions on numbers (numpy + scipy, nothing of Flower or torch); ``report`` reads the runs
and renders what these compute.

Scores of one run group at one stage are a mapping ``(task, seed) -> accuracy`` (None: no valid
score); two groups or two stages are compared on the (task, seed) pairs both have.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats as scipy_stats

Scores = Mapping[tuple[str, int], "float | None"]
GroupKey = tuple[str, tuple[str, ...]]  # (strategy, held-out tasks)


@dataclass(frozen=True)
class Spread:
    """Mean and sample standard deviation (ddof=1) of the values present; std is None for one value,
    both are None for none. ``n`` counts the values present."""
    mean: float | None
    std: float | None
    n: int


def mean_std(values: Iterable[float | None]) -> Spread:
    present = np.asarray([v for v in values if v is not None], dtype=float)
    if present.size == 0:
        return Spread(None, None, 0)
    std = float(np.std(present, ddof=1)) if present.size > 1 else None
    return Spread(float(np.mean(present)), std, int(present.size))


@dataclass(frozen=True)
class PairedTest:
    """Two-sided paired tests of ``after`` against ``before``.

    ``wilcoxon_p`` (signed-rank, the primary test: accuracies are bounded and need not be normal)
    and ``ttest_p`` (paired t-test). Degenerate inputs, by design rather than by a scipy warning:
    fewer than 2 pairs -> both None; every difference exactly zero -> both 1.0 (no difference seen);
    all differences equal but not zero -> ``ttest_p`` None (no variance: t is undefined).
    """
    n: int
    mean_diff: float | None
    wilcoxon_p: float | None
    ttest_p: float | None


def paired_test(after: Sequence[float], before: Sequence[float]) -> PairedTest:
    if len(after) != len(before):
        raise ValueError(f"paired test: {len(after)} values after, {len(before)} before")
    diffs = np.asarray(after, dtype=float) - np.asarray(before, dtype=float)
    n = int(diffs.size)
    if n < 2:
        return PairedTest(n, float(diffs.mean()) if n else None, None, None)
    mean_diff = float(diffs.mean())
    if not diffs.any():
        return PairedTest(n, mean_diff, 1.0, 1.0)
    wilcoxon_p = float(scipy_stats.wilcoxon(after, before).pvalue)
    # a spread below 1e-9 is float noise (accuracies are counts over test sets): scipy would warn
    constant = np.allclose(diffs, diffs[0], rtol=0, atol=1e-9)
    ttest_p = None if constant else float(scipy_stats.ttest_rel(after, before).pvalue)
    return PairedTest(n, mean_diff, wilcoxon_p, ttest_p)


def holm(p_values: Sequence[float | None]) -> list[float | None]:
    """Holm-Bonferroni adjusted p-values, in the input order; None entries pass through and do not
    count in the family size."""
    present = sorted((p, i) for i, p in enumerate(p_values) if p is not None)
    adjusted: list[float | None] = list(p_values)
    running = 0.0
    for rank, (p, i) in enumerate(present):
        running = max(running, min(1.0, (len(present) - rank) * p))  # step-down: never below a smaller p's
        adjusted[i] = running
    return adjusted


def paired(after: Scores, before: Scores) -> tuple[list[float], list[float]]:
    """The values of the (task, seed) pairs scored in both, in sorted key order."""
    keys = sorted(k for k, v in after.items() if v is not None and before.get(k) is not None)
    return [after[k] for k in keys], [before[k] for k in keys]  # type: ignore[misc]


@dataclass(frozen=True)
class Comparison:
    """``after`` (group, stage) against ``before`` (group, stage), with its Holm-adjusted Wilcoxon p.

    ``held_out``: scored on the held-out tasks instead of the trained ones (domain generalisation);
    a group key with no held-out tasks then stands for every held-out set of its strategy, pooled.
    """
    after: tuple[GroupKey, int]
    before: tuple[GroupKey, int]
    test: PairedTest
    holm_p: float | None
    held_out: bool = False


def _pooled(groups: Mapping[GroupKey, Sequence[Scores]], strategy: str, stage: int) -> dict:
    """The held-out scores of every held-out set of ``strategy`` at ``stage``, keyed (held-out set, task, seed)."""
    return {(held, *key): v for (s, held), stages in groups.items() if s == strategy
            for key, v in stages[stage].items()}


def comparisons(groups: Mapping[GroupKey, Sequence[Scores]], final_stage: int, reference: str = "stagewise",
                held_out: Mapping[GroupKey, Sequence[Scores]] | None = None) -> list[Comparison]:
    """Each group's ``final_stage`` against its stage 0, then the ``reference`` strategy against each
    other strategy with the same held-out tasks at ``final_stage``; with ``held_out`` (the held-out
    scores of the groups that hold tasks out) also each such group's held-out tasks at ``final_stage``
    against stage 0, and, for a strategy with several held-out sets, all its held-out pairs pooled.
    Holm across all of them."""
    # (after, before, scored on held-out tasks, the values paired)
    wanted = [((key, final_stage), (key, 0), False, paired(stages[final_stage], stages[0]))
              for key, stages in groups.items()]
    wanted += [(((reference, held), final_stage), ((strategy, held), final_stage), False,
                paired(groups[reference, held][final_stage], groups[strategy, held][final_stage]))
               for strategy, held in groups if strategy != reference and (reference, held) in groups]
    held_out = {key: stages for key, stages in (held_out or {}).items() if key[1]}
    wanted += [((key, final_stage), (key, 0), True, paired(stages[final_stage], stages[0]))
               for key, stages in held_out.items()]
    strategies = [s for s in dict.fromkeys(s for s, _ in held_out) if sum(k[0] == s for k in held_out) > 1]
    wanted += [(((strategy, ()), final_stage), ((strategy, ()), 0), True,
                paired(_pooled(held_out, strategy, final_stage), _pooled(held_out, strategy, 0)))
               for strategy in strategies]
    tests = [paired_test(*pair) for *_, pair in wanted]
    adjusted = holm([t.wilcoxon_p for t in tests])
    return [Comparison(a, b, t, p, flag) for (a, b, flag, _), t, p in zip(wanted, tests, adjusted)]


def gain_spreads(curves: Sequence[Sequence[float | None]]) -> list[Spread]:
    """Per stage, mean and std over seeds of each seed's gain over its own stage 0 (one curve per seed)."""
    stages = min((len(curve) for curve in curves), default=0)
    return [mean_std(None if c[s] is None or c[0] is None else c[s] - c[0] for c in curves) for s in range(stages)]


def by_task(scores: Scores) -> dict[str, Spread]:
    """Per task (first-seen order), mean and std of its accuracy over seeds."""
    tasks = dict.fromkeys(task for task, _ in scores)
    return {task: mean_std(v for (t, _), v in scores.items() if t == task) for task in tasks}


def task_gains(after: Scores, before: Scores) -> dict[str, Spread]:
    """Per task, mean and std over seeds of ``after - before`` on the seeds scored in both."""
    return by_task({k: v - before[k] for k, v in after.items()  # type: ignore[operator]
                    if v is not None and before.get(k) is not None})


# ------------------------------------------------------------------ gains against zero, clusters, power
def gain_test(gains: Sequence[float]) -> PairedTest:
    """``paired_test`` of gains (differences already taken) against zero: Wilcoxon signed-rank on
    the gains, and the paired t-test, which on differences is the one-sample t-test against 0."""
    return paired_test(gains, [0.0] * len(gains))


def bootstrap_ci(values: Sequence[float], clusters: Sequence[object], *, level: float = 0.95,
                 n_resamples: int = 10_000, seed: int = 0) -> tuple[float | None, float | None]:
    """Percentile confidence interval of the mean of ``values`` by a cluster bootstrap: each resample
    draws as many clusters as there are, with replacement, and takes every value of each drawn
    cluster (the values of one task over seeds are not independent; the tasks are the sample).

    Clusters are taken in sorted order and drawn with ``numpy.random.default_rng(seed)``, so the
    interval is deterministic; with one value per cluster it is exactly ``scipy.stats.bootstrap``'s
    percentile interval on the same generator. (None, None) without values."""
    if len(values) != len(clusters):
        raise ValueError(f"bootstrap: {len(values)} values, {len(clusters)} clusters")
    if not 0 < level < 1:
        raise ValueError(f"bootstrap: level must be in (0, 1), got {level}")
    if not values:
        return None, None
    names, index = np.unique(np.asarray(clusters), return_inverse=True)
    sums = np.bincount(index, weights=np.asarray(values, dtype=float), minlength=names.size)
    counts = np.bincount(index, minlength=names.size)
    drawn = np.random.default_rng(seed).integers(0, names.size, (n_resamples, names.size))
    means = sums[drawn].sum(axis=1) / counts[drawn].sum(axis=1)  # the mean of all values drawn
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


@dataclass(frozen=True)
class TaskLevelTest:
    """Per cluster (task, sorted), the mean of its values (over seeds); Wilcoxon p of those means
    against zero (``gain_test``'s, so None for fewer than 2 tasks and 1.0 when all are zero)."""
    means: dict[object, float]
    n: int
    wilcoxon_p: float | None


def task_level_test(values: Sequence[float], clusters: Sequence[object]) -> TaskLevelTest:
    """The random-effects view without a mixed model: average each task's seeds, then test the task
    means, so that a task seen with many seeds counts once."""
    if len(values) != len(clusters):
        raise ValueError(f"task-level test: {len(values)} values, {len(clusters)} clusters")
    grouped: dict[object, list[float]] = {}
    for value, cluster in zip(values, clusters):
        grouped.setdefault(cluster, []).append(value)
    means = {cluster: float(np.mean(grouped[cluster])) for cluster in sorted(grouped)}
    return TaskLevelTest(means, len(means), gain_test(list(means.values())).wilcoxon_p)


def detectable_effect(sd: float, n: int, *, alpha: float = 0.05, power: float = 0.8) -> float | None:
    """The smallest mean paired difference that a two-sided paired t-test at ``alpha`` detects with
    probability ``power`` on ``n`` pairs of standard deviation ``sd``:
    (t_{1-alpha/2, n-1} + t_{power, n-1}) * sd / sqrt(n) (the usual approximation of the noncentral t).
    None for fewer than 2 pairs (no degrees of freedom)."""
    if n < 2:
        return None
    t = scipy_stats.t
    return float((t.ppf(1 - alpha / 2, n - 1) + t.ppf(power, n - 1)) * sd / np.sqrt(n))


def pairs_needed(sd: float, effect: float, *, alpha: float = 0.05, power: float = 0.8) -> int:
    """The smallest n >= 2 whose ``detectable_effect`` is at most ``effect`` (> 0)."""
    if not effect > 0:
        raise ValueError(f"pairs needed: the effect must be > 0, got {effect}")

    def enough(n: int) -> bool:
        return detectable_effect(sd, n, alpha=alpha, power=power) <= effect  # type: ignore[operator]

    high = 2
    while not enough(high):  # the detectable effect falls with n: double, then bisect
        high *= 2
    low = high // 2  # not enough (or below 2)
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if enough(middle) else (middle, high)
    return high
