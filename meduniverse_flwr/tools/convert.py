"""Convert a public ViT checkpoint (MAE, MedMAE, timm / DeiT ``.pth``) into a stage-0 backbone.

``python -m meduniverse_flwr.tools.convert IN.pth OUT.safetensors`` writes a timm-layout ViT backbone (model.py's:
``global_pool="avg", fc_norm=False``, no ``head.*``) for ``pretrain = "OUT.safetensors"``. Why a separate tool:
these checkpoints are pickles and the federation never unpickles. This runs once, outside it, with PyTorch's
restricted loader (``weights_only=True``), so a pickle that would build anything but tensors and plain
containers is refused, never run; what it writes is plain safetensors, checked to load strictly into a timm ViT.
The state dict used is the checkpoint's ``model``, else ``state_dict``, else ``model_ema`` (the first that is a
dict), else the checkpoint itself; the summary line names it.
"""

from __future__ import annotations

import math
import pickle
import sys
from pathlib import Path

import torch
from timm.models.vision_transformer import VisionTransformer

from meduniverse_flwr.learn.model import backbone_depth, save_backbone

ENTRIES = ("model", "state_dict", "model_ema")
PREFIXES = ("module.", "encoder.", "backbone.", "model.")  # stripped (repeatedly) when every key has one
BLOCK_PARTS = ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
DROPS = {"decoder": ("decoder_", "mask_token"), "head": ("head.", "pre_logits."),
         "distillation": ("dist_token", "head_dist.")}  # not backbone: MAE decoder, classifiers, DeiT distillation


def _kind(key: str) -> str | None:
    return next((kind for kind, starts in DROPS.items() if key.startswith(starts)), None)


def required_keys(depth: int) -> list[str]:
    base = ["cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"]
    blocks = [f"blocks.{i}.{part}.{p}" for i in range(max(depth, 1)) for part in BLOCK_PARTS
              for p in ("weight", "bias")]
    return base + blocks + ["norm.weight", "norm.bias"]


