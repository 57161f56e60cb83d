"""Server-side masked image modelling: MAE and SimMIM on unlabeled medical images.

The encoder is exactly the timm ViT backbone the federation uses
(``model.create_backbone``), so the pretrained weights move into stage 0 with
no conversion. Labels are never read.

* MAE (He et al. 2022): the encoder sees only the visible patches; a light
  transformer decoder reconstructs the masked ones; MSE on masked patches,
  optionally against per-patch normalised pixels.
* SimMIM (Xie et al. 2022): masked patches are replaced by a learned mask token
  inside the encoder; a linear head predicts raw pixels; L1 on masked patches.

Standalone: ``python -m meduniverse_flwr.pretrain --method mae --epochs 30 --out pretrained/``
writes ``encoder.safetensors`` (load it with ``pretrain=<path>``),
``state.safetensors`` + ``state.json`` (resume a killed run), ``reconstruction.png``
and ``log.json``.

The resume state is data only (safetensors tensors, JSON bookkeeping) and is
validated like any untrusted input before use: the pretraining cache lives in
a shared data directory, so nothing read from it may run code.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from .model import create_backbone, save_backbone
from .seeds import derive_seed
from .task import autocast, cosine_with_warmup, resolve_device, to_input

logger = logging.getLogger("flwr")
DEFAULT_MASK_RATIO = {"mae": 0.75, "simmim": 0.6}


@dataclass(frozen=True)
class PretrainSettings:
    method: str = "mae"
    epochs: int = 30
    batch_size: int = 256
    lr: float = 1.5e-3
    weight_decay: float = 0.05
    warmup_epochs: int = 2
    mask_ratio: float = 0.0  # 0: the method's default (MAE 0.75, SimMIM 0.6)
    # A light decoder keeps MAE's advantage: its cost is paid on all tokens.
    decoder_dim: int = 64
    decoder_depth: int = 1
    # Off by default: per-patch normalised targets discard absolute intensity,
    # which medical classes depend on (CT Hounsfield units, stain colour); on the
    # embedded universe the linear probe is 0.706 with it, 0.789 without (10 epochs).
    norm_pix_loss: bool = False
    # bf16 autocast on CUDA (no effect on CPU, where bf16 matmuls are slower); part of the cache key,
    # since the weights differ. Measured on an H200 in benchmarks/README.md.
    bf16: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"pretrain method '{self.method}': unknown, choose one of {list(METHODS)}")
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ValueError(f"mask ratio {self.mask_ratio}: must be in [0, 1)")

    @property
    def effective_mask_ratio(self) -> float:
        return self.mask_ratio or DEFAULT_MASK_RATIO[self.method]


# ------------------------------------------------------------------ masking
def random_masking(batch: int, num_patches: int, ratio: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image, exactly ``round(ratio * num_patches)`` masked patches chosen uniformly.

    Returns ``(visible, mask)``: the sorted indices of visible patches (B x V)
    and a boolean mask (B x N, True = masked).
    """
    n_masked = int(round(ratio * num_patches))
    if not 0 <= n_masked < num_patches:
        raise ValueError(f"mask ratio {ratio} leaves no visible patch of {num_patches}")
    order = torch.rand(batch, num_patches, generator=generator).argsort(dim=1)
    visible = order[:, n_masked:].sort(dim=1).values
    mask = torch.ones(batch, num_patches, dtype=torch.bool)
    mask.scatter_(1, visible, False)
    return visible, mask


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """B x C x H x W -> B x N x (patch * patch * C), patches in row-major order."""
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // patch) * (w // patch), patch * patch * c)


def unpatchify(patches: torch.Tensor, patch: int, channels: int = 3) -> torch.Tensor:
    b, n, _ = patches.shape
    side = int(math.isqrt(n))
    x = patches.reshape(b, side, side, patch, patch, channels)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(b, channels, side * patch, side * patch)


