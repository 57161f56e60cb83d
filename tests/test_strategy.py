"""StageWise driving the real ClientApp handlers in-process (no Ray, no SuperLink)."""

import functools
import json
import logging
import re
from uuid import uuid4

import numpy as np
import pytest
import torch
from conftest import EVERY_STAGE, TINY_FLAGS, default_run_config, write_medmnist
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID

from meduniverse_flwr import server_app
from meduniverse_flwr.client_app import app as client_app
from meduniverse_flwr.config import RunConfig
from meduniverse_flwr.learn.model import create_backbone
from meduniverse_flwr.registry import STRATEGIES
from meduniverse_flwr.server.results import stage_entry
from meduniverse_flwr.server.strategy.stagewise import StageFailed, StageWise
from meduniverse_flwr.server_app import build_strategy
from meduniverse_flwr.wire.card import TaskCard
from meduniverse_flwr.wire.messages import pack, to_numpy, unpack
from simulation.inprocess import InProcessGrid, act_as_server


def run_federation(config: dict, num_nodes: int, tamper=None) -> tuple[dict, InProcessGrid]:
    grid = InProcessGrid(client_app, config, num_nodes, tamper)
    server_app.main(grid, Context(run_id=7, node_id=0, node_config={}, state=RecordDict(), run_config=config))
    with open(f"{config['output-dir']}/latest/results.json") as handle:
        return json.load(handle), grid


def without_seconds(stages):
    """Stages minus wall-clock times (the stage's and each node's)."""
    return [{**{k: v for k, v in stage.items() if k != "seconds"},
             "nodes": [{k: v for k, v in node.items() if k != "seconds"} for node in stage["nodes"]]}
            for stage in stages]


@pytest.fixture(scope="module")
def two_runs(data_root, tiny_sites, tmp_path_factory):
    """The every-stage settings (MAE-pretrained base, one stage) on three tiny sites, twice with the same seed."""
    results = []
    for attempt in range(2):
        config = {**default_run_config(), **EVERY_STAGE,
                  "data-root": str(data_root), "num-stages": 1, "local-epochs": 1,
                  "probe-epochs": 3, "pretrain-epochs": 1, "datasets": ",".join(tiny_sites), "clients-per-stage": 3,
                  "output-dir": str(tmp_path_factory.mktemp(f"run{attempt}"))}
        results.append(run_federation(config, num_nodes=3))
    return results


def test_results_follow_the_contract(two_runs):
    (results, grid), _ = two_runs
    assert [s["stage"] for s in results["stages"]] == [0, 1]
    stage0, stage1 = results["stages"]
    assert stage0["participants"] == [] and len(stage1["participants"]) == 3
    assert set(stage1["per_task"]) == set(TINY_FLAGS)
    for metrics in stage1["per_task"].values():
        assert 0 <= metrics["accuracy"] <= 1 and 0 <= metrics["auc"] <= 1
        assert metrics["n_scored"] > 0 and metrics["split"] == "test" and metrics["held_out"] is False
    assert stage1["mean_accuracy"] == pytest.approx(np.mean([m["accuracy"] for m in stage1["per_task"].values()]))
    assert stage1["bytes_up"] > 0 and stage1["bytes_down"] > stage1["bytes_up"]
    assert results["summary"]["accuracy_gain"][0] == 0.0
    assert results["summary"]["accuracy_gain"][1] == pytest.approx(stage1["mean_accuracy"] - stage0["mean_accuracy"])
    assert results["config"]["num-stages"] == 1


def test_each_node_gets_the_base_plus_a_head_sized_to_its_card(two_runs):
    (_, grid), _ = two_runs
    train_messages = [m for m in grid.pushed if m.metadata.message_type == "train"]
    assert len(train_messages) == 3
    base_keys = set(create_backbone("vit-micro", 28).state_dict())
    head_rows = set()
    for message in train_messages:
        arrays = unpack(message.content.array_records["arrays"], "fp32")
        assert set(arrays) == base_keys | {"head.weight", "head.bias"}
        head_rows.add(arrays["head.weight"].shape[0])
    assert head_rows == {2, 8, 11}  # binary pneumonia, 8 blood cell types, 11 organs


