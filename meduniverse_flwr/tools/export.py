"""A run's stage backbone as a folder in timm's ``save_for_hf`` / ``push_to_hub`` layout, loadable
with timm alone: ``model.safetensors`` (the stage's checkpoint, checked), ``config.json`` and a model
card ``README.md`` whose numbers are results.json's (read with ``results.read_results``, checked).

    python -m meduniverse_flwr.tools.export outputs/latest --out hf-export [--stage N] [--license "TEXT" ...]

The folder is built beside ``--out`` and renamed into place, so it appears whole or not at all; an
``--out`` that exists and is not empty is refused, never overwritten.
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import shutil
import sys
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from meduniverse_flwr.common.files import write_atomic, write_json_atomic, write_text_atomic
from meduniverse_flwr.common.text import safe_label
from meduniverse_flwr.learn.model import create_model, read_tensors
from meduniverse_flwr.registry import DP_LEVELS, INPUT_NORMS, MODELS, TIMM_VIT_PREFIX
from meduniverse_flwr.server.results import config_value, read_results

# timm registered names with the project's widths and depths; vit-micro is vit_tiny narrowed by model_args
ARCHITECTURES = {"vit-micro": "vit_tiny_patch16_224", "vit-tiny": "vit_tiny_patch16_224",
                 "vit-small": "vit_small_patch16_224", "vit-base": "vit_base_patch16_224"}
SPDX_LIKE = re.compile(r"[A-Za-z0-9][A-Za-z0-9.+-]*")
DISCLAIMER = "Research use only: not validated for clinical use"


def _md(value: Any) -> str:
    """Text from results.json, safe in a Markdown table cell (no newlines, pipes, markup or HTML)."""
    return re.sub(r"([`*_\[\]<>|#])", r"\\\1", safe_label(str(value))[:120])


def _num(value: Any, fmt: str = ".4f") -> str:
    return "not recorded" if value is None else format(value, fmt)


def backbone_args(name: str, image_size: int, path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(tensors, timm model_args) of a checkpoint: patch size and channels from its weights, the whole
    file checked against the ViT they and the run's config make; ValueError (one line) otherwise."""
    try:
        with safe_open(str(path), "pt") as handle:
            if "patch_embed.proj.weight" not in handle.keys():
                raise ValueError(f"checkpoint {path}: has no patch_embed.proj.weight")
            shape = handle.get_slice("patch_embed.proj.weight").get_shape()
    except (OSError, SafetensorError) as err:
        raise ValueError(f"checkpoint {path}: cannot read ({err})") from None
    if len(shape) != 4 or shape[2] != shape[3] or shape[2] < 1:
        raise ValueError(f"checkpoint {path}: patch_embed.proj.weight {tuple(shape)} is not a square patch")
    patch, in_chans = shape[2], shape[1]
    if image_size % patch:
        raise ValueError(f"checkpoint {path}: patch size {patch} does not divide the run's image-size {image_size}")
    model = create_model(name, image_size, in_chans=in_chans, patch_size=patch)
    tensors = read_tensors(path, {k: (v.shape, None) for k, v in model.state_dict().items()}, "checkpoint",
                           floats_only=True)
    args = {"img_size": image_size, "patch_size": patch, "in_chans": in_chans, "embed_dim": model.embed_dim,
            "depth": len(model.blocks), "num_heads": model.blocks[0].attn.num_heads, "global_pool": "avg",
            "fc_norm": False, "class_token": True}
    return tensors, args


def timm_config(architecture: str, model_args: dict[str, Any], input_norm: str) -> dict[str, Any]:
    """``config.json`` as timm's ``save_for_hf`` writes it (the run's input scaling: ``learn.finetune.to_input``)."""
    size, chans = model_args["img_size"], model_args["in_chans"]
    mean, std = INPUT_NORMS[input_norm]
    return {"architecture": architecture, "num_classes": 0, "num_features": model_args["embed_dim"],
            "global_pool": "avg", "model_args": model_args,
            "pretrained_cfg": {"input_size": [chans, size, size], "mean": list(mean[:chans]), "std": list(std[:chans]),
                               "crop_pct": 1.0, "interpolation": "bilinear", "num_classes": 0,
                               "first_conv": "patch_embed.proj", "classifier": "head"}}


