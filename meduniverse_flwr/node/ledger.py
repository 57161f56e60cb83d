"""A site's privacy floor, enforced by its own node, and the ledger of what it has spent.

The server's accountant (``learn.privacy.PrivacyLedger``) says what a run spent; a site that must not
release more than some epsilon on its data cannot take the server's word for it. A node whose
node config sets ``require-dp`` or ``max-epsilon`` (``node.site``) therefore checks every train
message before it trains, and refuses (``Refused``, a one-line reason the server logs as a
rejected node) one that would release an update

- trained without DP-SGD, or with its noise seeded from the run seed (``dp-secure-noise = false``:
  whoever knows the seed can subtract the noise), or
- that takes the site's epsilon on this dataset past ``max-epsilon`` at ``max-epsilon-delta``.

Accepted releases are charged to ``<cache dir>/privacy-ledger.json`` *before* training starts: a
crash after the charge wastes budget, never hides a release. The file spans runs and restarts
(a site's budget is for its data, not for one run); it is written atomically under an exclusive
lock, so two runs on one node cannot both spend the last of a budget. A ledger that cannot be
read refuses every release: a lost ledger must not reset a budget to zero.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
from collections.abc import Iterator, Sequence
from pathlib import Path

from meduniverse_flwr.common.files import write_json_atomic
from meduniverse_flwr.learn.privacy import epsilon_of, example_steps
from meduniverse_flwr.node.site import Site

LEDGER_FILE = "privacy-ledger.json"
MAX_LEDGER_BYTES = 16 << 20  # far above any real ledger (one event per release); bounds a hostile file
Event = tuple[float, float, int]  # (noise multiplier, sample rate, steps): one DP-SGD fine-tuning


class Refused(RuntimeError):
    """A train message the site's privacy floor does not allow (one line: why)."""


def ledger_path(cache_dir: Path) -> Path:
    return Path(cache_dir) / LEDGER_FILE


def read_ledger(path: Path) -> dict[str, list[Event]]:
    """The events charged so far per dataset (none before the first); Refused if unreadable."""
    if not path.exists():
        return {}
    try:
        if path.stat().st_size > MAX_LEDGER_BYTES:
            raise ValueError(f"larger than {MAX_LEDGER_BYTES} bytes")
        payload = json.loads(path.read_text())
        if payload.get("version") != 1 or not isinstance(payload.get("datasets"), dict):
            raise ValueError("not a version-1 ledger")
        return {str(name): [_event(event) for event in events] for name, events in payload["datasets"].items()}
    except (OSError, ValueError, TypeError, AttributeError) as err:
        raise Refused(f"privacy ledger {path} cannot be read ({err}); refusing to release until it is repaired") \
            from None


def _event(raw: object) -> Event:
    if not isinstance(raw, list) or len(raw) != 3:
        raise ValueError(f"event {raw!r} is not [noise, rate, steps]")
    noise, rate, steps = raw
    if not (isinstance(noise, float) and noise > 0 and math.isfinite(noise)
            and isinstance(rate, float) and 0 < rate <= 1
            and isinstance(steps, int) and not isinstance(steps, bool) and steps >= 1):
        raise ValueError(f"event {raw!r} is out of range")
    return noise, rate, steps


def spent(events: Sequence[Event], delta: float) -> float:
    """Epsilon of ``events`` composed, at ``delta`` (0 for none)."""
    return epsilon_of(list(events), delta) if events else 0.0


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def charge(site: Site, dataset: str, n_train: int, dp: str, noise_multiplier: float, secure_noise: bool,
           batch_size: int, epochs: int) -> float:
    """Check one train message against the site's floor and charge it to the ledger; the epsilon
    spent on ``dataset`` after it. Refused (nothing charged) if the floor does not allow it."""
    if dp != "example":
        raise Refused(f"site privacy floor: the run asks dp={dp!r}, and this site releases only DP-SGD-trained "
                      f"updates (require-dp={site.require_dp!r}, max-epsilon={site.max_epsilon})")
    if not secure_noise:
        raise Refused("site privacy floor: the run's DP-SGD noise is seeded from the run seed "
                      "(dp-secure-noise = false), so whoever knows the seed could remove it")
    sample_rate, steps = example_steps(n_train, batch_size, epochs)
    path = ledger_path(site.write_dir())
    with _locked(path):
        ledger = read_ledger(path)
        events = [*ledger.get(dataset, []), (float(noise_multiplier), float(sample_rate), int(steps))]
        after = spent(events, site.max_epsilon_delta)
        if after > site.max_epsilon:
            raise Refused(f"site privacy floor: this release would take epsilon on {dataset!r} from "
                          f"{spent(events[:-1], site.max_epsilon_delta):.4g} to {after:.4g}, past "
                          f"max-epsilon={site.max_epsilon} (delta {site.max_epsilon_delta})")
        write_json_atomic(path, {"version": 1, "datasets": {**ledger, dataset: events}})
    return after


def site_epsilon(site: Site, dataset: str) -> float:
    """What the site's ledger says it has spent on ``dataset`` (at ``max-epsilon-delta``)."""
    return spent(read_ledger(ledger_path(site.write_dir())).get(dataset, []), site.max_epsilon_delta)
