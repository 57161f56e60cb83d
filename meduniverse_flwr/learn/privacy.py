"""Differential privacy of what leaves a site: the two mechanisms and their accountant.

``dp = "site"``: the server clips each site's backbone update (fine-tuned minus base) to
``dp-clip-norm`` in L2 and adds Gaussian noise of std ``dp-noise-multiplier * dp-clip-norm`` to the
sum of the stage's clipped updates before dividing by the stage's K (DP-FedAvg, McMahan et al.
2018). One site's data changes the sum by at most the clip norm, so each stage is a Gaussian
mechanism on sites. The server is trusted to do this; sites are protected from everyone who
sees the bases (other sites, the published model).

``dp = "example"``: each site fine-tunes with DP-SGD (Abadi et al. 2016) through Opacus:
per-example gradients clipped to ``dp-clip-norm``, Gaussian noise of std ``noise * clip`` on
their sum, Poisson-sampled batches of expected size ``batch-size``. Every backbone a site sends
is then DP in its examples, against the server too.

The accountant is Opacus's RDP accountant (``opacus.accountants.RDPAccountant``), composed over
stages: one event per stage at the site level (sample rate 1: which K of the asked nodes reply
depends on timing, so no amplification by sampling is claimed), and ``epochs * ceil(n / batch)``
DP-SGD steps at sample rate ``batch / n`` per asked site at the example level. Opacus is imported
only when DP is on (it adds about a second to a node's start).
"""

from __future__ import annotations

import argparse
import math
import secrets
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from meduniverse_flwr.registry import DP_LEVELS


@dataclass(frozen=True)
class DPSGD:
    """Example-level DP-SGD settings of one site's fine-tuning."""

    clip_norm: float
    noise_multiplier: float
    secure_noise: bool  # noise seeded from OS entropy, not from the run seed (runs are not repeatable)


def noise_seed(seed: int, secure: bool) -> int:
    """The seed of a noise generator: the run's derived seed (repeatable), or 63 bits from the OS.

    With a known seed anyone who can recompute the training can subtract the noise, so a
    deployment that states a privacy guarantee sets ``dp-secure-noise``.
    """
    return secrets.randbits(63) if secure else seed


