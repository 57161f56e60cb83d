"""What travels in a message, both ways: model arrays in the transport dtype, and the node's instructions."""

from __future__ import annotations

import dataclasses
import json
import math
import reprlib
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from meduniverse_flwr import registry
from meduniverse_flwr.config import ConfigError, RunConfig, read_keys
from meduniverse_flwr.wire.transport import TRANSPORT_DTYPES, decode, encode

# Flower moves every Array of a record as its own object, one request each (over TLS with node
# authentication: ~30 ms each on the loopback benchmark), so ``pack`` sends the arrays of one call
# as one flat buffer in the wire dtype, named by its index: ``"packed:" + JSON [[name, shape], ...]``.
PACKED = "packed:"
R = TypeVar("R", ArrayRecord, ConfigRecord, MetricRecord)
# An index is a few dozen characters per array; a longer one is not one that ``pack`` wrote.
MAX_INDEX_CHARS = 1 << 20
MAX_NDIM = 8


def record(content: RecordDict, name: str, kind: type[R]) -> R | None:
    """``content[name]`` if it is a ``kind`` record, else None.

    Reads the RecordDict itself: Flower's typed views (``content.array_records``, ...) are built per
    access and hold a reference cycle (a bound method of the view) to the whole RecordDict, so a reply
    read through them keeps its arrays until the cyclic garbage collector runs. On a server folding
    K large replies that raised peak memory with K (benchmarks/README.md)."""
    value = content[name] if name in content else None
    return value if isinstance(value, kind) else None


def to_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    """One array per name -> NumPy; ValueError naming the entry if one is not a plain array."""
    return {name: _numpy(array, name) for name, array in record.items()}


def _numpy(array: Array, name: str) -> np.ndarray:
    try:
        value = array.numpy()  # np.load without pickles
    except (TypeError, ValueError, OSError, EOFError, zipfile.BadZipFile) as err:
        raise ValueError(f"{reprlib.repr(name)} cannot be read ({err})") from None
    if not isinstance(value, np.ndarray):  # np.load also opens .npz archives
        raise ValueError(f"{reprlib.repr(name)} is not an array")
    return value


def to_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({name: Array(np.ascontiguousarray(value)) for name, value in arrays.items()})


def pack(arrays: Mapping[str, np.ndarray], transport_dtype: str) -> ArrayRecord:
    """float arrays -> an ArrayRecord in the transport dtype with one packed entry (records of several
    calls merge with ``{**a, **b}``: their entries are named by their arrays). Tensors are converted by
    their owner first (``learn.model.to_arrays``): the wire knows no torch."""
    for name, value in arrays.items():
        if not isinstance(value, np.ndarray):
            raise TypeError(f"pack: {reprlib.repr(name)} is a {type(value).__name__}, not a NumPy array")
    encoded = encode(arrays, transport_dtype)
    index = json.dumps([[name, list(value.shape)] for name, value in encoded.items()], separators=(",", ":"))
    wire_dtype = TRANSPORT_DTYPES[transport_dtype].wire_dtype
    data = np.concatenate([value.reshape(-1) for value in encoded.values()]) if encoded else np.empty(0, wire_dtype)
    return ArrayRecord({PACKED + index: Array(data)})


def unpack(record: ArrayRecord, transport_dtype: str) -> dict[str, np.ndarray]:
    """A packed ArrayRecord (or one array per name) in the transport dtype -> float32 arrays;
    ValueError (one line) if it is neither, or not in that dtype."""
    packed = [key for key in record if key.startswith(PACKED)]
    if not packed:
        return decode(to_numpy(record), transport_dtype)
    if len(packed) != len(record):
        raise ValueError("record mixes packed and one-array entries")
    arrays: dict[str, np.ndarray] = {}
    for key in packed:
        for name, value in _unpacked(key, _numpy(record[key], key)).items():
            if name in arrays:
                raise ValueError(f"packed record: {reprlib.repr(name)} appears twice")
            arrays[name] = value
    return decode(arrays, transport_dtype)


def _unpacked(key: str, data: np.ndarray) -> dict[str, np.ndarray]:
    """One packed entry -> views of its buffer, the buffer's size checked against the index."""
    entries = _parse_index(key[len(PACKED):])
    if data.ndim != 1:
        raise ValueError(f"packed entry {reprlib.repr(key)} has shape {data.shape}, expected a flat buffer")
    sizes = [math.prod(shape) for _, shape in entries]
    if sum(sizes) != data.size:
        raise ValueError(f"packed entry {reprlib.repr(key)} holds {data.size} values, its index names {sum(sizes)}")
    views = np.split(data, np.cumsum(sizes)[:-1]) if entries else []
    return {name: view.reshape(shape) for (name, shape), view in zip(entries, views)}


def _parse_index(index: str) -> list[tuple[str, tuple[int, ...]]]:
    """``[[name, shape], ...]`` with unique names and shapes of at most MAX_NDIM sizes >= 0."""
    where = f"packed entry {reprlib.repr(PACKED + index)}"
    if len(index) > MAX_INDEX_CHARS:
        raise ValueError(f"{where}: index longer than {MAX_INDEX_CHARS} characters")
    try:
        entries = json.loads(index)
    except ValueError as err:
        raise ValueError(f"{where}: index is not JSON ({err})") from None
    if not isinstance(entries, list):
        raise ValueError(f"{where}: index is not a list")
    parsed = []
    for entry in entries:
        if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str)
                and isinstance(entry[1], list) and len(entry[1]) <= MAX_NDIM
                and all(type(size) is int and size >= 0 for size in entry[1])):
            raise ValueError(f"{where}: {reprlib.repr(entry)} is not [name, shape]")
        parsed.append((entry[0], tuple(entry[1])))
    if len({name for name, _ in parsed}) != len(parsed):
        raise ValueError(f"{where}: index names an array twice")
    return parsed



