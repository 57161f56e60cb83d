import pickle

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from timm.models.vision_transformer import VisionTransformer

from meduniverse_flwr.learn.model import create_backbone, load_backbone
from meduniverse_flwr.tools.convert import convert_state, main

DECODER = {"mask_token": (1, 1, 32), "decoder_embed.weight": (32, 64), "decoder_blocks.0.norm1.weight": (32,),
           "decoder_pred.weight": (768, 32), "decoder_pos_embed": (1, 5, 32)}


def tiny_vit(**kwargs) -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(img_size=32, patch_size=16, embed_dim=64, depth=2, num_heads=2, **kwargs)


def our_vit() -> VisionTransformer:
    """What the converter checks against: heads = 64 // 64 = 1."""
    return VisionTransformer(img_size=32, patch_size=16, embed_dim=64, depth=2, num_heads=1, num_classes=0,
                             global_pool="avg", fc_norm=False)


def mae_checkpoint() -> tuple[dict, dict[str, torch.Tensor]]:
    backbone = tiny_vit(num_classes=0).state_dict()
    state = {**backbone, **{k: torch.randn(shape) for k, shape in DECODER.items()}}
    return {"model": state, "epoch": 5}, backbone


def convert(tmp_path, checkpoint, capsys=None) -> tuple[int, str, str]:
    source = tmp_path / "in.pth"
    if checkpoint is not None:
        torch.save(checkpoint, source)
    rc = main([str(source), str(tmp_path / "out.safetensors")])
    out, err = capsys.readouterr() if capsys else ("", "")
    return rc, out, err


def test_mae_checkpoint_converts_to_a_strict_backbone(tmp_path, capsys):
    checkpoint, backbone = mae_checkpoint()
    rc, out, err = convert(tmp_path, checkpoint, capsys)
    assert rc == 0 and not err
    assert out.strip() == (f"{tmp_path / 'out.safetensors'}: ViT depth 2, width 64, patch 16, 5 position tokens "
                           "(from in.pth['model']); dropped 5 keys (decoder)")
    converted = load_file(str(tmp_path / "out.safetensors"))
    assert not set(DECODER) & set(converted)
    assert converted.keys() == backbone.keys()
    for key, tensor in backbone.items():
        assert converted[key].dtype == torch.float32 and converted[key].is_contiguous()
        assert torch.equal(converted[key], tensor), key
    result = our_vit().load_state_dict(converted, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    with safe_open(str(tmp_path / "out.safetensors"), "pt") as handle:
        assert handle.metadata() == {"format": "pt", "source": "in.pth", "converted-by": "meduniverse_flwr.tools.convert"}
    assert [p.name for p in tmp_path.iterdir()] and not list(tmp_path.glob(".*tmp*"))  # no temporary left behind


def test_converted_base_loads_into_the_federation_model(tmp_path):
    torch.manual_seed(1)
    backbone = create_backbone("vit-micro", 28).state_dict()  # width 96, depth 6, patch 4 at 28 px
    assert convert(tmp_path, {"model": {**backbone, "mask_token": torch.zeros(1, 1, 96)}})[0] == 0
    model = create_backbone("vit-micro", 28)
    load_backbone(tmp_path / "out.safetensors", model)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in backbone.items())


def test_module_prefix_and_finetuned_layout_are_mapped(tmp_path, capsys):
    # MAE fine-tuned (global_pool) layout: fc_norm instead of norm, and a classifier head
    finetuned = tiny_vit(num_classes=3, global_pool="avg", fc_norm=True).state_dict()
    assert "fc_norm.weight" in finetuned and "norm.weight" not in finetuned and "head.weight" in finetuned
    rc, out, _ = convert(tmp_path, {"model": {"module." + k: v for k, v in finetuned.items()}}, capsys)
    assert rc == 0 and "dropped 2 keys (head)" in out
    converted = load_file(str(tmp_path / "out.safetensors"))
    assert torch.equal(converted["norm.weight"], finetuned["fc_norm.weight"])
    assert torch.equal(converted["norm.bias"], finetuned["fc_norm.bias"])
    assert not any(k.startswith(("module.", "head.", "fc_norm.")) for k in converted)
    our_vit().load_state_dict(converted, strict=True)


