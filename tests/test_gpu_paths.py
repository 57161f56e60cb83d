"""The GPU code paths, run where CI runs them: on the CPU (CUDA-only branches are exercised by
benchmarks/gpu_throughput.py on a GPU; its results are in benchmarks/README.md)."""

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from conftest import ROOT
from meduniverse_flwr.data import TaskData
from meduniverse_flwr.model import create_model
from meduniverse_flwr.pretrain import PretrainSettings, pretrain
from meduniverse_flwr.task import TrainSettings, fit, predict, resolve_device
from simulation.experiment import federation_config, register


def data(n=48, size=28, classes=3):
    rng = np.random.default_rng(0)
    return TaskData(torch.from_numpy(rng.integers(0, 256, (n, 1, size, size), dtype=np.uint8)),
                    torch.from_numpy(rng.integers(0, classes, n)))


def test_auto_picks_the_cpu_here_and_cuda_without_a_gpu_is_one_line():
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ValueError, match="device 'cuda': no CUDA device on this machine") as err:
        resolve_device("cuda")
    assert "\n" not in str(err.value)


def test_data_moved_to_the_device_once_give_the_same_training():
    """fit moves the whole split to the device before the loop; on the CPU that is the old loop exactly."""
    torch.manual_seed(0)
    model = create_model("vit-micro", 28, num_classes=3)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    loss = fit(model, data(), "multiclass", TrainSettings(1, 1e-3, 0.05, 16, 0, torch.device("cpu")))
    again = create_model("vit-micro", 28, num_classes=3)
    again.load_state_dict(state)
    assert fit(again, data(), "multiclass", TrainSettings(1, 1e-3, 0.05, 16, 0, torch.device("cpu"))) == loss
    out = predict(model, data().images, 7, torch.device("cpu"))  # batches of 7: the last one short
    assert out.shape == (48, 3) and out.device.type == "cpu"


def test_compile_wraps_the_model_and_trains(monkeypatch):
    compiled = []
    real_compile = torch.compile

    def spy(model, **kwargs):  # dynamo traces the model as on a GPU; the eager backend keeps CI fast
        compiled.append(model)
        return real_compile(model, backend="eager")

    monkeypatch.setattr(torch, "compile", spy)
    torch.manual_seed(0)
    model = create_model("vit-micro", 28, num_classes=3)
    loss = fit(model, data(), "multiclass", TrainSettings(1, 1e-3, 0.05, 16, 0, torch.device("cpu"), compile=True))
    assert compiled == [model] and np.isfinite(loss)


def test_pretraining_with_the_bf16_setting_runs_on_the_cpu(tmp_path):
    images = data(64).images.expand(-1, 3, -1, -1)
    on = pretrain("vit-micro", 28, images, PretrainSettings(epochs=1, batch_size=32), tmp_path / "on", "cpu")
    off = pretrain("vit-micro", 28, images, PretrainSettings(epochs=1, batch_size=32, bf16=False), tmp_path / "off",
                   "cpu")
    assert on.losses == off.losses  # autocast is CUDA-only: the CPU computes in fp32 either way


def test_a_gpu_share_per_simulated_node_reaches_the_federation_config():
    register()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        cfg = compose(config_name="config", overrides=["federation.gpus_per_node=0.25", "device=cuda"])
    assert federation_config(cfg) == "num-supernodes=4 client-resources-num-cpus=1 client-resources-num-gpus=0.25"
