"""FedProx: the proximal term against a hand computation, its gradient, and mu = 0 as stage-wise."""

import pytest
import torch
from conftest import default_run_config, write_medmnist
from torch import nn

from meduniverse_flwr.config import RunConfig
from meduniverse_flwr.data.node_task import load_node_task
from meduniverse_flwr.data.options import DataOptions
from meduniverse_flwr.learn.fedprox import proximal_term
from meduniverse_flwr.learn.finetune import TrainSettings, train_on_task
from meduniverse_flwr.learn.model import create_model
from meduniverse_flwr.wire.messages import Instructions


@pytest.fixture(scope="module")
def tiny_task(tmp_path_factory):
    root = tmp_path_factory.mktemp("fedprox")
    path = write_medmnist(root, "pneumoniamnist", n=(32, 8, 8))
    return load_node_task(f"medmnist:{path}", 0, 1, DataOptions("medmnist", str(root), 28))


class TinyModel(nn.Module):
    """A backbone parameter and a head, named as a timm ViT's are."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.Linear(2, 2, bias=False)
        self.head = nn.Linear(2, 1, bias=False)


def test_the_term_is_half_mu_times_the_squared_distance_of_the_backbone_from_what_it_received():
    model = TinyModel()
    with torch.no_grad():
        model.blocks.weight.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
        model.head.weight.copy_(torch.tensor([[5.0, 6.0]]))
    term = proximal_term(model, proximal_mu=0.5)
    assert term().item() == 0.0  # as received
    with torch.no_grad():
        model.blocks.weight.add_(torch.tensor([[1.0, 0.0], [0.0, -2.0]]))
        model.head.weight.add_(100.0)  # the site's own head: never pulled back
    assert term().item() == 0.5 / 2 * (1.0 ** 2 + 2.0 ** 2)  # 1.25
    term().backward()
    # d/dw (mu/2) ||w - w0||^2 = mu (w - w0)
    assert torch.equal(model.blocks.weight.grad, 0.5 * torch.tensor([[1.0, 0.0], [0.0, -2.0]]))
    assert model.head.weight.grad is None


def test_the_strategy_sends_its_term_and_mu_and_a_node_reads_them_back():
    config = RunConfig.from_run_config({**default_run_config(), "strategy": "fedprox", "proximal-mu": 0.25})
    sent = Instructions.for_training(config)
    assert sent.node_term == "proximal" and sent.term_settings == (("proximal-mu", 0.25),)
    record = sent.to_record()
    assert record["node-term"] == "proximal" and record["proximal-mu"] == 0.25
    assert Instructions.from_record(record) == sent
    plain = Instructions.for_training(RunConfig.from_run_config(default_run_config()))
    assert plain.node_term == "" and "proximal-mu" not in plain.to_record()


def test_mu_zero_trains_exactly_what_stagewise_trains(tiny_task):
    torch.manual_seed(0)
    state = create_model("vit-micro", 28, num_classes=tiny_task.card.n_classes).state_dict()
    settings = TrainSettings(1, 1e-3, 0.05, 16, 3, torch.device("cpu"))
    plain = train_on_task("vit-micro", 28, tiny_task, state, settings, validate=False)[0]
    zero = train_on_task("vit-micro", 28, tiny_task, state,
                         TrainSettings(1, 1e-3, 0.05, 16, 3, torch.device("cpu"), node_term="proximal",
                                       term_settings=(("proximal-mu", 0.0),)), validate=False)[0]
    pulled = train_on_task("vit-micro", 28, tiny_task, state,
                           TrainSettings(1, 1e-3, 0.05, 16, 3, torch.device("cpu"), node_term="proximal",
                                         term_settings=(("proximal-mu", 100.0),)), validate=False)[0]
    assert all(torch.equal(plain[name], zero[name]) for name in plain)

    def distance(backbone):
        return sum((backbone[name] - state[name]).pow(2).sum().item() for name in backbone)

    assert distance(pulled) < distance(plain)  # a strong pull keeps the backbone nearer the base
