"""What a pretraining run is asked to do: the method and its hyperparameters, checked on creation.
Its own module, so that the MIM models and the loop both read it without importing each other."""

from __future__ import annotations

from dataclasses import dataclass

from meduniverse_flwr import registry

DEFAULT_MASK_RATIO = {"mae": 0.75, "simmim": 0.6}


@dataclass(frozen=True)
class PretrainSettings:
    method: str = "mae"
    epochs: int = 30
    batch_size: int = 256
    lr: float = 1.5e-3
    weight_decay: float = 0.05
    warmup_epochs: int = 2
    mask_ratio: float = 0.0  # 0: the method's default (MAE 0.75, SimMIM 0.6)
    # A light decoder keeps MAE's advantage: its cost is paid on all tokens.
    decoder_dim: int = 64
    decoder_depth: int = 1
    # Off by default: per-patch normalised targets discard absolute intensity,
    # which medical classes depend on (CT Hounsfield units, stain colour); on the
    # embedded universe the linear probe is 0.706 with it, 0.789 without (10 epochs).
    norm_pix_loss: bool = False
    # bf16 autocast on CUDA (no effect on CPU, where bf16 matmuls are slower); part of the cache key,
    # since the weights differ. Measured on an H200 in benchmarks/README.md.
    bf16: bool = True
    seed: int = 0
    input_norm: str = "symmetric"  # registry.INPUT_NORMS: the scaling the nodes fine-tune with too

    def __post_init__(self) -> None:
        methods = registry.PRETRAIN_METHODS
        if self.method not in methods:
            raise ValueError(f"pretrain method '{self.method}': unknown, choose one of {list(methods)}")
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ValueError(f"mask ratio {self.mask_ratio}: must be in [0, 1)")

    @property
    def effective_mask_ratio(self) -> float:
        return self.mask_ratio or DEFAULT_MASK_RATIO[self.method]
