"""What a hospital's node reads, writes, fetches, runs on and spends: set by the site alone.

A deployed SuperNode states all of it in its node config (``--node-config``, the table in
``deploy/README.md``); nothing a submitted run says changes it: a run with ``download=true`` or
another ``data-root`` fetches and reads nothing new on a site. In simulation, where a node config
has only ``partition-id`` / ``num-partitions``, the simulation plays every site: the partition id
picks one of the run's ``datasets`` and the run config supplies what the sites would have set.
A site's privacy floor (``require-dp``, ``max-epsilon``) is node config in both.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meduniverse_flwr.config import NODE_DATA_KEYS, ConfigError, read_keys
from meduniverse_flwr.data.options import DataOptions, write_dir
from meduniverse_flwr.data.partition import node_dataset
from meduniverse_flwr.registry import DEVICES

# node-config key -> (type, default); "dataset" has no default: a deployed node must name its data
SITE_KEYS: dict[str, tuple[type, Any]] = {
    "dataset": (str, None),  # a dataset entry ("medmnist:/data/pneumoniamnist.npz") or an .npz path
    "data-root": (str, ""),  # where bare entries are found; "" = ~/.cache/meduniverse_flwr
    "cache-dir": (str, ""),  # where the node writes (decoded data, its privacy ledger); "" = data-root's
    "download": (bool, False),  # whether the node may fetch a missing public dataset
    "skip-unreadable": (bool, False),  # drop unreadable images (logged) instead of refusing the dataset
    "device": (str, "auto"),  # registry.DEVICES
    "require-dp": (str, ""),  # "example": release only DP-SGD-trained updates (site_ledger.py)
    "max-epsilon": (float, math.inf),  # the most epsilon the site spends on its data, over all runs
    "max-epsilon-delta": (float, 1e-5),  # the delta that epsilon is stated at
}
SIMULATION_KEYS = ("partition-id", "num-partitions")  # what Flower's simulation engine gives a node
# run-config keys the simulation supplies for every site it plays: its datasets, the source of
# their bare entries (``data``; a deployed node's bare entries are embedded tasks), and the
# site keys of the same names
SIMULATED_SITE_KEYS = ("datasets", "data", "data-root", "download", "skip-unreadable", "device")
REQUIRE_DP = ("", "example")


@dataclass(frozen=True)
class Site:
    """One node's site settings (see ``SITE_KEYS``), and which shard of ``dataset`` it holds."""

    dataset: str
    shard: int = 0
    n_shards: int = 1
    source: str = "embedded"  # the source of a bare entry
    data_root: str = ""
    cache_dir: str = ""
    download: bool = False
    skip_unreadable: bool = False
    device: str = "auto"
    require_dp: str = ""
    max_epsilon: float = math.inf
    max_epsilon_delta: float = 1e-5

    @property
    def has_floor(self) -> bool:
        """Whether the site sets a privacy floor (and so keeps a ledger of its spending)."""
        return self.require_dp != "" or math.isfinite(self.max_epsilon)

    def data_options(self, run_config: Mapping[str, Any], image_size: int) -> DataOptions:
        """How this node reads its data: the site's settings, and how the run splits them."""
        run = read_keys(run_config, NODE_DATA_KEYS)
        return DataOptions(self.source, self.data_root, image_size, run["seed"], run["partition"],
                           run["dirichlet_alpha"], self.download, self.skip_unreadable, run["archive_share"],
                           self.cache_dir)

    def write_dir(self) -> Path:
        """Where the node writes: ``cache-dir``, else under its data root."""
        return write_dir(DataOptions(root=self.data_root, cache=self.cache_dir))


def site_from(node_config: Mapping[str, Any], run_config: Mapping[str, Any]) -> Site:
    """This node's site settings; a one-line ConfigError names a bad or missing node-config key."""
    unknown = sorted(set(node_config) - set(SITE_KEYS) - set(SIMULATION_KEYS))
    if unknown:
        raise ConfigError(f"node config: unknown key '{unknown[0]}'; the keys a site sets are {tuple(SITE_KEYS)}")
    values = {key: _node_value(node_config, key) for key in SITE_KEYS}
    shard, n_shards, source = 0, 1, Site.source
    if "dataset" not in node_config and "partition-id" in node_config:  # the simulation plays the site
        run = read_keys(run_config, SIMULATED_SITE_KEYS)
        values["dataset"], shard, n_shards = node_dataset(int(node_config["partition-id"]),
                                                          int(node_config["num-partitions"]), run["datasets"])
        source = run["data"]
        values.update({key: run[key.replace("-", "_")] for key in SIMULATED_SITE_KEYS[2:]})
    elif "dataset" not in node_config:
        raise ConfigError("node config: no 'dataset': start the SuperNode with --node-config "
                          "'dataset=\"<entry or .npz path>\"' naming this site's data")
    site = Site(values["dataset"], shard, n_shards, source, values["data-root"], values["cache-dir"],
                values["download"], values["skip-unreadable"], values["device"], values["require-dp"],
                values["max-epsilon"], values["max-epsilon-delta"])
    _check(site)
    return site


def _node_value(node_config: Mapping[str, Any], key: str) -> Any:
    kind, default = SITE_KEYS[key]
    if key not in node_config:
        return default
    value = node_config[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise ConfigError(f"node config: '{key}' = {value!r}: must be a {kind.__name__}")
    return value


def _check(site: Site) -> None:
    if not site.dataset:
        raise ConfigError("node config: 'dataset' is empty")
    if site.require_dp not in REQUIRE_DP:
        raise ConfigError(f"node config: 'require-dp' = {site.require_dp!r}: must be one of {REQUIRE_DP}")
    if not (site.max_epsilon > 0):  # NaN fails too
        raise ConfigError(f"node config: 'max-epsilon' = {site.max_epsilon!r}: must be > 0")
    if not 0 < site.max_epsilon_delta < 1:
        raise ConfigError(f"node config: 'max-epsilon-delta' = {site.max_epsilon_delta!r}: must be in (0, 1)")
    if site.device not in DEVICES:
        raise ConfigError(f"node config: 'device' = {site.device!r}: must be one of {DEVICES}")
