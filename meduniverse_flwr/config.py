"""The run configuration: Flower's flat kebab-case run config, typed and checked.

``[tool.flwr.app.config]`` in pyproject.toml is the one declaration of every
key and its default; Flower merges it into every run's config. ``RunConfig``
declares each key's *type* (a field per key, no defaults) and its check.
Choices and cross-key rules are read from the registries (``registry``: every
variant with its facts, e.g. the DP levels a strategy supports), so adding a
variant never touches this file. A leaf: importing it imports no torch, timm or
flwr, so checking a config costs nothing.

Two readers: the ServerApp builds the whole ``RunConfig`` (every check,
server-side paths included) before any node is contacted; a node reads only
the data keys it uses (``node_data_keys``), because everything else it needs
comes in each message. A wrong key, type or value raises ``ConfigError`` with
one line naming the key.
"""

from __future__ import annotations

import dataclasses
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meduniverse_flwr import registry
from meduniverse_flwr.wire.transport import TRANSPORT_DTYPES

# the source tree's declaration; an installed wheel carries a copy in the package (a site's lean install)
_TREE = Path(__file__).resolve().parents[1] / "pyproject.toml"
PYPROJECT = _TREE if _TREE.is_file() else Path(__file__).resolve().parent / "pyproject.toml"


class ConfigError(ValueError):
    """A run-config key has a wrong name, type or value."""


def split_list(value: str) -> tuple[str, ...]:
    """``"a, b,,c"`` -> ``("a", "b", "c")``: lists travel as comma strings."""
    return tuple(item.strip() for item in value.split(",") if item.strip())


def declared_defaults(pyproject: Path = PYPROJECT) -> dict[str, Any]:
    """``[tool.flwr.app.config]``: every key with its default (what Flower merges into a run)."""
    with open(pyproject, "rb") as handle:
        return dict(tomllib.load(handle)["tool"]["flwr"]["app"]["config"])