def _sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim // 2))
    angles = positions.double()[:, None] * omega[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_pos_embed(dim: int, grid: int) -> torch.Tensor:
    """Fixed 2D sin-cos position embedding (1 x grid*grid x dim), as in MAE's decoder."""
    ys, xs = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    emb = torch.cat([_sincos_1d(dim // 2, ys.flatten()), _sincos_1d(dim // 2, xs.flatten())], dim=1)
    return emb.float()[None]


# ------------------------------------------------------------------ models
class MaskedImageModel(nn.Module):
    """Common part: the encoder, the patch size and the pixel targets."""

    def __init__(self, encoder: VisionTransformer, norm_pix_loss: bool) -> None:
        super().__init__()
        self.encoder = encoder
        self.patch = encoder.patch_embed.patch_size[0]
        self.num_patches = encoder.patch_embed.num_patches
        self.norm_pix_loss = norm_pix_loss

    def targets(self, images: torch.Tensor) -> torch.Tensor:
        target = patchify(images, self.patch)
        if self.norm_pix_loss:
            mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
            target = (target - mean) / (var + 1e-6).sqrt()
        return target


class MAE(MaskedImageModel):
    def __init__(self, encoder: VisionTransformer, decoder_dim: int = 64, decoder_depth: int = 1,
                 decoder_heads: int = 4, norm_pix_loss: bool = False) -> None:
        super().__init__(encoder, norm_pix_loss)
        grid = encoder.patch_embed.grid_size[0]
        self.decoder_embed = nn.Linear(encoder.embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.register_buffer("decoder_pos", sincos_pos_embed(decoder_dim, grid), persistent=False)
        self.decoder = nn.Sequential(*[Block(decoder_dim, decoder_heads, mlp_ratio=4.0) for _ in range(decoder_depth)])
        self.decoder_norm = nn.LayerNorm(decoder_dim)
        self.decoder_pred = nn.Linear(decoder_dim, self.patch * self.patch * 3)
        nn.init.normal_(self.mask_token, std=0.02)

    def encode_visible(self, images: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """Encoder on visible patches only (+ class token): B x (1 + V) x D."""
        enc = self.encoder
        x = enc.patch_embed(images) + enc.pos_embed[:, enc.num_prefix_tokens :]
        x = torch.gather(x, 1, visible[..., None].expand(-1, -1, x.shape[-1]))
        cls = (enc.cls_token + enc.pos_embed[:, :1]).expand(len(x), -1, -1)
        x = enc.norm_pre(torch.cat([cls, x], dim=1))
        return enc.norm(enc.blocks(x))

    def forward(self, images: torch.Tensor, visible: torch.Tensor, mask: torch.Tensor):
        latent = self.decoder_embed(self.encode_visible(images, visible))
        b, n = mask.shape
        tokens = self.mask_token.expand(b, n, -1).clone()
        tokens.scatter_(1, visible[..., None].expand(-1, -1, tokens.shape[-1]), latent[:, 1:])
        x = torch.cat([latent[:, :1], tokens + self.decoder_pos], dim=1)
        pred = self.decoder_pred(self.decoder_norm(self.decoder(x)))[:, 1:]
        per_patch = ((pred - self.targets(images)) ** 2).mean(-1)
        loss = (per_patch * mask).sum() / mask.sum()
        return loss, pred


class SimMIM(MaskedImageModel):
    def __init__(self, encoder: VisionTransformer, norm_pix_loss: bool = False) -> None:
        super().__init__(encoder, norm_pix_loss)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, encoder.embed_dim))
        self.prediction = nn.Linear(encoder.embed_dim, self.patch * self.patch * 3)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, images: torch.Tensor, visible: torch.Tensor, mask: torch.Tensor):
        enc = self.encoder
        x = enc.patch_embed(images)
        x = torch.where(mask.to(x.device)[..., None], self.mask_token.to(x.dtype), x)
        x = enc.norm(enc.blocks(enc.norm_pre(enc._pos_embed(x))))
        pred = self.prediction(x[:, enc.num_prefix_tokens :])
        per_patch = (pred - self.targets(images)).abs().mean(-1)
        loss = (per_patch * mask).sum() / mask.sum()
        return loss, pred


def _build_mae(encoder: VisionTransformer, settings: PretrainSettings) -> MaskedImageModel:
    return MAE(encoder, settings.decoder_dim, settings.decoder_depth, norm_pix_loss=settings.norm_pix_loss)


def _build_simmim(encoder: VisionTransformer, settings: PretrainSettings) -> MaskedImageModel:
    return SimMIM(encoder)  # raw-pixel targets, as in the paper: norm_pix_loss is MAE's option


# The pretraining methods: name -> builder of the MIM model around the encoder.
METHODS: dict[str, Callable[[VisionTransformer, PretrainSettings], MaskedImageModel]] = {
    "mae": _build_mae,
    "simmim": _build_simmim,
}


def build_mim(encoder: VisionTransformer, settings: PretrainSettings) -> MaskedImageModel:
    return METHODS[settings.method](encoder, settings)


# ------------------------------------------------------------------ training
STATE_TENSORS, STATE_JSON = "state.safetensors", "state.json"
LEGACY_STATE = "state.pt"  # pickled by older versions: never loaded
PROGRESS_FIELDS = ("key", "epoch", "losses", "images_per_second")


@dataclass
class PretrainResult:
    encoder_path: Path
    losses: list[float]
    images_per_second: list[float]


def _settings_key(model_name: str, image_size: int, settings: PretrainSettings, n_images: int) -> dict:
    return {"model": model_name, "image_size": image_size, "n_images": n_images, **dataclasses.asdict(settings)}


def pretrain(
    model_name: str, image_size: int, images: torch.Tensor, settings: PretrainSettings, out_dir: Path,
    device: str = "auto", on_epoch_end: Callable[[int, float], None] | None = None,
) -> PretrainResult:
    """Pretrain ``model_name`` on uint8 ``images`` (N x 3 x S x S); resume from ``out_dir/state.json``.

    Every epoch ends with an atomic checkpoint, so a killed run continues from
    the last finished epoch (same settings required) and ends with the same
    weights as an uninterrupted one.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dev = resolve_device(device)
    torch.manual_seed(settings.seed)
    mim = build_mim(create_backbone(model_name, image_size), settings).to(dev)
    optimizer = torch.optim.AdamW(mim.parameters(), lr=settings.lr, weight_decay=settings.weight_decay,
                                  betas=(0.9, 0.95))
    steps_per_epoch = math.ceil(len(images) / settings.batch_size)
    key = _settings_key(model_name, image_size, settings, len(images))
    if (out_dir / LEGACY_STATE).exists():
        logger.warning("pretrain: ignoring %s (an older version's pickle, never loaded); delete it",
                       out_dir / LEGACY_STATE)
    start_epoch, losses, speeds = 0, [], []
    if (out_dir / STATE_JSON).is_file():
        start_epoch, losses, speeds = load_state(out_dir, key, settings.epochs, steps_per_epoch, mim, optimizer)
        logger.info("pretrain: resuming %s from epoch %d of %d", settings.method, start_epoch, settings.epochs)
    schedule = _lr_schedule(optimizer, settings, steps_per_epoch, start_epoch * steps_per_epoch)

    ratio = settings.effective_mask_ratio
    on_device = images.to(dev)  # once, not per batch
    for epoch in range(start_epoch, settings.epochs):
        # per-epoch generator: the same batches and masks whether or not the run was resumed
        generator = torch.Generator().manual_seed(derive_seed(settings.seed, "pretrain", epoch))
        order = torch.randperm(len(images), generator=generator)
        mim.train()
        order = order.to(dev)
        total, started = torch.zeros((), dtype=torch.float64, device=dev), time.perf_counter()
        for start in range(0, len(images), settings.batch_size):
            batch = to_input(on_device[order[start : start + settings.batch_size]], dev)
            visible, mask = random_masking(len(batch), mim.num_patches, ratio, generator)
            with autocast(dev) if settings.bf16 else nullcontext():
                loss, _ = mim(batch, visible.to(dev), mask.to(dev))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.detach().double() * len(batch)  # stays on the device: no sync per step
        losses.append(total.item() / len(images))
        speeds.append(len(images) / (time.perf_counter() - started))
        remaining = (settings.epochs - epoch - 1) * len(images) / float(np.mean(speeds[start_epoch:]))
        logger.info("pretrain %s epoch %d/%d: loss %.4f, %.0f images/s, ETA %.0fs", settings.method, epoch + 1,
                    settings.epochs, losses[-1], speeds[-1], remaining)
        save_state(out_dir, mim, optimizer, {"key": key, "epoch": epoch + 1, "losses": losses,
                                             "images_per_second": speeds})
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, losses[-1])

    encoder_path = out_dir / "encoder.safetensors"
    save_backbone(encoder_path, mim.encoder.state_dict(),
                  {"model": model_name, "image-size": str(image_size), "pretrain": settings.method,
                   "epochs": str(settings.epochs), "mask-ratio": str(ratio)})
    (out_dir / "log.json").write_text(json.dumps({**key, "losses": losses, "images_per_second": speeds}, indent=2))
    spread = torch.linspace(0, len(images) - 1, 6).long()  # across the corpus, not one dataset
    save_reconstruction_figure(mim, images[spread], ratio, settings.seed, out_dir / "reconstruction.png")
    return PretrainResult(encoder_path, losses, speeds)


def _lr_schedule(optimizer: torch.optim.Optimizer, settings: PretrainSettings, steps_per_epoch: int,
                 done_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Warm-up + cosine per step, positioned after ``done_steps`` steps (the lr is a pure function of it)."""
    for group in optimizer.param_groups:
        group["initial_lr"] = settings.lr  # what LambdaLR needs to start part-way
    factor = cosine_with_warmup(settings.epochs * steps_per_epoch, settings.warmup_epochs / max(settings.epochs, 1))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor, last_epoch=done_steps - 1)


# ------------------------------------------------------------------ resume state (untrusted on read)
def save_state(out_dir: Path, mim: MaskedImageModel, optimizer: torch.optim.Optimizer, progress: dict) -> None:
    """Tensors, then the JSON: a ``state.json`` only ever sits next to the tensors it describes."""
    (out_dir / STATE_JSON).unlink(missing_ok=True)  # a kill before the new JSON lands restarts, never mixes
    tensors = {**_prefixed("model/", mim.state_dict()), **_optimizer_tensors(optimizer)}
    _write_atomic(out_dir / STATE_TENSORS,
                  lambda tmp: save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp)))
    _write_atomic(out_dir / STATE_JSON, lambda tmp: tmp.write_text(json.dumps(progress)))


