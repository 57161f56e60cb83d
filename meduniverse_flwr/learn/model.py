"""ViT backbones by name, task heads, and the backbone/head split of a state dict.

A task model is a timm ``VisionTransformer`` whose classifier ``head`` is sized
to the task. Its state dict minus the ``head.*`` keys is the *backbone*: the
part the server aggregates, checkpoints, and that loads strictly into
``create_backbone(name, ...)`` (the same timm model with ``num_classes=0``).
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from timm.layers import resample_abs_pos_embed, resample_patch_embed
from timm.models.vision_transformer import VisionTransformer

from meduniverse_flwr.common.files import write_atomic
from meduniverse_flwr.registry import MODELS, TIMM_VIT_PREFIX  # the backbones by name, with their widths and depths

HEAD_PREFIX = "head."
# load_state_dict would silently cast any dtype; float8 and integers are no weights we write
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


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
    """The ViT called ``name`` (one of ``MODELS``, or any timm ViT architecture name) at the
    federation's image and patch size; ``num_classes=0`` gives the bare backbone."""
    patch = patch_size or default_patch_size(image_size)
    if image_size % patch:
        raise ValueError(f"model '{name}': image size {image_size} is not a multiple of patch size {patch}")
    # Mean-pooled tokens suit MIM-pretrained encoders; fc_norm=False keeps the parameter names
    # identical to timm's default ViT (the final ``norm``).
    sizes = dict(img_size=image_size, patch_size=patch, in_chans=in_chans, num_classes=num_classes,
                 global_pool="avg", fc_norm=False)
    if name in MODELS:
        spec = MODELS[name]
        return VisionTransformer(embed_dim=spec.embed_dim, depth=spec.depth, num_heads=spec.num_heads, **sizes)
    return timm_vit(name, sizes)


def timm_vit(name: str, sizes: dict) -> VisionTransformer:
    """timm's architecture ``name`` with the federation's sizes; a one-line error unless it is a
    ViT with one class token (the layout the heads, the aggregation and the MIM models assume)."""
    import timm

    if not name.startswith(TIMM_VIT_PREFIX) or not timm.is_model(name):
        raise ValueError(f"model '{name}': unknown, choose one of {sorted(MODELS)} or a timm ViT name "
                         f"(timm.list_models('{TIMM_VIT_PREFIX}*'))")
    model = timm.create_model(name, pretrained=False, **sizes)
    if not isinstance(model, VisionTransformer) or model.cls_token is None or model.num_prefix_tokens != 1:
        raise ValueError(f"model '{name}': not a ViT with one class token and no register tokens")
    return model


def create_backbone(name: str, image_size: int, in_chans: int = 3) -> VisionTransformer:
    return create_model(name, image_size, num_classes=0, in_chans=in_chans)


@functools.cache
def embed_dim(name: str) -> int:
    if name in MODELS:
        return MODELS[name].embed_dim
    with torch.device("meta"):  # its width, without allocating its weights
        return create_model(name, 32, patch_size=16).embed_dim


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


def to_arrays(state: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Tensors -> NumPy arrays on the CPU, as the wire takes them (``wire.messages.pack``)."""
    return {name: value.detach().cpu().numpy() for name, value in state.items()}


def to_tensors(arrays: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Arrays from the wire -> tensors sharing their memory (read-only ones copied once: torch writes)."""
    return {name: torch.from_numpy(np.require(value, requirements=["W"])) for name, value in arrays.items()}


def save_backbone(path: Path, backbone: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write a backbone as safetensors, atomically; the same tensors and metadata give the same bytes."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in backbone.items()}
    write_atomic(path, lambda tmp: Path(tmp).write_bytes(same_bytes(save(tensors, metadata=metadata))))


def same_bytes(raw: bytes) -> bytes:
    """A safetensors file with its metadata in key order: the library writes the metadata map in a
    random order per process, so equal checkpoints (the shared stage-0 base) would differ in bytes."""
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + size])
    if "__metadata__" not in header:
        return raw
    header = {"__metadata__": dict(sorted(header.pop("__metadata__").items())), **header}
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    return raw[:8] + text + b" " * (size - len(text)) + raw[8 + size:]  # the same characters, reordered


def load_backbone(path: Path, model: torch.nn.Module) -> None:
    """Load a backbone checkpoint strictly into ``model``; one-line error on mismatch.

    The file may come from anywhere (a user's ``pretrain`` path, a shared cache):
    names, shapes, dtypes and values are all checked before anything is loaded.
    """
    expected = {k: (v.shape, None) for k, v in model.state_dict().items() if not k.startswith(HEAD_PREFIX)}
    state = read_tensors(path, expected, "checkpoint", floats_only=True)
    model.load_state_dict(state, strict=False)  # complete for the backbone, checked above


def read_tensors(path: Path, expected: dict[str, tuple[torch.Size, torch.dtype | None]], what: str,
                 floats_only: bool = False) -> dict[str, torch.Tensor]:
    """An untrusted safetensors file that passes ``tensors_problem``; else a one-line ``ValueError``
    starting ``<what> <path>:``."""
    tensors = load_tensors(path, what)
    problem = tensors_problem(tensors, expected, floats_only)
    if problem:
        raise ValueError(f"{what} {path}: {problem}")
    return tensors


