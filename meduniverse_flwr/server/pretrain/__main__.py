"""Pretrain a stage-0 base (MAE or SimMIM) on unlabeled images, outside a run.

``python -m meduniverse_flwr.server.pretrain --method mae --epochs 30 --out pretrained/`` writes
``encoder.safetensors`` (load it with ``pretrain=<path>``), ``state.safetensors`` + ``state.json``
(run it again to resume a killed run), ``reconstruction.png`` and ``log.json``. Its defaults are
what the ServerApp pretrains with under the declared run config (pyproject.toml).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from meduniverse_flwr import registry
from meduniverse_flwr.config import declared_defaults, split_list
from meduniverse_flwr.data.corpus import load_corpus
from meduniverse_flwr.data.options import DataOptions
from meduniverse_flwr.server.pretrain.engine import pretrain
from meduniverse_flwr.server.pretrain.settings import PretrainSettings

logger = logging.getLogger("flwr")
TUNED = ("epochs", "batch_size", "lr", "weight_decay", "warmup_epochs", "mask_ratio", "decoder_dim", "decoder_depth",
         "seed")  # the PretrainSettings fields given as --<field>


def main(argv: list[str] | None = None) -> None:
    declared = declared_defaults()
    # as the ServerApp builds them: the run-config keys it passes, the rest PretrainSettings' own
    defaults = PretrainSettings(method=declared["pretrain"], epochs=declared["pretrain-epochs"], seed=declared["seed"],
                                input_norm=declared["input-norm"])
    parser = argparse.ArgumentParser(prog="python -m meduniverse_flwr.server.pretrain", description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", choices=list(registry.PRETRAIN_METHODS), default=defaults.method)
    parser.add_argument("--model", default=declared["model"])
    parser.add_argument("--image-size", type=int, default=declared["image-size"])
    parser.add_argument("--datasets", default=declared["datasets"],
                        help="comma list of dataset entries, as in the run config (e.g. medmnist:pathmnist)")
    parser.add_argument("--data", default=declared["data"], help="source of entries without a 'source:' prefix")
    parser.add_argument("--data-root", default=declared["data-root"], help="data / cache directory")
    parser.add_argument("--out", type=Path, required=True, help="output directory (resumes from it)")
    for field in TUNED:
        default = getattr(defaults, field)
        parser.add_argument("--" + field.replace("_", "-"), type=type(default), default=default)
    parser.add_argument("--norm-pix-loss", action="store_true", help="per-patch normalised MAE targets")
    parser.add_argument("--fp32", action="store_true", help="no bf16 autocast on CUDA")
    parser.add_argument("--input-norm", choices=list(registry.INPUT_NORMS), default=defaults.input_norm)
    parser.add_argument("--device", default=declared["device"])
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        settings = PretrainSettings(method=args.method, norm_pix_loss=args.norm_pix_loss, bf16=not args.fp32,
                                    input_norm=args.input_norm,
                                    **{field: getattr(args, field) for field in TUNED})
        images = load_corpus(split_list(args.datasets), DataOptions(args.data, args.data_root, args.image_size))
        logger.info("pretrain corpus: %d unlabeled images from %s", len(images), args.datasets)
        result = pretrain(args.model, args.image_size, images, settings, args.out, args.device)
    except ValueError as err:
        parser.exit(2, f"error: {err}\n")
    logger.info("encoder: %s", result.encoder_path)


if __name__ == "__main__":
    main()
