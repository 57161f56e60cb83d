"""conf/ + simulation/: composition, fail-fast validation, and a small real sweep."""

import csv
import subprocess
import sys

import pytest
from conftest import ROOT, default_run_config
from hydra import compose, initialize_config_dir

from simulation.experiment import register, to_run_config


def run_cli(*overrides, timeout=900):
    return subprocess.run([sys.executable, "-m", "simulation.run", *overrides], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def test_hydra_defaults_equal_the_flower_run_config_defaults():
    register()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        cfg = compose(config_name="config")
    expected = {**default_run_config(), "output-dir": "X"}
    assert to_run_config(cfg, output_dir="X") == expected


@pytest.mark.parametrize(
    "override, message",
    [
        ("strategy.clients_per_stag=3", "Key 'clients_per_stag' not in 'StrategyConfig'"),
        ("strategy.clients_per_stage=abc", "Value 'abc' of type 'str' could not be converted to Integer"),
        ("model=vit-huge", "Could not find 'model/vit-huge'"),
    ],
)
def test_bad_overrides_fail_before_anything_runs(override, message, tmp_path):
    result = run_cli(override, f"hydra.run.dir={tmp_path}", timeout=120)
    assert result.returncode != 0
    assert message in result.stderr
    assert not (tmp_path / ".flwr").exists()  # no SuperLink was started


def test_sweep_runs_jobs_writes_a_summary_and_leaves_no_process(tmp_path, data_root):
    sweep_dir = tmp_path / "sweep"
    result = run_cli(
        "--multirun", "strategy.num_stages=0,1",  # job 0 is invalid (fails in the ServerApp), job 1 runs
        "strategy.local_epochs=1", "strategy.probe_epochs=2", "strategy.clients_per_stage=2", "pretrain=none",
        "federation.num_supernodes=2", "data.datasets=[ct-tissue,histology-stain]", f"data.root={data_root}",
        f"hydra.sweep.dir={sweep_dir}",
    )
    assert result.returncode != 0 and "1 of 2 jobs failed" in result.stderr
    assert "'num-stages' = 0: must be >= 1" in (sweep_dir / "0" / "FAILED").read_text()
    assert (sweep_dir / "1" / "results.json").is_file() and (sweep_dir / "1" / "accuracy_gain.png").is_file()
    rows = list(csv.DictReader(open(sweep_dir / "summary.csv")))
    assert [row["status"] for row in rows] == ["failed", "completed"]
    assert "strategy.num_stages=1" in rows[1]["overrides"] and float(rows[1]["final_mean_accuracy"]) > 0
    assert "| job |" in (sweep_dir / "summary.md").read_text()
    # every SuperLink / simulation / Ray process of the sweep ran with paths inside sweep_dir
    survivors = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    assert str(sweep_dir) not in survivors
