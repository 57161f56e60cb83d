"""A hostile site for experiments on robust aggregation: it sends a scaled or sign-flipped update.

In simulation, nodes with ``partition-id < attack-nodes`` are hostile; each sends
``base + attack-factor * (its fine-tuned backbone - base)`` (-1: the update's sign flipped, as in
Fang et al. 2020's sign-flipping attack; 10: boosted ten-fold, as in model-replacement attacks).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch


def is_hostile(node_config: Mapping[str, object], attack_nodes: int) -> bool:
    """Whether this simulated node attacks (deployed SuperNodes without a partition id never do)."""
    return "partition-id" in node_config and int(node_config["partition-id"]) < attack_nodes


def poisoned(base: Mapping[str, torch.Tensor], trained: Mapping[str, torch.Tensor],
             factor: float) -> dict[str, torch.Tensor]:
    """``base + factor * (trained - base)`` per array, in float32."""
    return {name: (base[name].float() + factor * (value.float() - base[name].float())).to(value.dtype)
            for name, value in trained.items()}