def test_same_seed_gives_identical_stages(two_runs):
    (first, _), (second, _) = two_runs
    assert without_seconds(first["stages"]) == without_seconds(second["stages"])


def test_a_bad_node_is_rejected_and_the_stage_completes(run_config, tiny_sites, caplog):
    def poison(reply: Message) -> Message:
        if reply.metadata.message_type == "train":
            arrays = unpack(reply.content.array_records["arrays"], "fp32")
            arrays["cls_token"][:] = np.nan
            reply.content.array_records["arrays"] = pack(arrays, "fp32")
        return reply

    # all 3 nodes asked (ceil(1.5 x K)), K = 2 valid replies end the stage
    config = run_config(datasets=",".join(tiny_sites), clients_per_stage=2, oversample=1.5)
    with caplog.at_level(logging.WARNING, logger="flwr"):
        results, _ = run_federation(config, num_nodes=3, tamper={1002: poison})
    stage1 = results["stages"][1]
    assert stage1["participants"] == ["bloodmnist", "pneumoniamnist"]
    assert len(stage1["rejected"]) == 1 and "'cls_token' contains NaN or Inf" in stage1["rejected"][0]
    assert "rejected: 'cls_token' contains NaN" in caplog.text


class _Stage:
    """A StageWise strategy mid-stage, with train messages to two fake nodes."""

    def __init__(self, **settings):
        act_as_server()
        torch.manual_seed(0)  # every _Stage starts from the same base
        self.base = create_backbone("vit-micro", 28).state_dict()
        self.strategy = StageWise(RunConfig.with_defaults(**{**EVERY_STAGE,
                                                             "datasets": "a,b", "clients_per_stage": 2, **settings}))
        self.strategy.cards = {1: TaskCard("a", "CT", 2, "binary", 10, 5, 5), 2: TaskCard("b", "MR", 3, "multiclass", 30, 5, 5)}
        self.messages = {}
        for message in self.strategy.configure_train(1, ArrayRecord(self.base), ConfigRecord(), grid=None):
            message.metadata.__dict__["_message_id"] = str(uuid4())
            self.messages[message.metadata.dst_node_id] = message

    def reply(self, node, arrays=None, metrics=None, transport_dtype=None, to=None):
        arrays = {k: v.numpy() for k, v in self.base.items()} if arrays is None else arrays
        metrics = {"num-examples": 10} if metrics is None else metrics
        record = (ArrayRecord({k: Array(v) for k, v in arrays.items()}) if transport_dtype is None
                  else pack(arrays, transport_dtype))
        content = RecordDict({"arrays": record, "metrics": MetricRecord(metrics)})
        return Message(content, reply_to=to or self.messages[node])


def test_a_folded_reply_is_freed_when_dropped_not_by_the_cycle_collector():
    """The server holds one reply at a time: reading a reply must not tie it into a reference cycle
    (Flower's typed views ``content.array_records`` do), which only the cyclic collector frees; peak
    server memory then grew with K (benchmarks/README.md)."""
    import gc
    import weakref

    stage = _Stage()
    reply = stage.reply(1, transport_dtype="fp32")
    packed = weakref.ref(next(iter(reply.content["arrays"].values())))
    gc.disable()
    try:
        assert stage.strategy.accept_train_reply(reply)
        del reply
        assert packed() is None
    finally:
        gc.enable()


