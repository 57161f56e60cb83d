"""Issue 33's mechanics: one server base per experiment, the clients' own recipe, curation on the
server's corpus (``aggregation = distill``), and scoring only what the arrival gain needs."""

import hashlib
import json
import logging
import math
from pathlib import Path

import pytest
import torch
from conftest import EVERY_STAGE, default_run_config
from flwr.app import Context, MessageType, RecordDict
from safetensors.torch import load_file

from meduniverse_flwr import server_app
from meduniverse_flwr.client_app import app as client_app
from meduniverse_flwr.config import ConfigError, RunConfig
from meduniverse_flwr.learn.model import create_backbone
from meduniverse_flwr.server.pretrain.distill import (
    ContinueSettings,
    continue_mim,
    distill_loss,
    identity_adaptors,
    mae_around,
    split_mae_state,
    token_features,
)
from meduniverse_flwr.wire.messages import Instructions
from simulation.inprocess import InProcessGrid


def run(config: dict, num_nodes: int) -> tuple[dict, InProcessGrid]:
    grid = InProcessGrid(client_app, config, num_nodes)
    server_app.main(grid, Context(run_id=3, node_id=0, node_config={}, state=RecordDict(), run_config=config))
    run_dir = Path(config["resume-from"] or Path(config["output-dir"]) / "latest")
    return json.loads((run_dir / "results.json").read_text()), grid


@pytest.fixture
def tiny(data_root, tiny_sites, tmp_path):
    """Three tiny sites, MAE for one epoch, one stage; ``tiny(name, **overrides)`` runs it in-process."""

    def make(name: str, **overrides) -> tuple[dict, InProcessGrid, Path]:
        config = {**default_run_config(), **EVERY_STAGE,
                  "data-root": str(tmp_path / "cache"), "num-stages": 1, "local-epochs": 1,
                  "probe-epochs": 2, "pretrain-epochs": 1, "datasets": ",".join(tiny_sites), "clients-per-stage": 3,
                  "output-dir": str(tmp_path / name)}
        config.update({key.replace("_", "-"): value for key, value in overrides.items()})
        results, grid = run(config, num_nodes=3)
        return results, grid, Path(config["resume-from"] or Path(config["output-dir"]) / "latest").resolve()

    return make


# ----------------------------------------------------------------------- one base per experiment
def test_seeds_of_an_experiment_share_one_base_pretrained_once(tiny, caplog):
    caplog.set_level(logging.INFO, logger="flwr")
    first, _, first_dir = tiny("seed0", seed=0)
    pretrained_first = caplog.text.count("pretrain mae epoch 1/1")
    caplog.clear()
    second, _, second_dir = tiny("seed1", seed=1)
    assert pretrained_first == 1 and "pretrain mae epoch" not in caplog.text  # the second run trains no MAE
    stage0 = [(d / "checkpoints" / "stage-0.safetensors").read_bytes() for d in (first_dir, second_dir)]
    assert stage0[0] == stage0[1]
    assert first["base"]["sha256"] == second["base"]["sha256"] == hashlib.sha256(stage0[0]).hexdigest()
    assert "pretrain-seed 0" in first["base"]["from"]
    # the run seed still matters where it should: what the clients and the scoring do
    assert first["stages"][1]["per_task"] != second["stages"][1]["per_task"]
    third, _, _ = tiny("pseed1", seed=0, pretrain_seed=1, num_stages=0)
    assert third["base"]["sha256"] != first["base"]["sha256"]


def test_a_base_continued_by_mae_is_cached_and_differs(tiny, caplog):
    plain, _, _ = tiny("plain", num_stages=0)
    longer, _, longer_dir = tiny("longer", num_stages=0, pretrain_continue_epochs=1)
    assert longer["base"]["sha256"] != plain["base"]["sha256"]
    assert "continued 1 epochs of MAE" in longer["base"]["from"]
    again, _, _ = tiny("again", num_stages=0, pretrain_continue_epochs=1, seed=5)
    assert again["base"]["sha256"] == longer["base"]["sha256"]
    with pytest.raises(ValueError, match="pretrain-continue-epochs continues MAE"):
        tiny("simmim", num_stages=0, pretrain="simmim", pretrain_continue_epochs=1)


