"""What one stage produced, as plain records: a strategy fills them, ``results`` writes them."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class NodeReport:
    """One accepted train reply: the site's own numbers (``results.json`` ``stages[i].nodes``)."""

    node: int
    task: str
    train_loss: float | None
    val_accuracy: float | None
    val_auc: float | None
    seconds: float | None
    update_ratio: float  # ||update - base|| / ||base||, as sent
    clipped: bool  # scaled down to max-update-ratio


@dataclass
class StageOutcome:
    """One stage: who trained, who was refused, bytes on the wire, and every task's score of the new base."""

    participants: list[str] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)
    nodes: list[NodeReport] = field(default_factory=list)
    train_loss: float | None = None
    bytes_up: int = 0
    bytes_down: int = 0
    per_task: dict[str, dict] = field(default_factory=dict)
    server_seconds: float = 0.0  # the server's own training of the next base (a curation rule), in the stage's time
    # differential privacy (dp != off): the run's cumulative (epsilon, delta) after this stage, and what
    # this stage spent ({party, noise_multiplier, sample_rate, steps} each), replayed on resume
    epsilon: float | None = None
    delta: float | None = None
    privacy_events: list[dict] = field(default_factory=list)
