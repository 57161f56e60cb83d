"""conf/ + simulation/: composition, fail-fast validation, and a small real sweep."""

import csv
import json
import subprocess
import sys

import pytest
from conftest import EVERY_STAGE, ROOT, default_run_config
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from meduniverse_flwr.config import KEYS, ConfigError, RunConfig, read_keys
from meduniverse_flwr.registry import STRATEGIES
from simulation.experiment import register, to_run_config


def run_cli(*overrides, timeout=900):
    return subprocess.run([sys.executable, "-m", "simulation.run", *overrides], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def compose_run_config(*overrides: str) -> dict:
    register()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        return to_run_config(compose(config_name="config", overrides=list(overrides)), output_dir="X")


def test_the_hydra_default_is_the_declaration():
    assert compose_run_config() == {**default_run_config(), "output-dir": "X"}


@pytest.mark.parametrize("name", STRATEGIES)
def test_every_strategy_has_a_preset(name):
    assert compose_run_config(f"strategy={name}")["strategy"] == name


# what a preset requires its user to give (a placeholder in its yaml): a file that exists
GIVEN = {"arrival-mae-vitb-gpu": [f"pretrain={ROOT / 'pyproject.toml'}"]}


def test_a_preset_that_needs_a_value_says_which():
    with pytest.raises(ConfigError, match="'pretrain' = 'GIVE-THE-CONVERTED-ENCODER-PATH': must be one of"):
        RunConfig.from_run_config(compose_run_config("+experiment=arrival-mae-vitb-gpu"))


@pytest.mark.parametrize("experiment", sorted(path.stem for path in (ROOT / "conf" / "experiment").glob("*.yaml")))
def test_every_experiment_preset_composes_to_checked_keys_and_sweeps_registered_strategies_or_arms(experiment):
    given = GIVEN.get(experiment, [])
    run_config = compose_run_config(f"+experiment={experiment}", *given)
    read_keys(run_config, KEYS)
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        sweep = compose(config_name="config", overrides=[f"+experiment={experiment}", *given],
                        return_hydra_config=True)
    params = sweep.hydra.sweeper.params
    strategies, arms = (set(params.get(key, "").split(",")) - {""} for key in ("strategy", "arm"))
    assert strategies <= set(STRATEGIES) and arms <= ARMS and (strategies or arms)
    assert len(params["seed"].split(",")) >= 1
    for arm in arms:  # each arm's own settings win over the preset's
        with_arm = compose_run_config(f"+experiment={experiment}", f"arm={arm}", *given)
        RunConfig.from_run_config(with_arm)
        for key, value in OmegaConf.load(ROOT / "conf" / "arm" / f"{arm}.yaml").items():
            assert with_arm[key.replace("_", "-")] == value, (arm, key)


ARMS = {path.stem for path in (ROOT / "conf" / "arm").glob("*.yaml")}


@pytest.mark.parametrize("defence", sorted(path.stem for path in (ROOT / "conf" / "defence").glob("*.yaml")))
def test_every_defence_preset_composes_to_checked_keys(defence):
    run_config = compose_run_config(f"defence={defence}")
    read_keys(run_config, KEYS)
    if defence == "declared":
        assert run_config == compose_run_config()


def test_every_declared_key_is_a_hydra_key_of_the_same_name():
    run_config = compose_run_config("model=vit-tiny", "data=medmnist", "clients_per_stage=2", "node_metrics=false",
                                    "datasets=[pathmnist,octmnist]")
    assert run_config["model"] == "vit-tiny" and run_config["data"] == "medmnist"
    assert run_config["clients-per-stage"] == 2 and run_config["node-metrics"] is False
    assert run_config["datasets"] == "pathmnist,octmnist"


@pytest.mark.parametrize(
    "override, message",
    [
        ("clients_per_stag=3", "Key 'clients_per_stag' not in 'ExperimentConfig'"),
        ("clients_per_stage=abc", "Value 'abc' of type 'str' could not be converted to Integer"),
        ("model=vit-huge", "Could not find 'model/vit-huge'"),
        ("aggregation=avg", "'aggregation' = 'avg': must be one of ('mean', 'weighted'"),
    ],
)
def test_bad_overrides_fail_before_anything_runs(override, message, tmp_path):
    result = run_cli(override, f"hydra.run.dir={tmp_path}", timeout=120)
    assert result.returncode != 0
    assert message in result.stderr + result.stdout
    assert not (tmp_path / ".flwr").exists()  # no SuperLink was started


def test_sweep_runs_jobs_writes_a_summary_and_leaves_no_process(tmp_path, tiny_sites):
    """Job 1 also has a hostile node: it runs on its own app directory, whose ClientApp is the
    simulation's hostile one (the deployed ClientApp ignores attack-nodes)."""
    sweep_dir = tmp_path / "sweep"
    result = run_cli(
        "--multirun", "num_stages=-1,1",  # job 0 is invalid (fails before any process starts), job 1 runs
        "local_epochs=1", "probe_epochs=2", "clients_per_stage=2", "pretrain=none",
        "attack_nodes=1", "attack_factor=1000.0", "max_update_ratio=1e9",
        *(f"{key.replace('-', '_')}={value}" for key, value in EVERY_STAGE.items() if key != "clients-per-stage"),
        "federation.num_supernodes=2", f"datasets=[{','.join(tiny_sites[:2])}]", f"data_root={tmp_path / 'cache'}",
        f"hydra.sweep.dir={sweep_dir}",
    )
    assert result.returncode != 0 and "1 of 2 jobs failed" in result.stderr
    assert "'num-stages' = -1: must be >= 0" in (sweep_dir / "0" / "FAILED").read_text()
    assert (sweep_dir / "1" / "results.json").is_file() and (sweep_dir / "1" / "accuracy_gain.png").is_file()
    rows = list(csv.DictReader(open(sweep_dir / "summary.csv")))
    assert [row["status"] for row in rows] == ["failed", "completed"]
    assert "num_stages=1" in rows[1]["overrides"] and float(rows[1]["final_mean_accuracy"]) > 0
    assert "| job |" in (sweep_dir / "summary.md").read_text()
    app = (sweep_dir / "1" / "hostile-app" / "pyproject.toml").read_text()
    assert 'clientapp = "simulation.hostile_app:app"' in app and "meduniverse_flwr.client_app" not in app
    nodes = json.loads((sweep_dir / "1" / "results.json").read_text())["stages"][1]["nodes"]
    ratios = {node["task"]: node["update_ratio"] for node in nodes}
    assert ratios["pneumoniamnist"] > 10 > 1 > ratios["bloodmnist"]  # partition 0 sent 1000 x its update
    # every SuperLink / simulation / Ray process of the sweep ran with paths inside sweep_dir
    survivors = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    assert str(sweep_dir) not in survivors
    # what job 1 made of its overrides: each reached the run's config (none left at its default), both
    # tasks are scored at both stages, and the summary's numbers are the mean of those scores
    results = json.loads((sweep_dir / "1" / "results.json").read_text())
    overridden = {"num-stages": 1, "local-epochs": 1, "probe-epochs": 2, "clients-per-stage": 2, "pretrain": "none",
                  "attack-nodes": 1, "attack-factor": 1000.0, "max-update-ratio": 1e9,
                  "datasets": ",".join(tiny_sites[:2])}
    assert {key: results["config"][key] for key in overridden} == overridden
    stages = results["stages"]
    assert [s["stage"] for s in stages] == [0, 1]
    for stage in stages:
        scores = stage["per_task"]
        assert set(scores) == {"pneumoniamnist", "bloodmnist"}
        assert all(0 <= m[key] <= 1 for m in scores.values() for key in ("accuracy", "auc"))
        assert stage["mean_accuracy"] == pytest.approx(sum(m["accuracy"] for m in scores.values()) / 2)
    assert float(rows[1]["final_mean_accuracy"]) == pytest.approx(stages[1]["mean_accuracy"])
    assert float(rows[1]["gain_over_stage0"]) == pytest.approx(stages[1]["mean_accuracy"] - stages[0]["mean_accuracy"])
