"""The masked image models around the encoder, and the random masks they are trained with.

* MAE (He et al. 2022): the encoder sees only the visible patches; a light
  transformer decoder reconstructs the masked ones; MSE on masked patches,
  optionally against per-patch normalised pixels.
* SimMIM (Xie et al. 2022): masked patches are replaced by a learned mask token
  inside the encoder; a linear head predicts raw pixels; L1 on masked patches.

Both take ``(images, visible, mask)`` and return ``(loss, per-patch prediction)``. A method is
a builder here and a line in ``registry.PRETRAIN_METHODS``.
"""

from __future__ import annotations

import math

import torch
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from meduniverse_flwr.server.pretrain.settings import PretrainSettings


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


def build_mae(encoder: VisionTransformer, settings: PretrainSettings) -> MaskedImageModel:
    return MAE(encoder, settings.decoder_dim, settings.decoder_depth, norm_pix_loss=settings.norm_pix_loss)


def build_simmim(encoder: VisionTransformer, settings: PretrainSettings) -> MaskedImageModel:
    return SimMIM(encoder)  # raw-pixel targets, as in the paper: norm_pix_loss is MAE's option