@dataclass(frozen=True)
class RunConfig:
    """One field per declared key (``-`` becomes ``_``); the defaults live in pyproject.toml only."""

    strategy: str
    proximal_mu: float
    schedule: str
    num_stages: int
    clients_per_stage: int
    local_epochs: int
    client_lr: float
    client_layer_decay: float
    client_head_epochs: int
    model: str
    image_size: int
    data: str
    data_root: str
    datasets: tuple[str, ...]
    held_out: tuple[str, ...]
    archive_share: float
    partition: str
    dirichlet_alpha: float
    download: bool
    skip_unreadable: bool
    aggregation: str
    trim_fraction: float
    server_mix: float
    merge_density: float
    distill_weight: float
    distill_epochs: int
    distill_tokens: str
    distill_lr: float
    pretrain: str
    pretrain_epochs: int
    pretrain_seed: int
    pretrain_continue_epochs: int
    pretrain_corpus: tuple[str, ...]
    eval_mode: str
    eval_tasks: str
    eval_epochs: int
    eval_labels: int
    probe_epochs: int
    eval_split: str
    batch_size: int
    lr: float
    weight_decay: float
    layer_decay: float
    augment: str
    input_norm: str
    seed: int
    stage_timeout: float
    oversample: float
    min_replies: int
    max_update_ratio: float
    on_excess_update: str
    dp: str
    dp_clip_norm: float
    dp_noise_multiplier: float
    dp_delta: float
    dp_secure_noise: bool
    attack_nodes: int
    attack_factor: float
    node_metrics: bool
    tracker: str
    transport_dtype: str
    device: str
    compile: bool
    output_dir: str
    resume_from: str

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> "RunConfig":
        """Build from Flower's ``context.run_config`` (kebab-case keys); every server check runs."""
        unknown = sorted(set(run_config) - set(KEYS))
        if unknown:
            raise ConfigError(f"run config: unknown key '{unknown[0]}'")
        config = cls(**read_keys(run_config, KEYS))
        config.check_server()
        return config

    @classmethod
    def with_defaults(cls, **overrides: Any) -> "RunConfig":
        """The declared defaults with snake_case ``overrides`` (tests, benchmarks, scripts)."""
        run_config = declared_defaults()
        run_config.update({name.replace("_", "-"): value for name, value in overrides.items()})
        return cls.from_run_config(run_config)

    def to_run_config(self) -> dict[str, Any]:
        """The kebab-case mapping, lists as comma strings (the results contract)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name.replace("_", "-")] = ",".join(value) if isinstance(value, tuple) else value
        return out

    def check_server(self) -> None:
        """Checks across keys and of the server's own files; run before anything is sent."""
        def check(ok: bool, key: str, why: str) -> None:
            if not ok:
                raise ConfigError(f"run config: '{key}' = {getattr(self, key.replace('-', '_'))!r}: {why}")

        check(1 <= self.min_replies <= self.clients_per_stage, "min-replies", "must be in 1..clients-per-stage")
        check(not self.resume_from or (Path(self.resume_from).expanduser() / "results.json").is_file(),
              "resume-from", "must be a run directory holding results.json")
        if self.pretrain in registry.PRETRAIN_METHODS:
            check(self.pretrain_epochs >= 1, "pretrain-epochs", f"must be >= 1 with pretrain = '{self.pretrain}'")
        elif self.pretrain != "none":
            check(Path(self.pretrain).expanduser().is_file(), "pretrain",
                  f"must be one of {('none', *registry.PRETRAIN_METHODS)} or an existing checkpoint file")
        output_dir = Path(self.output_dir).expanduser()
        check(not output_dir.exists() or output_dir.is_dir(), "output-dir", "exists and is not a directory")
        strategy = registry.STRATEGIES[self.strategy]
        check(self.dp in strategy.dp_levels, "dp", f"strategy '{self.strategy}' supports dp in {strategy.dp_levels}")
        check(self.schedule in strategy.schedules, "schedule",
              f"strategy '{self.strategy}' supports schedule in {strategy.schedules}")
        if self.dp == "site":  # the noise is calibrated to one site moving an unweighted mean by clip / K
            check(self.aggregation == "mean", "aggregation", "dp = 'site' needs aggregation = 'mean'")
        if self.dp == "example":
            check(not self.compile, "compile", "not with dp = 'example' (Opacus' per-example hooks)")
        check(("archive" in self.pretrain_corpus) == (self.archive_share > 0), "archive-share",
              "the 'archive' corpus entry and archive-share > 0 go together")
        unknown = [name for name in self.held_out if name not in self.dataset_names]
        check(not unknown, "held-out", f"{unknown} not among the dataset names {self.dataset_names}")
        check(len(self.held_out) < len(self.datasets), "held-out", "leaves no dataset to train on")
        if self.schedule == "arrival":
            check(self.num_stages * self.clients_per_stage <= len(self.training_datasets), "num-stages",
                  f"x clients-per-stage = {self.num_stages * self.clients_per_stage} arrivals, more than the "
                  f"{len(self.training_datasets)} training datasets (schedule = 'arrival' trains each task once)")

    @property
    def dataset_names(self) -> tuple[str, ...]:
        """Task names of the ``datasets`` entries (``medmnist:/x/pneumoniamnist.npz`` -> pneumoniamnist)."""
        try:
            return tuple(registry.dataset_name(entry, self.data) for entry in self.datasets)
        except registry.UnknownSource as err:
            raise ConfigError(f"run config: 'datasets': {err}") from None

    @property
    def evaluate_epochs(self) -> int:
        """The training epochs of the evaluation protocol (``eval-mode``): the key it declares."""
        return getattr(self, registry.EVAL_PROTOCOLS[self.eval_mode].epochs_key.replace("-", "_"))

    @property
    def training_datasets(self) -> tuple[str, ...]:
        """The entries of ``datasets`` that are not held out."""
        return tuple(e for e, n in zip(self.datasets, self.dataset_names) if n not in self.held_out)


KEYS: dict[str, str] = {f.name.replace("_", "-"): str(f.type) for f in dataclasses.fields(RunConfig)}

# The keys a node reads from the run config: how the run splits and scores a site's data. Where
# the data are, what the node may fetch or write and what it runs on are the site's (site.py).
NODE_DATA_KEYS = ("partition", "dirichlet-alpha", "seed", "archive-share")
# The keys that make a simulated node hostile (experiments on robust aggregation only:
# simulation/hostile_app.py; the deployed ClientApp never reads them).
NODE_ATTACK_KEYS = ("attack-nodes", "attack-factor")


Check = Callable[[Any], "str | None"]  # the reason a value is wrong, or None


def _rule(predicate: Callable[[Any], bool], why: str) -> Check:
    return lambda value: None if predicate(value) else why


def _at_least(bound: float) -> Check:
    return _rule(lambda value: value >= bound, f"must be >= {bound:g}")


def _one_of(choices: Iterable[str]) -> Check:
    return _rule(lambda value: value in choices, f"must be one of {tuple(choices)}")