# ------------------------------------------------------------------ site level (server)
def noisy_sum_mean(base: Mapping[str, np.ndarray], mean: Mapping[str, np.ndarray], count: int, denominator: int,
                   noise_std: float, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """``base + (sum of the count clipped deltas + N(0, noise_std^2 I)) / denominator``.

    ``mean`` is the plain mean of ``count`` clipped updates (base + delta each). The denominator is
    fixed before the stage (its K), so one site changes the result by at most clip / K, whatever
    the others send. Noise is drawn in float64, per array in name order.
    """
    if count < 1 or denominator < 1:
        raise ValueError(f"noisy mean of {count} updates over {denominator}")
    out = {}
    for name in sorted(base):
        reference = base[name].astype(np.float64)
        summed = (mean[name].astype(np.float64) - reference) * count
        noise = rng.standard_normal(reference.shape) * noise_std
        out[name] = (reference + (summed + noise) / denominator).astype(base[name].dtype)
    return {name: out[name] for name in base}


# ------------------------------------------------------------------ example level (site)
def example_steps(n_train: int, batch_size: int, epochs: int) -> tuple[float, int]:
    """(sample rate, steps) of one site's DP-SGD fine-tuning: Poisson batches of expected size
    ``batch_size``, ``ceil(n / batch)`` steps per epoch."""
    if n_train < 1:
        raise ValueError(f"DP-SGD needs at least one training example, got {n_train}")
    return min(1.0, batch_size / n_train), epochs * math.ceil(n_train / batch_size)


def poisson_batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """One epoch of Poisson-sampled batches: ``ceil(n / batch)`` index tensors, each example in
    each with probability ``batch / n`` (the sampling the accountant assumes; a batch may be empty)."""
    sample_rate, steps = example_steps(n, batch_size, 1)
    for _ in range(steps):
        yield torch.nonzero(torch.rand(n, generator=generator) < sample_rate).squeeze(1)


def make_private(model: nn.Module, optimizer: torch.optim.Optimizer, dp: DPSGD, batch_size: int, seed: int,
                 device: torch.device) -> tuple[nn.Module, torch.optim.Optimizer, Callable[[], None]]:
    """Opacus's per-example-gradient wrapper and DP optimizer around ``model`` / ``optimizer``.

    Returns (forward module, DP optimizer, close): ``close()`` removes Opacus's hooks from ``model``.
    The loss must be the batch mean, as ``finetune.task_loss`` is.
    """
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    wrapped = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    generator = torch.Generator(device=device).manual_seed(noise_seed(seed, dp.secure_noise))
    private = DPOptimizer(optimizer, noise_multiplier=dp.noise_multiplier, max_grad_norm=dp.clip_norm,
                          expected_batch_size=batch_size, loss_reduction="mean", generator=generator)
    return wrapped, private, wrapped._close


def noise_only_step(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """The step of an empty Poisson batch: no gradient, but the noise all the same (skipping it
    would tell who was not sampled)."""
    optimizer.zero_grad(set_to_none=True)
    for param in model.parameters():
        if param.requires_grad:
            param.grad_sample = torch.zeros((0, *param.shape), dtype=param.dtype, device=param.device)
    optimizer.step()


# ------------------------------------------------------------------ accounting
class PrivacyLedger:
    """Cumulative (epsilon, delta) per protected party, with Opacus's RDP accountant.

    Parties are "federation" (site level) or a task name (example level; the nodes of a sharded
    task are counted together, an upper bound). ``events`` is what ``results.json`` records per
    stage so that a resumed run replays it.
    """

    def __init__(self, delta: float) -> None:
        self.delta = delta
        self._events: dict[str, list[tuple[float, float, int]]] = {}

    def spend(self, party: str, noise_multiplier: float, sample_rate: float, steps: int) -> None:
        self._events.setdefault(party, []).append((noise_multiplier, sample_rate, steps))

    def epsilon(self, party: str) -> float:
        events = self._events.get(party)
        return 0.0 if events is None else epsilon_of(events, self.delta)

    def worst_epsilon(self) -> float:
        """The largest epsilon of any party so far (0 before any release)."""
        return max((self.epsilon(party) for party in self._events), default=0.0)


def epsilon_of(events: list[tuple[float, float, int]], delta: float) -> float:
    """Epsilon at ``delta`` of the composed (noise multiplier, sample rate, steps) events, by
    Opacus's RDP accountant (each event = ``steps`` calls of its ``.step()``)."""
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = list(events)
    return float(accountant.get_epsilon(delta))


def noise_multiplier_for(epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """The smallest noise multiplier whose composition over ``steps`` events at ``sample_rate``
    stays within (epsilon, delta), by Opacus's RDP accountant."""
    from opacus.accountants.utils import get_noise_multiplier

    return float(get_noise_multiplier(target_epsilon=epsilon, target_delta=delta, sample_rate=sample_rate,
                                      steps=steps, accountant="rdp", epsilon_tolerance=0.001))


def main(argv: list[str] | None = None) -> None:
    """Calibrate ``dp-noise-multiplier`` for a target epsilon, or give the epsilon after each stage of a
    noise multiplier.

        python -m meduniverse_flwr.learn.privacy --epsilon 4 --level site --num-stages 3
        python -m meduniverse_flwr.learn.privacy --epsilon 4 --level example --num-stages 3 \\
            --local-epochs 2 --batch-size 64 --n-train 1000 3882
        python -m meduniverse_flwr.learn.privacy --noise-multiplier 1.1214 --level example --num-stages 3 --n-train 1000
    """
    parser = argparse.ArgumentParser(prog="python -m meduniverse_flwr.learn.privacy", description=main.__doc__.split("\n")[0])
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--epsilon", type=float, help="the epsilon after --num-stages: print the noise multiplier")
    target.add_argument("--noise-multiplier", type=float, help="print the epsilon after each stage")
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--level", choices=DP_LEVELS[1:], required=True)
    parser.add_argument("--num-stages", type=int, required=True)
    parser.add_argument("--local-epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--n-train", type=int, nargs="+", default=[], help="each site's training examples")
    args = parser.parse_args(argv)
    if args.level == "example" and not args.n_train:
        parser.error("--level example needs --n-train")
    # the party's (sample rate, steps) per stage: the federation at the site level, each site at the example level
    parties = ({"federation": (1.0, 1)} if args.level == "site" else
               {f"n-train {n}": example_steps(n, args.batch_size, args.local_epochs) for n in args.n_train})
    if args.noise_multiplier is not None:
        for party, (rate, steps) in parties.items():
            epsilons = [epsilon_of([(args.noise_multiplier, rate, steps)] * stage, args.delta)
                        for stage in range(1, args.num_stages + 1)]
            print(f"{party}: epsilon after stages 1..{args.num_stages}: " + " / ".join(f"{e:.2f}" for e in epsilons))
        return
    needed = {party: noise_multiplier_for(args.epsilon, args.delta, rate, steps * args.num_stages)
              for party, (rate, steps) in parties.items()}
    if args.level == "example":  # the site with the highest epsilon at a given noise sets the noise
        for party, sigma in needed.items():
            print(f"{party}: {sigma:.4f}")
    print(f"{max(needed.values()):.4f}")


if __name__ == "__main__":
    main()
