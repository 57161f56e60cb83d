"""The GPU code paths, tested on whatever machine runs the suite, a CPU-only CI runner or a CUDA box.

- Each assertion that depends on the machine branches on ``torch.cuda.is_available()``. The ``machine``
  fixture runs it three times: as this machine, as one without CUDA and as one with CUDA
  (``torch.cuda.is_available`` patched), so both branches of every such assertion run everywhere.
  A patched CUDA machine is asked only what needs no GPU: which device ``auto`` picks, what
  ``cuda`` resolves to, and the autocast context ``task.autocast`` builds (inspected, not entered).
- fit, predict and pretrain move the data and the model to the device they are given: spies on
  ``Tensor.to`` / ``Module.to`` see each move, with ``cpu:0`` as the device (a device object that
  is not ``torch.device("cpu")``, so a move to a hard-coded or auto-picked device shows, but the CPU
  runs it).
- A tiny fit and one pretraining epoch run on the machine's own device (``auto``): real CUDA
  under bf16 autocast where a GPU is present, the CPU in fp32 elsewhere; hooks check the dtype
  each forward pass computed in.

benchmarks/gpu_throughput.py measures what the CUDA paths buy on a GPU (results in benchmarks/README.md).
"""

from contextlib import nullcontext

import numpy as np
import pytest
import torch
from conftest import ROOT
from hydra import compose, initialize_config_dir
from torch import nn

from meduniverse_flwr.data.node_task import TaskData
from meduniverse_flwr.learn.finetune import TrainSettings, autocast, fit, predict, resolve_device
from meduniverse_flwr.learn.model import create_model
from meduniverse_flwr.server.pretrain import PretrainSettings, engine, pretrain
from simulation.experiment import federation_config, register

HAS_CUDA = torch.cuda.is_available()  # this machine, before any test patches it
DEVICE = resolve_device("auto")  # this machine's device: the one the real runs below use
GIVEN = torch.device("cpu", 0)  # a device to hand fit / predict / pretrain: not torch.device("cpu"), run by the CPU
MACHINES = {"this machine": None, "a machine without CUDA": False, "a CUDA machine": True}


def data(n=48, size=28, classes=3):
    rng = np.random.default_rng(0)
    return TaskData(torch.from_numpy(rng.integers(0, 256, (n, 1, size, size), dtype=np.uint8)),
                    torch.from_numpy(rng.integers(0, classes, n)))


@pytest.fixture(params=list(MACHINES))
def machine(request, monkeypatch):
    """Whether the test runs as a CUDA machine: this machine's answer, or a patched one."""
    cuda = MACHINES[request.param]
    if cuda is not None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        if cuda and not HAS_CUDA:  # what a bf16-capable GPU (Ampere or later) answers; asking needs a GPU
            monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    return torch.cuda.is_available()


def test_the_machine_fixture_runs_both_branches_and_this_machine_as_it_is(machine, request):
    assert machine == {None: HAS_CUDA, False: False, True: True}[MACHINES[request.node.callspec.params["machine"]]]


def test_auto_follows_the_machine_and_cuda_without_a_gpu_is_one_line(machine):
    if machine:
        assert resolve_device("auto") == torch.device("cuda")
        assert resolve_device("cuda") == torch.device("cuda")
    else:
        assert resolve_device("auto") == torch.device("cpu")
        with pytest.raises(ValueError, match="device 'cuda': no CUDA device on this machine") as err:
            resolve_device("cuda")
        assert "\n" not in str(err.value)
    assert resolve_device("cpu") == torch.device("cpu")  # asked for by name, the CPU is always there


def test_autocast_is_bf16_on_cuda_and_nothing_on_the_cpu(machine):
    on_cpu = autocast(torch.device("cpu"))
    assert isinstance(on_cpu, nullcontext)
    with on_cpu:  # full precision: CPU bf16 matmuls are slower
        assert not torch.is_autocast_enabled("cpu") and (torch.ones(4, 4) @ torch.ones(4, 4)).dtype == torch.float32
    if machine:  # only a CUDA device reaches autocast with type "cuda" (resolve_device refuses it elsewhere)
        on_cuda = autocast(torch.device("cuda"))
        assert isinstance(on_cuda, torch.autocast)
        assert on_cuda.device == "cuda" and on_cuda.fast_dtype == torch.bfloat16 and on_cuda._enabled
        if HAS_CUDA:  # entering it needs a GPU
            a = torch.ones(4, 4, device="cuda")
            with on_cuda:
                assert torch.is_autocast_enabled("cuda") and (a @ a).dtype == torch.bfloat16
            assert (a @ a).dtype == torch.float32  # and it ends with the block


def device_of(args, kwargs):
    """The device a ``.to(...)`` call asks for, None for a dtype-only one."""
    for arg in (kwargs.get("device"), *args):
        if isinstance(arg, torch.device | str):
            return torch.device(arg)
    return None


