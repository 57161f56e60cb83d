"""The norm site-level DP gives the base after each stage, from the mechanism itself
(EXPERIMENTS.md, `dp-cpu` at the site level): each stage adds N(0, (z c)^2 I) / K to the base's P
parameters, independent of everything else, so after s stages the base's norm is about
sqrt(|base_0|^2 + s P (z c / K)^2), the learned updates (0.08-0.17 of the base's norm) aside.

    python docs/experiments/site_noise_norms.py --base-norm 40 --clip 4 --sites 3 --stages 3 7.0117 2.0050 1.1046
"""

import argparse
import math

from meduniverse_flwr.learn.model import create_backbone


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("noise_multipliers", type=float, nargs="+")
    parser.add_argument("--model", default="vit-micro")
    parser.add_argument("--image-size", type=int, default=28)
    parser.add_argument("--base-norm", type=float, required=True, help="the norm of the stage-0 base")
    parser.add_argument("--clip", type=float, required=True, help="dp-clip-norm")
    parser.add_argument("--sites", type=int, required=True, help="K, the replies a stage's sum is divided by")
    parser.add_argument("--stages", type=int, required=True)
    args = parser.parse_args()
    parameters = sum(t.numel() for t in create_backbone(args.model, args.image_size).state_dict().values())
    print(f"{args.model} at {args.image_size} px: P = {parameters:,} parameters")
    for z in args.noise_multipliers:
        per_stage = z * args.clip * math.sqrt(parameters) / args.sites
        norms = [math.sqrt(args.base_norm ** 2 + s * per_stage ** 2) for s in range(args.stages + 1)]
        print(f"z = {z}: noise norm per stage {per_stage:,.0f}; base norm, stage 0..{args.stages}: "
              + " / ".join(f"{n:,.0f}" for n in norms))


if __name__ == "__main__":
    main()
