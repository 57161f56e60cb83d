"""The Hydra schema of one experiment, generated from the run-config declaration, and its flattening.

Every key of ``[tool.flwr.app.config]`` is a top-level Hydra key of the same
name (``_`` for ``-``), typed by ``RunConfig`` and defaulting to the declared
value, so a misspelled key or a wrong type fails at composition, before
anything runs, and no default is written twice. Lists (``datasets``,
``held_out``) are Hydra lists. ``output-dir`` is the job's own directory.
Groups in ``conf/`` are presets that set several keys at once (``model``,
``data``, ``strategy``); ``federation`` is the simulated federation, not part
of the run config.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from meduniverse_flwr.config import KEYS, declared_defaults, split_list

JOB_KEYS = ("output-dir",)  # set by simulation.run for each job, not by the user


@dataclass
class FederationConfig:
    num_supernodes: int = MISSING
    cpus_per_node: int = MISSING
    gpus_per_node: float = 0.0


def _field(key: str, default: Any) -> tuple[str, Any, Any]:
    kind = KEYS[key]
    if "tuple" in kind:
        values = list(split_list(default))
        return key.replace("-", "_"), list[str], dataclasses.field(default_factory=lambda: list(values))
    return key.replace("-", "_"), {"int": int, "float": float, "bool": bool}.get(kind, str), default


def experiment_schema() -> type:
    """A dataclass with one field per declared run-config key, plus ``federation``."""
    fields = [_field(key, value) for key, value in declared_defaults().items() if key not in JOB_KEYS]
    fields.append(("federation", FederationConfig, dataclasses.field(default_factory=FederationConfig)))
    return dataclasses.make_dataclass("ExperimentConfig", fields)


def register() -> None:
    """The schema ``conf/config.yaml`` composes first: group files merge into typed keys."""
    ConfigStore.instance().store(name="experiment_schema", node=experiment_schema())


def to_run_config(cfg, output_dir: str) -> dict:
    """Flower's flat kebab-case run config for ``cfg``: every key but ``federation``, lists joined."""
    values = OmegaConf.to_container(cfg, resolve=True)
    values.pop("federation")
    run_config = {key.replace("_", "-"): ",".join(value) if isinstance(value, list) else value
                  for key, value in values.items()}
    return {**run_config, "output-dir": output_dir}


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