@pytest.mark.parametrize(
    "fault, reason",
    [
        (lambda a, m: a.update({"pos_embed": np.zeros((1, 3, 96), np.float32)}), "shape"),
        (lambda a, m: a.pop("norm.weight"), "missing keys"),
        (lambda a, m: a.update({"head.weight": np.zeros((2, 96), np.float32)}), "unexpected keys"),
        (lambda a, m: a["blocks.0.attn.qkv.weight"].__setitem__((0, 0), np.nan), "NaN"),
        (lambda a, m: m.update({"num-examples": 0}), "num-examples is 0"),
        (lambda a, m: m.update({"num-examples": -5.0}), "num-examples is -5.0"),
        (lambda a, m: m.pop("num-examples"), "num-examples is None"),
        (lambda a, m: m.update({"num-examples": [1, 2]}), "num-examples is [1, 2]"),
    ],
)
def test_faulty_replies_leave_the_aggregate_untouched(fault, reason):
    stage = _Stage()
    arrays, metrics = {k: v.numpy().copy() for k, v in stage.base.items()}, {"num-examples": 10}
    fault(arrays, metrics)
    assert not stage.strategy.accept_train_reply(stage.reply(1, arrays, metrics))
    assert reason in stage.strategy.outcome.rejected[0]
    assert stage.strategy._running.count == 0
    assert stage.strategy.accept_train_reply(stage.reply(2, metrics={"num-examples": 10, "train-loss": [0.1]}))
    new_base, metrics_out = stage.strategy.finish_stage(1)
    assert metrics_out["replies"] == 1
    np.testing.assert_array_equal(to_numpy(new_base)["cls_token"], stage.base["cls_token"].numpy())


def test_error_replies_and_strangers_are_rejected():
    stage = _Stage()
    error_reply = Message(Error(code=0, reason="data file missing"), reply_to=stage.messages[1])
    assert not stage.strategy.accept_train_reply(error_reply)
    assert "data file missing" in stage.strategy.outcome.rejected[0]
    stranger = stage.reply(2)
    stranger.metadata.__dict__["_src_node_id"] = 99
    assert not stage.strategy.accept_train_reply(stranger)
    assert "not asked to train" in stage.strategy.outcome.rejected[1]


def test_a_reply_without_its_records_is_rejected_naming_each_missing_one():
    stage = _Stage()
    no_metrics = stage.reply(1)
    del no_metrics.content["metrics"]
    empty = Message(RecordDict({}), reply_to=stage.messages[2])
    assert not stage.strategy.accept_train_reply(no_metrics) and not stage.strategy.accept_train_reply(empty)
    assert stage.strategy.outcome.rejected == ["node 1: reply lacks the 'metrics' record",
                                               "node 2: reply lacks the 'arrays' and 'metrics' records"]


def test_an_error_reply_from_the_superlink_counts_for_the_node_it_was_sent_to():
    stage = _Stage()
    unavailable = Message(Error(code=0, reason="Node unavailable"), reply_to=stage.messages[2])
    unavailable.metadata.__dict__["_src_node_id"] = SUPERLINK_NODE_ID  # as Flower sends it for a dead node
    assert not stage.strategy.accept_train_reply(unavailable)
    assert stage.strategy.outcome.rejected == ["node 2: error reply (Node unavailable)"]


@pytest.mark.parametrize("name", STRATEGIES)
def test_flowers_own_start_drives_every_strategy_or_it_says_why_not(name, run_config, tiny_sites):
    config = {**run_config(datasets=",".join(tiny_sites[:2])), "strategy": name, "clients-per-stage": 2}
    grid = InProcessGrid(client_app, config, num_nodes=2)
    strategy = build_strategy(RunConfig.from_run_config(config))
    base = ArrayRecord(create_backbone("vit-micro", 28).state_dict())
    # Flower's config records override the strategy's instructions key by key
    start = functools.partial(strategy.start, grid, base, num_rounds=1, train_config=ConfigRecord({"epochs": 1}),
                              evaluate_config=ConfigRecord({"epochs": 2}))
    if name in ("cyclic", "centralized"):
        with pytest.raises(NotImplementedError, match=f"strategy '{name}' cannot run under Flower's "
                                                      r"Strategy.start\(\): .*; run it with the MedUniverse ServerApp"):
            start()
        return
    result = start()
    assert set(result.arrays) == set(base)
    moved = not np.array_equal(result.arrays["cls_token"].numpy(), base["cls_token"].numpy())
    assert moved == (name != "local")  # local never changes the server's base
    assert set(result.evaluate_metrics_clientapp[1]) == {"pneumoniamnist/accuracy", "bloodmnist/accuracy"}


