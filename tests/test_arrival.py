"""The paper's protocol: the arrival schedule, the server's public archive, scoring labels, TIES merging."""

import json
from collections import Counter

import numpy as np
import pytest
import torch
from conftest import TINY_FLAGS, write_medmnist
from flwr.app import Context, RecordDict

from meduniverse_flwr import server_app
from meduniverse_flwr.client_app import app as client_app
from meduniverse_flwr.config import ConfigError, RunConfig
from meduniverse_flwr.data.corpus import load_corpus
from meduniverse_flwr.data.node_task import TaskData, load_node_task
from meduniverse_flwr.data.options import DataOptions
from meduniverse_flwr.data.partition import stratified_subset
from meduniverse_flwr.learn.evaluate import scoring_labels
from meduniverse_flwr.server.aggregation import aggregate, ties_merge
from meduniverse_flwr.server.results import summarize
from meduniverse_flwr.server.schedule import arrival_order, arrivals, trained_by
from simulation.inprocess import InProcessGrid

TASKS = [f"task-{i}" for i in range(8)]


def test_each_task_arrives_once_and_each_stage_over_a_block_of_seeds():
    for seed in range(12):
        order = arrival_order(TASKS, 2, seed)
        assert sorted(order) == TASKS
        assert [task for stage in range(1, 5) for task in arrivals(order, 2, stage)] == order
        assert trained_by(order, 2, 0) == set() and trained_by(order, 2, 2) == set(order[:4])
    for block in range(3):  # seeds 4b .. 4b+3: every task at every stage exactly once
        stage_of = Counter((task, position // 2) for seed in range(4 * block, 4 * block + 4)
                           for position, task in enumerate(arrival_order(TASKS, 2, seed)))
        assert set(stage_of.values()) == {1} and len(stage_of) == 8 * 4
    assert arrival_order(TASKS, 2, 0) != arrival_order(TASKS, 2, 4)  # a new block, a new permutation
    assert arrival_order(reversed(TASKS), 2, 3) == arrival_order(TASKS, 2, 3)  # set order does not matter


def test_stratified_subset_keeps_class_shares_and_every_class():
    classes = np.repeat([0, 1, 2, 3], [500, 300, 150, 50])
    index = stratified_subset(classes, 100, seed=3)
    assert len(index) == 100 == len(np.unique(index))
    assert np.bincount(classes[index]).tolist() == [50, 30, 15, 5]
    rare = np.array([0] * 1000 + list(range(1, 10)))
    assert np.bincount(rare[stratified_subset(rare, 10, 0)]).tolist() == [1] * 10
    np.testing.assert_array_equal(stratified_subset(classes, 100, 3), index)
    assert not np.array_equal(stratified_subset(classes, 100, 4), index)
    np.testing.assert_array_equal(stratified_subset(classes, 0, 3), np.arange(1000))
    odd = stratified_subset(classes, 7, 0)
    assert len(odd) == 7 and set(classes[odd]) == {0, 1, 2, 3}


def test_scoring_labels_are_a_seeded_stratified_subset_of_the_train_split():
    labels = torch.arange(40) % 4
    train = TaskData(torch.arange(40, dtype=torch.uint8).reshape(40, 1, 1, 1).expand(40, 1, 2, 2), labels)
    picked = scoring_labels(train, 8, seed=1)
    assert len(picked) == 8 and torch.bincount(picked.labels).tolist() == [2, 2, 2, 2]
    assert torch.equal(picked.labels, labels[picked.images[:, 0, 0, 0].long()])  # images kept with their labels
    assert scoring_labels(train, 0, seed=1) is train


def test_the_server_archive_is_disjoint_from_every_client_image(tmp_path):
    path = write_medmnist(tmp_path, "pneumoniamnist", n=(200, 40, 60))
    with np.load(path) as arrays:  # make every image unique, so that equal bytes mean the same image
        images = {split: arrays[f"{split}_images"].copy() for split in ("train", "val", "test")}
        labels = {split: arrays[f"{split}_labels"] for split in ("train", "val", "test")}
    serial = 0
    for split in images:
        for image in images[split]:
            image[0, :3] = np.frombuffer(serial.to_bytes(3, "little"), np.uint8)
            serial += 1
    np.savez(path, **{f"{s}_images": images[s] for s in images}, **{f"{s}_labels": labels[s] for s in labels})
    entry = f"medmnist:{path}"
    options = DataOptions(source="medmnist", root=str(tmp_path / "cache"), archive_share=0.25)
    corpus = load_corpus(["archive"], options, archived=[entry])
    task = load_node_task(entry, 0, 1, options)
    assert len(corpus) == 50 and task.card.n_train == 150 and len(task.train) == 150
    archive = {bytes(image[0].numpy()) for image in corpus}
    client = {bytes(image[0].numpy()) for split in (task.train, task.val, task.test) for image in split.images}
    assert len(archive) == 50 and not archive & client
    assert archive | {bytes(image[0].numpy()) for image in task.train.images} == {
        bytes(image) for image in images["train"]}  # together they are the whole train split
    unsplit = load_node_task(entry, 0, 1, DataOptions(source="medmnist", root=str(tmp_path / "cache")))
    assert unsplit.card.n_train == 200


def test_ties_merge_against_hand_computed_values():
    deltas = np.array([[0.9, -0.1, 0.4, -0.8],
                       [0.5, 0.2, -0.6, -0.1],
                       [-0.3, 0.05, 0.7, 0.2]], dtype=np.float32)
    # density 0.5 keeps 2 of 4 per vector: [0.9, 0, 0, -0.8], [0.5, 0, -0.6, 0], [0, 0, 0.7, 0]
    # elected signs of the sums [1.4, 0, 0.1, -0.8]: +, 0, +, -; agreeing means 0.7, 0, 0.7, -0.8
    np.testing.assert_allclose(ties_merge(deltas, 0.5), [0.7, 0.0, 0.7, -0.8], rtol=1e-6)
    # density 1 trims nothing: signs of [1.1, 0.15, 0.5, -0.7]; means of the agreeing values
    np.testing.assert_allclose(ties_merge(deltas, 1.0), [0.7, 0.125, 0.55, -0.45], rtol=1e-6)
    for order in ([2, 0, 1], [1, 2, 0]):  # the same bits in any order
        assert ties_merge(deltas[order], 0.5).tobytes() == ties_merge(deltas, 0.5).tobytes()
    base = {"w": np.array([1.0, 1.0, 1.0, 1.0], dtype=np.float32)}
    updates = [({"w": base["w"] + row}, 10) for row in deltas]
    np.testing.assert_allclose(aggregate(updates, "ties", merge_density=0.5, base=base)["w"],
                               [1.7, 1.0, 1.7, 0.2], rtol=1e-6)


def test_an_arrival_runs_gain_pairs_each_scored_task_with_its_own_stage0_score():
    def stage(number, scores):
        return {"stage": number, "per_task": {t: {"accuracy": a, "held_out": False} for t, a in scores.items()}}
    stages = [stage(0, {"a": 0.5, "b": 0.9, "c": 0.7}), stage(1, {"b": 0.95}), stage(2, {"a": 0.6, "c": 0.6}),
              stage(3, {})]
    summary = summarize(stages)
    # a difference of means would read +0.25 at stage 1 (b's 0.95 against the mean of a, b and c)
    assert summary["accuracy_gain"] == pytest.approx([0.0, 0.05, 0.0, None])
    diffs = np.array([0.05, 0.1, -0.1])
    t = diffs.mean() / (diffs.std(ddof=1) / np.sqrt(3))
    from scipy import stats
    assert summary["p_value"] == pytest.approx(2 * stats.t.sf(abs(t), df=2))
    assert "each against its stage-0 score" in summary["p_value_test"]


def _config(run_config, **overrides) -> dict:
    settings = dict(schedule="arrival", clients_per_stage=1, num_stages=3, eval_mode="finetune", eval_epochs=1,
                    eval_labels=12)
    return run_config(**{**settings, **overrides})


def test_arrival_runs_train_each_task_once_and_score_the_tasks_still_to_come(run_config, tiny_sites):
    config = _config(run_config, pretrain="none", node_metrics=False, num_stages=2, datasets=",".join(tiny_sites),
                     eval_tasks="unseen")
    grid = InProcessGrid(client_app, config, num_nodes=3)
    server_app.main(grid, Context(run_id=3, node_id=0, node_config={}, state=RecordDict(), run_config=config))
    with open(f"{config['output-dir']}/latest/results.json") as handle:
        results = json.load(handle)
    stages = results["stages"]
    order = arrival_order(list(TINY_FLAGS), 1, 0)
    assert [stage["participants"] for stage in stages] == [[], *[[task] for task in order[:2]]]
    for stage in stages:  # scored from base s: exactly the tasks that have not trained yet
        assert sorted(stage["per_task"]) == sorted(order[stage["stage"]:])
    last = order[2]  # never trained: its score from every base, with the same 12 labels each time
    assert all(stage["per_task"][last]["accuracy"] is not None for stage in stages)
    assert results["tasks"][last]["n_classes"] >= 2 and isinstance(results["tasks"][last]["classes"], list)
    trained_messages = Counter(m.metadata.dst_node_id for m in grid.pushed if m.metadata.message_type == "train")
    assert sorted(trained_messages.values()) == [1, 1]


@pytest.mark.parametrize("overrides, message", [
    ({"strategy": "fedavg"}, "'schedule' = 'arrival': strategy 'fedavg' supports schedule in"),
    ({"num_stages": 5}, "'num-stages' = 5: x clients-per-stage = 5 arrivals, more than the 4 training datasets"),
    ({"archive_share": 0.2}, "'archive-share' = 0.2: the 'archive' corpus entry and archive-share > 0 go together"),
    ({"schedule": "weekly"}, "'schedule' = 'weekly': must be one of ('every-stage', 'arrival')"),
])
def test_arrival_settings_that_cannot_work_are_refused_in_one_line(run_config, overrides, message):
    with pytest.raises(ConfigError) as err:
        RunConfig.from_run_config(_config(run_config, **overrides))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_control_arm_with_no_stages_scores_only_its_starting_base(run_config):
    config = _config(run_config, num_stages=0, pretrain="none")
    grid = InProcessGrid(client_app, config, num_nodes=4)
    server_app.main(grid, Context(run_id=4, node_id=0, node_config={}, state=RecordDict(), run_config=config))
    with open(f"{config['output-dir']}/latest/results.json") as handle:
        stages = json.load(handle)["stages"]
    assert len(stages) == 1 and len(stages[0]["per_task"]) == 4
    assert not any(m.metadata.message_type == "train" for m in grid.pushed)
