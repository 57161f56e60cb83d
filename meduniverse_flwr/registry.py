"""Every variant by name, with the facts other parts need about it. No torch, timm or flwr here.

A run-config choice (``strategy``, ``model``, ``data``, ...) names an entry of one registry. An
entry is data: what the rest of the code must know about the variant (what a strategy's nodes
keep, which DP levels it supports, its node-side training term; a data source's name rule; a
model's width and depth), plus ``target``, the ``"module:attribute"`` that implements it, imported
by ``resolve`` only where it runs (Hydra's ``_target_``; timm registers a model with its config
the same way). So ``config`` checks every choice, and ``report`` reads every fact, without
importing model code; and a variant is one module plus one line here.

The aggregation rules are named here (``AGGREGATIONS``) and built beside their NumPy code
(``server.aggregation.RULES``, the same names: ``tests/test_registries.py``), so that ``config``
checks a choice without importing server code. The transport dtypes live with the wire
(``wire.transport.TRANSPORT_DTYPES``), which both sides import.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PACKAGE = "meduniverse_flwr"


def resolve(target: str) -> Any:
    """``"meduniverse_flwr.server.strategy.stagewise:StageWise"`` -> the object; only this package's modules."""
    module, _, attribute = target.partition(":")
    if not (module == PACKAGE or module.startswith(PACKAGE + ".")) or not attribute:
        raise ValueError(f"registry target {target!r}: not a '{PACKAGE}.<module>:<name>'")
    return getattr(importlib.import_module(module), attribute)


