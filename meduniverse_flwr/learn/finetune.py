"""Fine-tuning and evaluation of one task model; plain PyTorch, no Flower.

Data stay uint8 tensors in memory; batches are normalised and augmented with
batched tensor ops, so the loop never waits on per-sample Python work.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from meduniverse_flwr import registry
from meduniverse_flwr.data.node_task import NodeTask, TaskData
from meduniverse_flwr.learn import metrics
from meduniverse_flwr.learn.augment import augmentation_for, augmented
from meduniverse_flwr.learn.model import create_model, embed_dim, merge_state, new_head_state, split_state
from meduniverse_flwr.learn.privacy import DPSGD, make_private, noise_only_step, poisson_batches
from meduniverse_flwr.registry import EVAL_SPLITS, INPUT_NORMS
from meduniverse_flwr.wire.messages import Instructions

PROBE_LR = 1e-2  # a linear probe on standardised features tolerates a large step
# LP-FT's first phase (Kumar et al., ICLR 2022): the fresh head alone, at the scoring recipe's chosen lr
# (arrival-val), so that the whole model then starts from a head that fits the features it was sent
HEAD_LR = 1e-3
WARMUP_FRACTION = 0.05


@dataclass(frozen=True)
class TrainSettings:
    epochs: int
    lr: float
    weight_decay: float
    batch_size: int
    seed: int
    device: torch.device
    compile: bool = False  # torch.compile the model (pays off for long runs on a GPU; see benchmarks/README.md)
    layer_decay: float = 1.0  # layer-wise lr decay (MAE / BEiT); 1.0 = one lr for every layer
    eval_split: str = "test"  # the split the evaluation protocols score on: "test" or "val" (for choosing settings)
    dp_sgd: DPSGD | None = None  # example-level DP of the fine-tuning whose backbone leaves the site (privacy.py)
    eval_labels: int = 0  # labelled train examples the evaluation protocols may use (stratified, seeded); 0 = all
    node_term: str = ""  # a registry.NODE_TERMS entry added to the site's training loss (e.g. FedProx's)
    term_settings: tuple[tuple[str, float], ...] = ()  # its run-config keys and values
    augment: str = "flip"  # the training recipe (augment.py), resolved for the image size
    input_norm: str = "symmetric"  # registry.INPUT_NORMS: how uint8 images become inputs
    head_epochs: int = 0  # a client's LP-FT: epochs of the fresh head alone on the frozen backbone first


def settings_for(sent: Instructions) -> TrainSettings:
    """A message's training settings, on the device it names; its one ``dp`` decision: DP-SGD or not."""
    dp_sgd = DPSGD(sent.dp_clip_norm, sent.dp_noise_multiplier, sent.dp_secure_noise) if sent.dp == "example" else None
    return TrainSettings(sent.epochs, sent.lr, sent.weight_decay, sent.batch_size, sent.seed,
                         resolve_device(sent.device), sent.compile, sent.layer_decay, sent.eval_split, dp_sgd,
                         sent.eval_labels, sent.node_term, sent.term_settings,
                         augment=augmentation_for(sent.augment, sent.image_size), input_norm=sent.input_norm,
                         head_epochs=sent.head_epochs)


def resolve_device(name: str) -> torch.device:
    """``auto``: CUDA when present, else the CPU; ``cuda`` without a GPU is a one-line error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda': no CUDA device on this machine (use 'auto' or 'cpu')")
    return torch.device(name)


def autocast(device: torch.device):
    """bf16 autocast on CUDA; full precision on CPU (where bf16 matmuls are slower)."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def to_input(images: torch.Tensor, device: torch.device, norm: str = "symmetric") -> torch.Tensor:
    """uint8 [0, 255], 1 or 3 channels -> float (x / 255 - mean) / std (``registry.INPUT_NORMS``),
    3 channels (grayscale repeated)."""
    mean, std = INPUT_NORMS[norm]
    x = images.to(device, non_blocking=True).float()
    if len(set(mean)) == 1 and len(set(std)) == 1:  # one scale for every channel: before the repeat
        x = x.mul_(1.0 / (255.0 * std[0])).sub_(mean[0] / std[0])
        return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
    x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
    scale = torch.tensor([1.0 / (255.0 * s) for s in std], device=device)[:, None, None]
    shift = torch.tensor([m / s for m, s in zip(mean, std)], device=device)[:, None, None]
    return x * scale - shift


