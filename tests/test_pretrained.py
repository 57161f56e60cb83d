"""A public ViT as the stage-0 base (model.load_pretrained), training augmentation (augment.py) and the
input scaling a checkpoint expects (input-norm), each the same in pretraining, fine-tuning and evaluation."""

import json
import math

import pytest
import timm
import torch
from conftest import EVERY_STAGE, default_run_config
from flwr.app import Context, RecordDict
from safetensors.torch import load_file, save_file
from test_hydra import compose_run_config

from meduniverse_flwr import server_app
from meduniverse_flwr.client_app import app as client_app
from meduniverse_flwr.config import ConfigError, RunConfig
from meduniverse_flwr.learn.augment import augmentation_for, augmented, random_resized_crop
from meduniverse_flwr.learn.finetune import to_input
from meduniverse_flwr.learn.model import create_backbone, embed_dim, fit_checkpoint, load_pretrained
from meduniverse_flwr.registry import INPUT_NORMS
from meduniverse_flwr.server.pretrain.base import initial_base
from simulation.inprocess import InProcessGrid


def timm_backbone(tmp_path, name="vit_tiny_patch16_224", **kwargs):
    """A random timm ViT saved as its backbone (no head): the layout of timm's and MAE's checkpoints."""
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    path = tmp_path / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def test_a_federation_starts_from_a_timm_vit_of_another_patch_and_image_size(tmp_path, tiny_sites):
    path = timm_backbone(tmp_path)  # 224 px, patch 16: 14 x 14 positions
    config = {**default_run_config(), **EVERY_STAGE,
              "datasets": ",".join(tiny_sites[:2]), "model": "vit-tiny", "image-size": 28,
              "pretrain": str(path), "num-stages": 1, "clients-per-stage": 2, "local-epochs": 1, "probe-epochs": 1,
              "batch-size": 16, "data-root": str(tmp_path / "cache"), "output-dir": str(tmp_path / "out")}
    server_app.main(InProcessGrid(client_app, config, 2),
                    Context(run_id=9, node_id=0, node_config={}, state=RecordDict(), run_config=config))
    results = json.loads((tmp_path / "out" / "latest" / "results.json").read_text())
    assert [s["stage"] for s in results["stages"]] == [0, 1] and len(results["stages"][1]["participants"]) == 2
    model = create_backbone("vit-tiny", 28)  # patch 4 at 28 px: 7 x 7 positions
    fitted, adapted = fit_checkpoint(load_file(str(path)), model)
    assert adapted == ["patch 16 resampled to 4", "position grid 14x14 resampled to 7x7"]
    stage0 = load_file(str(tmp_path / "out" / "latest" / "checkpoints" / "stage-0.safetensors"))
    assert stage0.keys() == fitted.keys() and all(torch.equal(stage0[k], fitted[k]) for k in fitted)
    assert stage0["pos_embed"].shape == (1, 50, 192) and stage0["patch_embed.proj.weight"].shape == (192, 3, 4, 4)


def test_head_decoder_and_one_channel_are_adapted(tmp_path):
    torch.manual_seed(0)
    source = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=5, in_chans=1).state_dict()
    source |= {"mask_token": torch.zeros(1, 1, 192), "decoder_embed.weight": torch.zeros(8, 192)}
    fitted, adapted = fit_checkpoint(source, create_backbone("vit-tiny", 32))
    assert adapted[:2] == ["dropped 4 head / decoder keys", "1 input channel repeated to 3"]
    assert torch.allclose(fitted["patch_embed.proj.weight"].sum(1), fitted["patch_embed.proj.weight"][:, 0] * 3)
    assert not [k for k in fitted if k.startswith(("head.", "decoder_", "mask_token"))]


@pytest.mark.parametrize("name, message", [
    ("vit_small_patch16_224", "width 384, depth 12: the model '192 wide, 12 deep' needs the same"),
    ("vit_tiny_patch16_224", "width 192, depth 6: the model '192 wide, 12 deep' needs the same"),
])
def test_a_checkpoint_of_another_width_or_depth_is_refused_in_one_line(tmp_path, name, message):
    kwargs = {"depth": 6} if "tiny" in name else {}
    path = timm_backbone(tmp_path, name, **kwargs)
    with pytest.raises(ValueError) as err:
        load_pretrained(path, create_backbone("vit-tiny", 28))
    assert str(err.value) == f"checkpoint {path}: {message} (patch and image size may differ)"


def test_what_is_left_after_fitting_must_fit_exactly(tmp_path):
    state = load_file(str(timm_backbone(tmp_path)))
    state["blocks.0.extra"] = torch.zeros(3)
    save_file(state, str(tmp_path / "extra.safetensors"))
    with pytest.raises(ValueError, match=r"does not fit the model: unexpected \['blocks.0.extra'\]"):
        load_pretrained(tmp_path / "extra.safetensors", create_backbone("vit-tiny", 28))


# ------------------------------------------------------------------ augmentation
def ramps(n=64, size=64):
    """Images whose value is the column index: a crop's output is a ramp of slope = the box's width share."""
    return torch.arange(size, dtype=torch.float32).expand(n, 3, size, size).clone()


