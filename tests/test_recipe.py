"""MAE's fine-tuning recipe (issue 14): AdamW groups without decay on norms, biases and embeddings,
layer-wise lr decay, and evaluation on a chosen split (val to choose settings, test to report)."""

import dataclasses

import pytest
import torch
from conftest import default_run_config
from torch import nn

from meduniverse_flwr.config import ConfigError, RunConfig
from meduniverse_flwr.data.node_task import NodeTask, TaskData
from meduniverse_flwr.learn import finetune as task_module
from meduniverse_flwr.learn.evaluate import evaluate_base
from meduniverse_flwr.learn.finetune import TrainSettings, fit, param_groups, settings_for
from meduniverse_flwr.learn.model import MODELS, create_backbone, create_model
from meduniverse_flwr.server.strategy.stagewise import StageWise
from meduniverse_flwr.wire.card import TaskCard
from meduniverse_flwr.wire.messages import Instructions

CPU = torch.device("cpu")


def names(groups, decayed):
    return {name for g in groups if (g["weight_decay"] > 0) == decayed for name in g["param_names"]}


@pytest.mark.parametrize("model_name", ["vit-micro", "vit-tiny"])
@pytest.mark.parametrize("layer_decay", [1.0, 0.75])
def test_no_weight_decay_on_exactly_timms_names_norms_and_biases(model_name, layer_decay):
    model = create_model(model_name, 28, num_classes=5)
    params = dict(model.named_parameters())
    groups = param_groups(model, 0.05, 1e-3, layer_decay)
    expected = {n for n, p in params.items() if n in model.no_weight_decay() or p.ndim == 1}
    assert {"cls_token", "pos_embed", "norm.weight", "norm.bias", "head.bias", "blocks.0.norm1.weight",
            "blocks.0.attn.qkv.bias", "patch_embed.proj.bias"} <= expected
    assert names(groups, decayed=False) == expected
    assert names(groups, decayed=True) == set(params) - expected
    assert all(g["weight_decay"] in (0.0, 0.05) for g in groups)
    assert {"head.weight", "blocks.0.attn.qkv.weight", "patch_embed.proj.weight"} <= names(groups, decayed=True)


@pytest.mark.parametrize("model_name", ["vit-micro", "vit-tiny"])
def test_layer_wise_lr_follows_the_mae_formula(model_name):
    decay, lr = 0.65, 2e-3
    depth = MODELS[model_name].depth
    model = create_model(model_name, 28, num_classes=3)
    lr_of = {name: g["lr"] for g in param_groups(model, 0.05, lr, decay) for name in g["param_names"]}
    for name in lr_of:
        if name.startswith("head.") or name.startswith("norm."):
            want = lr
        elif name.startswith("blocks."):
            want = lr * decay ** (depth - int(name.split(".")[1]))
        else:
            assert name in ("cls_token", "pos_embed") or name.startswith("patch_embed.")
            want = lr * decay ** (depth + 1)
        assert lr_of[name] == pytest.approx(want, rel=1e-12), name
    assert lr_of["blocks.0.mlp.fc1.weight"] < lr_of[f"blocks.{depth - 1}.mlp.fc1.weight"] < lr_of["head.weight"]


def test_the_groups_hold_every_parameter_once_and_decay_one_means_one_lr():
    model = create_model("vit-micro", 28, num_classes=4)
    for decay in (1.0, 0.5):
        groups = param_groups(model, 0.05, 1e-3, decay)
        grouped = [p for g in groups for p in g["params"]]
        assert len(grouped) == len({id(p) for p in grouped})
        assert {id(p) for p in grouped} == {id(p) for p in model.parameters()}
        assert all(len(g["params"]) == len(g["param_names"]) for g in groups)
    plain = param_groups(model, 0.05, 1e-3, 1.0)
    assert len(plain) == 2 and {g["lr"] for g in plain} == {1e-3}  # decayed / not decayed, one lr
    frozen = create_backbone("vit-micro", 28)
    frozen.pos_embed.requires_grad_(False)
    assert "pos_embed" not in {n for g in param_groups(frozen, 0.05, 1e-3) for n in g["param_names"]}


def test_a_linear_probe_head_gets_groups_too():
    head = nn.Linear(8, 3)  # no no_weight_decay(), no blocks
    groups = param_groups(head, 0.05, 1e-2, 0.5)
    assert names(groups, decayed=True) == {"weight"} and names(groups, decayed=False) == {"bias"}
    assert {g["lr"] for g in groups} == {1e-2}