def task_loss(logits: torch.Tensor, labels: torch.Tensor, label_kind: str) -> torch.Tensor:
    if label_kind == "multilabel":
        return F.binary_cross_entropy_with_logits(logits, labels)
    return F.cross_entropy(logits, labels)


def probabilities(logits: torch.Tensor, label_kind: str) -> torch.Tensor:
    return torch.sigmoid(logits) if label_kind == "multilabel" else torch.softmax(logits, dim=1)


def cosine_with_warmup(total_steps: int, warmup_fraction: float = WARMUP_FRACTION):
    """LR factor per step: linear warm-up, then cosine decay to 0."""
    warmup = max(1, int(warmup_fraction * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


# Leading parameters of a timm ViT that sit below block 0 for layer-wise lr decay.
_EMBEDDING_PREFIXES = ("cls_token", "reg_token", "dist_token", "pos_embed", "patch_embed.", "norm_pre.")


def _layer_id(name: str, num_blocks: int) -> int:
    """MAE / BEiT layer index: embeddings 0, ``blocks.i`` i + 1, everything after the blocks num_blocks + 1."""
    if name.startswith(_EMBEDDING_PREFIXES):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return num_blocks + 1


def param_groups(model: nn.Module, weight_decay: float, lr: float, layer_decay: float = 1.0) -> list[dict]:
    """AdamW parameter groups of MAE's fine-tuning recipe.

    No weight decay on the model's ``no_weight_decay()`` names (timm ViT: ``pos_embed``,
    ``cls_token``, ...) nor on any 1-d parameter (norm weights, biases). With ``layer_decay`` < 1
    each layer's lr is scaled by ``layer_decay ** (num_blocks + 1 - layer_id)``: the head (and the
    final norm) keep ``lr``, block i gets ``lr * decay ** (num_blocks - i)``, the patch / position
    embeddings and the class token ``lr * decay ** (num_blocks + 1)``. A model without blocks (a
    linear probe's ``nn.Linear``) is one layer at ``lr``. Each group carries ``param_names`` and
    ``lr_scale``; parameters that do not train are left out.
    """
    skip = set(model.no_weight_decay()) if callable(getattr(model, "no_weight_decay", None)) else set()
    blocks = getattr(model, "blocks", None)
    num_blocks = len(blocks) if isinstance(blocks, nn.Sequential | nn.ModuleList) else 0
    groups: dict[tuple[bool, int], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decay = param.ndim > 1 and name not in skip
        layer = _layer_id(name, num_blocks) if num_blocks else 0
        scale = layer_decay ** (num_blocks + 1 - layer) if num_blocks else 1.0
        key = (decay, layer if layer_decay != 1.0 else 0)
        if key not in groups:
            groups[key] = {"params": [], "param_names": [], "weight_decay": weight_decay if decay else 0.0,
                           "lr": lr * scale, "lr_scale": scale}
        groups[key]["params"].append(param)
        groups[key]["param_names"].append(name)
    return list(groups.values())


Term = Callable[[], torch.Tensor]  # a strategy's addition to the loss, e.g. FedProx's proximal term


def train_step(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, labels: torch.Tensor,
               label_kind: str, optimizer: torch.optim.Optimizer, schedule, device: torch.device,
               term: Term | None = None) -> torch.Tensor:
    """One optimisation step on a ready batch (the task loss plus ``term()``, if any); returns the task
    loss, detached and left on the device."""
    with autocast(device):
        loss = task_loss(forward(x).float(), labels, label_kind)
    optimizer.zero_grad(set_to_none=True)
    (loss if term is None else loss + term()).backward()
    optimizer.step()
    schedule.step()
    return loss.detach()


def shuffled_batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """One epoch of batches: a seeded permutation cut into ``ceil(n / batch)`` index tensors."""
    yield from torch.randperm(n, generator=generator).split(batch_size)


def fit(model: nn.Module, data: TaskData, label_kind: str, settings: TrainSettings, augment: bool = True,
        term: Term | None = None) -> float:
    """Train ``model`` on ``data`` (AdamW with ``param_groups``, warm-up + cosine; ``term()`` added to
    each step's loss); returns the mean task loss of the last epoch.

    The data move to the device once, and the loss stays there until the epoch ends: on a GPU
    the loop then never waits for a host copy or a sync. With ``settings.dp_sgd`` the batches are
    Poisson-sampled and each step is Opacus's DP-SGD step (per-example clipping, then noise).
    """
    device = settings.device
    model.to(device).train()
    images, labels = data.images.to(device, non_blocking=True), data.labels.to(device, non_blocking=True)
    generator = torch.Generator().manual_seed(settings.seed)
    optimizer = torch.optim.AdamW(param_groups(model, settings.weight_decay, settings.lr, settings.layer_decay))
    steps_per_epoch = math.ceil(len(data) / settings.batch_size)
    if settings.dp_sgd is not None and term is not None:
        raise ValueError("a loss term on the parameters is invisible to DP-SGD's per-example gradients")
    if settings.dp_sgd is None:
        forward, batches, close = torch.compile(model) if settings.compile else model, shuffled_batches, None
    else:
        forward, optimizer, close = make_private(model, optimizer, settings.dp_sgd, settings.batch_size,
                                                 settings.seed, device)
        batches = poisson_batches
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(settings.epochs * steps_per_epoch))
    epoch_loss = float("nan")
    try:
        for _ in range(settings.epochs):
            total, seen = torch.zeros((), dtype=torch.float64, device=device), 0
            for index in batches(len(data), settings.batch_size, generator):
                if len(index) == 0:  # an empty Poisson batch still takes its noisy step
                    noise_only_step(model, optimizer)
                    schedule.step()
                    continue
                index = index.to(device)
                x = to_input(images[index], device, settings.input_norm) if images.dtype == torch.uint8 \
                    else images[index]
                if augment:
                    x = augmented(x, settings.augment, generator)
                loss = train_step(forward, x, labels[index], label_kind, optimizer, schedule, device, term)
                total += loss.double() * len(index)  # float64, as exact as a Python float sum
                seen += len(index)
            epoch_loss = total.item() / seen if seen else float("nan")
    finally:
        if close is not None:
            close()
    return epoch_loss


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, batch_size: int, device: torch.device,
            norm: str = "symmetric") -> torch.Tensor:
    """Model outputs for uint8 images (or ready float features), in order, on the CPU."""
    model.to(device).eval()
    images = images.to(device)  # once, not per batch
    outputs = []
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size]
        x = to_input(batch, device, norm) if batch.dtype == torch.uint8 else batch
        with autocast(device):
            outputs.append(model(x).float())
    return torch.cat(outputs).cpu()  # one copy to the host, not one per batch


