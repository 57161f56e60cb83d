"""The report of the arrival protocol (``schedule = "arrival"``): what a task gains from the base it
is sent when it arrives, over the MIM base (the paper's Fig. 3), across seeds, arms and label budgets.

    python -m meduniverse_flwr.arrival_report multirun/2025-01-01/12-00-00 --out report

Runs are found and read as ``report`` does (``report.find_runs``, ``results.read_results``); a bad
results.json is one line on stderr and exit status 2. ``report.main`` hands its runs here when every
one is an arrival run.

A task ``t`` that trains at stage ``a`` of a stage-wise run was sent base ``a - 1``; its arrival gain
is its score from that base minus its score from the MIM base (stage 0 of the same run), so 0 at
``a = 1``. A control run (``num-stages = 0``: random init, a base pretrained longer) scores only its
own base; its gain for ``t`` is that score minus the MIM base's score of ``t`` in a stage-wise run
of the same seed, eval-labels, datasets and eval-mode (the reference), at ``t``'s arrival stage there.
The unit is (task, seed); scores are in points (x 100). Arms are grouped per ``eval-labels`` level.

Written to ``--out`` (default ``report/`` in the runs' common parent): ``report.md``,
``fig3_gain.png`` and ``arrival.json`` (the numbers of every table). The numbers are in ``stats``.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import textwrap
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import report, stats
from .config import declared_defaults
from .results import read_results, write_json_atomic
from .validation import safe_label

METRICS = ("accuracy", "auc")
POINTS = 100.0
TARGET_GAIN = 2.0  # points: the gain the "pairs needed" column is sized for
RANDOM_INIT = "random init"
# keys that may differ between the seeds of one arm (eval-labels is a dimension of its own)
SAME_ARM_KEYS = ("seed", "output-dir", "resume-from", "device", "stage-timeout", "tracker", "eval-labels")
CLASSES_SHOWN = 6


# ------------------------------------------------------------------ reading runs
@dataclass(frozen=True)
class ArrivalRun:
    results_path: Path
    config: dict[str, Any]
    stages: list[dict[str, Any]]
    tasks: dict[str, dict[str, Any]]  # task -> {"modality": str, "classes": [str]}, from results.json's "tasks"
    arm: str
    seed: int
    eval_labels: int
    num_stages: int

    @property
    def control(self) -> bool:
        """The run scores only its starting base (random init, a base pretrained longer)."""
        return self.num_stages == 0

    def sent(self, arrival: int) -> dict[str, Any]:
        """The stage entry that scores a task arriving at stage ``arrival``: the base it was sent
        (``arrival - 1``), or a control's one base."""
        return self.stages[0 if self.control else arrival - 1]


def _is_int(value: Any, low: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_name(value: Any) -> bool:
    return isinstance(value, str) and value != ""


CONFIG_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "seed": (lambda v: isinstance(v, int) and not isinstance(v, bool), "must be an integer"),
    "eval-labels": (_is_int, "must be an integer >= 0"),
    "num-stages": (_is_int, "must be an integer >= 0"),
    "pretrain": (_is_name, "must be a name or a path"),
    "pretrain-epochs": (_is_int, "must be an integer >= 0"),
    "aggregation": (_is_name, "must be a rule name"),
    "server-mix": (_is_number, "must be a number"),
    "merge-density": (_is_number, "must be a number"),
    "datasets": (lambda v: isinstance(v, str), "must be a comma-separated string"),
    "eval-mode": (_is_name, "must be a protocol name"),
}


