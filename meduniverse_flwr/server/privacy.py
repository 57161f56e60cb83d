"""Differential privacy on the server: one object per ``dp`` level, wrapping the stage's aggregate.

Built once per run by ``server_privacy(config)``, the server's one ``dp`` decision point, the way
Flower's DP strategies wrap a strategy. The strategy asks it to ``wrap`` each stage's aggregate
(site level: clip every update on the way in, noise the sum on the way out) and to ``spend`` what
each stage released into the run's ledger (Opacus's RDP accountant, ``learn.privacy.PrivacyLedger``).
The node's side of example-level DP is ``learn.privacy.DPSGD`` in its training settings.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from meduniverse_flwr.config import RunConfig
from meduniverse_flwr.learn.privacy import PrivacyLedger, example_steps, noise_seed, noisy_sum_mean
from meduniverse_flwr.server.aggregation import Aggregate
from meduniverse_flwr.server.norms import Arrays, clip_update
from meduniverse_flwr.wire.card import TaskCard
from meduniverse_flwr.wire.seeds import derive_seed


class NoPrivacy:
    """``dp = "off"``: the aggregate as it is, nothing spent."""

    def __init__(self, config: RunConfig) -> None:
        self.config = config
        self.ledger = PrivacyLedger(config.dp_delta)

    def describe(self) -> str:
        return "off"

    def wrap(self, aggregate: Aggregate, base: Arrays, target: int, stage: int) -> Aggregate:
        return aggregate

    def released(self, asked: Iterable[TaskCard]) -> list[dict]:
        """The stage's privacy events ({party, noise_multiplier, sample_rate, steps} each)."""
        return []

    def spend(self, events: Iterable[dict]) -> None:
        """Add ``events`` to the ledger (a stage's, or a resumed run's from its results.json)."""
        for event in events:
            self.ledger.spend(event["party"], event["noise_multiplier"], event["sample_rate"], event["steps"])

    def epsilon(self) -> tuple[float, float] | None:
        """(worst epsilon, delta) so far, or None when no DP is on."""
        return None


class ExamplePrivacy(NoPrivacy):
    """``dp = "example"``: sites train with DP-SGD; the server only counts each asked site's steps
    (asked: a late or rejected reply was still trained and sent)."""

    def describe(self) -> str:
        c = self.config
        return f"{c.dp} level, clip {c.dp_clip_norm:g}, noise multiplier {c.dp_noise_multiplier:g}, delta {c.dp_delta:g}"

    def released(self, asked: Iterable[TaskCard]) -> list[dict]:
        epochs = self.config.local_epochs + self.config.client_head_epochs  # LP-FT's head epochs see the data too
        return [self._event(card.name, *example_steps(card.n_train, self.config.batch_size, epochs))
                for card in asked]

    def _event(self, party: str, sample_rate: float, steps: int) -> dict:
        return {"party": party, "noise_multiplier": self.config.dp_noise_multiplier, "sample_rate": sample_rate,
                "steps": steps}

    def epsilon(self) -> tuple[float, float]:
        return self.ledger.worst_epsilon(), self.ledger.delta


class SitePrivacy(ExamplePrivacy):
    """``dp = "site"`` (DP-FedAvg): each update clipped to ``dp-clip-norm``, Gaussian noise of std
    ``noise * clip`` on the sum, divided by the stage's K fixed in advance; one event per stage on
    the federation (sample rate 1: no amplification by sampling is claimed)."""

    def wrap(self, aggregate: Aggregate, base: Arrays, target: int, stage: int) -> Aggregate:
        seed = noise_seed(derive_seed(self.config.seed, stage, "dp-noise"), self.config.dp_secure_noise)
        return ClippedNoisySum(aggregate, base, self.config.dp_clip_norm,
                               self.config.dp_noise_multiplier * self.config.dp_clip_norm, target, seed)

    def released(self, asked: Iterable[TaskCard]) -> list[dict]:
        return [self._event("federation", 1.0, 1)]


class ClippedNoisySum:
    """An aggregate whose inputs are clipped around ``base`` and whose result is the noisy sum of
    the clipped updates over ``denominator`` (``learn.privacy.noisy_sum_mean``)."""

    def __init__(self, inner: Aggregate, base: Arrays, clip_norm: float, noise_std: float, denominator: int,
                 seed: int) -> None:
        self.inner, self.base, self.clip_norm = inner, base, clip_norm
        self.noise_std, self.denominator, self.seed = noise_std, denominator, seed

    @property
    def count(self) -> int:
        return self.inner.count

    def add(self, update: Arrays, num_examples: float) -> None:
        self.inner.add(clip_update(self.base, update, self.clip_norm), num_examples)

    def result(self) -> dict[str, np.ndarray]:
        return noisy_sum_mean(self.base, self.inner.result(), self.inner.count, self.denominator, self.noise_std,
                              np.random.default_rng(self.seed))


LEVELS = {"off": NoPrivacy, "example": ExamplePrivacy, "site": SitePrivacy}


def server_privacy(config: RunConfig) -> NoPrivacy:
    """The run's DP on the server, by ``dp``."""
    return LEVELS[config.dp](config)