def score(logits: torch.Tensor, labels: torch.Tensor, label_kind: str) -> dict[str, float]:
    """Loss, accuracy and AUC of ``logits`` against ``labels``."""
    probs = probabilities(logits, label_kind).numpy()
    y = labels.numpy()
    return {
        "loss": float(task_loss(logits, labels, label_kind)),
        "accuracy": metrics.accuracy(y, probs, label_kind),
        "auc": metrics.auc(y, probs, label_kind),
    }


def linear_probe(
    backbone: nn.Module, train: TaskData, test: TaskData, label_kind: str, n_outputs: int,
    settings: TrainSettings,
) -> dict[str, float]:
    """Frozen backbone, fresh linear head trained on standardised features, scored on ``test``."""
    train_features = predict(backbone, train.images, settings.batch_size, settings.device, settings.input_norm)
    test_features = predict(backbone, test.images, settings.batch_size, settings.device, settings.input_norm)
    mean, std = train_features.mean(0), train_features.std(0).clamp_min(1e-6)
    torch.manual_seed(settings.seed)
    head = nn.Linear(train_features.shape[1], n_outputs)
    fit(head, TaskData((train_features - mean) / std, train.labels), label_kind,
        TrainSettings(settings.epochs, PROBE_LR, 0.0, 256, settings.seed, settings.device), augment=False)
    return score(predict(head, (test_features - mean) / std, 4096, settings.device), test.labels, label_kind)