# ------------------------------------------------------------------------ the clients' recipe
def test_client_recipe_changes_the_base_and_not_the_scoring(tiny):
    runs = {lr: tiny(f"lr{lr}", client_lr=lr, client_layer_decay=0.75, client_head_epochs=1)
            for lr in (1e-3, 1e-4)}
    bases = {lr: load_file(d / "checkpoints" / "stage-1.safetensors") for lr, (_, _, d) in runs.items()}
    assert any(not torch.equal(bases[1e-3][k], bases[1e-4][k]) for k in bases[1e-3])

    def sent(grid, kind):
        return [dict(m.content["config"]) for m in grid.pushed if m.metadata.message_type == kind]

    evaluate = {lr: sent(grid, MessageType.EVALUATE) for lr, (_, grid, _) in runs.items()}
    assert evaluate[1e-3] == evaluate[1e-4] and evaluate[1e-3]  # the scoring recipe, unchanged
    assert {(c["lr"], c["layer-decay"], c["head-epochs"]) for c in evaluate[1e-3]} == {(1e-3, 1.0, 0)}
    train = {lr: sent(grid, MessageType.TRAIN) for lr, (_, grid, _) in runs.items()}
    assert {(c["lr"], c["layer-decay"], c["head-epochs"]) for c in train[1e-4]} == {(1e-4, 0.75, 1)}


def test_head_epochs_train_the_head_alone_first(monkeypatch):
    """LP-FT: with head epochs the backbone is frozen in the first fit and trains in the second."""
    from meduniverse_flwr.data.node_task import NodeTask, TaskData
    from meduniverse_flwr.learn import finetune as task
    from meduniverse_flwr.wire.card import TaskCard

    trained = []
    monkeypatch.setattr(task, "fit", lambda model, data, kind, settings, augment=True, term=None: trained.append(
        (settings.epochs, settings.lr, sorted(n for n, p in model.named_parameters() if p.requires_grad))) or 0.0)
    card = TaskCard("t", "x", 3, "multiclass", 8, 8, 8)
    images = torch.zeros(8, 3, 28, 28, dtype=torch.uint8)
    data = TaskData(images, torch.arange(8) % 3)
    model = task.create_model("vit-micro", 28, num_classes=3)
    settings = task.TrainSettings(2, 3e-4, 0.05, 4, 0, torch.device("cpu"), head_epochs=1)
    task.train_on_task("vit-micro", 28, NodeTask(card, data, data, data), model.state_dict(), settings,
                       validate=False)
    (head_epochs, head_lr, head_params), (epochs, lr, params) = trained
    assert (head_epochs, head_lr, epochs, lr) == (1, task.HEAD_LR, 2, 3e-4)
    assert head_params == ["head.bias", "head.weight"]
    assert len(params) == len(list(model.parameters()))  # then the whole model


def test_client_keys_are_checked_in_one_line():
    for key, value, why in (("client-lr", 0.0, "must be > 0"), ("client-layer-decay", 1.5, "must be in"),
                            ("client-head-epochs", -1, "must be >= 0"), ("distill-tokens", "some", "must be one of"),
                            ("eval-tasks", "all", "must be one of"), ("pretrain-seed", -1, "must be >= 0")):
        with pytest.raises(ConfigError, match=f"'{key}' = .*{why}") as err:
            RunConfig.from_run_config({**default_run_config(), key: value})
        assert "\n" not in str(err.value)
    record = dict(Instructions.for_training(RunConfig.with_defaults()).to_record())
    with pytest.raises(ConfigError, match="'head-epochs' = -2"):
        Instructions.from_record({**record, "head-epochs": -2})


# ------------------------------------------------------------------- curation on the server
def test_distill_loss_against_a_hand_computation():
    student = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    teachers = [torch.tensor([[0.0, 1.0], [2.0, 2.0]]), torch.tensor([[1.0, 1.0], [-1.0, 0.0]])]
    adaptors = identity_adaptors(2, 2)
    # teacher 0: cos = 0 and 1 -> distances 1, 0; teacher 1: cos = 1/sqrt2 and -1/sqrt2
    expected = ((1.0 + 0.0) / 2 + ((1 - 1 / math.sqrt(2)) + (1 + 1 / math.sqrt(2))) / 2) / 2
    assert distill_loss(student, teachers, adaptors).item() == pytest.approx(expected)
    with torch.no_grad():  # a rotating adaptor for teacher 0: (x, y) -> (-y, x)
        adaptors[0].weight.copy_(torch.tensor([[0.0, -1.0], [1.0, 0.0]]))
    # teacher 0 now sees (0, 1) and (-1, 1): cos = 1 and 0 -> distances 0, 1
    assert distill_loss(student, teachers, adaptors).item() == pytest.approx(expected)
    tokens = torch.arange(2 * 3 * 2, dtype=torch.float32).reshape(2, 3, 2)
    assert torch.equal(token_features(tokens, "cls"), tokens[:, 0])
    assert torch.equal(token_features(tokens, "mean"), tokens[:, 1:].mean(1))
    assert torch.equal(token_features(tokens, "all"), tokens)