# ``dp``: who is protected. "off": nothing beyond images staying on site; "site": the server
# clips and noises the stage's aggregate; "example": each site fine-tunes with DP-SGD (privacy.py).
DP_LEVELS = ("off", "site", "example")
DEVICES = ("auto", "cpu", "cuda")
TIMM_VIT_PREFIX = "vit_"  # any timm ViT architecture by name (vit_base_patch16_224, ...), checked where it is built
AUGMENTATIONS = ("auto", "flip", "crop-flip")  # training augmentation (augment.py): auto = crop-flip from 64 px
# input scaling, uint8 -> (x / 255 - mean) / std per channel: [-1, 1] (this project's), or a
# checkpoint's own (ImageNet statistics, as timm's MAE / DeiT weights expect)
INPUT_NORMS = {"symmetric": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
               "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))}
EVAL_SPLITS = ("test", "val")  # what the evaluation protocols score on (val: for choosing settings)
ON_EXCESS = ("reject", "clip")  # an update above max-update-ratio x the base's norm (validation.py)
NODE_KEEPS = ("nothing", "head", "model")  # what a node keeps between its messages (travels in each)
# ``schedule = arrival``: after a stage, score only the tasks arriving next (what the arrival gain needs)
# or every task still to come (the unseen-tasks view); stage 0 scores every task either way
# Which tasks train in which stage (``schedule``; server.schedule): every stage, or each task once as it arrives.
SCHEDULES = ("every-stage", "arrival")
# How a stage's backbones become the next base (``aggregation``; server.aggregation.RULES builds each).
AGGREGATIONS = ("mean", "weighted", "median", "trimmed-mean", "ties", "distill")
EVAL_TASKS = ("arriving", "unseen")
# ``aggregation = distill``: which of each teacher's tokens the student matches (class token, patch mean, all)
DISTILL_TOKENS = ("cls", "mean", "all")


@dataclass(frozen=True)
class StrategyEntry:
    target: str  # a ``server.strategy.stagewise.StageWise`` (sub)class, built from the RunConfig
    node_keeps: str = "nothing"  # nothing: a fresh head every stage; head: its own head; model: its own model
    dp_levels: tuple[str, ...] = DP_LEVELS  # the ``dp`` levels it supports
    schedules: tuple[str, ...] = ("every-stage",)  # the ``schedule`` values it supports (SCHEDULES)
    node_term: str = ""  # a NODE_TERMS entry added to each site's training loss ("" for none)
    breaks_privacy: bool = False  # training data leave the sites (an upper reference, not a federation)


# Federation strategies (``strategy``). The comparison strategies each change one thing.
STRATEGIES: dict[str, StrategyEntry] = {
    "stagewise": StrategyEntry(f"{PACKAGE}.server.strategy.stagewise:StageWise", schedules=("every-stage", "arrival")),
    "fedavg": StrategyEntry(f"{PACKAGE}.server.strategy.stagewise:StageWise", node_keeps="head"),  # FedPer: each node its own head
    # Opacus's per-example gradients do not see a term on the parameters, so no DP-SGD with it
    "fedprox": StrategyEntry(f"{PACKAGE}.server.strategy.stagewise:StageWise", node_term="proximal", dp_levels=("off", "site"),
                             schedules=("every-stage", "arrival")),
    "local": StrategyEntry(f"{PACKAGE}.server.strategy.local:Local", node_keeps="model", dp_levels=("off", "example")),
    "cyclic": StrategyEntry(f"{PACKAGE}.server.strategy.cyclic:Cyclic", dp_levels=("off", "example")),
    "centralized": StrategyEntry(f"{PACKAGE}.server.strategy.centralized:Centralized", dp_levels=("off",), breaks_privacy=True),
}


@dataclass(frozen=True)
class NodeTerm:
    target: str  # (model, **settings) -> a zero-argument function giving the term to add to the loss
    keys: tuple[str, ...]  # its run-config keys: the server sends them in each train message


# Terms a strategy adds to each site's training loss (``StrategyEntry.node_term``).
NODE_TERMS: dict[str, NodeTerm] = {
    "proximal": NodeTerm(f"{PACKAGE}.learn.fedprox:proximal_term", ("proximal-mu",)),
}


@dataclass(frozen=True)
class EvalProtocol:
    target: str  # (model name, image size, NodeTask, backbone, TrainSettings) -> scores
    epochs_key: str  # the run-config key that holds its training epochs (the server sends its value)


# How good a base is for one task (``eval-mode``): a fresh head trained on the train split.
EVAL_PROTOCOLS: dict[str, EvalProtocol] = {
    "linear-probe": EvalProtocol(f"{PACKAGE}.learn.finetune:probe_score", "probe-epochs"),
    "finetune": EvalProtocol(f"{PACKAGE}.learn.finetune:finetune_score", "eval-epochs"),  # the paper's protocol
}


@dataclass(frozen=True)
class ViTSpec:
    embed_dim: int
    depth: int
    num_heads: int


# Backbones (``model``), built by ``learn.model.create_model``. tiny / small / base have the widths and
# depths of timm's vit_*_patch16_224; micro is this project's CPU default for 28 px (~0.7 M parameters).
MODELS: dict[str, ViTSpec] = {
    "vit-micro": ViTSpec(96, 6, 3),
    "vit-tiny": ViTSpec(192, 12, 3),
    "vit-small": ViTSpec(384, 12, 6),
    "vit-base": ViTSpec(768, 12, 12),  # the paper's scale
}


def medmnist_flag(spec: str) -> str:
    """``pneumoniamnist`` or ``.../pneumoniamnist_64.npz`` -> ``pneumoniamnist``."""
    return Path(spec).stem.split("_")[0] if spec.endswith(".npz") or "/" in spec else spec


@dataclass(frozen=True)
class DataSource:
    loader: str  # (spec, DataOptions) -> (TaskCard, splits)
    paths: str  # (spec, DataOptions) -> the files it reads (the node cache decodes again when one changes)
    name: Any  # spec -> the task name on the card (and in results / held-out lists); a pure string rule


# Data sources (``data``, or ``source:spec`` in a ``datasets`` entry).
SOURCES: dict[str, DataSource] = {
    "embedded": DataSource(f"{PACKAGE}.data.sources:embedded_source", f"{PACKAGE}.data.sources:embedded_paths", lambda spec: spec),
    "medmnist": DataSource(f"{PACKAGE}.data.sources:medmnist_source", f"{PACKAGE}.data.sources:medmnist_paths", medmnist_flag),
    "folder": DataSource(f"{PACKAGE}.data.sources:folder_source", f"{PACKAGE}.data.sources:site_paths",
                         lambda spec: Path(spec).expanduser().name),
    "dicom": DataSource(f"{PACKAGE}.data.sources:dicom_source", f"{PACKAGE}.data.sources:site_paths",
                        lambda spec: Path(spec).expanduser().name),
    "npz": DataSource(f"{PACKAGE}.data.sources:npz_source", f"{PACKAGE}.data.sources:npz_paths", lambda spec: Path(spec).stem),
}

# How nodes sharing a dataset split it (``partition``): (split, card, split name, shard, n_shards, options) -> indices.
PARTITIONS: dict[str, str] = {"iid": f"{PACKAGE}.data.partition:iid_partition", "dirichlet": f"{PACKAGE}.data.partition:dirichlet_partition"}

# Server-side masked image modelling (``pretrain``): (encoder, PretrainSettings) -> the MIM model around it.
PRETRAIN_METHODS: dict[str, str] = {"mae": f"{PACKAGE}.server.pretrain.models:build_mae",
                                    "simmim": f"{PACKAGE}.server.pretrain.models:build_simmim"}

# Curation rules (an ``aggregation`` that trains the next base on the server's unlabelled corpus from the
# stage's backbones, instead of combining them): (RunConfig, MIM decoder state or None) -> a Curator.
CURATION_RULES: dict[str, str] = {"distill": f"{PACKAGE}.server.pretrain.distill:Distiller"}

# Experiment trackers (``tracker``): (run dir, run config, run name) -> a Tracker.
TRACKERS: dict[str, str] = {"none": f"{PACKAGE}.server.tracking:no_tracker",
                            "tensorboard": f"{PACKAGE}.server.tracking:tensorboard_tracker",
                            "mlflow": f"{PACKAGE}.server.tracking:mlflow_tracker"}


class UnknownSource(ValueError):
    """A dataset entry names a source that is not in SOURCES."""


def parse_entry(entry: str, default_source: str) -> tuple[str, str]:
    """``"medmnist:pneumoniamnist"`` -> (medmnist, pneumoniamnist); a bare ``.npz`` path is read by the
    npz source, any other bare name takes ``default_source``."""
    source, sep, spec = entry.partition(":")
    if not sep:
        source, spec = "npz" if entry.endswith(".npz") else default_source, entry
    if source not in SOURCES:
        raise UnknownSource(f"dataset '{entry}': unknown source '{source}', choose one of {tuple(SOURCES)}")
    return source, spec


def dataset_name(entry: str, default_source: str) -> str:
    """The task name a dataset entry gets on its card."""
    source, spec = parse_entry(entry, default_source)
    return SOURCES[source].name(spec)
