"""The numbers of the arrival report (``report.arrival``), per eval-labels level, arm and metric: the
arrival gain per arrival stage and pooled over stages >= 2 (tests, 95% CI, power), per task, of unseen
and held-out tasks, and arm against arm (the first stage-wise arm, and each longer-pretrained control). The statistics are in ``stats``."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meduniverse_flwr.common.text import safe_label
from meduniverse_flwr.report import stats
from meduniverse_flwr.report.arrival_runs import (
    RANDOM_INIT,
    ArrivalRun,
    arm_order,
    arrival_stages,
    find_reference,
    level_label,
    level_order,
)

METRICS = ("accuracy", "auc")
POINTS = 100.0
TARGET_GAIN = 2.0  # points: the gain the "pairs needed" column is sized for
# keys that may differ between the seeds of one arm (eval-labels is a dimension of its own)
SAME_ARM_KEYS = ("seed", "output-dir", "resume-from", "device", "stage-timeout", "tracker", "eval-labels")


@dataclass(frozen=True)
class Arrival:
    """One (task, seed) of an arm: the stage the task trained at, its score from the arm's base for
    it (stage-wise: the base it was sent; control: the control's base) and from the MIM base, in points."""
    task: str
    seed: int
    stage: int
    score: float
    mim: float

    @property
    def gain(self) -> float:
        return self.score - self.mim


def _points(stage: dict[str, Any], task: str, metric: str) -> float | None:
    value = stage["per_task"].get(task, {}).get(metric)
    return None if value is None else POINTS * value


def arrivals(run: ArrivalRun, reference: ArrivalRun, metric: str) -> tuple[list[Arrival], list[str]]:
    """The arrivals of ``run`` in the arrival order of ``reference`` (a stage-wise run: itself; a
    control: its reference), scored against ``reference``'s MIM base; and the tasks left out for want
    of a score, in task order."""
    found, missing = [], []
    for task, stage in sorted(arrival_stages(reference.stages).items()):
        score, base = _points(run.sent(stage), task, metric), _points(reference.stages[0], task, metric)
        if score is None or base is None:
            missing.append(task)
        else:
            found.append(Arrival(task, run.seed, stage, score, base))
    return found, missing


@dataclass(frozen=True)
class Estimate:
    """Mean gain at one stage over (task, seed) units, with its 95% cluster-bootstrap CI over tasks."""
    stage: int
    n: int
    mean: float | None
    low: float | None
    high: float | None


def estimate(stage: int, gains: list[float], tasks: list[str]) -> Estimate:
    low, high = stats.bootstrap_ci(gains, tasks)
    return Estimate(stage, len(gains), stats.mean_std(gains).mean, low, high)


@dataclass(frozen=True)
class Pooled:
    """The arrival gain over every pair arriving at stage >= 2 (stage 1 is 0 by construction for a
    stage-wise arm): the tests, the CI and the power of this design."""
    n_pairs: int
    n_tasks: int
    mean: float | None
    sd: float | None
    low: float | None
    high: float | None
    wilcoxon_p: float | None
    ttest_p: float | None
    task_level_p: float | None
    detectable_effect: float | None
    pairs_needed: int | None  # for a gain of TARGET_GAIN points at this sd
    holm_p: float | None = None  # Holm across every arm x level x metric of the report


def pooled(late: list[Arrival]) -> Pooled:
    gains, tasks = [x.gain for x in late], [x.task for x in late]
    spread = stats.mean_std(gains)
    low, high = stats.bootstrap_ci(gains, tasks)
    test, by_task = stats.gain_test(gains), stats.task_level_test(gains, tasks)
    sd = spread.std
    return Pooled(len(gains), by_task.n, spread.mean, sd, low, high, test.wilcoxon_p, test.ttest_p, by_task.wilcoxon_p,
                  None if sd is None else stats.detectable_effect(sd, len(gains)),
                  None if sd is None else stats.pairs_needed(sd, TARGET_GAIN))


@dataclass(frozen=True)
class Absolute:
    """Mean scores (points) of the pairs arriving at stage >= 2: from the arm's base and the MIM base."""
    n: int
    score: float | None
    mim: float | None


@dataclass(frozen=True)
class ArmResult:
    """Everything the report says of one arm at one eval-labels level for one metric."""
    arm: str
    eval_labels: int
    metric: str
    control: bool
    seeds: list[int]
    per_stage: list[Estimate]                 # arrival stage 1..S
    pooled: Pooled
    absolute: Absolute
    per_task: dict[str, dict[str, Any]]       # task -> {"mean", "n"} over seeds, arrival stage >= 2
    unseen: list[Estimate]                    # stage-wise arms: stage s >= 1, tasks not yet trained
    held_out: list[Estimate]                  # the same for held-out tasks (empty without any)


def unseen_gains(runs: list[ArrivalRun], metric: str, held_out: bool) -> list[Estimate]:
    """Per stage s >= 1, the mean over every task scored at s (not yet trained, or held out) of its
    score at s minus its score at stage 0; empty when no such task is scored."""
    values: dict[int, tuple[list[float], list[str]]] = {}
    for run in runs:
        order = arrival_stages(run.stages)
        for stage in run.stages[1:]:
            s = stage["stage"]
            gains, tasks = values.setdefault(s, ([], []))
            for task, scores in sorted(stage["per_task"].items()):
                now, base = _points(stage, task, metric), _points(run.stages[0], task, metric)
                if scores["held_out"] == held_out and order.get(task, math.inf) > s and None not in (now, base):
                    gains.append(now - base)  # type: ignore[operator]
                    tasks.append(task)
    if not any(gains for gains, _ in values.values()):
        return []
    return [estimate(s, *values[s]) for s in sorted(values)]


def arm_result(arm_runs: list[ArrivalRun], found: list[Arrival], metric: str) -> ArmResult:
    first = arm_runs[0]
    last_stage = max((x.stage for x in found), default=0)
    per_stage = [estimate(a, [x.gain for x in found if x.stage == a], [x.task for x in found if x.stage == a])
                 for a in range(1, last_stage + 1)]
    late = [x for x in found if x.stage >= 2]
    per_task = {task: {"mean": spread.mean, "n": spread.n}
                for task, spread in sorted(stats.by_task({(x.task, x.seed): x.gain for x in late}).items())}
    absolute = Absolute(len(late), stats.mean_std(x.score for x in late).mean, stats.mean_std(x.mim for x in late).mean)
    stagewise = [] if first.control else arm_runs
    return ArmResult(first.arm, first.eval_labels, metric, first.control, sorted(run.seed for run in arm_runs),
                     per_stage, pooled(late), absolute, per_task,
                     unseen_gains(stagewise, metric, False), unseen_gains(stagewise, metric, True))


@dataclass(frozen=True)
class Versus:
    """One arm against another of its level, paired on the (task, seed) both score at arrival stage >= 2:
    ``pooled`` holds the tests of the score differences (arm minus ``against``)."""
    arm: str
    against: str
    eval_labels: int
    metric: str
    pooled: Pooled


def compare(found: dict[tuple[int, str, str], list[Arrival]], arm: str, against: str, level: int,
            metric: str) -> Versus:
    """``arm`` minus ``against`` on the (task, seed) pairs both score at arrival stage >= 2."""
    scores = {(x.task, x.seed): x.score for x in found[level, against, metric] if x.stage >= 2}
    pairs = [Arrival(x.task, x.seed, x.stage, x.score, scores[x.task, x.seed])
             for x in found[level, arm, metric] if x.stage >= 2 and (x.task, x.seed) in scores]
    return Versus(arm, against, level, metric, pooled(pairs))


def versus_arms(found: dict[tuple[int, str, str], list[Arrival]], controls: set[str]) -> list[Versus]:
    """Per level and metric: every stage-wise arm and random init against the first stage-wise arm (in arm
    order), and every stage-wise arm against each control pretrained longer: does the federation add more
    than the same compute spent on MIM? (arm minus control, so a gain reads the same way as above)."""
    compared = []
    for level, metric in dict.fromkeys((lv, m) for lv, _, m in found):
        arms = [arm for lv, arm, m in found if (lv, m) == (level, metric)]
        stagewise = [arm for arm in arms if arm not in controls]
        longer = [arm for arm in arms if arm in controls and arm != RANDOM_INIT]
        if stagewise:
            compared += [compare(found, arm, stagewise[0], level, metric) for arm in arms
                         if arm != stagewise[0] and arm not in longer]
        compared += [compare(found, arm, control, level, metric) for control in longer for arm in stagewise]
    return compared


@dataclass(frozen=True)
class Analysis:
    runs: list[ArrivalRun]
    references: dict[Path, Path]  # a control's results.json -> its reference's
    results: list[ArmResult]      # per eval-labels level, arm, metric
    notes: list[str]
    versus: list[Versus] = dataclasses.field(default_factory=list)  # arm against arm (``versus_arms``)


def config_notes(arms: dict[tuple[int, str], list[ArrivalRun]]) -> list[str]:
    """Settings that differ between the seeds of one arm: they are not seeds of one experiment."""
    notes = []
    for (level, arm), runs in arms.items():
        keys = {k for run in runs for k in run.config} - set(SAME_ARM_KEYS)
        differ = sorted(k for k in keys if len({repr(run.config.get(k)) for run in runs}) > 1)
        if differ:
            notes.append(f"runs of {arm} ({level_label(level)}) differ in {safe_label(', '.join(differ))}")
    return notes


def analyse(runs: list[ArrivalRun], notes: Iterable[str] = ()) -> Analysis:
    """The arms of ``runs`` (distinct, usable: ``usable_runs``) and every number of the report, the
    primary p-values (Wilcoxon over pairs) Holm-adjusted across all arms, levels and metrics."""
    notes = list(notes)
    references: dict[Path, Path] = {}
    arms: dict[tuple[int, str], list[ArrivalRun]] = {}
    found: dict[tuple[int, str, str], list[Arrival]] = {}
    missing: dict[str, list[str]] = {metric: [] for metric in METRICS}
    for run in sorted(runs, key=lambda r: (level_order(r.eval_labels), arm_order(r), r.seed)):
        reference = find_reference(run, runs) if run.control else run
        if reference is None:
            notes.append(f"{run.results_path}: no stage-wise run with seed {run.seed}, {level_label(run.eval_labels)}, "
                         "the same datasets and eval-mode to take the MIM base and the arrival order from, left out")
            continue
        if run.control:
            references[run.results_path] = reference.results_path
        arms.setdefault((run.eval_labels, run.arm), []).append(run)
        for metric in METRICS:
            got, lacking = arrivals(run, reference, metric)
            found.setdefault((run.eval_labels, run.arm, metric), []).extend(got)
            missing[metric].extend(lacking)
    for metric, tasks in missing.items():  # one note per metric: a task without AUC lacks it in every arm
        if tasks:
            total = len(tasks) + sum(len(got) for (_, _, m), got in found.items() if m == metric)
            names = safe_label(", ".join(sorted(set(tasks))))
            notes.append(f"no {metric} score for {len(tasks)} of {total} arrivals ({names}), left out of the "
                         f"{metric} tables (their n count the rest)")
    results = [arm_result(arm_runs, found[level, arm, metric], metric)
               for (level, arm), arm_runs in arms.items() for metric in METRICS]
    versus = versus_arms(found, {arm for (_, arm), arm_runs in arms.items() if arm_runs[0].control})
    # one family: every gain over the MIM base and every arm-against-arm comparison of the report
    adjusted = stats.holm([r.pooled.wilcoxon_p for r in results] + [v.pooled.wilcoxon_p for v in versus])
    results = [dataclasses.replace(r, pooled=dataclasses.replace(r.pooled, holm_p=p))
               for r, p in zip(results, adjusted)]
    versus = [dataclasses.replace(v, pooled=dataclasses.replace(v.pooled, holm_p=p))
              for v, p in zip(versus, adjusted[len(results):])]
    used = [run for arm_runs in arms.values() for run in arm_runs]
    return Analysis(used, references, results, notes + config_notes(arms), versus)


def task_cards(runs: list[ArrivalRun]) -> dict[str, dict[str, Any]]:
    """Every task's card, the first run's that has one."""
    cards: dict[str, dict[str, Any]] = {}
    for run in runs:
        for name, card in run.tasks.items():
            cards.setdefault(name, card)
    return dict(sorted(cards.items()))