def model_card(results: dict, stage: int, architecture: str, model_args: dict, licenses: list[str]) -> str:
    """The ``README.md`` of an export of ``stage``: every number is results.json's, 4 decimals."""
    config, stages, tasks = results["config"], results["stages"], results.get("tasks", {})
    entry, get = stages[stage], lambda key, default="not recorded": _md(config.get(key, default))
    licence = licenses[0].lower() if len(licenses) == 1 and SPDX_LIKE.fullmatch(licenses[0]) else "other"
    mean, std = INPUT_NORMS[config.get("input-norm", "symmetric")]  # checked by export()
    pretrain = config.get("pretrain", "not recorded")
    base = {"none": "a seeded random initialisation (no pretraining)", "mae": "MAE", "simmim": "SimMIM"}.get(
        pretrain, "a backbone checkpoint given to the run")
    if pretrain in ("mae", "simmim"):
        base += f"-pretrained on the server for {get('pretrain-epochs', '?')} epochs"
    call = ", ".join(f"{k}={v!r}" for k, v in model_args.items())
    lines = ["---", "library_name: timm", f"license: {licence}", "tags:",
             *[f"- {t}" for t in ("image-feature-extraction", "timm", "medical-imaging", "federated-learning")],
             "---", "", f"# MedUniverse federated ViT base: {get('model')}, stage {stage}", "",
             f"A timm `{architecture}`-family ViT feature extractor (`num_classes=0`, mean-pooled tokens, "
             f"{model_args['embed_dim']} features) trained by federated learning over medical imaging sites.", "",
             "## Method", "",
             "MedUniverse (arXiv:2407.14719) builds a universal medical imaging base by stage-wise federated "
             "fine-tuning of a ViT pretrained with masked image modelling (MIM): in each stage a set of sites "
             "fine-tunes the current base on its own task with a task-specific head, the server aggregates the "
             "updated backbones into the next stage's base, and images never leave the sites. After every "
             "stage the base is scored on every site's task with a fresh head.", "",
             "## How it was built", "",
             f"- Strategy: {get('strategy')}, schedule {get('schedule')}, aggregation {get('aggregation')}",
             f"- Backbone: {get('model')} ({model_args['embed_dim']} wide, {model_args['depth']} deep, "
             f"{model_args['num_heads']} heads, patch {model_args['patch_size']}, {model_args['img_size']} px); "
             f"stage-0 base: {base}",
             f"- Stages run: {len(stages) - 1} training stage(s) after stage 0 (the initial base, untrained)",
             f"- Exported stage: {stage}",
             f"- Scores: {get('eval-mode')} on each task", "",
             "| Stage | K (clients per stage) | Participants |", "|---|---|---|"]
    for s in stages:
        people = ", ".join(_md(p) for p in s["participants"]) or "none (evaluation only)"
        lines.append(f"| {s['stage']} | {get('clients-per-stage') if s['stage'] else '-'} | {people} |")
    lines += ["", "## Sites' tasks", "", "| Task | Modality | Classes | Held out |", "|---|---|---|---|"]
    for name in dict.fromkeys([*tasks, *entry["per_task"]]):
        facts, scores = tasks.get(name, {}), entry["per_task"].get(name, {})
        held = {True: "yes", False: "no"}.get(scores.get("held_out"), "not recorded")
        lines.append(f"| {_md(name)} | {_md(facts.get('modality', 'not recorded'))} | "
                     f"{facts.get('n_classes', 'not recorded')} | {held} |")
    lines += ["", f"## Scores of the stage-{stage} base", "", "| Task | Accuracy | AUC | Split | Examples scored |",
              "|---|---|---|---|---|"]
    for name, scores in entry["per_task"].items():
        lines.append(f"| {_md(name)} | {_num(scores['accuracy'])} | {_num(scores['auc'])} | {scores['split']} | "
                     f"{scores.get('n_scored', 'not recorded')} |")
    lines += ["", f"Mean accuracy over the trained tasks: {_num(entry['mean_accuracy'])}", "",
              "## Differential privacy", ""]
    if "epsilon" in entry:
        lines.append(f"DP level {get('dp')}: epsilon = {entry['epsilon']:.4f}, "
                     f"delta = {entry['delta']:g} (cumulative over the run up to stage {stage})")
    else:
        lines.append(f"DP: {get('dp', 'off')} (no epsilon recorded)")
    lines += ["", "## Data licences", ""]
    lines += [f"- {safe_label(text)}" for text in licenses] or ["Not given: the user of this card must supply them."]
    lines += ["", "## How to load", "", "```python", "import timm", "",
              f'model = timm.create_model("{architecture}", pretrained=True, '
              f'pretrained_cfg_overlay=dict(file="<DIR>/model.safetensors"), num_classes=0, {call})',
              "features = model(images)  # (batch, features), mean-pooled tokens", "```", "",
              "`<DIR>` is this folder; recent timm also loads it with "
              '`timm.create_model("local-dir:<DIR>", pretrained=True)`. '
              f"Inputs: RGB (grayscale repeated to 3 channels), resized to {model_args['img_size']} x "
              f"{model_args['img_size']}, scaled as (x / 255 - mean) / std with mean {list(mean)}, std "
              f"{list(std)} (`pretrained_cfg` in config.json).", "",
              "## Intended use and limitations", "",
              f"- {DISCLAIMER}; not a medical device and not for diagnosis or any clinical decision.",
              "- Trained on the sites listed above only; it may not transfer to other scanners, populations or tasks.",
              "- The scores are the federation's own evaluation on the sites' splits, not an independent validation.",
              ""]
    return "\n".join(lines)


