"""Hostile nodes and files, end to end through the real ServerApp and ClientApp handlers (in-process).

A node's card, train reply or evaluation reply, and a results.json read back, can be anything:
each case here is logged and refused (or reported missing), never a crash, never in the aggregate,
and no finished stage is lost.
"""

import json
import logging
import math

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, MetricRecord, RecordDict
from safetensors.numpy import load_file

from meduniverse_flwr import server_app
from meduniverse_flwr.client_app import app as client_app
from meduniverse_flwr.server.results import RunOutputs, read_results
from meduniverse_flwr.wire.messages import pack, unpack
from simulation.inprocess import InProcessGrid

ATTACKER = 1002


def run(config, tamper=None, num_nodes=3, run_id=5):
    grid = InProcessGrid(client_app, config, num_nodes, tamper)
    server_app.main(grid, Context(run_id=run_id, node_id=0, node_config={}, state=RecordDict(), run_config=config))
    run_dir = (__import__("pathlib").Path(config["output-dir"]) / "latest").resolve()
    return json.loads((run_dir / "results.json").read_text()), run_dir


def on(kind, change):
    """A tamper hook that rewrites replies of one message type (``change`` gets the reply and a call count)."""
    calls = []

    def tamper(reply):
        if reply.metadata.message_type == kind:
            calls.append(1)
            change(reply, len(calls))
        return reply

    return tamper


def base_norm(run_dir, stage):
    arrays = load_file(run_dir / "checkpoints" / f"stage-{stage}.safetensors")
    return math.sqrt(sum(float(np.square(a, dtype=np.float64).sum()) for a in arrays.values()))


@pytest.fixture
def tiny(run_config, tiny_sites):
    def make(**overrides):
        return run_config(**{"datasets": ",".join(tiny_sites), "pretrain": "none", "clients_per_stage": 3, "probe_epochs": 1,
                             "batch_size": 16, **overrides})
    return make


def test_an_attacker_cannot_steer_the_base(tiny, tmp_path):
    def attack(reply, stage):
        arrays = unpack(reply.content.array_records["arrays"], "fp32")
        # stage 1: the update scaled x1e3; stage 2: arrays of 1e30
        reply.content.array_records["arrays"] = pack(
            {name: values * 1e3 if stage == 1 else np.full_like(values, 1e30) for name, values in arrays.items()}, "fp32")

    honest, honest_dir = run(tiny(num_stages=2, output_dir=str(tmp_path / "honest")))
    attacked, attacked_dir = run(tiny(num_stages=2, output_dir=str(tmp_path / "attacked")),
                                 tamper={ATTACKER: on("train", attack)})
    for stage in (1, 2):
        rejected = attacked["stages"][stage]["rejected"]
        assert len(rejected) == 1 and rejected[0].startswith(f"node {ATTACKER}: update norm is")
        assert len(attacked["stages"][stage]["participants"]) == 2
        assert not honest["stages"][stage]["rejected"]
    honest_norms = [base_norm(honest_dir, s) for s in (0, 1, 2)]
    final = base_norm(attacked_dir, 2)
    assert min(honest_norms) * 0.95 <= final <= max(honest_norms) * 1.05


@pytest.mark.parametrize("field, value", [
    ("n-classes", math.inf), ("n-classes", 1e9), ("n-classes", 2**62), ("n-classes", 5_000_000),
    ("n-classes", 2.5), ("n-classes", "4"), ("n-classes", True), ("n-train", 10**18),
    ("name", "pneumoniamnist\n\x1b[31mINFO: forged line"), ("name", "evil$\\undefinedcommand$"),
])
def test_a_bad_card_leaves_its_node_out_and_the_run_completes(tiny, field, value, caplog):
    def forge(reply, _):
        card = dict(reply.content.config_records["card"])
        reply.content.config_records["card"] = ConfigRecord({**card, field: value})

    with caplog.at_level(logging.WARNING, logger="flwr"):
        results, _ = run(tiny(), tamper={ATTACKER: on("query", forge)})
    assert f"node {ATTACKER}: task card rejected" in caplog.text
    assert "\x1b" not in caplog.text and "forged line\n" not in caplog.text
    assert len(results["stages"][1]["participants"]) == 2
    assert "organamnist" not in results["stages"][1]["per_task"]  # the attacker's task never entered


