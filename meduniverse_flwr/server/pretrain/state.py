"""The resume state of a pretraining run: ``state.safetensors`` (model and AdamW tensors) and
``state.json`` (settings key, epochs done, losses, speeds), rewritten after every epoch.

It is data only and validated like any untrusted input before use: the pretraining cache lives
in a shared data directory, so nothing read from it may run code (an older version's pickled
``state.pt`` is never loaded).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

from meduniverse_flwr.common.files import write_atomic, write_json_atomic
from meduniverse_flwr.learn.model import read_tensors
from meduniverse_flwr.server.pretrain.models import MaskedImageModel

logger = logging.getLogger("flwr")
STATE_TENSORS, STATE_JSON = "state.safetensors", "state.json"
LEGACY_STATE = "state.pt"  # pickled by older versions: never loaded
PROGRESS_FIELDS = ("key", "epoch", "losses", "images_per_second")


def save_state(out_dir: Path, mim: MaskedImageModel, optimizer: torch.optim.Optimizer, progress: dict) -> None:
    """Tensors, then the JSON: a ``state.json`` only ever sits next to the tensors it describes."""
    (out_dir / STATE_JSON).unlink(missing_ok=True)  # a kill before the new JSON lands restarts, never mixes
    tensors = {k: v.detach().contiguous().cpu()
               for k, v in {**_prefixed("model/", mim.state_dict()), **_optimizer_tensors(optimizer)}.items()}
    write_atomic(out_dir / STATE_TENSORS, lambda tmp: save_file(tensors, str(tmp)))
    write_json_atomic(out_dir / STATE_JSON, progress)


def load_state(out_dir: Path, key: dict, epochs: int, steps_per_epoch: int, mim: MaskedImageModel,
               optimizer: torch.optim.Optimizer) -> tuple[int, list[float], list[float]]:
    """Validate ``state.json`` + ``state.safetensors`` against this run, load them into ``mim`` and
    ``optimizer``; returns (epochs done, losses, images/s), (0, [], []) with nothing to resume.
    Any problem: a one-line ``ValueError``."""
    if (out_dir / LEGACY_STATE).exists():
        logger.warning("pretrain: ignoring %s (an older version's pickle, never loaded); delete it",
                       out_dir / LEGACY_STATE)
    if not (out_dir / STATE_JSON).is_file():
        return 0, [], []
    progress = read_progress(out_dir / STATE_JSON, key, epochs)
    epoch = progress["epoch"]
    tensors_path = out_dir / STATE_TENSORS
    tensors = read_tensors(tensors_path, _expected_tensors(mim, optimizer), "pretrain state")
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