def _task_cards(cards: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The facts the per-task table shows of results.json's ``tasks`` (checked by ``read_results``)."""
    return {name: {"modality": card.get("modality", ""), "classes": list(card.get("classes", []))}
            for name, card in cards.items()}


def arm_label(config: dict[str, Any]) -> str:
    """The arm a run belongs to, from its (checked) config; seeds of one arm share it."""
    pretrain = config["pretrain"]
    if config["num-stages"] == 0:
        if pretrain == "none":
            return RANDOM_INIT
        epochs = f", {config['pretrain-epochs']} epochs" if pretrain in ("mae", "simmim") else ""
        return f"{safe_label(pretrain)} base{epochs} (no stages)"
    label = f"stage-wise: {safe_label(config['aggregation'])}"
    if config["server-mix"] != 1:
        label += f", mix {config['server-mix']:g}"
    if config["aggregation"] == "ties":
        label += f", density {config['merge-density']:g}"
    return label + (", from random init" if pretrain == "none" else "")


def read_run(results_path: Path) -> ArrivalRun:
    """A checked results.json with the config fields the arms need (missing keys take their declared
    defaults); ValueError (one line, naming the file) otherwise."""
    payload = read_results(results_path)
    defaults = declared_defaults()
    config = dict(payload["config"])
    for key, (ok, why) in CONFIG_CHECKS.items():
        config[key] = report._config_value(results_path, config, key, defaults.get(key), ok, why)
    return ArrivalRun(results_path, config, payload["stages"], _task_cards(payload.get("tasks", {})),
                      arm_label(config), config["seed"], config["eval-labels"], config["num-stages"])


def arrival_stages(stages: list[dict[str, Any]]) -> dict[str, int]:
    """Task -> the stage it trained in (its ``participants``); ValueError when one trains twice."""
    arrival: dict[str, int] = {}
    for stage in stages[1:]:
        for task in stage["participants"]:
            if task in arrival:
                raise ValueError(f"task {safe_label(task)!r} trains in stages {arrival[task]} and {stage['stage']}")
            arrival[task] = stage["stage"]
    return arrival


def usable_runs(runs: list[ArrivalRun]) -> tuple[list[ArrivalRun], list[str]]:
    """The runs a report can use, one per (arm, eval-labels, seed), the first given; notes say why
    the others are left out (not an arrival run, unfinished, a task trained twice, no arrival)."""
    kept: dict[tuple[str, int, int], ArrivalRun] = {}
    notes = []
    for run in runs:
        key = (run.arm, run.eval_labels, run.seed)
        why = None
        if run.config.get("schedule") != "arrival":
            why = f"schedule {safe_label(str(run.config.get('schedule')))!r}, not an arrival run"
        elif len(run.stages) <= run.num_stages:
            why = f"unfinished ({len(run.stages)} of {run.num_stages + 1} stages)"
        elif not run.control:
            try:
                why = None if arrival_stages(run.stages) else "no task trained in any stage"
            except ValueError as err:
                why = str(err)
        if why is None and key in kept and run.results_path.resolve() != kept[key].results_path.resolve():
            why = f"same arm, eval-labels and seed as {kept[key].results_path}"
        if why is not None:
            notes.append(f"{run.results_path}: {why}, left out")
        elif key not in kept:
            kept[key] = run
    return list(kept.values()), notes


def _arm_order(run: ArrivalRun) -> tuple[int, str]:
    """Stage-wise arms first, then the longer-pretrained controls, random init last."""
    return (2 if run.arm == RANDOM_INIT else int(run.control), run.arm)


def _level_order(level: int) -> tuple[bool, int]:
    """Label-scarce levels first (ascending), all labels (0) last."""
    return level == 0, level


def level_label(level: int) -> str:
    return "eval-labels = all" if level == 0 else f"eval-labels = {level}"


def find_reference(control: ArrivalRun, runs: list[ArrivalRun]) -> ArrivalRun | None:
    """The stage-wise run a control is compared with: same seed, eval-labels, datasets (hence the
    same arrival order) and eval-mode; the first in arm order, one started from a pretrained base first."""
    same = [run for run in runs if not run.control and run.seed == control.seed
            and run.eval_labels == control.eval_labels
            and all(run.config[k] == control.config[k] for k in ("datasets", "eval-mode"))]
    return min(same, key=lambda run: (run.config["pretrain"] == "none", _arm_order(run)), default=None)


# ------------------------------------------------------------------ the numbers
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
    """One arm against the first stage-wise arm of its level, paired on the (task, seed) both score at
    arrival stage >= 2: ``pooled`` holds the tests of the score differences (arm minus ``against``)."""
    arm: str
    against: str
    eval_labels: int
    metric: str
    pooled: Pooled


def versus_first(found: dict[tuple[int, str, str], list[Arrival]], controls: set[str]) -> list[Versus]:
    """Every arm against the first stage-wise arm (in arm order) of the same level and metric."""
    compared = []
    for (level, against, metric), reference in found.items():
        first = next((arm for (lv, arm, m) in found if (lv, m) == (level, metric) and arm not in controls), None)
        if against != first:
            continue
        scores = {(x.task, x.seed): x.score for x in reference if x.stage >= 2}
        for (lv, arm, m), arrived in found.items():
            if (lv, m) == (level, metric) and arm != first:
                pairs = [Arrival(x.task, x.seed, x.stage, x.score, scores[x.task, x.seed])
                         for x in arrived if x.stage >= 2 and (x.task, x.seed) in scores]
                compared.append(Versus(arm, first, level, metric, pooled(pairs)))
    return compared


@dataclass(frozen=True)
class Analysis:
    runs: list[ArrivalRun]
    references: dict[Path, Path]  # a control's results.json -> its reference's
    results: list[ArmResult]      # per eval-labels level, arm, metric
    notes: list[str]
    versus: list[Versus] = dataclasses.field(default_factory=list)  # each arm against the first stage-wise arm


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
    for run in sorted(runs, key=lambda r: (_level_order(r.eval_labels), _arm_order(r), r.seed)):
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
    versus = versus_first(found, {arm for (_, arm), arm_runs in arms.items() if arm_runs[0].control})
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


# ------------------------------------------------------------------ report.md
def _num(value: float | None, fmt: str = "+.2f") -> str:
    return "-" if value is None else format(value, fmt)


def _ci(low: float | None, high: float | None) -> str:
    return "-" if low is None else f"[{low:+.2f}, {high:+.2f}]"


def _estimate_cell(e: Estimate) -> str:
    return "-" if e.mean is None else f"{e.mean:+.2f} {_ci(e.low, e.high)} (n={e.n})"


LEGEND = (
    "Unit: one (task, seed). Arrival gain of a task that trains at stage a: its score from the base it was "
    "sent (base a - 1, a fresh head on the eval-labels budget) minus its score from the MIM base (stage 0 of the "
    "same run); 0 at a = 1 by construction. A control's gain: its base's score minus the MIM base's score in "
    "the reference stage-wise run (same seed, eval-labels, datasets, eval-mode), at the task's arrival stage "
    "there. Scores and gains in points (x 100); accuracy and AUC (accuracy cannot see a change in a task at "
    "its majority class).")
TESTS_NOTE = (
    "Pooled over the pairs arriving at stage >= 2. Wilcoxon signed-rank (two-sided, against 0) is the primary "
    "test, Holm-adjusted across every row of this table (arms x levels x metrics) and of the arm-against-arm "
    "table; the one-sample t-test is "
    "beside it. Task-level p: each task's gains averaged over seeds, then Wilcoxon over the task means (a task "
    "counts once: the random-effects view). 95% CI: percentile cluster bootstrap over tasks (10,000 "
    "resamples of the tasks with replacement, every seed of a drawn task kept; seeded). SD: of the pairs "
    "(ddof 1). Detectable: the smallest mean gain a two-sided paired t-test at alpha 0.05 finds with power "
    f"0.8 at this n and SD, (t(0.975, n-1) + t(0.8, n-1)) x SD / sqrt(n); pairs for {TARGET_GAIN:g} points: "
    f"the smallest n where that is <= {TARGET_GAIN:g} points. p = 1 when every gain is 0; - with fewer than 2 pairs (or, for "
    "t, no variance).")
FIGURE_NOTE = ("Figure: `fig3_gain.png`, mean arrival gain per arrival stage with its 95% CI band, one line per "
               "arm (controls dashed), a column per eval-labels level, a row per metric. "
               "Numbers of every table: `arrival.json`.")


def pooled_table(results: list[ArmResult]) -> str:
    rows = [[level_label(r.eval_labels), r.arm, r.metric, str(p.n_pairs), str(p.n_tasks), _num(p.mean),
             _num(p.sd, ".2f"), _ci(p.low, p.high), report._p_cell(p.wilcoxon_p), report._p_cell(p.holm_p),
             report._p_cell(p.ttest_p), report._p_cell(p.task_level_p), _num(p.detectable_effect, ".2f"),
             "-" if p.pairs_needed is None else str(p.pairs_needed)]
            for r in results for p in [r.pooled]]
    return report.md_table(["level", "arm", "metric", "n pairs", "n tasks", "mean gain", "SD", "95% CI",
                            "Wilcoxon p", "Holm p", "t-test p", "task-level p", "detectable",
                            f"pairs for {TARGET_GAIN:g} points"], rows)


def versus_table(versus: list[Versus]) -> str:
    rows = [[level_label(v.eval_labels), v.arm, v.against, v.metric, str(p.n_pairs), str(p.n_tasks), _num(p.mean),
             _ci(p.low, p.high), report._p_cell(p.wilcoxon_p), report._p_cell(p.holm_p), report._p_cell(p.ttest_p),
             report._p_cell(p.task_level_p)] for v in versus for p in [v.pooled]]
    return report.md_table(["level", "arm", "against", "metric", "n pairs", "n tasks", "mean difference", "95% CI",
                            "Wilcoxon p", "Holm p", "t-test p", "task-level p"], rows)


def _stage_table(results: list[ArmResult], field: str) -> str:
    per_arm = [(r.arm, {e.stage: e for e in getattr(r, field)}) for r in results]
    stages = sorted({s for _, by_stage in per_arm for s in by_stage})
    rows = [[arm] + [_estimate_cell(by_stage[s]) if s in by_stage else "-" for s in stages]
            for arm, by_stage in per_arm if by_stage]
    return report.md_table(["arm"] + [f"stage {s}" for s in stages], rows)


def absolute_table(results: list[ArmResult]) -> str:
    rows = [[r.arm, str(r.absolute.n), _num(r.absolute.score, ".2f"), _num(r.absolute.mim, ".2f"),
             _num(r.pooled.mean)] for r in results]
    return report.md_table(["arm", "n pairs", "score from the arm's base", "score from the MIM base", "gain"], rows)


def _classes(classes: list[str]) -> str:
    shown = ", ".join(safe_label(c) for c in classes[:CLASSES_SHOWN])
    return (shown + f", ... (+{len(classes) - CLASSES_SHOWN})" if len(classes) > CLASSES_SHOWN else shown) or "-"


def per_task_table(results: list[ArmResult], cards: dict[str, dict[str, Any]]) -> str:
    tasks = sorted({task for r in results for task in r.per_task})
    rows = []
    for task in tasks:
        card = cards.get(task, {"modality": "", "classes": []})
        cells = [safe_label(task), safe_label(card["modality"]) or "-", _classes(card["classes"])]
        for r in results:
            cell = r.per_task.get(task)
            cells.append("-" if cell is None else f"{cell['mean']:+.2f} (n={cell['n']})")
        rows.append(cells)
    return report.md_table(["task", "modality", "classes"] + [r.arm for r in results], rows)


def runs_table(analysis: Analysis) -> str:
    rows = [[str(run.results_path), run.arm, level_label(run.eval_labels), str(run.seed), str(len(run.stages)),
             str(analysis.references.get(run.results_path, "-"))] for run in analysis.runs]
    return report.md_table(["results.json", "arm", "level", "seed", "stages", "MIM reference (controls)"], rows)


def _sections(analysis: Analysis) -> Iterable[tuple[int, str, list[ArmResult]]]:
    """(level, metric, that level's results for that metric in arm order)."""
    keys = dict.fromkeys((r.eval_labels, r.metric) for r in analysis.results)
    for level, metric in sorted(keys, key=lambda k: (_level_order(k[0]), METRICS.index(k[1]))):
        yield level, metric, [r for r in analysis.results if (r.eval_labels, r.metric) == (level, metric)]


def report_markdown(analysis: Analysis) -> str:
    seeds = ", ".join(str(s) for s in sorted({run.seed for run in analysis.runs})) or "-"
    arms = list(dict.fromkeys(r.arm for r in analysis.results))
    parts = ["# MedUniverse arrival report", "",
             f"{len(analysis.runs)} runs, {len(arms)} arms ({_md_list(arms)}); seeds {seeds}.", "", LEGEND, ""]
    parts += [f"- note: {report._md(note)}" for note in analysis.notes] + ([""] if analysis.notes else [])
    parts += ["## Arrival gain, arrival stages >= 2 pooled", "", TESTS_NOTE, "", pooled_table(analysis.results), ""]
    if analysis.versus:
        parts += ["## Arm against arm, arrival stages >= 2 pooled", "",
                  "Each arm's score minus the first stage-wise arm's score of the same (task, seed): the arm's "
                  "base against that arm's base for the same arriving task. Tests and CI as above; Holm in one "
                  "family with the table above.", "", versus_table(analysis.versus), ""]
    sections = list(_sections(analysis))
    for level, metric, results in sections:
        parts += [f"## Arrival gain by arrival stage: {metric}, {level_label(level)}", "",
                  "Mean gain (points) [95% CI] (n pairs).", "", _stage_table(results, "per_stage"), ""]
    for level, metric, results in sections:
        parts += [f"## Scores of the arriving tasks (stage >= 2): {metric}, {level_label(level)}", "",
                  "Mean score (points): stage-wise arms from the base each task was sent, controls from their "
                  "base; the MIM base of the same (task, seed).", "", absolute_table(results), ""]
    cards = task_cards(analysis.runs)
    for level, metric, results in sections:
        parts += [f"## Arrival gain per task (stage >= 2, mean over seeds): {metric}, {level_label(level)}", "",
                  per_task_table(results, cards), ""]
    for field, title, what in (("unseen", "Unseen tasks", "every task not yet trained"),
                               ("held_out", "Held-out tasks", "every held-out task")):
        for level, metric, results in sections:
            shown = [r for r in results if getattr(r, field)]
            if shown:
                parts += [f"## {title} at each stage: {metric}, {level_label(level)}", "",
                          f"Stage-wise arms: mean over {what} scored at stage s of its score at s minus its score "
                          "at stage 0 (points) [95% CI] (n).", "", _stage_table(shown, field), ""]
    parts += ["## Runs read", "", runs_table(analysis), "", FIGURE_NOTE, ""]
    return "\n".join(parts)


def _md_list(items: list[str]) -> str:
    return report._md(", ".join(items)) or "none"


# ------------------------------------------------------------------ figure, JSON, the whole report
def plot_gain(analysis: Analysis, path: Path) -> None:
    """Fig. 3: mean arrival gain per arrival stage with its 95% CI band, a line per arm, a column per
    eval-labels level, a row per metric that has a score."""
    plt = report._pyplot()
    sections = [s for s in _sections(analysis) if any(e.mean is not None for r in s[2] for e in r.per_stage)]
    levels = sorted({level for level, _, _ in sections}, key=_level_order) or [0]
    metrics = [m for m in METRICS if any(metric == m for _, metric, _ in sections)] or ["accuracy"]
    colors = {arm: f"C{i % 10}" for i, arm in enumerate(dict.fromkeys(r.arm for r in analysis.results))}
    fig, axes = plt.subplots(len(metrics), len(levels), figsize=(5 * len(levels) + 2, 3.8 * len(metrics)),
                             dpi=120, squeeze=False)
    for row, metric in enumerate(metrics):
        for column, level in enumerate(levels):
            ax = axes[row][column]
            for r in (r for lv, m, rs in sections if (lv, m) == (level, metric) for r in rs):
                shown = [e for e in r.per_stage if e.mean is not None]
                x = [e.stage for e in shown]
                label = textwrap.fill(f"{r.arm} ({len(r.seeds)} seeds)", 30)
                ax.plot(x, [e.mean for e in shown], "--" if r.control else "-", marker="o", color=colors[r.arm],
                        label=label)
                ax.fill_between(x, [e.low for e in shown], [e.high for e in shown], color=colors[r.arm], alpha=0.2)
            ax.axhline(0, color="black", linewidth=0.8)
            ax.set_title(f"{metric}, {level_label(level)}", fontsize=9)
            ax.set_xlabel("arrival stage")
            ax.set_ylabel(f"mean arrival gain, {metric} (points)")
            ax.xaxis.get_major_locator().set_params(integer=True)
    legend = {label: handle for ax in axes.flat for handle, label in zip(*ax.get_legend_handles_labels())}
    if legend:  # every arm once, also one missing from the top right panel; outside, the lines stay visible
        axes[0][-1].legend(legend.values(), legend.keys(), fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.suptitle("Arrival gain over the MIM base (mean over (task, seed), 95% CI, bootstrap over tasks)", fontsize=10)
    fig.tight_layout()
    report._save(fig, path)
    plt.close(fig)


def analysis_json(analysis: Analysis) -> dict[str, Any]:
    return {"unit": "(task, seed); scores and gains in points (x 100)",
            "target_gain_points": TARGET_GAIN,
            "runs": [{"results": str(run.results_path), "arm": run.arm, "eval_labels": run.eval_labels,
                      "seed": run.seed, "stages": len(run.stages),
                      "reference": str(analysis.references[run.results_path])
                      if run.results_path in analysis.references else None} for run in analysis.runs],
            "notes": analysis.notes,
            "tasks": task_cards(analysis.runs),
            "results": [dataclasses.asdict(r) for r in analysis.results],
            "versus": [dataclasses.asdict(v) for v in analysis.versus]}


def write_report(runs: list[ArrivalRun], out: Path, notes: Iterable[str] = ()) -> list[Path]:
    """report.md, fig3_gain.png and arrival.json of ``runs`` in ``out``; the paths written."""
    kept, skipped = usable_runs(runs)
    analysis = analyse(kept, [*notes, *skipped])
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "report.md", out / "fig3_gain.png", out / "arrival.json"]
    tmp = paths[0].with_suffix(".md.tmp")
    tmp.write_text(report_markdown(analysis))
    tmp.replace(paths[0])
    plot_gain(analysis, paths[1])
    write_json_atomic(paths[2], analysis_json(analysis))
    return paths


def report_paths(paths: list[Path], out: Path | None) -> int:
    """Read every run ``paths`` stand for, write the report (to ``out``, or ``report.default_out``);
    exit status 2 when a results.json was bad (one line each on stderr), else 0."""
    status, runs = 0, []
    for path in paths:
        for results_path, _ in report.find_runs(path):
            try:
                runs.append(read_run(results_path))
            except ValueError as err:
                print(f"arrival_report: {err}", file=sys.stderr)
                status = 2
    if runs:
        written = write_report(runs, out or report.default_out(runs))  # type: ignore[arg-type]
        print("arrival_report: " + ", ".join(str(path) for path in written))
    return status


def main(argv: list[str] | None = None) -> int:
    args = report.parse_report_args("python -m meduniverse_flwr.arrival_report", __doc__,
                                    "where report.md, fig3_gain.png and arrival.json go (default: report/ in the "
                                    "runs' common parent)", argv)
    return report_paths(args.paths, args.out)


if __name__ == "__main__":
    sys.exit(main())
