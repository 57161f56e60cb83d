"""The in-process sweep runner of the experiments (``simulation/local_sweep.py``)."""

import json

import pytest
from conftest import EVERY_STAGE, default_run_config
from flwr.app import Context, MessageType, RecordDict

from meduniverse_flwr import server_app
from meduniverse_flwr.client_app import app as client_app
from simulation.inprocess import InProcessGrid
from simulation.local_sweep import ScoreMemo, finished, job_name, sweep_jobs


def test_a_presets_sweep_is_the_product_of_its_params_and_only_replaces_one():
    jobs = sweep_jobs("arrival2-val-mae", [])
    assert len(jobs) == 8 and jobs[0] == ["seed=100", "arm=stagewise-mean", "pretrain_epochs=10"]
    assert {job[2] for job in jobs} == {f"pretrain_epochs={e}" for e in (10, 30, 100, 200)}
    assert sweep_jobs("arrival2-val-mae", ["seed=7", "pretrain_epochs=30"]) == [
        ["seed=7", "arm=stagewise-mean", "pretrain_epochs=30"]]


def test_job_names_carry_no_comma():
    """Flower's app bundle splits its file list on commas: a committed path with one breaks `flwr run .`."""
    name = job_name(["seed=1", "arm=stagewise-mean", "datasets=[a,b]", "pretrain=/x/y.safetensors"])
    assert name == "seed-1_arm-stagewise-mean_datasets-[a-b]_pretrain--x-y.safetensors"
    assert "," not in name and "/" not in name and "=" not in name


def test_memoised_scores_are_the_scores_and_are_not_computed_twice(data_root, tiny_sites, tmp_path):
    calls = []

    def counting(message, context):
        calls.append(message.metadata.message_type)
        return client_app(message, context)

    results = []
    for attempt, strategy_seed in enumerate((0, 0, 1)):
        config = {**default_run_config(), **EVERY_STAGE,
                  "data-root": str(data_root), "num-stages": 1, "local-epochs": 1,
                  "probe-epochs": 2, "pretrain-epochs": 1, "datasets": ",".join(tiny_sites[:2]),
                  "clients-per-stage": 2, "seed": strategy_seed, "output-dir": str(tmp_path / str(attempt))}
        calls.clear()
        grid = InProcessGrid(ScoreMemo(counting, tmp_path / "memo"), config, 2)
        server_app.main(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=config))
        results.append((json.loads((tmp_path / str(attempt) / "latest" / "results.json").read_text()), list(calls)))
    (first, first_calls), (again, again_calls), (other, other_calls) = results
    assert first_calls.count(MessageType.EVALUATE) == 4  # two nodes, stages 0 and 1
    assert MessageType.EVALUATE not in again_calls and MessageType.TRAIN in again_calls
    assert [s["per_task"] for s in again["stages"]] == [s["per_task"] for s in first["stages"]]
    # another seed is another evaluation (its seeds and partitions): computed, not taken from the memo
    assert other_calls.count(MessageType.EVALUATE) == 4
    # a job folder counts as done only for the settings that made it
    done = tmp_path / "0" / "latest" / "results.json"
    assert finished(done, {**first["config"], "output-dir": "elsewhere"})
    with pytest.raises(ValueError, match="made with other settings \\(client-lr\\)"):
        finished(done, {**first["config"], "client-lr": 0.5})
