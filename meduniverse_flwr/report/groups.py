"""The runs of a multi-run report (``report``), grouped: one group per (strategy with its variant
settings, held-out tasks), one run per seed, with the labels the tables and figures name them by.

What a strategy is comes from ``registry.STRATEGIES`` (one that breaks privacy is labelled and placed
as a reference); a name it does not know, from an old or another results.json, is a strategy like any.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meduniverse_flwr.common.text import safe_label
from meduniverse_flwr.config import declared_defaults, split_list
from meduniverse_flwr.registry import STRATEGIES
from meduniverse_flwr.report import stats
from meduniverse_flwr.server.results import config_value, read_results

# keys that may differ between the runs of one group without making them different experiments
SAME_EXPERIMENT_KEYS = ("seed", "output-dir", "resume-from", "device", "stage-timeout", "tracker", "num-stages")
# settings that make a run a variant of its strategy (privacy, robustness): named in its group's label
# when they differ from the declared defaults
VARIANT_KEYS = ("aggregation", "trim-fraction", "max-update-ratio", "on-excess-update", "dp", "dp-clip-norm",
                "dp-noise-multiplier", "dp-delta", "dp-secure-noise", "attack-nodes", "attack-factor")
ATTACK_SHOWN = ("aggregation", "max-update-ratio", "attack-factor")
BREAKS_PRIVACY = " (pools data: breaks privacy, upper reference)"  # after such a strategy's name


def variant(config: dict[str, Any]) -> str:
    """`` [key=value, ...]`` for the VARIANT_KEYS a run sets away from their declared defaults ("" for
    none); settings that do nothing are left out (dp-* with dp off, a trim of another rule, an attack
    factor without attackers), and an attacked run always names its attack and defence (ATTACK_SHOWN)."""
    defaults = declared_defaults()
    attacked = config.get("attack-nodes", 0) != 0
    shown = []
    for key in VARIANT_KEYS:
        value = config.get(key, defaults[key])
        idle = ((key.startswith("dp-") and config.get("dp", "off") == "off")
                or (key == "trim-fraction" and config.get("aggregation") != "trimmed-mean")
                or (key == "attack-factor" and not attacked))
        if not idle and (value != defaults[key] or attacked and key in ATTACK_SHOWN):
            shown.append(f"{key}={value:g}" if isinstance(value, float) else f"{key}={value}")
    return f" [{', '.join(shown)}]" if shown else ""


@dataclass(frozen=True)
class Run:
    results_path: Path
    strategy: str
    held_out: tuple[str, ...]
    seed: int
    config: dict[str, Any]
    stages: list[dict[str, Any]]
    variant: str = ""  # ``variant(config)``

    @property
    def group(self) -> stats.GroupKey:
        """(strategy and its variant settings, held-out tasks)."""
        return self.strategy + self.variant, self.held_out


def read_run(results_path: Path) -> Run:
    """A checked results.json and the config fields that group it; ValueError (one line) otherwise.
    A run written before ``strategy`` existed was stage-wise; missing keys take their declared defaults."""
    payload = read_results(results_path)
    config = payload["config"]
    strategy = config_value(results_path, config, "strategy", "stagewise",
                            lambda v: isinstance(v, str) and v != "", "must be a strategy name")
    seed = config_value(results_path, config, "seed", 0,
                        lambda v: isinstance(v, int) and not isinstance(v, bool), "must be an integer")
    held_out = config_value(results_path, config, "held-out", "",
                            lambda v: isinstance(v, str) or isinstance(v, list) and all(isinstance(t, str) for t in v),
                            "must be a comma-separated string or a list of task names")
    names = split_list(held_out) if isinstance(held_out, str) else tuple(t.strip() for t in held_out if t.strip())
    return Run(results_path, strategy, tuple(sorted(names)), seed, config, payload["stages"], variant(config))


def breaks_privacy(strategy: str) -> bool:
    """Whether a group's strategy (its variant settings aside) takes training data off the sites."""
    entry = STRATEGIES.get(strategy.partition(" [")[0])
    return entry is not None and entry.breaks_privacy


