"""The server's stage-0 base: what the run starts from, made once per experiment.

The server pretrains once, as the paper's does: the base is a function of ``pretrain-seed`` and of
the corpus's content, never of the run ``seed``, so every seed of an experiment starts from the same
bytes. It is cached under the data root by a hash of the corpus and the settings, and shared (and
resumed) by every run that asks for the same. ``pretrain-continue-epochs`` continues that base with
MAE alone (``distill.continue_mim``), the "MAE trained longer" control, cached the same way. The
MAE decoder stays here, on the server, for a curation rule that continues MAE.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from meduniverse_flwr import registry
from meduniverse_flwr.config import RunConfig
from meduniverse_flwr.data.corpus import load_corpus
from meduniverse_flwr.data.options import cache_root, options_from
from meduniverse_flwr.learn.model import create_backbone, load_backbone, load_pretrained, save_backbone
from meduniverse_flwr.server.pretrain.distill import (
    ContinueSettings,
    continue_mim,
    mae_around,
    read_decoder,
    split_mae_state,
)
from meduniverse_flwr.server.pretrain.engine import DECODER_FILE, pretrain
from meduniverse_flwr.server.pretrain.settings import PretrainSettings
from meduniverse_flwr.wire.seeds import derive_seed

logger = logging.getLogger("flwr")


@dataclass
class ServerBase:
    backbone: dict[str, torch.Tensor]
    decoder: dict[str, torch.Tensor] | None  # the MAE decoder (server-only), when the base was MAE-trained here
    source: str  # what it is, for results.json and the log


@functools.lru_cache(maxsize=1)  # pretraining and a curation rule read it in one run: decoded once
def server_corpus(config: RunConfig) -> torch.Tensor:
    """The server's unlabelled images: ``pretrain-corpus`` (or the training datasets' train and val
    splits); held-out domains stay unseen and no test split is read."""
    return load_corpus(config.pretrain_corpus or config.training_datasets,
                       options_from(vars(config), config.image_size), archived=config.training_datasets)


def content_key(config: RunConfig, settings: object, corpus: torch.Tensor) -> str:
    """A hash of what determines a base: the corpus's bytes, the model and the settings."""
    digest = hashlib.sha256(corpus.numpy().tobytes())
    digest.update(json.dumps({"model": config.model, "image-size": config.image_size,
                              "settings": asdict(settings)}, sort_keys=True).encode())
    return digest.hexdigest()[:16]


def initial_base(config: RunConfig) -> ServerBase:
    """The stage-0 base: MIM-pretrained on the server (``mae`` / ``simmim``, then continued by
    ``pretrain-continue-epochs``), loaded from a checkpoint (a path), or a random initialisation
    (``none``), each seeded by ``pretrain-seed``."""
    if config.pretrain == "none":
        torch.manual_seed(config.pretrain_seed)
        return ServerBase(create_backbone(config.model, config.image_size).state_dict(), None,
                          f"random init, pretrain-seed {config.pretrain_seed}")
    if config.pretrain not in registry.PRETRAIN_METHODS:  # a checkpoint of any width and depth, fitted
        path = Path(config.pretrain).expanduser()
        backbone = create_backbone(config.model, config.image_size)
        for line in load_pretrained(path, backbone):
            logger.info("stage-0 base from %s: %s", path, line)
        return ServerBase(backbone.state_dict(), None, f"checkpoint {path}")
    corpus = server_corpus(config)
    settings = PretrainSettings(method=config.pretrain, epochs=config.pretrain_epochs, seed=config.pretrain_seed,
                                input_norm=config.input_norm)
    out_dir = cache_root(config.data_root) / "pretrain" / f"{settings.method}-{config.model}-" \
                                                          f"{content_key(config, settings, corpus)}"
    logger.info("stage-0 base: %s, %d epochs on %d unlabeled images (%s)", config.pretrain, config.pretrain_epochs,
                len(corpus), out_dir)
    result = pretrain(config.model, config.image_size, corpus, settings, out_dir, config.device)
    backbone = checkpoint_backbone(config, result.encoder_path)
    decoder = read_decoder(out_dir / DECODER_FILE, config.model, config.image_size) if settings.method == "mae" else None
    source = f"{config.pretrain}, {config.pretrain_epochs} epochs, pretrain-seed {config.pretrain_seed}"
    if config.pretrain_continue_epochs == 0:
        return ServerBase(backbone, decoder, source)
    if settings.method != "mae":
        raise ValueError("pretrain-continue-epochs continues MAE: it needs pretrain = 'mae'")
    return continued(config, backbone, decoder, corpus, out_dir, source)


def continued(config: RunConfig, backbone: dict[str, torch.Tensor], decoder: dict[str, torch.Tensor] | None,
              corpus: torch.Tensor, out_dir: Path, source: str) -> ServerBase:
    """The base continued by ``pretrain-continue-epochs`` of MAE alone at ``distill-lr``: the steps a
    curation rule's weight-0 control takes, all spent before stage 1 (cached beside the base)."""
    settings = ContinueSettings(epochs=config.pretrain_continue_epochs, lr=config.distill_lr,
                                seed=derive_seed(config.pretrain_seed, "continue"), input_norm=config.input_norm)
    path = out_dir / f"continued-{hashlib.sha256(repr(settings).encode()).hexdigest()[:12]}.safetensors"
    source += f", continued {settings.epochs} epochs of MAE at lr {settings.lr:g}"
    if not path.is_file():
        mim = mae_around(config.model, config.image_size, backbone, decoder, derive_seed(config.pretrain_seed, "decoder"))
        losses = continue_mim(mim, corpus, [], settings, config.device)
        logger.info("continued MAE %d epochs: loss %.4f -> %.4f", settings.epochs, losses[0], losses[-1])
        encoder, decoder = split_mae_state({k: v.detach().cpu() for k, v in mim.state_dict().items()})
        save_backbone(path.with_suffix(".decoder.safetensors"), decoder, {"model": config.model})
        save_backbone(path, encoder, {"model": config.model, "source": source})
    return ServerBase(checkpoint_backbone(config, path),
                      read_decoder(path.with_suffix(".decoder.safetensors"), config.model, config.image_size), source)


def checkpoint_backbone(config: RunConfig, path: Path) -> dict[str, torch.Tensor]:
    """A backbone checkpoint, checked strictly against the run's model (one-line error if it does not fit)."""
    backbone = create_backbone(config.model, config.image_size)
    load_backbone(path, backbone)
    return backbone.state_dict()