# Each key's own check. Keys without one only need the right type.
CHECKS: dict[str, Check] = {
    "strategy": _one_of(registry.STRATEGIES),
    "proximal-mu": _at_least(0),
    "schedule": _one_of(registry.SCHEDULES),
    "num-stages": _at_least(0),
    "clients-per-stage": _at_least(1),
    "local-epochs": _at_least(1),
    "client-lr": _rule(lambda value: value > 0, "must be > 0"),
    "client-layer-decay": _rule(lambda value: 0.0 < value <= 1.0, "must be in (0, 1] (1.0: no layer-wise lr decay)"),
    "client-head-epochs": _at_least(0),
    "model": _rule(lambda value: value in registry.MODELS or value.startswith(registry.TIMM_VIT_PREFIX),
                   f"must be one of {tuple(registry.MODELS)} or a timm ViT name ({registry.TIMM_VIT_PREFIX}...)"),
    "image-size": _at_least(8),
    "data": _one_of(registry.SOURCES),
    "datasets": _rule(lambda value: len(value) >= 1, "must name at least one dataset"),
    "partition": _one_of(registry.PARTITIONS),
    "dirichlet-alpha": _rule(lambda value: value > 0, "must be > 0"),
    "aggregation": _one_of(registry.AGGREGATIONS),
    "trim-fraction": _rule(lambda value: 0.0 <= value < 0.5, "must be in [0, 0.5)"),
    "server-mix": _rule(lambda value: 0.0 < value <= 1.0, "must be in (0, 1]"),
    "merge-density": _rule(lambda value: 0.0 < value <= 1.0, "must be in (0, 1] (the share of each task vector kept)"),
    "distill-weight": _at_least(0),
    "distill-epochs": _at_least(1),
    "distill-tokens": _one_of(registry.DISTILL_TOKENS),
    "distill-lr": _rule(lambda value: value > 0, "must be > 0"),
    "archive-share": _rule(lambda value: 0.0 <= value <= 0.9, "must be in [0, 0.9]"),
    "pretrain-epochs": _at_least(0),
    "pretrain-seed": _at_least(0),
    "pretrain-continue-epochs": _at_least(0),
    "eval-mode": _one_of(registry.EVAL_PROTOCOLS),
    "eval-tasks": _one_of(registry.EVAL_TASKS),
    "eval-epochs": _at_least(1),
    "eval-labels": _at_least(0),
    "probe-epochs": _at_least(1),
    "eval-split": _one_of(registry.EVAL_SPLITS),
    "batch-size": _at_least(1),
    "lr": _rule(lambda value: value > 0, "must be > 0"),
    "weight-decay": _at_least(0),
    "layer-decay": _rule(lambda value: 0.0 < value <= 1.0, "must be in (0, 1] (1.0: no layer-wise lr decay)"),
    "augment": _one_of(registry.AUGMENTATIONS),
    "input-norm": _one_of(registry.INPUT_NORMS),
    "stage-timeout": _rule(lambda value: value > 0, "must be > 0"),
    "oversample": _rule(lambda value: value >= 1.0, "must be >= 1 (ask at least K nodes)"),
    "min-replies": _at_least(1),
    "max-update-ratio": _rule(lambda value: value > 0, "must be > 0"),
    "on-excess-update": _one_of(registry.ON_EXCESS),
    "dp": _one_of(registry.DP_LEVELS),
    "dp-clip-norm": _rule(lambda value: value > 0, "must be > 0"),
    "dp-noise-multiplier": _rule(lambda value: value > 0, "must be > 0 (dp = 'off' for no noise)"),
    "dp-delta": _rule(lambda value: 0.0 < value < 1.0, "must be in (0, 1)"),
    "attack-nodes": _at_least(0),
    "tracker": _one_of(registry.TRACKERS),
    "transport-dtype": _one_of(TRANSPORT_DTYPES),
    "device": _one_of(registry.DEVICES),
}


def read_keys(run_config: Mapping[str, Any], keys: Iterable[str]) -> dict[str, Any]:
    """The typed, checked values of ``keys`` (snake_case names); one-line ConfigError otherwise."""
    values: dict[str, Any] = {}
    for key in keys:
        if key not in run_config:
            raise ConfigError(f"run config: missing key '{key}' (declared in [tool.flwr.app.config])")
        value = _coerce(key, run_config[key], KEYS[key])
        why = CHECKS[key](value) if key in CHECKS else None
        if why is not None:
            raise ConfigError(f"run config: '{key}' = {value!r}: {why}")
        values[key.replace("-", "_")] = value
    return values


def _coerce(key: str, raw: Any, kind: str) -> Any:
    """Turn a TOML / CLI value into the field's type, or name the key that is wrong."""
    if "tuple" in kind:
        if not isinstance(raw, str):
            raise ConfigError(f"run config: '{key}' must be a comma-separated string, got {raw!r}")
        return split_list(raw)
    if kind == "bool":
        if not isinstance(raw, bool):
            raise ConfigError(f"run config: '{key}' must be true or false, got {raw!r}")
        return raw
    if kind == "int":
        if isinstance(raw, bool) or not isinstance(raw, int):
            raise ConfigError(f"run config: '{key}' must be an integer, got {raw!r}")
        return raw
    if kind == "float":
        if isinstance(raw, bool) or not isinstance(raw, (int, float)):
            raise ConfigError(f"run config: '{key}' must be a number, got {raw!r}")
        return float(raw)
    if not isinstance(raw, str):
        raise ConfigError(f"run config: '{key}' must be a string, got {raw!r}")
    return raw