@dataclass(frozen=True)
class Instructions:
    """Everything a node needs for one message besides its data, sent in the message's ``config`` record.

    Keys are the run-config names (and checks) of the same settings, except four a message
    alone carries: ``epochs`` (the local epochs of a train message, or the evaluation protocol's
    epochs of an evaluate message), ``head-epochs`` (epochs of the fresh head alone before them),
    and the strategy's facts the node acts on, ``node-keeps`` and ``node-term``
    (``registry.StrategyEntry``), followed by the term's own keys. A train message carries the
    arriving client's recipe (``client-lr``, ``client-layer-decay``, ``client-head-epochs``) under
    ``lr``, ``layer-decay`` and ``head-epochs``; an evaluate message the scoring recipe.
    """

    model: str
    image_size: int
    transport_dtype: str
    device: str
    epochs: int
    head_epochs: int  # LP-FT: the fresh head alone on the frozen backbone first (0: none)
    lr: float
    weight_decay: float
    batch_size: int
    seed: int
    eval_mode: str
    layer_decay: float
    augment: str
    input_norm: str
    eval_split: str
    eval_labels: int
    node_metrics: bool
    compile: bool
    node_keeps: str  # what the node keeps between messages: nothing, its head, or its model
    node_term: str  # a registry.NODE_TERMS entry added to its training loss ("" for none)
    term_settings: tuple[tuple[str, float], ...]  # the term's run-config keys and values
    dp: str  # "example": the node fine-tunes with DP-SGD (privacy.py)
    dp_clip_norm: float
    dp_noise_multiplier: float
    dp_secure_noise: bool

    @classmethod
    def for_training(cls, config: RunConfig) -> "Instructions":
        """What a train message asks of a client: the clients' own recipe (``client-*``)."""
        return cls.for_run(config, config.local_epochs, config.client_lr, config.client_layer_decay,
                           config.client_head_epochs)

    @classmethod
    def for_scoring(cls, config: RunConfig) -> "Instructions":
        """What an evaluate message asks: the scoring recipe (``lr``, ``layer-decay``, ``eval-*``)."""
        return cls.for_run(config, config.evaluate_epochs, config.lr, config.layer_decay, 0)

    @classmethod
    def for_run(cls, config: RunConfig, epochs: int, lr: float, layer_decay: float, head_epochs: int) -> "Instructions":
        """A run's instructions, for messages that train ``epochs`` epochs at ``lr`` with ``layer_decay``
        after ``head_epochs`` of the head alone."""
        entry = registry.STRATEGIES[config.strategy]
        term_keys = registry.NODE_TERMS[entry.node_term].keys if entry.node_term else ()
        settings = config.to_run_config()
        return cls(model=config.model, image_size=config.image_size, transport_dtype=config.transport_dtype,
                   device=config.device, epochs=epochs, head_epochs=head_epochs, lr=lr,
                   weight_decay=config.weight_decay, batch_size=config.batch_size, seed=config.seed,
                   eval_mode=config.eval_mode, layer_decay=layer_decay, augment=config.augment, input_norm=config.input_norm,
                   eval_split=config.eval_split, eval_labels=config.eval_labels,
                   node_metrics=config.node_metrics, compile=config.compile, node_keeps=entry.node_keeps,
                   node_term=entry.node_term, term_settings=tuple((key, settings[key]) for key in term_keys),
                   dp=config.dp, dp_clip_norm=config.dp_clip_norm, dp_noise_multiplier=config.dp_noise_multiplier,
                   dp_secure_noise=config.dp_secure_noise)

    def to_record(self) -> ConfigRecord:
        plain = {f.name.replace("_", "-"): getattr(self, f.name) for f in dataclasses.fields(self)
                 if f.name != "term_settings"}
        return ConfigRecord({**plain, **dict(self.term_settings)})

    @classmethod
    def from_record(cls, record: Mapping[str, object]) -> "Instructions":
        """Read and check a message's ``config`` record; ConfigError (one line) names a bad key."""
        own = ("epochs", "head-epochs", "node-keeps", "node-term", "term-settings")
        values = read_keys(record, [f.name.replace("_", "-") for f in dataclasses.fields(cls)
                                    if f.name.replace("_", "-") not in own])
        epochs = record.get("epochs")
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise ConfigError(f"message config: 'epochs' = {epochs!r}: must be an integer >= 1")
        head_epochs = record.get("head-epochs")
        if isinstance(head_epochs, bool) or not isinstance(head_epochs, int) or head_epochs < 0:
            raise ConfigError(f"message config: 'head-epochs' = {head_epochs!r}: must be an integer >= 0")
        node_keeps, node_term = record.get("node-keeps"), record.get("node-term")
        if node_keeps not in registry.NODE_KEEPS:
            raise ConfigError(f"message config: 'node-keeps' = {node_keeps!r}: must be one of {registry.NODE_KEEPS}")
        if node_term != "" and node_term not in registry.NODE_TERMS:
            raise ConfigError(f"message config: 'node-term' = {node_term!r}: must be '' or one of "
                              f"{tuple(registry.NODE_TERMS)}")
        term_keys = registry.NODE_TERMS[node_term].keys if node_term else ()
        term = read_keys(record, term_keys)
        return cls(epochs=epochs, head_epochs=head_epochs, node_keeps=node_keeps, node_term=node_term,
                   term_settings=tuple((key, term[key.replace("-", "_")]) for key in term_keys), **values)