def test_held_out_tasks_never_train_but_are_evaluated():
    stage = _Stage(held_out="b")
    assert set(stage.messages) == {1}  # no train message for the held-out task
    evaluate = list(stage.strategy.configure_evaluate(1, ArrayRecord(stage.base), ConfigRecord(), grid=None))
    assert sorted(m.metadata.dst_node_id for m in evaluate) == [1, 2]
    replies = []
    for message, accuracy in zip(evaluate, (0.5, 0.9)):
        message.metadata.__dict__["_message_id"] = str(uuid4())
        metrics = MetricRecord({"accuracy": accuracy, "auc": 0.7, "n-scored": 5, "loss": 1.0})
        replies.append(Message(RecordDict({"metrics": metrics}), reply_to=message))
    stage.strategy.aggregate_evaluate(1, replies)
    entry = stage_entry(1, stage.strategy.take_outcome(), 1.0)
    assert entry["per_task"]["b"]["held_out"] is True and entry["per_task"]["a"]["held_out"] is False
    assert entry["mean_accuracy"] == 0.5 and entry["mean_accuracy_held_out"] == 0.9


def test_a_node_silent_at_evaluation_is_named_and_its_task_reported_missing(caplog):
    stage = _Stage()
    evaluate = list(stage.strategy.configure_evaluate(1, ArrayRecord(stage.base), ConfigRecord(), grid=None))
    evaluate[0].metadata.__dict__["_message_id"] = str(uuid4())
    metrics = MetricRecord({"accuracy": 0.5, "auc": 0.7, "n-scored": 5, "loss": 1.0})
    with caplog.at_level(logging.WARNING, logger="flwr"):
        stage.strategy.aggregate_evaluate(1, [Message(RecordDict({"metrics": metrics}), reply_to=evaluate[0])])
    outcome = stage.strategy.take_outcome()
    assert outcome.per_task["b"] == {"accuracy": None, "auc": None, "n_scored": 0, "split": "test",
                                     "held_out": False, "missing": "node 2: no reply"}
    assert stage_entry(1, outcome, 1.0)["mean_accuracy"] is None  # not a mean over fewer tasks
    assert "stage 1 evaluation: no reply before the timeout from nodes 2 (b)" in caplog.text


def test_bf16_transport_halves_the_bytes_both_ways():
    fp32, bf16 = _Stage(), _Stage(transport_dtype="bf16")
    assert {array.dtype for array in bf16.messages[1].content.array_records["arrays"].values()} == {"uint16"}
    assert 2 * bf16.strategy.outcome.bytes_down == pytest.approx(fp32.strategy.outcome.bytes_down, rel=0.01)
    assert not bf16.strategy.accept_train_reply(bf16.reply(1))  # a float32 reply breaks the agreed encoding
    assert "arrived as float32, expected uint16" in bf16.strategy.outcome.rejected[0]
    assert bf16.strategy.accept_train_reply(bf16.reply(2, transport_dtype="bf16"))
    assert fp32.strategy.accept_train_reply(fp32.reply(2))
    assert 2 * bf16.strategy.outcome.bytes_up == pytest.approx(fp32.strategy.outcome.bytes_up, rel=0.01)
    new_base, _ = bf16.strategy.finish_stage(1)
    assert to_numpy(new_base)["cls_token"].dtype == np.float32  # the server's base stays full precision


