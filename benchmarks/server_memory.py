"""Server memory in the number of replies K, per aggregation rule; aggregation cost per reply.

    python benchmarks/server_memory.py [--model vit-small] [--image-size 224] [--rules weighted,median,trimmed-mean]

For K = 2, 8, 32 (each in a fresh process), ``StageWise.run_train_stage``
drives a synthetic grid whose K nodes answer one at a time with random
backbones of the real shapes; the peak RSS of the process and the stage's
seconds are reported, for each rule. The streaming rules stay flat in K; the
robust rules (median, trimmed mean) hold every reply. Then the cost of folding
one reply into the running aggregate is timed against a plain NumPy add over
the same float32 bytes (one thread each), in wall and in CPU time, and checked
against ``FOLD_TARGET``.
"""

import argparse
import resource
import subprocess
import sys
import time
from uuid import uuid4

import numpy as np

# The fold of one reply within this many times a NumPy float32 add over its bytes: the target set in
# benchmarks/README.md ("Server memory flat in the number of replies K"), unchanged since it was set.
FOLD_TARGET = 2.0


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def one_stage(k: int, model: str, image_size: int, rule: str) -> None:
    """Child process: one stage with K synthetic replies; prints peak RSS before and after."""
    from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
    from flwr.serverapp import Grid
    from flwr.supercore.task_identity import TaskIdentity

    from meduniverse_flwr.config import RunConfig
    from meduniverse_flwr.learn.model import create_backbone
    from meduniverse_flwr.server.strategy.stagewise import StageWise
    from meduniverse_flwr.wire.card import TaskCard
    from meduniverse_flwr.wire.messages import pack

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    base = ArrayRecord(create_backbone(model, image_size).state_dict())
    shapes = {name: array.shape for name, array in base.items()}
    base_arrays = {name: array.numpy() for name, array in base.items()}
    rng = np.random.default_rng(0)

    class SyntheticGrid(Grid):
        """K nodes; each pull returns one fresh reply, as if replies trickle in."""

        def __init__(self):
            self.pushed: dict[str, Message] = {}

        def get_node_ids(self):
            return list(range(k))

        def push_messages(self, messages):
            ids = []
            for message in messages:
                message.metadata.__dict__["_message_id"] = str(uuid4())
                message.content = RecordDict()  # a SuperLink keeps serialised bytes, not our objects
                self.pushed[message.metadata.message_id] = message
                ids.append(message.metadata.message_id)
            return ids

        def pull_messages(self, message_ids):
            for message_id in message_ids:
                message = self.pushed.pop(message_id, None)
                if message is not None:
                    # a fine-tuned backbone: the base plus a small update (within max-update-ratio)
                    arrays = {n: base_arrays[n] + 0.01 * rng.standard_normal(s, dtype=np.float32)
                              for n, s in shapes.items()}
                    content = RecordDict({"arrays": pack(arrays, "fp32"),
                                          "metrics": MetricRecord({"num-examples": 100})})
                    return [Message(content, reply_to=message)]
            return []

        def send_and_receive(self, messages, *, timeout=None):
            raise NotImplementedError

        def create_message(self, *args, **kwargs):
            raise NotImplementedError

        def set_run(self, run):
            pass

        @property
        def run(self):
            raise NotImplementedError

    strategy = StageWise(RunConfig.with_defaults(schedule="every-stage", clients_per_stage=k, model=model,
                                                 image_size=image_size, aggregation=rule))
    strategy.cards = {node: TaskCard(f"task-{node}", "synthetic", 2, "binary", 100, 100, 100) for node in range(k)}
    before = peak_rss_mb()
    started = time.perf_counter()
    new_base, metrics = strategy.run_train_stage(SyntheticGrid(), 1, base)
    assert metrics["replies"] == k
    print(f"{before:.1f} {peak_rss_mb():.1f} {time.perf_counter() - started:.2f}")


def fold_cost(model: str, image_size: int, repeats: int = 5, clock=time.perf_counter) -> tuple[float, float, int]:
    """Seconds to fold one reply into a ``RunningAggregate`` and to add its float32 arrays with NumPy,
    both on one thread (NumPy's element-wise ufuncs do not spawn threads); ``clock=time.process_time``
    counts only this process's CPU time, for a machine that other jobs share."""
    from meduniverse_flwr.learn.model import create_backbone
    from meduniverse_flwr.server.aggregation import RunningAggregate

    shapes = {n: tuple(t.shape) for n, t in create_backbone(model, image_size).state_dict().items()}
    rng = np.random.default_rng(0)
    update = {n: rng.standard_normal(s, dtype=np.float32) for n, s in shapes.items()}
    total = {n: np.zeros(s, np.float32) for n, s in shapes.items()}
    running = RunningAggregate("weighted")
    running.add(update, 7)  # allocate the sums before timing
    started = clock()
    for _ in range(repeats):
        running.add(update, 7)
    ours = (clock() - started) / repeats
    started = clock()
    for _ in range(repeats):
        for name in total:
            np.add(total[name], update[name], out=total[name])
    plain = (clock() - started) / repeats
    return ours, plain, sum(a.nbytes for a in update.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="vit-small")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--rules", default="weighted,median,trimmed-mean")
    parser.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        one_stage(args.child, args.model, args.image_size, args.rules)
        return
    from meduniverse_flwr.learn.model import create_backbone

    backbone_mb = sum(t.numel() * 4 for t in create_backbone(args.model, args.image_size).state_dict().values()) / 2**20
    for rule in args.rules.split(","):
        peaks = {}
        for k in (2, 8, 32):
            out = subprocess.run([sys.executable, __file__, "--child", str(k), "--model", args.model,
                                  "--image-size", str(args.image_size), "--rules", rule],
                                 capture_output=True, text=True, check=True)
            before, after, seconds = map(float, out.stdout.split()[-3:])
            peaks[k] = after
            print(f"{rule:>12} K={k:2d}: peak RSS {after:7.1f} MiB (before the stage {before:.1f} MiB), "
                  f"stage {seconds:.1f} s")
        growth = peaks[32] - peaks[2]
        print(f"{rule:>12}: {args.model} backbone = {backbone_mb:.1f} MiB; growth K=2 -> K=32: {growth:.1f} MiB = "
              f"{growth / backbone_mb:.2f} backbones")
    for clock, kind in ((time.perf_counter, "wall"), (time.process_time, "CPU")):
        ours, plain, nbytes = fold_cost(args.model, args.image_size, clock=clock)
        ratio = ours / plain
        print(f"fold one reply ({nbytes / 2**20:.1f} MiB, {kind} time, one thread each): {1e3 * ours:.1f} ms; "
              f"NumPy float32 add over the same bytes: {1e3 * plain:.1f} ms; ratio {ratio:.2f} "
              f"(target <= {FOLD_TARGET:g}: {'met' if ratio <= FOLD_TARGET else 'MISSED'})")


if __name__ == "__main__":
    main()