def test_state_dict_entries_prefixes_distillation_and_a_second_norm():
    backbone = tiny_vit(num_classes=0).state_dict()
    pos = backbone["pos_embed"]
    # DeiT distilled: a dist token with its own position, a distillation head; plus a post-pool fc_norm
    deit = {**backbone, "dist_token": torch.zeros(1, 1, 64), "head_dist.weight": torch.zeros(3, 64),
            "fc_norm.weight": torch.ones(64), "fc_norm.bias": torch.zeros(64),
            "pos_embed": torch.cat([pos[:, :1], torch.zeros(1, 1, 64), pos[:, 1:]], dim=1)}
    mapped, dropped = convert_state({"module.encoder." + k: v for k, v in deit.items()})
    assert sorted(dropped) == ["dist_token", "fc_norm.bias", "fc_norm.weight", "head_dist.weight"]
    assert mapped.keys() == backbone.keys()
    assert torch.equal(mapped["pos_embed"], backbone["pos_embed"])
    # a prefix only some keys have is kept (and then the required keys are missing)
    with pytest.raises(ValueError, match="missing required keys"):
        convert_state({("backbone." + k if k != "cls_token" else k): v for k, v in backbone.items()})


def test_state_dict_is_picked_in_order(tmp_path, capsys):
    _, backbone = mae_checkpoint()
    rc, out, _ = convert(tmp_path, {"state_dict": backbone, "model_ema": {"x": torch.zeros(1)}}, capsys)
    assert rc == 0 and "(from in.pth['state_dict'])" in out and "dropped 0 keys\n" in out
    rc, out, _ = convert(tmp_path, backbone, capsys)
    assert rc == 0 and "(from in.pth)" in out


class Marker:
    """Unpickling it would create ``path``: code a pickle runs, which the converter must never run."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickled_object_is_refused_and_never_runs(tmp_path, capsys):
    pickle.loads(pickle.dumps(Marker(tmp_path / "proof")))  # an ordinary unpickle does run it
    assert (tmp_path / "proof").exists()
    marker = tmp_path / "marker"
    _, backbone = mae_checkpoint()
    rc, out, err = convert(tmp_path, {"model": backbone, "args": Marker(marker)}, capsys)
    assert rc == 1 and not out
    assert err.count("\n") == 1 and err.startswith(f"convert: {tmp_path / 'in.pth'}: not a plain tensor checkpoint "
                                                   "(weights_only load refused: ")
    assert "open" in err and "weights_only` set to `False" not in err
    assert not marker.exists() and not (tmp_path / "out.safetensors").exists()


def _nan(backbone):
    backbone["blocks.1.attn.qkv.weight"][0, 0] = float("nan")
    return {"model": backbone}


@pytest.mark.parametrize("make, message", [
    (_nan, "non-finite values in blocks.1.attn.qkv.weight"),
    (lambda b: {"model": {k: v for k, v in b.items() if k not in ("cls_token", "pos_embed")}},
     "missing required keys ['cls_token', 'pos_embed']"),
    (lambda b: {"model": {k: v for k, v in b.items() if k != "blocks.1.mlp.fc2.bias"}},
     "missing required keys ['blocks.1.mlp.fc2.bias']"),
    (lambda b: {**b, "blocks.0.attn.q_bias": torch.zeros(64)}, "does not load strictly into a timm ViT: "
     "unexpected blocks.0.attn.q_bias"),
    (lambda b: {**b, "norm.weight": torch.ones(32)},
     "does not load strictly into a timm ViT: size mismatch for norm.weight"),
    (lambda b: list(b.values()), "not a dict but list"),
    (lambda b: {"model": {"step": 3}}, "no tensors in ['model']"),
    (lambda b: None, "no such file"),
])
def test_bad_checkpoints_give_one_line_errors(tmp_path, capsys, make, message):
    _, backbone = mae_checkpoint()
    rc, out, err = convert(tmp_path, make(backbone), capsys)
    assert rc == 1 and not out
    assert err.count("\n") == 1 and err.startswith(f"convert: {tmp_path / 'in.pth'}: {message}"), err
    assert not (tmp_path / "out.safetensors").exists()


def test_usage(capsys):
    assert main([]) == 2 and "usage:" in capsys.readouterr().err