def strategy_label(strategy: str) -> str:
    """A group's strategy (with its variant settings) for tables and legends; a reference that breaks
    privacy says so, beside the methods it bounds."""
    name, bracket, settings = strategy.partition(" [")
    return safe_label(name) + (BREAKS_PRIVACY if breaks_privacy(name) else "") + safe_label(bracket + settings)


def group_label(key: stats.GroupKey) -> str:
    strategy, held_out = key
    return strategy_label(strategy) + (f" [held out: {safe_label(', '.join(held_out))}]" if held_out else "")


@dataclass(frozen=True)
class Group:
    """The runs of one (strategy, held-out) group, one per seed, over the stages common to the report."""
    runs: list[Run]
    trained: list[stats.Scores]    # per stage: (task, seed) -> accuracy, trained tasks
    held_out: list[stats.Scores]   # the same for held-out tasks
    mean_curves: list[list[float | None]]  # per seed: mean accuracy (trained tasks) per stage


def _scores(runs: list[Run], stage: int, held_out: bool) -> stats.Scores:
    return {(task, run.seed): scores["accuracy"] for run in runs
            for task, scores in run.stages[stage]["per_task"].items() if scores["held_out"] == held_out}


def _group_order(key: stats.GroupKey) -> tuple[int, str, tuple[str, ...]]:
    """The method first, the references that break privacy last, the rest as named."""
    strategy, held_out = key
    return (0 if strategy.partition(" [")[0] == "stagewise" else 2 if breaks_privacy(strategy) else 1,
            strategy, held_out)


def build_groups(runs: list[Run], num_stages: int) -> dict[stats.GroupKey, Group]:
    members: dict[stats.GroupKey, list[Run]] = {}
    for run in sorted(runs, key=lambda r: (_group_order(r.group), r.seed)):
        members.setdefault(run.group, []).append(run)
    return {key: Group(group, [_scores(group, s, False) for s in range(num_stages)],
                       [_scores(group, s, True) for s in range(num_stages)],
                       [[run.stages[s]["mean_accuracy"] for s in range(num_stages)] for run in group])
            for key, group in members.items()}


def distinct_runs(runs: list[Run]) -> tuple[list[Run], list[str]]:
    """One run per (group, seed), the first given; unfinished runs (fewer stages than their
    ``num-stages``: failed, stopped or still running) are left out. Notes say why."""
    kept: dict[tuple[stats.GroupKey, int], Run] = {}
    notes = []
    for run in runs:
        planned = run.config.get("num-stages")
        if not run.stages or isinstance(planned, int) and len(run.stages) <= planned:
            notes.append(f"{run.results_path}: unfinished ({len(run.stages)} of "
                         f"{planned + 1 if isinstance(planned, int) else '?'} stages), left out")
        elif (run.group, run.seed) in kept:
            if run.results_path.resolve() != kept[run.group, run.seed].results_path.resolve():
                notes.append(f"{run.results_path}: same strategy, held-out tasks and seed as "
                             f"{kept[run.group, run.seed].results_path}, left out")
        else:
            kept[run.group, run.seed] = run
    return list(kept.values()), notes


def config_notes(groups: dict[stats.GroupKey, Group]) -> list[str]:
    """Settings that differ between the runs of one group: they are not seeds of one experiment."""
    notes = []
    for key, group in groups.items():
        keys = {k for run in group.runs for k in run.config} - set(SAME_EXPERIMENT_KEYS)
        differ = sorted(k for k in keys if len({repr(run.config.get(k)) for run in group.runs}) > 1)
        if differ:
            notes.append(f"runs of {group_label(key)} differ in {safe_label(', '.join(differ))}")
    return notes


def final_epsilons(group: Group, final: int) -> list[float | None]:
    """Each run's cumulative epsilon at ``final`` (None without DP)."""
    return [run.stages[final].get("epsilon") for run in group.runs]


def variant_of(key: stats.GroupKey) -> bool:
    """Whether a group's runs set privacy or robustness settings away from their defaults (``variant``)."""
    return " [" in key[0]