def test_a_node_claiming_another_task_name_is_refused_with_it(tiny, caplog):
    def impersonate(reply, _):
        card = dict(reply.content.config_records["card"])
        reply.content.config_records["card"] = ConfigRecord({**card, "name": "pneumoniamnist"})

    with caplog.at_level(logging.WARNING, logger="flwr"):
        results, _ = run(tiny(), tamper={ATTACKER: on("query", impersonate)})
    assert "claimed with 2 different signatures" in caplog.text
    assert results["stages"][1]["participants"] == ["bloodmnist"]  # neither claimant of the name trains


@pytest.mark.parametrize("metric, value, missing", [
    ("n-scored", math.inf, True), ("n-scored", math.nan, True), ("n-scored", 1e12, True), ("accuracy", 1.5, True),
    ("auc", 7.0, True), ("accuracy", math.nan, True), ("auc", math.nan, False),
])
def test_a_bad_evaluation_reply_is_a_missing_score_not_a_crash(tiny, tmp_path, metric, value, missing):
    def forge(reply, _):
        metrics = dict(reply.content.metric_records["metrics"])
        reply.content.metric_records["metrics"] = MetricRecord({**metrics, metric: value})

    results, run_dir = run(tiny(), tamper={ATTACKER: on("evaluate", forge)})
    assert (run_dir / "checkpoints" / "stage-1.safetensors").is_file()  # the trained stage is kept
    for stage in results["stages"]:
        task = stage["per_task"]["organamnist"]
        if missing:  # reported as missing, and no mean over fewer tasks
            assert task["accuracy"] is None and f"node {ATTACKER}" in task["missing"]
            assert stage["mean_accuracy"] is None and stage["missing_tasks"] == ["organamnist"]
        else:  # an undefined AUC is legitimate (a class absent from the split): no AUC, the accuracy counts
            assert task["auc"] is None and task["accuracy"] is not None and stage["mean_accuracy"] is not None
    assert results["summary"]["p_value"] is None or not missing


def test_latest_moves_only_when_a_run_completes(tiny, tmp_path):
    first, first_dir = run(tiny())
    failing = tiny(min_replies=3, stage_timeout=5.0)

    def silence(reply, _):
        reply.content.array_records["arrays"] = reply.content.array_records["arrays"].__class__()

    with pytest.raises(Exception, match="fewer than min-replies"):  # another run id: run names are per second
        run(failing, tamper={ATTACKER: on("train", silence)}, run_id=6)
    assert (tmp_path / "outputs" / "latest").resolve() == first_dir
    assert not list((tmp_path / "outputs").glob(".latest-*"))


@pytest.mark.parametrize("corrupt, message", [
    (lambda r: r["stages"].reverse(), "stages\\[0\\].stage = '1': must be 0"),
    (lambda r: r["stages"][1].pop("per_task"), "stages\\[1\\].per_task = 'None': must be an object"),
    (lambda r: r["stages"][1]["per_task"]["bloodmnist"].update(accuracy=7.0), "accuracy = '7.0'"),
    (lambda r: r["stages"][0].update(bytes_up="many"), "bytes_up"),
    (lambda r: r.update(stages={"0": {}}), "stages = .*must be a list"),
    (lambda r: r.pop("config"), "config"),
])
def test_a_tampered_results_json_is_refused_on_resume_in_one_line(tiny, corrupt, message):
    config = tiny()
    results, run_dir = run(config)
    corrupt(results)
    (run_dir / "results.json").write_text(json.dumps(results))
    with pytest.raises(ValueError, match=message) as err:
        RunOutputs.resume(run_dir, results.get("config", {}))
    assert "\n" not in str(err.value) and "results.json" in str(err.value)


def test_results_json_with_nan_constants_or_too_deep_is_refused(tmp_path):
    path = tmp_path / "results.json"
    path.write_text('{"config": {}, "stages": [{"stage": NaN}]}')
    with pytest.raises(ValueError, match="NaN is not a JSON number"):
        read_results(path)
    path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError, match="not a valid results.json"):
        read_results(path)