class ReplyingGrid:
    """Answers each train message with a fixed backbone, one reply per pull; ``silent`` nodes never answer."""

    def __init__(self, stage, updates=None, silent=()):
        self.stage, self.pending, self.updates, self.silent = stage, {}, updates, set(silent)

    def push_messages(self, messages):
        for message in messages:
            message.metadata.__dict__["_message_id"] = str(uuid4())
            self.pending[message.metadata.message_id] = message
        return list(self.pending)

    def pull_messages(self, ids):
        for message_id in list(ids):
            message = self.pending.get(message_id)
            if message is not None and message.metadata.dst_node_id not in self.silent:
                del self.pending[message_id]
                node = message.metadata.dst_node_id
                arrays = None if self.updates is None else self.updates[node]
                return [self.stage.reply(node, arrays, {"num-examples": [10, 30][node - 1]}, to=message)]
        return []


def test_streaming_stage_equals_batch_aggregation_exactly():
    """run_train_stage (pull and fold one by one) == aggregate_train over the same replies."""
    rng = np.random.default_rng(0)

    streaming, batch = _Stage(), _Stage()
    updates = {node: {k: (v.numpy() + rng.normal(scale=0.001, size=v.shape)).astype(np.float32)
                      for k, v in streaming.base.items()} for node in (1, 2)}
    streamed, _ = streaming.strategy.run_train_stage(ReplyingGrid(streaming, updates), 1,
                                                     ArrayRecord(streaming.base), ConfigRecord())
    batched, _ = batch.strategy.aggregate_train(1, [batch.reply(n, updates[n], {"num-examples": [10, 30][n - 1]})
                                                   for n in (1, 2)])
    for name in streaming.base:
        np.testing.assert_array_equal(to_numpy(streamed)[name], to_numpy(batched)[name])
    assert streaming.strategy.take_outcome().participants == ["a", "b"]
    expected = 0.25 * updates[1]["cls_token"].astype(np.float64) + 0.75 * updates[2]["cls_token"]
    np.testing.assert_allclose(to_numpy(streamed)["cls_token"], expected, rtol=1e-6)


class KilledAfterStage(InProcessGrid):
    """The ServerApp process 'dies' when it starts training stage ``stage``."""

    def __init__(self, *args, stage, **kwargs):
        super().__init__(*args, **kwargs)
        self.stage = stage

    def push_messages(self, messages):
        messages = list(messages)
        if any(m.metadata.group_id == f"stage-{self.stage}" for m in messages):
            raise KeyboardInterrupt("killed")
        return super().push_messages(messages)


@pytest.mark.parametrize("dp", ["off", "site"])
def test_a_killed_run_resumes_to_the_same_results(dp, run_config, tiny_sites, tmp_path):
    """With site-level DP too: the server's noise repeats with the seed, and the resumed run's epsilon
    goes on from the privacy its finished stages spent (replayed from results.json)."""
    straight = run_config(num_stages=2, output_dir=str(tmp_path / "straight"),
                          datasets=",".join(tiny_sites[:2]), clients_per_stage=2, dp=dp,
                          aggregation="mean" if dp == "site" else "weighted")
    expected, _ = run_federation(straight, num_nodes=2)

    killed = {**straight, "output-dir": str(tmp_path / "killed")}
    grid = KilledAfterStage(client_app, killed, 2, stage=2)
    with pytest.raises(KeyboardInterrupt):
        server_app.main(grid, Context(run_id=8, node_id=0, node_config={}, state=RecordDict(), run_config=killed))
    assert not (tmp_path / "killed" / "latest").exists()  # a run that did not complete never takes it
    (run_dir,) = (tmp_path / "killed").glob("*-run8")
    assert [s["stage"] for s in json.loads((run_dir / "results.json").read_text())["stages"]] == [0, 1]

    resumed, grid = run_federation({**killed, "resume-from": str(run_dir)}, num_nodes=2)
    assert without_seconds(resumed["stages"]) == without_seconds(expected["stages"])
    assert not any(m.metadata.group_id == "stage-1" for m in grid.pushed)  # stage 1 was not redone
    assert (run_dir / "checkpoints" / "stage-2.safetensors").is_file()
    if dp == "site":
        assert 0 < resumed["stages"][1]["epsilon"] < resumed["stages"][2]["epsilon"]