def load_state(out_dir: Path, key: dict, epochs: int, steps_per_epoch: int, mim: MaskedImageModel,
               optimizer: torch.optim.Optimizer) -> tuple[int, list[float], list[float]]:
    """Validate ``state.json`` + ``state.safetensors`` against this run, load them into ``mim`` and
    ``optimizer``; returns (epochs done, losses, images/s). Any problem: a one-line ``ValueError``."""
    progress = read_progress(out_dir / STATE_JSON, key, epochs)
    epoch = progress["epoch"]
    tensors_path = out_dir / STATE_TENSORS
    tensors = read_tensors(tensors_path, _expected_tensors(mim, optimizer))
    steps = {float(v) for k, v in tensors.items() if k.endswith("/step")}
    if steps != {float(epoch * steps_per_epoch)}:
        raise ValueError(f"pretrain state {tensors_path}: optimizer steps {sorted(steps)[:3]} do not match "
                         f"epoch {epoch} x {steps_per_epoch} steps in {STATE_JSON}")
    mim.load_state_dict(_unprefixed("model/", tensors), strict=True)
    per_param: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in _unprefixed("optimizer/", tensors).items():
        index, field = name.split("/")
        per_param.setdefault(int(index), {})[field] = value
    optimizer.load_state_dict({"state": per_param, "param_groups": optimizer.state_dict()["param_groups"]})
    return epoch, progress["losses"], progress["images_per_second"]


