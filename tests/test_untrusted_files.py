"""The pretraining cache is read as untrusted data: never unpickled, validated before use."""

import json
import logging
import math
import pathlib
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from meduniverse_flwr.server.pretrain import PretrainSettings, pretrain

SETTINGS = PretrainSettings(epochs=2, batch_size=8, warmup_epochs=1)


def tiny_corpus(n=16):
    return torch.randint(0, 256, (n, 3, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


class PlantedPickle:
    """What an attacker would leave as ``state.pt``: unpickling it creates ``marker``."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


def test_a_planted_state_pt_is_never_unpickled(tmp_path, caplog):
    out, marker = tmp_path / "pretrain", tmp_path / "code-ran"
    out.mkdir()
    torch.save(PlantedPickle(marker), out / "state.pt")
    with caplog.at_level(logging.WARNING, logger="flwr"):
        result = pretrain("vit-micro", 28, tiny_corpus(), PretrainSettings(epochs=1, batch_size=8), out, device="cpu")
    assert not marker.exists()
    assert result.encoder_path.is_file() and len(result.losses) == 1
    assert "ignoring" in caplog.text and "state.pt" in caplog.text


@pytest.fixture(scope="module")
def killed_after_one_epoch(tmp_path_factory):
    """A genuine resume state: epoch 1 of 2."""
    out = tmp_path_factory.mktemp("killed")

    def kill(epoch, loss):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pretrain("vit-micro", 28, tiny_corpus(), SETTINGS, out, device="cpu", on_epoch_end=kill)
    return out


def set_pos_embed_shape(tensors, progress):
    tensors["model/encoder.pos_embed"] = torch.zeros(1, 10, 96)


def put_nan_in_optimizer(tensors, progress):
    tensors["optimizer/0/exp_avg"].view(-1)[0] = math.nan


def make_step_int(tensors, progress):
    tensors["optimizer/0/step"] = tensors["optimizer/0/step"].long()


def make_epoch_a_string(tensors, progress):
    progress["epoch"] = "1"


def claim_epoch_beyond_range(tensors, progress):
    progress.update(epoch=3, losses=[1.0] * 3, images_per_second=[1.0] * 3)


def claim_an_epoch_the_tensors_have_not_done(tensors, progress):
    progress.update(epoch=2, losses=[1.0] * 2, images_per_second=[1.0] * 2)


def put_nan_in_losses(tensors, progress):
    progress["losses"] = [math.nan]


def make_key_a_list(tensors, progress):
    progress["key"] = []


@pytest.mark.parametrize("tamper, error", [
    (set_pos_embed_shape, r"state\.safetensors: does not fit the model: shape/dtype .*encoder\.pos_embed"),
    (put_nan_in_optimizer, r"state\.safetensors: non-finite values in \['optimizer/0/exp_avg'\]"),
    (make_step_int, r"state\.safetensors: does not fit the model: .*optimizer/0/step.*int64"),
    (make_epoch_a_string, r"state\.json: epoch '1' is not an integer in 1\.\.2"),
    (claim_epoch_beyond_range, r"state\.json: epoch 3 is not an integer in 1\.\.2"),
    (claim_an_epoch_the_tensors_have_not_done, r"state\.safetensors: optimizer steps \[2\.0\] do not match epoch 2"),
    (put_nan_in_losses, r"state\.json: 'losses' is not a list of 1 finite numbers"),
    (make_key_a_list, r"state\.json: 'key' is not an object"),
])
def test_a_tampered_resume_state_is_refused_in_one_line(killed_after_one_epoch, tmp_path, tamper, error):
    out = shutil.copytree(killed_after_one_epoch, tmp_path / "out")
    tensors = load_file(out / "state.safetensors")
    progress = json.loads((out / "state.json").read_text())
    tamper(tensors, progress)
    save_file(tensors, out / "state.safetensors")
    (out / "state.json").write_text(json.dumps(progress))
    with pytest.raises(ValueError, match=error) as err:
        pretrain("vit-micro", 28, tiny_corpus(), SETTINGS, out, device="cpu")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("damage, error", [
    (lambda out: (out / "state.json").write_text("{not json"), r"state\.json: cannot read"),
    (lambda out: (out / "state.safetensors").unlink(), r"state\.safetensors: cannot read"),
])
def test_an_unreadable_resume_state_is_refused_in_one_line(killed_after_one_epoch, tmp_path, damage, error):
    out = shutil.copytree(killed_after_one_epoch, tmp_path / "out")
    damage(out)
    with pytest.raises(ValueError, match=error) as err:
        pretrain("vit-micro", 28, tiny_corpus(), SETTINGS, out, device="cpu")
    assert "\n" not in str(err.value)
