"""Curation on the server's unlabelled corpus (``aggregation = distill``; beyond the paper).

The paper's server only combines what the clients send. This rule uses what the server also holds,
its unlabelled corpus: the next base is trained on it, starting from the current base, with the MAE
loss (so it keeps what MIM taught it) plus a feature-distillation loss towards each of the stage's
client backbones (the teachers): the student's tokens, through one linear adaptor per teacher, match
that teacher's tokens by cosine distance, as in multi-teacher distillation (AM-RADIO, Ranzinger et
al., CVPR 2024) and FedDF's server-side ensemble distillation (Lin et al., NeurIPS 2020). No label,
head or client image is used; the teachers are the backbones the stage already brought.

``continue_mim`` is the loop: with ``weight = 0`` (or no teachers) it is plain MAE continuation, the
rule's own control (same seeds, same steps), and what ``pretrain-continue-epochs`` spends before
stage 1 (the "MAE trained longer" control). The MAE decoder it needs stays on the server.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from meduniverse_flwr.config import RunConfig
from meduniverse_flwr.learn.finetune import autocast, cosine_with_warmup, resolve_device, to_input
from meduniverse_flwr.learn.model import create_backbone, read_tensors, to_arrays, to_tensors
from meduniverse_flwr.server.pretrain.engine import build_mim
from meduniverse_flwr.server.pretrain.models import MAE, random_masking
from meduniverse_flwr.server.pretrain.settings import PretrainSettings
from meduniverse_flwr.wire.seeds import derive_seed

WARMUP_FRACTION = 0.1  # of the continuation's steps: a short ramp, the base is already trained


@dataclass(frozen=True)
class ContinueSettings:
    epochs: int
    lr: float
    seed: int
    weight: float = 0.0  # of the distillation loss; 0: MAE alone
    tokens: str = "cls"  # registry.DISTILL_TOKENS
    batch_size: int = 256
    weight_decay: float = 0.05
    mask_ratio: float = 0.75
    input_norm: str = "symmetric"


def token_features(tokens: torch.Tensor, which: str) -> torch.Tensor:
    """B x (1 + N) x D encoder tokens -> what is distilled: the class token (B x D), the mean patch token
    (B x D) or every token (B x (1 + N) x D)."""
    if which == "cls":
        return tokens[:, 0]
    if which == "mean":
        return tokens[:, 1:].mean(dim=1)
    if which == "all":
        return tokens
    raise ValueError(f"distill tokens '{which}': choose cls, mean or all")


def distill_loss(student: torch.Tensor, teachers: list[torch.Tensor], adaptors: nn.ModuleList) -> torch.Tensor:
    """Mean over teachers of the mean cosine distance ``1 - cos(adaptor_t(student), teacher_t)`` per
    feature vector (per image, or per image and token). Cosine: teachers fine-tuned on different tasks
    differ in scale, and the student should match their directions, not their norms."""
    losses = [(1.0 - F.cosine_similarity(adaptor(student), teacher, dim=-1)).mean()
              for adaptor, teacher in zip(adaptors, teachers, strict=True)]
    return torch.stack(losses).mean()


def identity_adaptors(count: int, dim: int) -> nn.ModuleList:
    """One linear adaptor per teacher, starting as the identity: every teacher began from the student."""
    adaptors = nn.ModuleList(nn.Linear(dim, dim) for _ in range(count))
    for adaptor in adaptors:
        nn.init.eye_(adaptor.weight)
        nn.init.zeros_(adaptor.bias)
    return adaptors


def continue_mim(mim: MAE, corpus: torch.Tensor, teachers: list[nn.Module], settings: ContinueSettings,
                 device: str = "auto") -> list[float]:
    """Train ``mim`` (encoder and decoder, in place) on uint8 ``corpus`` for ``settings.epochs`` epochs:
    MAE loss + ``weight`` x ``distill_loss`` towards ``teachers`` (frozen); returns the mean loss per epoch.

    Batches and masks come from per-epoch generators of ``settings.seed``, so a run with weight 0 takes
    exactly the steps of one without teachers."""
    dev = resolve_device(device)
    distilling = settings.weight > 0 and bool(teachers)
    adaptors = identity_adaptors(len(teachers), mim.encoder.embed_dim).to(dev) if distilling else nn.ModuleList()
    for teacher in teachers:
        teacher.to(dev).eval().requires_grad_(False)
    mim.to(dev).train()
    params = list(mim.parameters()) + list(adaptors.parameters())
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay, betas=(0.9, 0.95))
    steps = settings.epochs * math.ceil(len(corpus) / settings.batch_size)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(steps, WARMUP_FRACTION))
    on_device, losses = corpus.to(dev), []
    for epoch in range(settings.epochs):
        generator = torch.Generator().manual_seed(derive_seed(settings.seed, "continue", epoch))
        order = torch.randperm(len(corpus), generator=generator).to(dev)
        total = torch.zeros((), dtype=torch.float64, device=dev)
        for start in range(0, len(corpus), settings.batch_size):
            x = to_input(on_device[order[start:start + settings.batch_size]], dev, settings.input_norm)
            visible, mask = random_masking(len(x), mim.num_patches, settings.mask_ratio, generator)
            with autocast(dev):
                loss, _ = mim(x, visible.to(dev), mask.to(dev))
                if distilling:
                    with torch.no_grad():
                        targets = [token_features(t.forward_features(x), settings.tokens).float() for t in teachers]
                    student = token_features(mim.encoder.forward_features(x), settings.tokens).float()
                    loss = loss + settings.weight * distill_loss(student, targets, adaptors)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.detach().double() * len(x)
        losses.append(total.item() / len(corpus))
    return losses


def split_mae_state(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """An MAE state dict -> (encoder = the backbone, decoder = everything else, server-only)."""
    encoder = {k.removeprefix("encoder."): v for k, v in state.items() if k.startswith("encoder.")}
    return encoder, {k: v for k, v in state.items() if not k.startswith("encoder.")}


def new_mae(model_name: str, image_size: int, seed: int) -> MAE:
    """The MAE the server pretrains (``PretrainSettings``' decoder), its weights seeded by ``seed``."""
    torch.manual_seed(seed)
    return build_mim(create_backbone(model_name, image_size), PretrainSettings(method="mae"))


def mae_around(model_name: str, image_size: int, backbone: dict[str, torch.Tensor],
               decoder: dict[str, torch.Tensor] | None, seed: int) -> MAE:
    """An MAE with ``backbone`` as its encoder and ``decoder``, or a fresh decoder seeded by ``seed``
    when there is none (a base that was not MAE-pretrained here)."""
    mim = new_mae(model_name, image_size, seed)
    mim.encoder.load_state_dict(backbone, strict=True)
    if decoder is not None:
        mim.load_state_dict({**{f"encoder.{k}": v for k, v in backbone.items()}, **decoder}, strict=True)
    return mim


def read_decoder(path, model_name: str, image_size: int) -> dict[str, torch.Tensor]:
    """An MAE decoder file (the server's cache or run directory: read as untrusted), checked name by
    name, shape by shape against this model's decoder; a one-line ValueError otherwise."""
    _, expected = split_mae_state(new_mae(model_name, image_size, 0).state_dict())
    return read_tensors(path, {k: (v.shape, v.dtype) for k, v in expected.items()}, "MAE decoder")


class Distiller:
    """The ``distill`` rule's curator: keeps the MAE decoder and the corpus on the server, and trains
    each stage's next base from the current one and the stage's backbones."""

    def __init__(self, config: RunConfig, corpus: torch.Tensor, decoder: dict[str, torch.Tensor] | None) -> None:
        self.config, self.corpus, self.decoder = config, corpus, decoder
        self.seconds = 0.0  # server compute of the last stage, counted in its results

    def next_base(self, base: dict[str, np.ndarray], teachers: list[dict[str, np.ndarray]],
                  stage: int) -> dict[str, np.ndarray]:
        c = self.config
        started = time.perf_counter()
        as_torch = to_tensors(base)
        mim = mae_around(c.model, c.image_size, as_torch, self.decoder, derive_seed(c.pretrain_seed, "decoder"))
        teacher_models = []
        for state in teachers if c.distill_weight > 0 else []:
            teacher = create_backbone(c.model, c.image_size)
            teacher.load_state_dict(to_tensors(state), strict=True)
            teacher_models.append(teacher)
        settings = ContinueSettings(epochs=c.distill_epochs, lr=c.distill_lr, seed=derive_seed(c.seed, stage, "curate"),
                                    weight=c.distill_weight, tokens=c.distill_tokens, input_norm=c.input_norm)
        continue_mim(mim, self.corpus, teacher_models, settings, c.device)
        encoder, self.decoder = split_mae_state({k: v.detach().cpu() for k, v in mim.state_dict().items()})
        self.seconds = time.perf_counter() - started
        return to_arrays(encoder)