def read_progress(path: Path, key: dict, epochs: int) -> dict:
    """``state.json``, checked field by field: it must describe a run with exactly these settings."""
    try:
        progress = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as err:
        raise ValueError(f"pretrain state {path}: cannot read ({err})") from None
    problem = _progress_problem(progress, key, epochs)
    if problem:
        raise ValueError(f"pretrain state {path}: {problem}")
    return progress


def _progress_problem(progress: object, key: dict, epochs: int) -> str:
    if not isinstance(progress, dict) or sorted(progress) != sorted(PROGRESS_FIELDS):
        return f"not an object with exactly the fields {list(PROGRESS_FIELDS)}"
    if not isinstance(progress["key"], dict):
        return "'key' is not an object"
    if progress["key"] != key:
        return f"made with other settings; use another --out or delete it ({_diff(progress['key'], key)})"
    epoch = progress["epoch"]
    if type(epoch) is not int or not 1 <= epoch <= epochs:
        return f"epoch {epoch!r:.40} is not an integer in 1..{epochs}"
    for field in ("losses", "images_per_second"):
        if not _finite_floats(progress[field], epoch):
            return f"'{field}' is not a list of {epoch} finite numbers"
    return ""


def _finite_floats(values: object, length: int) -> bool:
    return isinstance(values, list) and len(values) == length and \
        all(type(v) is float and math.isfinite(v) for v in values)


