import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the simulation/ entry point is not part of the installed package


def default_run_config() -> dict:
    with open(ROOT / "pyproject.toml", "rb") as handle:
        return tomllib.load(handle)["tool"]["flwr"]["app"]["config"]


@pytest.fixture(scope="session")
def data_root(tmp_path_factory) -> Path:
    """One embedded-data cache for the whole session (built on first use, ~5 s)."""
    return tmp_path_factory.mktemp("embedded-cache")


@pytest.fixture
def run_config(data_root, tmp_path):
    """The app's default run config with tiny, fast settings and test-local paths."""

    def make(**overrides) -> dict:
        config = default_run_config()
        config.update({"data-root": str(data_root), "output-dir": str(tmp_path / "outputs"),
                       "num-stages": 1, "local-epochs": 1, "probe-epochs": 3, "pretrain-epochs": 1})
        config.update({key.replace("_", "-"): value for key, value in overrides.items()})
        return config

    return make