def load_tensors(path: Path, what: str) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors, unchecked; a one-line ``ValueError`` if it cannot be read."""
    try:
        return load_file(str(path))
    except (OSError, SafetensorError) as err:
        raise ValueError(f"{what} {path}: cannot read ({err})") from None


def not_float_problem(tensors: dict[str, torch.Tensor]) -> str:
    """The first few tensors that are not FLOAT_DTYPES ("" if none)."""
    not_float = [f"{k} {t.dtype}" for k, t in tensors.items() if t.dtype not in FLOAT_DTYPES]
    return f"not float16/bfloat16/float32/float64: {not_float[:3]}" if not_float else ""


def backbone_depth(state: dict[str, torch.Tensor]) -> int:
    """The number of transformer blocks a ViT state dict holds (``blocks.<i>.*``)."""
    return 1 + max((int(k.split(".")[1]) for k in state if k.startswith("blocks.") and k.split(".")[1].isdigit()),
                   default=-1)


def tensors_problem(tensors: dict[str, torch.Tensor], expected: dict[str, tuple[torch.Size, torch.dtype | None]],
                    floats_only: bool = False) -> str:
    """What is wrong with ``tensors``, naming the first few ("" if nothing). Right is: exactly the
    names of ``expected``, each with its shape and dtype (None: any; with ``floats_only``, any of
    FLOAT_DTYPES), every value finite."""
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    wrong = [f"{k} {tuple(t.shape)} {t.dtype} != {tuple(shape)} {dtype or ''}".rstrip()
             for k, t in tensors.items() if k in expected for shape, dtype in [expected[k]]
             if t.shape != shape or dtype not in (None, t.dtype)]
    if missing or unexpected or wrong:
        parts = [f"missing {missing[:3]}" * bool(missing), f"unexpected {unexpected[:3]}" * bool(unexpected),
                 f"shape/dtype {wrong[:3]}" * bool(wrong)]
        return f"does not fit the model: {'; '.join(p for p in parts if p)}"
    if floats_only and (problem := not_float_problem(tensors)):
        return problem
    not_finite = [k for k, t in tensors.items() if not torch.isfinite(t).all()]
    if not_finite:
        return f"non-finite values in {not_finite[:3]}"
    return ""


# ------------------------------------------------------------------ a public checkpoint as the base
# what a MIM or classification checkpoint carries besides the backbone
NOT_BACKBONE = ("head.", "decoder_", "mask_token", "head_dist.", "dist_token")


def load_pretrained(path: Path, model: VisionTransformer) -> list[str]:
    """Load a timm-layout ViT checkpoint of ``model``'s width and depth into ``model``, whatever
    its patch and image size (``fit_checkpoint``); what was adapted, one line each. The file is
    untrusted: floats only, finite, and what is left after fitting must fit exactly."""
    state = load_tensors(path, "checkpoint")
    if problem := not_float_problem(state):  # before fitting, which casts to float32
        raise ValueError(f"checkpoint {path}: {problem}")
    try:
        fitted, adapted = fit_checkpoint(state, model)
    except ValueError as err:
        raise ValueError(f"checkpoint {path}: {err}") from None
    expected = {k: (v.shape, None) for k, v in model.state_dict().items() if not k.startswith(HEAD_PREFIX)}
    problem = tensors_problem(fitted, expected)
    if problem:
        raise ValueError(f"checkpoint {path}: {problem}")
    model.load_state_dict(fitted, strict=False)  # complete for the backbone, checked above
    return adapted


def fit_checkpoint(state: dict[str, torch.Tensor], model: VisionTransformer) -> tuple[dict[str, torch.Tensor], list[str]]:
    """``state`` fitted to ``model`` (float32), and what was adapted: head and MIM-decoder keys
    dropped, one input channel repeated to three, patch and position embeddings resampled with
    timm's own functions (bicubic, antialiased). The width and depth must be the model's; a
    one-line ValueError names the first mismatch."""
    dropped = {k for k in state if k.startswith(NOT_BACKBONE)}
    adapted = [f"dropped {len(dropped)} head / decoder keys"] if dropped else []
    state = {k: v.float() for k, v in state.items() if k not in dropped}
    for key in ("cls_token", "pos_embed", "patch_embed.proj.weight"):
        if key not in state:
            raise ValueError(f"has no '{key}': not a timm-layout ViT with a class token")
    width = state["cls_token"].shape[-1]
    depth = backbone_depth(state)
    if (width, depth) != (model.embed_dim, len(model.blocks)):
        raise ValueError(f"width {width}, depth {depth}: the model '{model.embed_dim} wide, {len(model.blocks)} deep' "
                         "needs the same (patch and image size may differ)")
    weight, target = state["patch_embed.proj.weight"], model.patch_embed.proj.weight.shape
    if weight.shape[1] == 1 and target[1] == 3:  # a grayscale encoder: the same response to gray inputs
        weight, adapted = weight.repeat(1, 3, 1, 1) / 3, adapted + ["1 input channel repeated to 3"]
    if weight.shape[-2:] != target[-2:]:
        adapted.append(f"patch {weight.shape[-1]} resampled to {target[-1]}")
        weight = resample_patch_embed(weight, list(target[-2:]))
    state["patch_embed.proj.weight"] = weight
    positions, prefix = state["pos_embed"], model.num_prefix_tokens
    grid = math.isqrt(positions.shape[1] - prefix)
    if grid * grid != positions.shape[1] - prefix:
        raise ValueError(f"pos_embed {tuple(positions.shape)}: not {prefix} class token(s) and a square grid")
    if positions.shape != model.pos_embed.shape:
        adapted.append(f"position grid {grid}x{grid} resampled to {'x'.join(map(str, model.patch_embed.grid_size))}")
        state["pos_embed"] = resample_abs_pos_embed(positions, list(model.patch_embed.grid_size),
                                                    num_prefix_tokens=prefix)
    return state, adapted