def read_tensors(path: Path, expected: dict[str, tuple[torch.Size, torch.dtype]]) -> dict[str, torch.Tensor]:
    """A safetensors file whose names, shapes and dtypes are exactly ``expected``, all values finite."""
    try:
        tensors = load_file(str(path))
    except (OSError, SafetensorError) as err:
        raise ValueError(f"pretrain state {path}: cannot read ({err})") from None
    problem = _tensors_problem(tensors, expected)
    if problem:
        raise ValueError(f"pretrain state {path}: {problem}")
    return tensors


def _tensors_problem(tensors: dict[str, torch.Tensor], expected: dict[str, tuple[torch.Size, torch.dtype]]) -> str:
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        return f"does not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}"
    wrong = [f"{k} {tuple(t.shape)} {t.dtype} != {tuple(expected[k][0])} {expected[k][1]}"
             for k, t in tensors.items() if (t.shape, t.dtype) != expected[k]]
    if wrong:
        return f"does not fit the model: shape/dtype {wrong[:3]}"
    not_finite = [k for k, t in tensors.items() if not torch.isfinite(t).all()]
    if not_finite:
        return f"non-finite values in {not_finite[:3]}"
    return ""


def _expected_tensors(mim: MaskedImageModel,
                      optimizer: torch.optim.Optimizer) -> dict[str, tuple[torch.Size, torch.dtype]]:
    """What ``save_state`` writes for this model: its state dict and AdamW's state (amsgrad off) of
    every parameter (all are trained, so all have state after the first step)."""
    expected = {k: (v.shape, v.dtype) for k, v in _prefixed("model/", mim.state_dict()).items()}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for index, param in enumerate(params):
        expected[f"optimizer/{index}/exp_avg"] = expected[f"optimizer/{index}/exp_avg_sq"] = (param.shape, param.dtype)
        expected[f"optimizer/{index}/step"] = (torch.Size(), torch.float32)  # AdamW's step count: a float32 scalar
    return expected


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """AdamW's per-parameter state as flat names ``optimizer/<param index>/<field>``."""
    return {f"optimizer/{index}/{field}": value for index, state in optimizer.state_dict()["state"].items()
            for field, value in state.items()}


def _prefixed(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in tensors.items()}