def _mae_and_corpus():
    torch.manual_seed(0)
    backbone = create_backbone("vit-micro", 28).state_dict()
    corpus = torch.randint(0, 256, (24, 3, 28, 28), dtype=torch.uint8)
    return backbone, corpus


def test_weight_zero_is_mae_only_continuation_with_the_same_seed():
    backbone, corpus = _mae_and_corpus()
    teacher = create_backbone("vit-micro", 28)
    results = {}
    for name, teachers, weight in (("none", [], 0.0), ("zero", [teacher], 0.0), ("one", [teacher], 1.0)):
        mim = mae_around("vit-micro", 28, backbone, None, seed=3)
        continue_mim(mim, corpus, teachers, ContinueSettings(epochs=2, lr=1e-3, seed=7, weight=weight, batch_size=8),
                     "cpu")
        results[name] = split_mae_state(mim.state_dict())
    for part in range(2):
        assert all(torch.equal(results["none"][part][k], results["zero"][part][k]) for k in results["none"][part])
    assert any(not torch.equal(results["none"][0][k], results["one"][0][k]) for k in results["none"][0])


def test_the_teachers_pull_the_student_towards_them():
    """Distillation moves the student's class token towards a teacher's, the MAE loss alone does not."""
    backbone, corpus = _mae_and_corpus()
    torch.manual_seed(11)
    teacher = create_backbone("vit-micro", 28)
    x = torch.randn(16, 3, 28, 28)

    def distance(mim):
        with torch.no_grad():
            s, t = mim.encoder.forward_features(x)[:, 0], teacher.forward_features(x)[:, 0]
        return (1 - torch.nn.functional.cosine_similarity(s, t, dim=-1)).mean().item()

    start = distance(mae_around("vit-micro", 28, backbone, None, seed=3))
    moved = {}
    for weight in (0.0, 5.0):
        mim = mae_around("vit-micro", 28, backbone, None, seed=3)
        continue_mim(mim, corpus, [teacher], ContinueSettings(epochs=4, lr=3e-3, seed=1, weight=weight, batch_size=8),
                     "cpu")
        moved[weight] = distance(mim)
    assert moved[5.0] < start and moved[5.0] < moved[0.0]


def test_distill_runs_in_a_federation_and_keeps_its_decoder_on_the_server(tiny):
    results, grid, run_dir = tiny("distill", aggregation="distill", distill_epochs=1, num_stages=2, seed=4)
    stages = results["stages"]
    assert [s["stage"] for s in stages] == [0, 1, 2]
    assert stages[0]["server_seconds"] == 0.0 and all(s["server_seconds"] > 0 for s in stages[1:])
    assert all((run_dir / "checkpoints" / f"stage-{s}.decoder.safetensors").is_file() for s in (1, 2))
    decoder_names = set(load_file(run_dir / "checkpoints" / "stage-1.decoder.safetensors"))
    assert decoder_names and all(not name.startswith("encoder.") for name in decoder_names)
    for message in grid.pushed:  # nothing of the decoder leaves the server
        arrays = message.content["arrays"] if "arrays" in message.content else {}
        assert not any("decoder" in key or "mask_token" in key for key in arrays)
    # stopped after stage 1 and resumed, the same stage 2 (the decoder is read back from the run directory)
    _, _, stopped = tiny("distill-again", aggregation="distill", distill_epochs=1, num_stages=1, seed=4)
    again, _, _ = tiny("distill-resumed", aggregation="distill", distill_epochs=1, num_stages=2, seed=4,
                       resume_from=str(stopped))
    strip = lambda s: {k: v for k, v in s.items() if k not in ("seconds", "server_seconds", "nodes")}
    assert [strip(s) for s in again["stages"]] == [strip(s) for s in stages]


def test_arriving_scores_only_the_next_arrivals(tiny, tiny_sites):
    results, grid, _ = tiny("arriving", schedule="arrival", clients_per_stage=1, num_stages=2, eval_mode="finetune",
                            eval_epochs=1)
    order = [s["participants"][0] for s in results["stages"][1:]]
    scored = [sorted(s["per_task"]) for s in results["stages"]]
    assert len(scored[0]) == 3 and scored[1] == [order[1]] and scored[2] == []
    unseen, _, _ = tiny("unseen", schedule="arrival", clients_per_stage=1, num_stages=2, eval_mode="finetune",
                        eval_epochs=1, eval_tasks="unseen")
    assert [len(s["per_task"]) for s in unseen["stages"]] == [3, 2, 1]
    # the arrival's own score is the same either way (same base, same seeds)
    assert results["stages"][1]["per_task"][order[1]] == unseen["stages"][1]["per_task"][order[1]]