@pytest.fixture
def moves(monkeypatch):
    """Every ``.to`` of a tensor or module as (object, device asked for); the moves still happen."""
    seen = []
    tensor_to, module_to = torch.Tensor.to, nn.Module.to

    def spy(real):
        def to(self, *args, **kwargs):
            seen.append((self, device_of(args, kwargs)))
            return real(self, *args, **kwargs)
        return to

    monkeypatch.setattr(torch.Tensor, "to", spy(tensor_to))
    monkeypatch.setattr(nn.Module, "to", spy(module_to))
    return seen


def devices_asked(moves, obj):
    return [device for moved, device in moves if moved is obj]


def kinds_asked(moves):
    """The device types all ``.to`` calls asked for (a move to ``x.device`` names plain ``cpu``, not ``cpu:0``)."""
    return {device.type for _, device in moves if device is not None}


def test_fit_moves_the_model_and_the_whole_split_to_the_device_given_once(moves):
    torch.manual_seed(0)
    model, split = create_model("vit-micro", 28, num_classes=3), data(20)
    assert np.isfinite(fit(model, split, "multiclass", TrainSettings(1, 1e-3, 0.05, 16, 0, GIVEN)))  # 2 batches
    assert devices_asked(moves, model) == [GIVEN]
    assert devices_asked(moves, split.images) == [GIVEN] and devices_asked(moves, split.labels) == [GIVEN]
    assert kinds_asked(moves) == {"cpu"}  # nothing goes to another kind of device (e.g. a hard-coded cuda)


def test_predict_moves_the_model_and_all_images_once_and_returns_them_on_the_host(moves):
    model, images = create_model("vit-micro", 28, num_classes=3), data(16).images
    out = predict(model, images, 7, GIVEN)  # batches of 7: the last one short
    assert devices_asked(moves, model) == [GIVEN] and devices_asked(moves, images) == [GIVEN]  # not per batch
    assert kinds_asked(moves) == {"cpu"}
    assert out.shape == (16, 3) and out.device == torch.device("cpu")


def test_pretrain_moves_the_model_and_the_corpus_to_the_device_given_once(moves, tmp_path):
    images = data(16).images.expand(-1, 3, -1, -1)
    pretrain("vit-micro", 28, images, PretrainSettings(epochs=1, batch_size=16), tmp_path, str(GIVEN))
    assert [device for moved, device in moves if isinstance(moved, engine.MaskedImageModel)] == [GIVEN]
    assert devices_asked(moves, images) == [GIVEN]
    assert kinds_asked(moves) == {"cpu"}


def training_dtypes(module):
    """The dtypes ``module``'s forward passes compute in while it trains."""
    dtypes = []
    module.register_forward_hook(lambda m, args, out: dtypes.append(out.dtype) if m.training else None)
    return dtypes


def test_a_tiny_fit_runs_on_this_machines_device():
    """On a GPU: real CUDA, the steps in bf16; on a CPU: the CPU in fp32. Either way on the device, loss finite."""
    torch.manual_seed(0)
    model = create_model("vit-micro", 28, num_classes=3)
    dtypes = training_dtypes(model.head)
    loss = fit(model, data(), "multiclass", TrainSettings(1, 1e-3, 0.05, 16, 0, DEVICE))
    assert np.isfinite(loss) and dtypes
    assert set(dtypes) == {torch.bfloat16 if HAS_CUDA else torch.float32}
    assert {p.device.type for p in model.parameters()} == {DEVICE.type} == {"cuda" if HAS_CUDA else "cpu"}
    out = predict(model, data().images, 7, DEVICE)
    assert out.shape == (48, 3) and out.device == torch.device("cpu") and out.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_a_pretraining_epoch_runs_in_bf16_on_cuda_and_in_fp32_on_the_cpu(tmp_path, monkeypatch):
    dtypes = {}

    def hooked(encoder, settings):  # the MIM model pretrain builds, its first linear layer watched
        mim = build_mim(encoder, settings)
        dtypes[settings.bf16] = training_dtypes(mim.encoder.blocks[0].attn.qkv)
        return mim

    build_mim = engine.build_mim
    monkeypatch.setattr(engine, "build_mim", hooked)
    images = data(64).images.expand(-1, 3, -1, -1)
    on = pretrain("vit-micro", 28, images, PretrainSettings(epochs=1, batch_size=32), tmp_path / "on", "auto")
    off = pretrain("vit-micro", 28, images, PretrainSettings(epochs=1, batch_size=32, bf16=False), tmp_path / "off",
                   "auto")
    assert np.isfinite(on.losses).all() and np.isfinite(off.losses).all() and on.encoder_path.is_file()
    assert set(dtypes[True]) == {torch.bfloat16 if HAS_CUDA else torch.float32}
    assert set(dtypes[False]) == {torch.float32}  # bf16=False: full precision on every device
    if not HAS_CUDA:
        assert on.losses == off.losses  # autocast is CUDA-only: the CPU computes in fp32 either way


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


def test_a_gpu_share_per_simulated_node_reaches_the_federation_config():
    register()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        cfg = compose(config_name="config", overrides=["federation.gpus_per_node=0.25", "device=cuda"])
    assert federation_config(cfg) == "num-supernodes=4 client-resources-num-cpus=1 client-resources-num-gpus=0.25"