def _unprefixed(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}


def _diff(old: dict, new: dict) -> str:
    return ", ".join(f"{k}: {old.get(k)!r:.40} -> {new[k]!r}" for k in new if old.get(k) != new[k])


def _write_atomic(path: Path, write: Callable[[Path], object]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    write(tmp)
    tmp.replace(path)


@torch.no_grad()
def save_reconstruction_figure(mim: MaskedImageModel, images: torch.Tensor, ratio: float, seed: int,
                               path: Path) -> None:
    """Rows: original / masked / reconstruction (visible patches pasted back, as MAE shows it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    device = next(mim.parameters()).device
    mim.eval()
    x = to_input(images, device)
    visible, mask = random_masking(len(x), mim.num_patches, ratio, torch.Generator().manual_seed(seed))
    _, pred = mim(x, visible.to(device), mask.to(device))
    target = patchify(x, mim.patch)
    if mim.norm_pix_loss:  # undo the per-patch normalisation with the true patch statistics
        pred = pred * (target.var(-1, keepdim=True) + 1e-6).sqrt() + target.mean(-1, keepdim=True)
    m = mask.to(device)[..., None]
    masked = unpatchify(torch.where(m, torch.zeros_like(target), target), mim.patch)
    recon = unpatchify(torch.where(m, pred, target), mim.patch)
    rows = [x, masked, recon]
    fig, axes = plt.subplots(3, len(x), figsize=(1.6 * len(x), 5), squeeze=False)
    for r, (name, row) in enumerate(zip(("original", "masked", "reconstruction"), rows)):
        for c in range(len(x)):
            axes[r, c].imshow(((row[c].permute(1, 2, 0).float().cpu() + 1) / 2).clamp(0, 1).numpy())
            axes[r, c].axis("off")
        axes[r, 0].set_title(name, fontsize=8, loc="left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ------------------------------------------------------------------ corpus + CLI
def main(argv: list[str] | None = None) -> None:
    from .config import split_list
    from .data import DataOptions
    from .data.corpus import load_corpus

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", choices=list(METHODS), default="mae")
    parser.add_argument("--model", default="vit-micro")
    parser.add_argument("--image-size", type=int, default=28)
    parser.add_argument("--datasets", default="fundus-vessel,histology-stain,brain-tissue,ct-tissue",
                        help="comma list of dataset entries, as in the run config (e.g. medmnist:pathmnist)")
    parser.add_argument("--data", default="embedded", help="source of entries without a 'source:' prefix")
    parser.add_argument("--data-root", default="", help="data / cache directory")
    parser.add_argument("--out", type=Path, required=True, help="output directory (resumes from it)")
    defaults = PretrainSettings()
    for field in ("epochs", "batch_size", "lr", "weight_decay", "warmup_epochs", "mask_ratio", "decoder_dim",
                  "decoder_depth", "seed"):
        default = getattr(defaults, field)
        parser.add_argument("--" + field.replace("_", "-"), type=type(default), default=default)
    parser.add_argument("--norm-pix-loss", action="store_true", help="per-patch normalised MAE targets")
    parser.add_argument("--fp32", action="store_true", help="no bf16 autocast on CUDA")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        settings = PretrainSettings(
            method=args.method, norm_pix_loss=args.norm_pix_loss, bf16=not args.fp32,
            **{f: getattr(args, f) for f in ("epochs", "batch_size", "lr", "weight_decay", "warmup_epochs",
                                            "mask_ratio", "decoder_dim", "decoder_depth", "seed")})
        images = load_corpus(split_list(args.datasets), DataOptions(args.data, args.data_root, args.image_size))
        logger.info("pretrain corpus: %d unlabeled images from %s", len(images), args.datasets)
        result = pretrain(args.model, args.image_size, images, settings, args.out, args.device)
    except ValueError as err:
        parser.exit(2, f"error: {err}\n")
    logger.info("encoder: %s", result.encoder_path)


if __name__ == "__main__":
    main()
