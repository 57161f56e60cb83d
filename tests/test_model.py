import pytest
import torch

from meduniverse_flwr.learn.model import (
    MODELS,
    create_backbone,
    create_model,
    load_backbone,
    merge_state,
    new_head_state,
    save_backbone,
    split_state,
)


@pytest.mark.parametrize("name, image_size", [("vit-micro", 28), ("vit-tiny", 28), ("vit-small", 64), ("vit-base", 224)])
def test_every_model_builds_for_its_image_size(name, image_size):
    model = create_model(name, image_size, num_classes=5)
    assert model.embed_dim == MODELS[name].embed_dim
    if name == "vit-micro":  # forward only on the small one, to keep the suite fast
        assert model(torch.zeros(2, 3, image_size, image_size)).shape == (2, 5)


def test_split_and_merge_round_trip():
    state = create_model("vit-micro", 28, num_classes=3).state_dict()
    backbone, head = split_state(state)
    assert set(head) == {"head.weight", "head.bias"}
    assert not any(k.startswith("head.") for k in backbone)
    merged = merge_state(backbone, head)
    assert merged.keys() == state.keys()
    # the backbone is exactly the timm model with num_classes=0: strict load, nothing missing
    result = create_backbone("vit-micro", 28).load_state_dict(backbone, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    with pytest.raises(ValueError, match="share keys"):
        merge_state(state, head)


def test_heads_are_seeded_and_sized():
    a, b, c = new_head_state(96, 4, seed=1), new_head_state(96, 4, seed=1), new_head_state(96, 4, seed=2)
    assert a["head.weight"].shape == (4, 96) and a["head.bias"].shape == (4,)
    assert torch.equal(a["head.weight"], b["head.weight"])
    assert not torch.equal(a["head.weight"], c["head.weight"])
    assert a["head.weight"].abs().max() <= 96 ** -0.5


def test_checkpoint_round_trip_and_mismatch_errors(tmp_path):
    backbone = create_backbone("vit-micro", 28).state_dict()
    path = tmp_path / "stage-1.safetensors"
    save_backbone(path, backbone, {"model": "vit-micro"})
    fresh = create_backbone("vit-micro", 28)
    load_backbone(path, fresh)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in backbone.items())

    with pytest.raises(ValueError, match=r"stage-1.safetensors: does not fit the model: shape") as err:
        load_backbone(path, create_backbone("vit-micro", 64))  # other patch grid -> pos_embed shape
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="does not fit the model: missing"):
        load_backbone(path, create_backbone("vit-tiny", 28))
    bad = tmp_path / "corrupt.safetensors"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="corrupt.safetensors: cannot read"):
        load_backbone(bad, fresh)


@pytest.mark.parametrize("tamper, error", [
    (lambda t: t.round().int(), r"not float16/bfloat16/float32/float64: \['cls_token torch.int32'\]"),
    (lambda t: t.to(torch.float8_e4m3fn), r"not float16/.*: \['cls_token torch.float8_e4m3fn'\]"),
    (lambda t: t.index_fill(-1, torch.tensor([0]), float("nan")), r"non-finite values in \['cls_token'\]"),
    (lambda t: t.index_fill(-1, torch.tensor([0]), float("inf")), r"non-finite values in \['cls_token'\]"),
])
def test_a_checkpoint_with_bad_values_is_refused_in_one_line(tmp_path, tamper, error):
    backbone = create_backbone("vit-micro", 28).state_dict()
    path = tmp_path / "planted.safetensors"
    save_backbone(path, {**backbone, "cls_token": tamper(backbone["cls_token"])}, {})
    fresh = create_backbone("vit-micro", 28)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(ValueError, match=r"planted.safetensors: " + error) as err:
        load_backbone(path, fresh)
    assert "\n" not in str(err.value)
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())  # nothing loaded


def test_unknown_model_and_bad_patch_grid():
    with pytest.raises(ValueError, match="unknown"):
        create_model("vit-giant", 28)
    with pytest.raises(ValueError, match="not a multiple"):
        create_model("vit-micro", 30)
