"""FedProx (Li et al., MLSys 2020): each site's loss plus ``(mu / 2) * ||w - w_base||^2``.

``w`` is the backbone's parameters as they train and ``w_base`` their values as received, so a
site's update is pulled towards the base it started from: the comparison FLamby, NVFlare and
Flower's baselines offer against client drift. The head is left out: it is the site's own,
never aggregated, so there is no shared head to stay near. The server side is stage-wise
aggregation unchanged (``registry.STRATEGIES["fedprox"]``); ``proximal-mu = 0`` is exactly it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from meduniverse_flwr.learn.model import HEAD_PREFIX


def proximal_term(model: nn.Module, proximal_mu: float) -> Callable[[], torch.Tensor]:
    """``(proximal_mu / 2) * ||w - w_base||^2`` over the backbone's trainable parameters, ``w_base``
    taken now (build it on the model as received, before any step)."""
    pairs = [(param, param.detach().clone()) for name, param in model.named_parameters()
             if param.requires_grad and not name.startswith(HEAD_PREFIX)]

    def term() -> torch.Tensor:
        return 0.5 * proximal_mu * torch.stack([(param - anchor).pow(2).sum() for param, anchor in pairs]).sum()

    return term