def test_resume_refuses_other_settings(run_config, tiny_sites, tmp_path):
    first = run_config(num_stages=1, datasets=",".join(tiny_sites[:2]), clients_per_stage=2)
    run_federation(first, num_nodes=2)
    run_dir = str((tmp_path / "outputs" / "latest").resolve())
    with pytest.raises(ValueError, match=r"results.json was made with other settings: seed 0 -> 1") as err:
        run_federation({**first, "seed": 1, "num-stages": 2, "resume-from": run_dir}, num_nodes=2)
    assert "\n" not in str(err.value)


def test_a_silent_node_ends_the_stage_by_timeout_and_is_named(caplog):
    stage = _Stage(stage_timeout=0.3)
    with caplog.at_level(logging.INFO, logger="flwr"):
        new_base, metrics = stage.strategy.run_train_stage(ReplyingGrid(stage, silent={2}), 1,
                                                           ArrayRecord(stage.base), ConfigRecord())
    assert metrics["replies"] == 1 and new_base is not None
    assert "timed out after 0s; no reply from nodes 2 (b)" in caplog.text


def test_too_few_replies_fail_the_stage_with_a_reason():
    stage = _Stage(stage_timeout=0.2, min_replies=2)
    with pytest.raises(StageFailed, match="stage 1: 1 valid replies, fewer than min-replies=2"):
        stage.strategy.run_train_stage(ReplyingGrid(stage, silent={2}), 1, ArrayRecord(stage.base), ConfigRecord())


def test_k_replies_end_the_stage_and_oversampling_asks_more_nodes(caplog):
    stage = _Stage(clients_per_stage=1, oversample=2.0)
    assert set(stage.messages) == {1, 2}  # ceil(2.0 x 1) = 2 nodes asked
    with caplog.at_level(logging.INFO, logger="flwr"):
        _, metrics = stage.strategy.run_train_stage(ReplyingGrid(stage), 1, ArrayRecord(stage.base), ConfigRecord())
    assert metrics["replies"] == 1
    assert re.search(r"K=1 replies in; late replies from (1 \(a\)|2 \(b\)) are dropped", caplog.text)
    sampled = _Stage(clients_per_stage=1)  # oversample 1: one of the two nodes, seeded
    assert len(sampled.messages) == 1 and set(sampled.messages) == set(_Stage(clients_per_stage=1).messages)


def test_the_log_has_a_line_for_every_reply_and_every_pretraining_epoch(run_config, caplog, tmp_path):
    sites = ",".join(f"medmnist:{write_medmnist(tmp_path, flag, n=(32, 8, 8))}" for flag in ("bloodmnist", "pathmnist"))
    config = run_config(num_stages=2, pretrain="mae", pretrain_epochs=2, datasets=sites, clients_per_stage=2,
                        probe_epochs=1, data_root=str(tmp_path))
    with caplog.at_level(logging.INFO, logger="flwr"):
        run_federation(config, num_nodes=2)
    for stage in (1, 2):
        assert re.search(rf"stage {stage}: asked 2 node\(s\) to train: 1000 \(bloodmnist\), 1001 \(pathmnist\)",
                         caplog.text)
        for count in (1, 2):
            assert re.search(rf"stage {stage}: reply {count}/2 from node 100[01] \(\S+\) accepted: train loss [0-9.]+, "
                             rf"val accuracy [0-9.]+, update [0-9.]+ x base; \d+s elapsed", caplog.text)
    for stage in (0, 1, 2):
        assert len(re.findall(rf"stage {stage} evaluation: node 100[01] \(\S+\) scores accuracy", caplog.text)) == 2
    for epoch in (1, 2):
        assert re.search(rf"pretrain mae epoch {epoch}/2: loss [0-9.]+, \d+ images/s, ETA \d+s", caplog.text)
