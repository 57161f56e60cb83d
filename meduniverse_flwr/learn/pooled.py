"""Multi-task training on pooled data: the ``centralized`` reference, plain PyTorch, no Flower.

One backbone and one linear head per task, trained on every task's training split at once
(batches of one task each, in a seeded shuffled order). It needs all the data in one place,
which is what federation avoids: it is an upper reference that breaks privacy.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from meduniverse_flwr.data.node_task import NodeTask
from meduniverse_flwr.learn.augment import augmented
from meduniverse_flwr.learn.finetune import TrainSettings, cosine_with_warmup, param_groups, to_input, train_step
from meduniverse_flwr.learn.model import create_model, embed_dim, new_head_state


def train_pooled(
    model_name: str, image_size: int, tasks: dict[str, NodeTask], backbone: dict[str, torch.Tensor],
    heads: dict[str, dict[str, torch.Tensor]], settings: TrainSettings,
) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]], float]:
    """Fine-tune ``backbone`` and each task's head (``heads[task]``: ``weight`` / ``bias``, or a
    fresh seeded head when absent) for ``settings.epochs`` over the pooled training splits.

    Returns the backbone, the heads and the example-weighted mean loss of the last epoch.
    """
    device = settings.device
    torch.manual_seed(settings.seed)
    model = create_model(model_name, image_size, num_classes=0)
    model.load_state_dict(backbone, strict=True)
    names = sorted(tasks)
    head_modules = nn.ModuleList(nn.Linear(embed_dim(model_name), tasks[name].card.n_classes) for name in names)
    for index, (name, head) in enumerate(zip(names, head_modules)):
        state = heads.get(name) or {key.removeprefix("head."): value for key, value in
                                     new_head_state(embed_dim(model_name), tasks[name].card.n_classes,
                                                    settings.seed + index).items()}
        head.load_state_dict(state, strict=True)
    model.to(device).train()
    head_modules.to(device).train()
    optimizer = torch.optim.AdamW(param_groups(model, settings.weight_decay, settings.lr, settings.layer_decay)
                                  + param_groups(head_modules, settings.weight_decay, settings.lr))
    data = [(tasks[name].train.images.to(device), tasks[name].train.labels.to(device)) for name in names]
    steps = sum(math.ceil(len(labels) / settings.batch_size) for _, labels in data)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(settings.epochs * steps))
    generator = torch.Generator().manual_seed(settings.seed)
    epoch_loss = float("nan")
    for _ in range(settings.epochs):
        batches = [(task, order[start : start + settings.batch_size])
                   for task, (_, labels) in enumerate(data)
                   for order in [torch.randperm(len(labels), generator=generator)]
                   for start in range(0, len(labels), settings.batch_size)]
        total = torch.zeros((), dtype=torch.float64, device=device)
        for position in torch.randperm(len(batches), generator=generator).tolist():
            task, index = batches[position]
            images, labels = data[task]
            index = index.to(device)
            x = augmented(to_input(images[index], device, settings.input_norm), settings.augment, generator)
            loss = train_step(lambda batch: head_modules[task](model(batch)), x, labels[index],
                              tasks[names[task]].card.label_kind, optimizer, schedule, device)
            total += loss.double() * len(index)
        epoch_loss = total.item() / sum(len(labels) for _, labels in data)
    trained_heads = {name: {key: value.detach().cpu() for key, value in head.state_dict().items()}
                     for name, head in zip(names, head_modules)}
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}, trained_heads, epoch_loss
