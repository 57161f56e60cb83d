"""The structured Hydra config of one experiment, and its translation to Flower's run config.

Every group node is a dataclass registered with Hydra's ConfigStore, so a
misspelled key or a wrong type fails at composition, before anything runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass
class ModelConfig:
    name: str = MISSING
    image_size: int = MISSING


@dataclass
class DataConfig:
    source: str = MISSING
    root: str = ""
    datasets: list[str] = field(default_factory=list)
    held_out: list[str] = field(default_factory=list)
    partition: str = "iid"
    dirichlet_alpha: float = 0.5
    download: bool = False
    skip_unreadable: bool = False


@dataclass
class StrategyConfig:
    name: str = MISSING
    num_stages: int = MISSING
    clients_per_stage: int = MISSING
    local_epochs: int = MISSING
    aggregation: str = MISSING
    server_mix: float = MISSING
    eval_mode: str = MISSING
    eval_epochs: int = MISSING
    probe_epochs: int = MISSING
    batch_size: int = MISSING
    lr: float = MISSING
    weight_decay: float = MISSING
    stage_timeout: float = MISSING
    transport_dtype: str = MISSING
    oversample: float = MISSING
    min_replies: int = MISSING


@dataclass
class PretrainConfig:
    method: str = MISSING  # mae | simmim | none | checkpoint
    epochs: int = 0
    path: str = ""


@dataclass
class FederationConfig:
    num_supernodes: int = MISSING
    cpus_per_node: int = MISSING
    gpus_per_node: float = 0.0


@dataclass
class ExperimentConfig:
    model: ModelConfig = MISSING
    data: DataConfig = MISSING
    strategy: StrategyConfig = MISSING
    pretrain: PretrainConfig = MISSING
    federation: FederationConfig = MISSING
    seed: int = 0
    device: str = "auto"
    resume_from: str = ""


def register() -> None:
    """The schema ``conf/config.yaml`` composes first: group files merge into typed nodes."""
    ConfigStore.instance().store(name="experiment_schema", node=ExperimentConfig)


STRATEGY_KEYS = ("num_stages", "clients_per_stage", "local_epochs", "aggregation", "server_mix", "eval_mode",
                 "eval_epochs", "probe_epochs", "batch_size", "lr", "weight_decay", "stage_timeout",
                 "transport_dtype", "oversample", "min_replies")


def to_run_config(cfg, output_dir: str) -> dict:
    """Flower's flat kebab-case run config (``[tool.flwr.app.config]`` keys) for ``cfg``."""
    if cfg.strategy.name != "stagewise":
        raise ValueError(f"strategy '{cfg.strategy.name}': only 'stagewise' is available")
    pretrain = cfg.pretrain.path if cfg.pretrain.method == "checkpoint" else cfg.pretrain.method
    run_config = {
        "model": cfg.model.name,
        "image-size": cfg.model.image_size,
        "data": cfg.data.source,
        "data-root": cfg.data.root,
        "datasets": ",".join(cfg.data.datasets),
        "held-out": ",".join(cfg.data.held_out),
        "partition": cfg.data.partition,
        "dirichlet-alpha": cfg.data.dirichlet_alpha,
        "download": cfg.data.download,
        "skip-unreadable": cfg.data.skip_unreadable,
        "pretrain": pretrain,
        "pretrain-epochs": cfg.pretrain.epochs,
        "seed": cfg.seed,
        "device": cfg.device,
        "resume-from": cfg.resume_from,
        "output-dir": output_dir,
    }
    run_config.update({key.replace("_", "-"): cfg.strategy[key] for key in STRATEGY_KEYS})
    return run_config


def to_override_string(run_config: dict) -> str:
    """``--run-config`` text: TOML values (strings quoted, numbers bare)."""
    def value(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        return "'" + str(v).replace("'", "") + "'"

    return " ".join(f"{key}={value(v)}" for key, v in run_config.items())


def federation_config(cfg) -> str:
    fed = cfg.federation
    text = f"num-supernodes={fed.num_supernodes} client-resources-num-cpus={fed.cpus_per_node}"
    return text + (f" client-resources-num-gpus={fed.gpus_per_node}" if fed.gpus_per_node else "")