def convert_state(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """A public ViT state dict -> (its timm-layout backbone, the names of the keys dropped).

    Raises a one-line ``ValueError`` when a required backbone key is missing after mapping.
    """
    stripping = True
    while stripping:
        prefix = next((p for p in PREFIXES if state and all(k.startswith(p) for k in state)), None)
        stripping = prefix is not None
        if stripping:
            state = {k[len(prefix):]: v for k, v in state.items()}
    kept = {k: v for k, v in state.items() if _kind(k) is None}
    dropped = [k for k in state if _kind(k) is not None]
    if "fc_norm.weight" in kept or "fc_norm.bias" in kept:
        fc_norm = {k: kept.pop(k) for k in ("fc_norm.weight", "fc_norm.bias") if k in kept}
        if "norm.weight" in kept:  # a second, post-pool norm: our model has no place for it
            dropped += sorted(fc_norm)
        else:
            # MAE fine-tuned (global_pool) layout: its final LayerNorm is fc_norm, applied after mean pooling,
            # and it has no `norm`. Ours applies `norm` to every token, then mean-pools: the same W-sized
            # affine parameters one step earlier. Not identical (LayerNorm does not commute with the mean),
            # but the nearest fit, and the federation fine-tunes from it.
            kept.update({"norm." + k.split(".", 1)[1]: v for k, v in fc_norm.items()})
    pos = kept.get("pos_embed")
    if "dist_token" in state and pos is not None and pos.dim() == 3 and pos.shape[1] > 2:
        kept["pos_embed"] = torch.cat([pos[:, :1], pos[:, 2:]], dim=1)  # drop the distillation token's position
    missing = [k for k in required_keys(backbone_depth(kept)) if k not in kept]
    if missing:
        raise ValueError(f"missing required keys {missing[:4]}{' ...' if len(missing) > 4 else ''}")
    return kept, dropped


def _refusal(err: pickle.UnpicklingError) -> str:
    text = str(err).split("WeightsUnpickler error:", 1)[-1].strip()
    return " ".join(text.split("\n\n")[0].split(". ")[0].split()) or "unpickling error"


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], str]:
    """The tensors of the checkpoint's state dict, and which entry they came from ('' for the checkpoint itself)."""
    if not path.is_file():
        raise ValueError("no such file")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(f"not a plain tensor checkpoint (weights_only load refused: {_refusal(err)})") from None
    except (OSError, RuntimeError, EOFError, ValueError) as err:
        raise ValueError(f"cannot read ({' '.join(str(err).split())[:200]})") from None
    if not isinstance(checkpoint, dict):
        raise ValueError(f"not a dict but {type(checkpoint).__name__}")
    entry = next((e for e in ENTRIES if isinstance(checkpoint.get(e), dict)), "")
    state = checkpoint[entry] if entry else checkpoint
    tensors = {str(k): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ValueError(f"no tensors in {'[' + repr(entry) + ']' if entry else 'the checkpoint'}")
    return tensors, entry


def check_strict(backbone: dict[str, torch.Tensor]) -> tuple[VisionTransformer, int]:
    """The timm ViT the backbone loads into strictly (and its patch size); one-line ``ValueError`` if none."""
    proj, pos, width = backbone["patch_embed.proj.weight"], backbone["pos_embed"], backbone["cls_token"].shape[-1]
    grid = math.isqrt(max(pos.shape[1] - 1, 0)) if pos.dim() == 3 else 0
    if proj.dim() != 4 or proj.shape[-1] != proj.shape[-2] or grid < 1 or grid * grid != pos.shape[1] - 1:
        raise ValueError(f"pos_embed {tuple(pos.shape)} / patch_embed {tuple(proj.shape)}: not a square-patch ViT "
                         "with one class token and a square position grid")
    heads = max(width // 64, 1)
    heads = heads if width % heads == 0 else 1  # heads only split qkv: no parameter depends on them
    fc1 = backbone["blocks.0.mlp.fc1.weight"]
    model = VisionTransformer(img_size=grid * proj.shape[-1], patch_size=proj.shape[-1], in_chans=proj.shape[1],
                              embed_dim=width, depth=backbone_depth(backbone), num_heads=heads,
                              mlp_ratio=fc1.shape[0] / width, num_classes=0, global_pool="avg", fc_norm=False)
    try:
        result = model.load_state_dict(backbone, strict=False)
    except RuntimeError as err:  # a size mismatch
        line = next((ln.strip() for ln in str(err).splitlines() if "size mismatch" in ln), str(err).splitlines()[0])
        raise ValueError(f"does not load strictly into a timm ViT: {line}") from None
    if result.missing_keys or result.unexpected_keys:
        first = ("missing", result.missing_keys[0]) if result.missing_keys else ("unexpected", result.unexpected_keys[0])
        raise ValueError(f"does not load strictly into a timm ViT: {' '.join(first)}")
    return model, proj.shape[-1]


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or args[0].startswith("-"):
        print("usage: python -m meduniverse_flwr.tools.convert IN.pth OUT.safetensors", file=sys.stderr)
        return 2
    source, out = Path(args[0]).expanduser(), Path(args[1]).expanduser()
    try:
        state, entry = load_checkpoint(source)
        backbone, dropped = convert_state(state)
        backbone = {k: v.detach().to(torch.float32, copy=True).contiguous() for k, v in backbone.items()}
        not_finite = [k for k, v in backbone.items() if not torch.isfinite(v).all()]
        if not_finite:
            raise ValueError(f"non-finite values in {not_finite[0]}" + (" ..." if len(not_finite) > 1 else ""))
        model, patch = check_strict(backbone)
    except ValueError as err:
        print(f"convert: {source}: {err}", file=sys.stderr)
        return 1
    metadata = {"format": "pt", "source": source.name, "converted-by": "meduniverse_flwr.tools.convert"}
    try:
        save_backbone(out, backbone, metadata)  # safetensors save_file through write_atomic
    except OSError as err:
        print(f"convert: {out}: cannot write ({err})", file=sys.stderr)
        return 1
    kinds = sorted({_kind(k) or k.split(".")[0] for k in dropped})
    origin = f"{source.name}[{entry!r}]" if entry else source.name
    print(f"{out}: ViT depth {len(model.blocks)}, width {model.embed_dim}, patch {patch}, "
          f"{backbone['pos_embed'].shape[1]} position tokens (from {origin}); "
          f"dropped {len(dropped)} keys{' (' + ', '.join(kinds) + ')' if kinds else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