def test_random_resized_crop_zooms_into_a_box_of_the_declared_area_and_ratio():
    out = random_resized_crop(ramps(), torch.Generator().manual_seed(0))
    slopes = (out[:, 0, :, 1:] - out[:, 0, :, :-1]).mean((1, 2))
    assert out.shape == (64, 3, 64, 64)
    # area share in [0.08, 1] and ratio in [3/4, 4/3]: width share in [sqrt(0.08 * 3/4), 1]
    assert slopes.min() >= math.sqrt(0.08 * 3 / 4) - 1e-4 and slopes.max() <= 1 + 1e-4
    assert slopes.std() > 0.1  # every image its own box
    assert (out >= 0).all() and (out <= 63).all()  # nothing from outside the image


def test_the_recipe_is_seeded_and_auto_crops_only_from_64_px():
    x = ramps(8)
    first, again = (augmented(x, "crop-flip", torch.Generator().manual_seed(3)) for _ in range(2))
    assert torch.equal(first, again)
    flipped = augmented(x, "flip", torch.Generator().manual_seed(3))
    slopes = (flipped[:, 0, :, 1:] - flipped[:, 0, :, :-1]).mean((1, 2))
    assert set(slopes.tolist()) == {1.0, -1.0}  # flipped or not, never resized
    assert [augmentation_for("auto", size) for size in (28, 63, 64, 224)] == ["flip", "flip", "crop-flip", "crop-flip"]
    assert augmentation_for("flip", 224) == "flip"


# ------------------------------------------------------------------ input scaling
def test_input_norms_scale_per_channel_and_the_default_is_the_old_one():
    gray = torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8)
    assert torch.equal(to_input(gray, torch.device("cpu")), gray.float().mul_(2.0 / 255.0).sub_(1.0).expand(-1, 3, -1, -1))
    mean, std = (torch.tensor(v)[:, None, None] for v in INPUT_NORMS["imagenet"])
    expected = (gray.float().expand(-1, 3, -1, -1) / 255 - mean) / std
    assert torch.allclose(to_input(gray, torch.device("cpu"), "imagenet"), expected, atol=1e-6)


def test_a_timm_architecture_name_is_a_model_at_the_federations_sizes(tmp_path):
    path = timm_backbone(tmp_path)
    config = RunConfig.with_defaults(model="vit_tiny_patch16_224", image_size=28, pretrain=str(path))
    base = initial_base(config).backbone
    fitted, _ = fit_checkpoint(load_file(str(path)), create_backbone("vit_tiny_patch16_224", 28))
    assert base.keys() == fitted.keys() and all(torch.equal(base[k], fitted[k]) for k in fitted)
    assert base["patch_embed.proj.weight"].shape == (192, 3, 4, 4) and embed_dim("vit_tiny_patch16_224") == 192
    with pytest.raises(ValueError, match="not a ViT with one class token and no register tokens"):
        create_backbone("vit_small_patch14_reg4_dinov2", 28)
    with pytest.raises(ConfigError, match=r"'model' = 'resnet50': must be one of .* or a timm ViT name \(vit_...\)"):
        RunConfig.with_defaults(model="resnet50")


def test_the_public_mae_preset_runs_on_cpu_from_a_tiny_timm_vit_in_the_same_layout(tmp_path, tiny_sites):
    """conf/experiment/arrival-mae-vitb-gpu.yaml with a random vit_tiny_patch16_224 file in place of the
    converted MAE ViT-B/16 (same layout: 224 px, patch 16), at 64 px on two tiny sites: resampled, cropped
    and ImageNet-scaled end to end."""
    path = timm_backbone(tmp_path)
    config = compose_run_config("+experiment=arrival-mae-vitb-gpu", f"pretrain={path}",
                                "image_size=64", f"datasets=[{','.join(tiny_sites[:2])}]",
                                "num_stages=2", "clients_per_stage=1", "local_epochs=1", "eval_epochs=1", "eval_labels=0", "batch_size=16",
                                f"data_root={tmp_path / 'cache'}")
    config |= {"output-dir": str(tmp_path / "out"), "model": "vit-tiny"}  # the file's width (the preset's is vit-base)
    assert (config["augment"], config["input-norm"], config["schedule"]) == ("crop-flip", "imagenet", "arrival")
    server_app.main(InProcessGrid(client_app, config, 2),
                    Context(run_id=11, node_id=0, node_config={}, state=RecordDict(), run_config=config))
    results = json.loads((tmp_path / "out" / "latest" / "results.json").read_text())
    assert [s["stage"] for s in results["stages"]] == [0, 1, 2]
    assert all(task["accuracy"] is not None for s in results["stages"] for task in s["per_task"].values())
    stage0 = load_file(str(tmp_path / "out" / "latest" / "checkpoints" / "stage-0.safetensors"))
    assert torch.equal(stage0["pos_embed"], fit_checkpoint(load_file(str(path)), create_backbone("vit-tiny", 64))[0]["pos_embed"])
