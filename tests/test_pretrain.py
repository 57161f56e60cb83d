import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from meduniverse_flwr.config import RunConfig
from meduniverse_flwr.learn.model import create_backbone, save_backbone
from meduniverse_flwr.server.pretrain import MAE, PretrainSettings, patchify, pretrain, random_masking, unpatchify
from meduniverse_flwr.server.pretrain.base import initial_base


def test_masking_is_seeded_exact_and_consistent():
    visible, mask = random_masking(8, 49, 0.75, torch.Generator().manual_seed(3))
    assert visible.shape == (8, 12)  # round(0.75 * 49) = 37 masked, 12 visible
    assert (mask.sum(1) == 37).all()
    for row in range(8):
        assert not mask[row, visible[row]].any()  # visible indices are exactly the unmasked ones
        assert torch.equal(visible[row], visible[row].sort().values)
    again, _ = random_masking(8, 49, 0.75, torch.Generator().manual_seed(3))
    other, _ = random_masking(8, 49, 0.75, torch.Generator().manual_seed(4))
    assert torch.equal(visible, again) and not torch.equal(visible, other)
    with pytest.raises(ValueError, match="no visible patch"):
        random_masking(1, 4, 0.99, torch.Generator())


def test_patchify_round_trip():
    x = torch.randn(2, 3, 28, 28)
    patches = patchify(x, 4)
    assert patches.shape == (2, 49, 48)
    assert torch.equal(patches[0, 1], x[0, :, 0:4, 4:8].permute(1, 2, 0).reshape(-1))
    assert torch.equal(unpatchify(patches, 4), x)


def test_mae_encoder_never_sees_masked_patches():
    torch.manual_seed(0)
    mae = MAE(create_backbone("vit-micro", 28)).eval()
    images = torch.randn(2, 3, 28, 28)
    visible, mask = random_masking(2, 49, 0.75, torch.Generator().manual_seed(0))
    tampered = unpatchify(torch.where(mask[..., None], torch.randn(2, 49, 48) * 5, patchify(images, 4)), 4)
    with torch.no_grad():
        out = mae.encode_visible(images, visible)
        out_tampered = mae.encode_visible(tampered, visible)
    assert out.shape == (2, 1 + 12, 96)
    torch.testing.assert_close(out, out_tampered)


def synthetic_corpus(n=192, size=28, seed=0):
    """Smooth blobs and stripes: structure a masked model can learn to fill in."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    images = []
    for _ in range(n):
        cx, cy, freq = rng.uniform(0.2, 0.8, 2).tolist() + [rng.uniform(2, 6)]
        blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / 0.05)
        stripes = 0.5 + 0.5 * np.sin(2 * np.pi * freq * (xx + yy))
        images.append(np.stack([blob, stripes, 0.5 * (blob + stripes)]) * 255)
    return torch.from_numpy(np.asarray(images)).round().byte()


@pytest.mark.parametrize("method", ["mae", "simmim"])
def test_loss_decreases_and_export_loads_strictly_into_timm(method, tmp_path):
    settings = PretrainSettings(method=method, epochs=6, batch_size=32, warmup_epochs=1)
    result = pretrain("vit-micro", 28, synthetic_corpus(), settings, tmp_path, device="cpu")
    assert result.losses[-1] < 0.8 * result.losses[0]
    outcome = create_backbone("vit-micro", 28).load_state_dict(load_file(result.encoder_path), strict=True)
    assert not outcome.missing_keys and not outcome.unexpected_keys
    assert (tmp_path / "reconstruction.png").stat().st_size > 5_000


def test_a_killed_pretraining_resumes_to_the_same_weights(tmp_path):
    settings = PretrainSettings(epochs=3, batch_size=64, warmup_epochs=1)
    corpus = synthetic_corpus(128)
    straight = pretrain("vit-micro", 28, corpus, settings, tmp_path / "straight", device="cpu")

    def kill_after_two(epoch, loss):
        if epoch == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pretrain("vit-micro", 28, corpus, settings, tmp_path / "killed", device="cpu", on_epoch_end=kill_after_two)
    assert json.loads((tmp_path / "killed" / "state.json").read_text())["epoch"] == 2
    resumed = pretrain("vit-micro", 28, corpus, settings, tmp_path / "killed", device="cpu")
    assert resumed.losses == straight.losses
    a, b = load_file(straight.encoder_path), load_file(resumed.encoder_path)
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="state.json: made with other settings.*epochs: 3 -> 4"):
        pretrain("vit-micro", 28, corpus, PretrainSettings(epochs=4, batch_size=64, warmup_epochs=1),
                 tmp_path / "killed", device="cpu")


def test_server_base_from_a_checkpoint_and_clear_errors(tmp_path, run_config):
    good = create_backbone("vit-micro", 28).state_dict()
    path = tmp_path / "encoder.safetensors"
    save_backbone(path, good, {})
    base = initial_base(RunConfig.from_run_config(run_config(pretrain=str(path)))).backbone
    assert all(torch.equal(base[k], good[k]) for k in good)

    wrong = tmp_path / "tiny.safetensors"
    save_backbone(wrong, create_backbone("vit-tiny", 28).state_dict(), {})
    with pytest.raises(ValueError, match=r"tiny.safetensors: width 192, depth 12: the model '96 wide, 6 deep' "
                                         r"needs the same") as err:
        initial_base(RunConfig.from_run_config(run_config(pretrain=str(wrong))))
    assert "\n" not in str(err.value)
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x00" * 16)
    with pytest.raises(ValueError, match="corrupt.safetensors: cannot read"):
        initial_base(RunConfig.from_run_config(run_config(pretrain=str(corrupt))))
