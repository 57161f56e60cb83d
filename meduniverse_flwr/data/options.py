"""How a node finds, reads and caches its data (``DataOptions``), from the run config."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

DEFAULT_ROOT = Path.home() / ".cache" / "meduniverse_flwr"


@dataclass(frozen=True)
class DataOptions:
    """How dataset entries are found and read (hashable: node data are cached per process)."""

    source: str = "embedded"  # the source of entries without a "source:" prefix
    root: str = ""
    image_size: int = 28
    seed: int = 0
    partition: str = "iid"  # how nodes sharing a dataset split it: iid | dirichlet
    dirichlet_alpha: float = 0.5
    download: bool = False
    skip_unreadable: bool = False
    archive_share: float = 0.0  # share of each train split set apart for the server (never the node's)
    cache: str = ""  # where a node writes (decoded data, extracted embedded tasks); "" = cache_root(root)


def cache_root(data_root: str) -> Path:
    """Where the embedded data and pretrained bases are cached: ``data-root`` or the default."""
    return Path(data_root).expanduser() if data_root else DEFAULT_ROOT


def write_dir(options: DataOptions) -> Path:
    """Where a node with these options writes: its cache directory, else under its data root."""
    return Path(options.cache).expanduser() if options.cache else cache_root(options.root)


def options_from(values: Mapping[str, Any], image_size: int) -> DataOptions:
    """Data options from run-config values (snake_case, as ``config.read_keys`` returns them)."""
    return DataOptions(values["data"], values["data_root"], image_size, values["seed"], values["partition"],
                       values["dirichlet_alpha"], values["download"], values["skip_unreadable"],
                       values["archive_share"])