def test_fit_optimises_with_the_groups(monkeypatch):
    seen = []

    class Recording(torch.optim.AdamW):
        def __init__(self, params, *args, **kwargs):
            super().__init__(params, *args, **kwargs)
            seen.append(self)

    monkeypatch.setattr(task_module.torch.optim, "AdamW", Recording)
    model = create_model("vit-micro", 28, num_classes=2)
    data = TaskData(torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8), torch.tensor([0, 1, 0, 1]))
    fit(model, data, "multiclass", TrainSettings(1, 1e-3, 0.05, 4, 0, CPU, layer_decay=0.5))
    (optimizer,) = seen
    want = param_groups(model, 0.05, 1e-3, 0.5)
    assert [g["param_names"] for g in optimizer.param_groups] == [g["param_names"] for g in want]
    assert [g["weight_decay"] for g in optimizer.param_groups] == [g["weight_decay"] for g in want]
    assert [g["initial_lr"] for g in optimizer.param_groups] == pytest.approx([g["lr"] for g in want])


# ----------------------------------------------------------------------------------- eval-split
def split(seed, n=12):
    generator = torch.Generator().manual_seed(seed)
    return TaskData(torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=generator),
                    torch.arange(n) % 3)


class Unread:
    """A split that fails the test if anything of it is read."""

    def __len__(self):
        raise AssertionError("the test split was read")

    def __getattr__(self, name):
        raise AssertionError(f"the test split was read ({name})")


def node_task(val, test):
    return NodeTask(TaskCard("toy", "ct", 3, "multiclass", 12, 12, 12), split(0, 24), val, test)


@pytest.mark.parametrize("mode", ["linear-probe", "finetune"])
def test_eval_split_val_scores_on_val_and_never_reads_test(mode):
    backbone = create_backbone("vit-micro", 28).state_dict()
    settings = TrainSettings(1, 1e-3, 0.05, 8, 0, CPU)
    val, test = split(1), split(2, n=9)

    on_test = evaluate_base("vit-micro", 28, node_task(val, test), backbone, mode, settings)
    on_val = evaluate_base("vit-micro", 28, node_task(val, test), backbone, mode,
                           dataclasses.replace(settings, eval_split="val"))
    assert on_test["n-scored"] == 9 and on_val["n-scored"] == 12
    assert on_val["loss"] != on_test["loss"]
    # the same numbers as scoring that very split as the test split
    assert on_val == evaluate_base("vit-micro", 28, node_task(test, val), backbone, mode, settings)
    # with val, the test split is never touched
    assert on_val == evaluate_base("vit-micro", 28, node_task(val, Unread()), backbone, mode,
                                   dataclasses.replace(settings, eval_split="val"))


# ----------------------------------------------------------------------------------- the keys
def test_the_new_keys_travel_to_the_nodes():
    """Scoring gets ``layer-decay``, training the clients' own ``client-layer-decay``; both the split."""
    config = RunConfig.with_defaults(layer_decay=0.65, client_layer_decay=0.75, eval_split="val")
    strategy = StageWise(config)
    for sent, decay in ((strategy.train_instructions, 0.75), (strategy.evaluate_instructions, 0.65)):
        record = sent.to_record()
        assert record["layer-decay"] == decay and record["eval-split"] == "val"
        settings = settings_for(Instructions.from_record(record))
        assert settings.layer_decay == decay and settings.eval_split == "val"
    defaults = RunConfig.with_defaults()
    assert (defaults.layer_decay, defaults.eval_split) == (1.0, "test")


@pytest.mark.parametrize(
    "override, message",
    [
        ({"layer-decay": 0.0}, "'layer-decay' = 0.0: must be in \\(0, 1\\]"),
        ({"layer-decay": 1.5}, "'layer-decay' = 1.5: must be in \\(0, 1\\]"),
        ({"layer-decay": -0.5}, "'layer-decay'"),
        ({"layer-decay": "0.75"}, "'layer-decay' must be a number"),
        ({"eval-split": "train"}, "'eval-split' = 'train': must be one of \\('test', 'val'\\)"),
        ({"eval-split": 1}, "'eval-split' must be a string"),
    ],
)
def test_bad_values_of_the_new_keys_fail_with_one_line(override, message):
    with pytest.raises(ConfigError, match=message) as err:
        RunConfig.from_run_config({**default_run_config(), **override})
    assert "\n" not in str(err.value)


def test_a_message_with_a_bad_value_is_refused_in_one_line():
    record = dict(StageWise(RunConfig.with_defaults()).train_instructions.to_record())
    for key, value in (("layer-decay", 2.0), ("eval-split", "train")):
        with pytest.raises(ConfigError, match=f"'{key}'") as err:
            Instructions.from_record({**record, key: value})
        assert "\n" not in str(err.value)
