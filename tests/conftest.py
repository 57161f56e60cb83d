import os
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the simulation/ entry point is not part of the installed package

from meduniverse_flwr.data.medmnist import FLAGS, medmnist_path  # noqa: E402

# pytest-xdist workers share the cores: one worker's torch takes its share, not every core
torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))

# The files of real processes, longest first: pytest-xdist (``--dist loadfile --no-loadscope-reorder``)
# hands files out in collection order, so these start at once and their waits (heartbeats, timeouts,
# process starts) overlap the in-process tests instead of ending the run alone.
REAL_PROCESS_FILES = ("test_deploy.py", "test_deploy_floor.py", "test_hydra.py", "test_flwr_run.py")


def pytest_collection_modifyitems(items):
    first = {name: rank for rank, name in enumerate(REAL_PROCESS_FILES)}
    items.sort(key=lambda item: first.get(item.path.name, len(first)))  # stable: the rest keep their order



def default_run_config() -> dict:
    with open(ROOT / "pyproject.toml", "rb") as handle:
        return tomllib.load(handle)["tool"]["flwr"]["app"]["config"]


# The settings the federation-mechanics tests were written for: every stage retrains every site and
# scores every task with a linear probe (the default before the paper's arrival protocol became it).
# Tests whose subject is the arrival protocol set its keys themselves (tests/test_arrival.py).
EVERY_STAGE = {"schedule": "every-stage", "clients-per-stage": 4, "aggregation": "weighted", "client-lr": 0.001,
               "client-layer-decay": 1.0, "eval-mode": "linear-probe", "eval-epochs": 1, "eval-labels": 0}


def with_every_stage(run_config: str, *set_later: str) -> str:
    """`flwr run --run-config` text with EVERY_STAGE's keys that it does not set itself (nor ``set_later``
    by the text appended to it)."""
    given = {item.partition("=")[0] for item in run_config.split()} | set(set_later)
    return " ".join([*(f"{key}='{value}'" if isinstance(value, str) else f"{key}={value}"
                       for key, value in EVERY_STAGE.items() if key not in given), run_config])


@pytest.fixture(scope="session")
def data_root(tmp_path_factory) -> Path:
    """One embedded-data cache for the whole session (built on first use, ~5 s)."""
    return tmp_path_factory.mktemp("embedded-cache")


@pytest.fixture
def run_config(data_root, tmp_path):
    """The app's default run config with tiny, fast settings and test-local paths."""

    def make(**overrides) -> dict:
        config = {**default_run_config(), **EVERY_STAGE}
        config.update({"data-root": str(data_root), "output-dir": str(tmp_path / "outputs"),
                       "num-stages": 1, "local-epochs": 1, "probe-epochs": 3, "pretrain-epochs": 1})
        config.update({key.replace("_", "-"): value for key, value in overrides.items()})
        return config

    return make


RGB_FLAGS = {"pathmnist", "dermamnist", "bloodmnist", "retinamnist"}
TINY_FLAGS = ("pneumoniamnist", "bloodmnist", "organamnist")  # 2, 8 and 11 classes; gray and RGB


@pytest.fixture(scope="session")
def tiny_sites(tmp_path_factory) -> list[str]:
    """Three tiny sites (``medmnist:`` entries, 48 train / 16 val / 16 test images each): for runs whose
    subject is the federation's mechanics (messages, resume, rejection), not what it learns; training
    on the embedded universe's 1,000 images a task made such runs 20x slower."""
    root = tmp_path_factory.mktemp("tiny-sites")
    return [f"medmnist:{write_medmnist(root, flag, n=(48, 16, 16), seed=index)}" for index, flag in enumerate(TINY_FLAGS)]


def write_medmnist(root, flag, size=28, n=(12, 4, 6), seed=0):
    """A tiny file in the official layout: N x S x S (x 3) uint8 images, N x L labels."""
    info, rng = FLAGS[flag], np.random.default_rng(seed)
    arrays = {}
    for split, count in zip(("train", "val", "test"), n):
        shape = (count, size, size, 3) if flag in RGB_FLAGS else (count, size, size)
        arrays[f"{split}_images"] = rng.integers(0, 256, shape, dtype=np.uint8)
        if info.label_kind == "multilabel":
            arrays[f"{split}_labels"] = rng.integers(0, 2, (count, info.n_classes))
        else:
            arrays[f"{split}_labels"] = (np.arange(count) % info.n_classes)[:, None]
    path = medmnist_path(root, flag, size)
    np.savez_compressed(path, **arrays)
    return path