def export(run_dir: Path, out_dir: Path, stage: int | None = None, licenses: tuple[str, ...] | list[str] = ()) -> Path:
    """Write the export folder ``out_dir`` for ``stage`` (default: the last); ValueError (one line) on a problem."""
    run_dir, out_dir = Path(run_dir).expanduser(), Path(out_dir).expanduser()
    path = run_dir / "results.json"
    if not run_dir.is_dir():
        raise ValueError(f"run dir {run_dir}: not a directory")
    if not path.is_file():
        raise ValueError(f"{path}: missing")
    results = read_results(path)
    config, stages = results["config"], results["stages"]
    if not stages:
        raise ValueError(f"{path}: no completed stage")
    stage = stages[-1]["stage"] if stage is None else stage
    if not 0 <= stage < len(stages):
        raise ValueError(f"stage {stage}: not in {path} (stages 0..{len(stages) - 1})")
    name = config_value(path, config, "model", None, lambda v: v in MODELS or str(v).startswith(TIMM_VIT_PREFIX),
                        f"not one of {sorted(MODELS)} or a timm ViT name")
    size = config_value(path, config, "image-size", None, lambda v: type(v) is int and 1 <= v <= 8192,
                        "must be an integer in 1..8192")
    config_value(path, config, "dp", "off", lambda v: v in DP_LEVELS, f"not one of {DP_LEVELS}")
    norm = config_value(path, config, "input-norm", "symmetric", lambda v: v in INPUT_NORMS,
                        f"not one of {tuple(INPUT_NORMS)}")
    checkpoint = run_dir / "checkpoints" / f"stage-{stage}.safetensors"
    if not checkpoint.is_file():
        raise ValueError(f"checkpoint {checkpoint}: missing")
    if out_dir.exists() and not (out_dir.is_dir() and not any(out_dir.iterdir())):
        raise ValueError(f"--out {out_dir}: exists and is not an empty directory; not overwriting it")
    tensors, model_args = backbone_args(name, size, checkpoint)
    architecture = ARCHITECTURES.get(name, name)  # a timm name is its own architecture
    card = model_card(results, stage, architecture, model_args, list(licenses))
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    build = out_dir.parent / f".{out_dir.name}.{secrets.token_hex(4)}.tmp"
    os.mkdir(build)  # the umask's mode, like any directory
    try:
        metadata = {"format": "pt", "model": name, "image-size": str(size), "stage": str(stage)}
        write_atomic(build / "model.safetensors", lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
        write_json_atomic(build / "config.json", timm_config(architecture, model_args, norm))
        write_text_atomic(build / "README.md", card)
        try:
            os.rename(build, out_dir)  # replaces only a missing or (still) empty directory
        except OSError as err:
            raise ValueError(f"--out {out_dir}: cannot create ({err.strerror}); not overwriting it") from None
    finally:
        shutil.rmtree(build, ignore_errors=True)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m meduniverse_flwr.tools.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="a run directory (holding results.json and checkpoints/)")
    parser.add_argument("--stage", type=int, default=None, help="the stage to export (default: the last)")
    parser.add_argument("--out", type=Path, required=True, help="the folder to write (must not exist or be empty)")
    parser.add_argument("--license", action="append", default=[], dest="licenses",
                        help="a data licence (repeatable); one SPDX-like word sets the card's license")
    args = parser.parse_args(argv)
    try:
        out = export(args.run_dir, args.out, args.stage, args.licenses)
    except (ValueError, OSError) as err:
        print(f"export: {(str(err).splitlines() or [type(err).__name__])[0]}", file=sys.stderr)
        return 1
    print(f"exported to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
