"""ViT backbones by name, task heads, and the backbone/head split of a state dict.

A task model is a timm ``VisionTransformer`` whose classifier ``head`` is sized
to the task. Its state dict minus the ``head.*`` keys is the *backbone*: the
part the server aggregates, checkpoints, and that loads strictly into
``create_backbone(name, ...)`` (the same timm model with ``num_classes=0``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from timm.models.vision_transformer import VisionTransformer

HEAD_PREFIX = "head."


@dataclass(frozen=True)
class ViTSpec:
    embed_dim: int
    depth: int
    num_heads: int


# tiny / small / base have the widths and depths of timm's vit_*_patch16_224;
# micro is this project's CPU default for 28 px (~0.7 M parameters).
MODELS: dict[str, ViTSpec] = {
    "vit-micro": ViTSpec(96, 6, 3),
    "vit-tiny": ViTSpec(192, 12, 3),
    "vit-small": ViTSpec(384, 12, 6),
    "vit-base": ViTSpec(768, 12, 12),  # the paper's scale
}


def default_patch_size(image_size: int) -> int:
    """Patch 4 at 28 px, 8 at 64 px, 16 from 128 px: a 7x7 to 14x14 token grid."""
    if image_size <= 32:
        return 4
    if image_size <= 64:
        return 8
    return 16


def create_model(
    name: str, image_size: int, num_classes: int = 0, in_chans: int = 3, patch_size: int | None = None
) -> VisionTransformer:
    """The timm ViT called ``name``; ``num_classes=0`` gives the bare backbone."""
    if name not in MODELS:
        raise ValueError(f"model '{name}': unknown, choose one of {sorted(MODELS)}")
    spec = MODELS[name]
    patch = patch_size or default_patch_size(image_size)
    if image_size % patch:
        raise ValueError(f"model '{name}': image size {image_size} is not a multiple of patch size {patch}")
    return VisionTransformer(
        img_size=image_size,
        patch_size=patch,
        in_chans=in_chans,
        num_classes=num_classes,
        embed_dim=spec.embed_dim,
        depth=spec.depth,
        num_heads=spec.num_heads,
        # Mean-pooled tokens suit MIM-pretrained encoders; fc_norm=False keeps
        # the parameter names identical to timm's default ViT.
        global_pool="avg",
        fc_norm=False,
    )


def create_backbone(name: str, image_size: int, in_chans: int = 3) -> VisionTransformer:
    return create_model(name, image_size, num_classes=0, in_chans=in_chans)


def embed_dim(name: str) -> int:
    return MODELS[name].embed_dim


def new_head_state(in_features: int, num_outputs: int, seed: int) -> dict[str, torch.Tensor]:
    """A fresh linear head, PyTorch's default ``nn.Linear`` init from a seeded generator.

    The server hands it out with the base; the seed makes it reproducible.
    """
    generator = torch.Generator().manual_seed(seed)
    bound = 1.0 / math.sqrt(in_features)
    weight = (torch.rand(num_outputs, in_features, generator=generator) * 2 - 1) * bound
    bias = (torch.rand(num_outputs, generator=generator) * 2 - 1) * bound
    return {f"{HEAD_PREFIX}weight": weight, f"{HEAD_PREFIX}bias": bias}


def split_state(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Full task-model state -> (backbone, head)."""
    backbone = {k: v for k, v in state.items() if not k.startswith(HEAD_PREFIX)}
    head = {k: v for k, v in state.items() if k.startswith(HEAD_PREFIX)}
    return backbone, head


def merge_state(backbone: dict[str, torch.Tensor], head: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """(backbone, head) -> full task-model state; the inverse of ``split_state``."""
    overlap = set(backbone) & set(head)
    if overlap:
        raise ValueError(f"backbone and head share keys: {sorted(overlap)}")
    return {**backbone, **head}


def save_backbone(path: Path, backbone: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write a backbone as safetensors, atomically (write then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in backbone.items()}, str(tmp), metadata=metadata)
    tmp.replace(path)


def load_backbone(path: Path, model: torch.nn.Module) -> None:
    """Load a backbone checkpoint strictly into ``model``; one-line error on mismatch.

    The file may come from anywhere (a user's ``pretrain`` path, a shared cache):
    names, shapes, dtypes and values are all checked before anything is loaded.
    """
    try:
        state = load_file(str(path))
    except (OSError, SafetensorError) as err:
        raise ValueError(f"checkpoint {path}: cannot read ({err})") from None
    expected = {k: v.shape for k, v in model.state_dict().items() if not k.startswith(HEAD_PREFIX)}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [f"{k} {tuple(state[k].shape)} != {tuple(s)}" for k, s in expected.items() if k in state and state[k].shape != s]
    if missing or unexpected or wrong:
        parts = [f"missing {missing[:3]}" * bool(missing), f"unexpected {unexpected[:3]}" * bool(unexpected),
                 f"shape {wrong[:3]}" * bool(wrong)]
        raise ValueError(f"checkpoint {path}: does not fit the model: {'; '.join(p for p in parts if p)}")
    # load_state_dict would silently cast any dtype; float8 and integers are no weights we write
    floats = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    not_float = [f"{k} {v.dtype}" for k, v in state.items() if v.dtype not in floats]
    if not_float:
        raise ValueError(f"checkpoint {path}: not float16/bfloat16/float32/float64: {not_float[:3]}")
    not_finite = [k for k, v in state.items() if not torch.isfinite(v).all()]
    if not_finite:
        raise ValueError(f"checkpoint {path}: non-finite values in {not_finite[:3]}")
    model.load_state_dict(state, strict=False)  # complete for the backbone, checked above