def train_on_task(
    model_name: str, image_size: int, task: NodeTask, state: dict[str, torch.Tensor], settings: TrainSettings,
    validate: bool,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, float]]:
    """Fine-tune base + head (``state``) on the node's train split.

    Returns the fine-tuned backbone, the head (which stays on the node) and the metrics
    the server reads: num-examples, train-loss (not under DP-SGD: it is a noiseless function
    of the examples DP-SGD protects), seconds and, with ``validate``, val-accuracy and val-auc
    (the site's own score of its fine-tuned model).
    """
    started = time.perf_counter()
    torch.manual_seed(settings.seed)
    model = create_model(model_name, image_size, num_classes=task.card.n_classes)
    model.load_state_dict(state, strict=True)
    if settings.head_epochs:
        fit_head(model, task.train, task.card.label_kind, settings)
    term = node_term(model, settings)
    loss = fit(model, task.train, task.card.label_kind, settings, term=term)
    metrics = {"num-examples": len(task.train)} | ({} if settings.dp_sgd else {"train-loss": loss})
    if validate:
        val = score(predict(model, task.val.images, settings.batch_size, settings.device, settings.input_norm),
                    task.val.labels, task.card.label_kind)
        metrics.update({"val-accuracy": val["accuracy"], "val-auc": val["auc"]})
    backbone, head = split_state({k: v.detach().cpu() for k, v in model.state_dict().items()})
    return backbone, head, {**metrics, "seconds": time.perf_counter() - started}


def fit_head(model: nn.Module, data: TaskData, label_kind: str, settings: TrainSettings) -> None:
    """LP-FT's first phase: ``settings.head_epochs`` epochs of the head alone (backbone frozen, at
    ``HEAD_LR``, no layer decay), with DP-SGD when the fine-tuning has it (the head sees the data too)."""
    head = set(model.get_classifier().parameters())
    frozen = [p for p in model.parameters() if p not in head and p.requires_grad]
    for param in frozen:
        param.requires_grad_(False)
    try:
        fit(model, data, label_kind, dataclasses.replace(settings, epochs=settings.head_epochs, lr=HEAD_LR,
                                                         layer_decay=1.0, seed=settings.seed + 1))
    finally:
        for param in frozen:
            param.requires_grad_(True)


def node_term(model: nn.Module, settings: TrainSettings) -> Term | None:
    """The strategy's term for this model (built on its parameters as received), or None."""
    if not settings.node_term:
        return None
    build = registry.resolve(registry.NODE_TERMS[settings.node_term].target)
    return build(model, **{key.replace("-", "_"): value for key, value in settings.term_settings})


def eval_data(task: NodeTask, eval_split: str) -> TaskData:
    """The split the evaluation protocols score on (``eval-split``); the other one is never read."""
    if eval_split not in EVAL_SPLITS:
        raise ValueError(f"eval split '{eval_split}': choose one of {EVAL_SPLITS}")
    return task.val if eval_split == "val" else task.test


def probe_score(model_name: str, image_size: int, task: NodeTask, backbone: dict[str, torch.Tensor],
                  settings: TrainSettings) -> dict[str, float]:
    """Frozen backbone, fresh linear head; scored on ``settings.eval_split``."""
    model = create_model(model_name, image_size, num_classes=0)
    model.load_state_dict(backbone, strict=True)
    return linear_probe(model, task.train, eval_data(task, settings.eval_split), task.card.label_kind,
                        task.card.n_classes, settings)


def finetune_score(model_name: str, image_size: int, task: NodeTask, backbone: dict[str, torch.Tensor],
              settings: TrainSettings) -> dict[str, float]:
    """The paper's protocol: the whole model fine-tuned from the base with a fresh head; scored on
    ``settings.eval_split``."""
    card = task.card
    model = create_model(model_name, image_size, num_classes=card.n_classes)
    head = new_head_state(embed_dim(model_name), card.n_classes, settings.seed)
    model.load_state_dict(merge_state(backbone, head), strict=True)
    fit(model, task.train, card.label_kind, settings)
    scored = eval_data(task, settings.eval_split)
    return score(predict(model, scored.images, settings.batch_size, settings.device, settings.input_norm),
                 scored.labels, card.label_kind)
