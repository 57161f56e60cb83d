"""The run configuration: Flower's flat kebab-case run config, typed and checked.

Every key of ``[tool.flwr.app.config]`` maps to one field here. A wrong key,
type or value raises ``ConfigError`` with one line naming the key, before any
node is contacted.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

AGGREGATIONS = ("mean", "weighted")
PRETRAIN_METHODS = ("mae", "simmim")
DATA_SOURCES = ("embedded", "medmnist", "folder", "dicom")
PARTITIONS = ("iid", "dirichlet")
TRANSPORT_DTYPES = ("fp32", "bf16", "fp16")
EVAL_MODES = ("linear-probe", "finetune")
DEVICES = ("auto", "cpu", "cuda")


class ConfigError(ValueError):
    """A run-config key has a wrong name, type or value."""


def split_list(value: str) -> tuple[str, ...]:
    """``"a, b,,c"`` -> ``("a", "b", "c")``: lists travel as comma strings."""
    return tuple(item.strip() for item in value.split(",") if item.strip())


@dataclass(frozen=True)
class RunConfig:
    num_stages: int = 3
    clients_per_stage: int = 4
    local_epochs: int = 2
    model: str = "vit-micro"
    image_size: int = 28
    data: str = "embedded"
    data_root: str = ""
    datasets: tuple[str, ...] = ("fundus-vessel", "histology-stain", "brain-tissue", "ct-tissue")
    held_out: tuple[str, ...] = ()
    partition: str = "iid"
    dirichlet_alpha: float = 0.5
    download: bool = False
    skip_unreadable: bool = False
    aggregation: str = "weighted"
    server_mix: float = 1.0
    pretrain: str = "mae"
    pretrain_epochs: int = 10
    eval_mode: str = "linear-probe"
    eval_epochs: int = 1
    probe_epochs: int = 30
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.05
    seed: int = 0
    stage_timeout: float = 3600.0
    oversample: float = 1.0
    min_replies: int = 1
    transport_dtype: str = "fp32"
    device: str = "auto"
    output_dir: str = "outputs"
    resume_from: str = ""

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> "RunConfig":
        """Build from Flower's ``context.run_config`` (kebab-case keys)."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        for key, raw in run_config.items():
            name = key.replace("-", "_")
            if name not in fields:
                raise ConfigError(f"run config: unknown key '{key}'")
            values[name] = _coerce(key, raw, fields[name].type)
        config = cls(**values)
        config.validate()
        return config

    def to_run_config(self) -> dict[str, Any]:
        """The kebab-case mapping, lists as comma strings (the results contract)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name.replace("_", "-")] = ",".join(value) if isinstance(value, tuple) else value
        return out

    def validate(self) -> None:
        def check(ok: bool, key: str, why: str) -> None:
            if not ok:
                raise ConfigError(f"run config: '{key}' = {getattr(self, key.replace('-', '_'))!r}: {why}")

        check(self.num_stages >= 1, "num-stages", "must be >= 1")
        check(self.clients_per_stage >= 1, "clients-per-stage", "must be >= 1")
        check(self.local_epochs >= 1, "local-epochs", "must be >= 1")
        check(self.image_size >= 8, "image-size", "must be >= 8")
        check(self.aggregation in AGGREGATIONS, "aggregation", f"must be one of {AGGREGATIONS}")
        check(0.0 < self.server_mix <= 1.0, "server-mix", "must be in (0, 1]")
        check(self.eval_mode in EVAL_MODES, "eval-mode", f"must be one of {EVAL_MODES}")
        check(self.eval_epochs >= 1, "eval-epochs", "must be >= 1")
        check(self.probe_epochs >= 1, "probe-epochs", "must be >= 1")
        check(self.batch_size >= 1, "batch-size", "must be >= 1")
        check(self.lr > 0, "lr", "must be > 0")
        check(self.weight_decay >= 0, "weight-decay", "must be >= 0")
        check(self.stage_timeout > 0, "stage-timeout", "must be > 0")
        check(self.oversample >= 1.0, "oversample", "must be >= 1 (ask at least K nodes)")
        check(1 <= self.min_replies <= self.clients_per_stage, "min-replies", "must be in 1..clients-per-stage")
        check(self.device in DEVICES, "device", f"must be one of {DEVICES}")
        check(not self.resume_from or (Path(self.resume_from).expanduser() / "results.json").is_file(),
              "resume-from", "must be a run directory holding results.json")
        check(self.transport_dtype in TRANSPORT_DTYPES, "transport-dtype", f"must be one of {TRANSPORT_DTYPES}")
        if self.pretrain in PRETRAIN_METHODS:
            check(self.pretrain_epochs >= 1, "pretrain-epochs", f"must be >= 1 with pretrain = '{self.pretrain}'")
        elif self.pretrain != "none":
            check(Path(self.pretrain).expanduser().is_file(), "pretrain",
                  f"must be one of {('none', *PRETRAIN_METHODS)} or an existing checkpoint file")
        check(len(self.datasets) >= 1, "datasets", "must name at least one dataset")
        check(self.data in DATA_SOURCES, "data", f"must be one of {DATA_SOURCES}")
        check(self.partition in PARTITIONS, "partition", f"must be one of {PARTITIONS}")
        check(self.dirichlet_alpha > 0, "dirichlet-alpha", "must be > 0")
        unknown = [name for name in self.held_out if name not in self.dataset_names]
        check(not unknown, "held-out", f"{unknown} not among the dataset names {self.dataset_names}")
        check(len(self.held_out) < len(self.datasets), "held-out", "leaves no dataset to train on")

    @property
    def dataset_names(self) -> tuple[str, ...]:
        """Task names of the ``datasets`` entries (``medmnist:/x/pneumoniamnist.npz`` -> pneumoniamnist)."""
        from .data import dataset_name

        return tuple(dataset_name(entry, self.data) for entry in self.datasets)

    @property
    def training_datasets(self) -> tuple[str, ...]:
        """The entries of ``datasets`` that are not held out."""
        return tuple(e for e, n in zip(self.datasets, self.dataset_names) if n not in self.held_out)


def _coerce(key: str, raw: Any, annotation: Any) -> Any:
    """Turn a TOML / CLI value into the field's type, or name the key that is wrong."""
    kind = str(annotation)
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
