"""What a stage costs on a real (TLS + node authentication) deployment, all on 127.0.0.1, and where it goes.

    python benchmarks/deployment_stage.py [--stages 2] [--images 64]
    python benchmarks/deployment_stage.py --images 0 --datasets ct-tissue,histology-stain,brain-tissue
    python benchmarks/deployment_stage.py --data-load 1000

Starts the launcher's local deployment (one SuperLink, one SuperNode per dataset), runs
``flwr run . meduniverse-local`` with a random base, and prints each stage's wall time from
``results.json``. With ``--images N`` each node gets a made-here MedMNIST-layout file of N
train and 3N/8 val / test random images (what tests/test_deploy.py runs on), so the numbers are
the deployment's fixed cost; ``--images 0`` uses the ``--datasets`` entries as they are.

The breakdown comes from the SuperNodes' log lines, time-stamped here as they appear: per
message, the wait from the previous round's last reply to the node receiving it (server
processing, the server's and the node's polls), the download of its objects, the start of its
ClientApp process (SuperExec poll, process start, Flower's imports), the ClientApp's own work
(the app's imports, data load, compute) and the upload of the reply. The app's imports and data
load are also timed alone, in fresh processes.

``--data-load N`` starts no deployment: it times a node's task load in a fresh process (what every
message's ClientApp pays), first (decode, and write the node data cache) and then (from the cache),
for sources of N train and N/5, 2N/5 val / test images where decoding costs.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from PIL import Image

from deploy.launch import LOCAL_CONNECTION, LocalDeployment
from meduniverse_flwr.data.embedded import load_embedded
from meduniverse_flwr.data.medmnist import FLAGS, medmnist_path
from meduniverse_flwr.learn.model import create_backbone
from meduniverse_flwr.wire.messages import pack
from simulation.flower import finish_flwr_run, free_port, run_status, start_flwr_run

SYNTHETIC = "pneumoniamnist,bloodmnist,organamnist"  # 2, 8 and 11 classes; gray and RGB
RGB = {"bloodmnist", "pathmnist", "dermamnist", "retinamnist"}
# node log line -> event of the message in flight (ANSI colours stripped)
EVENTS = {"Receiving:": "received", "Received successfully": "downloaded", "Start `flwr-clientapp` process": "started",
          "Sending:": "replied", "Sent successfully": "uploaded"}
ROUND = re.compile(r"ROUND (stage|evaluate)-(\d+)\]")
PHASES = ["to node", "download", "ClientApp up", "ClientApp work", "upload"]


def write_site(folder: Path, flag: str, n_train: int, seed: int) -> Path:
    """A MedMNIST-layout file of random images: N train, 3N/8 val and test."""
    info, rng = FLAGS[flag], np.random.default_rng(seed)
    arrays = {}
    held_out = max(1, 3 * n_train // 8)
    for split, count in zip(("train", "val", "test"), (n_train, held_out, held_out)):
        arrays[f"{split}_images"] = rng.integers(0, 256, (count, 28, 28, 3) if flag in RGB else (count, 28, 28),
                                                 dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(count) % info.n_classes)[:, None]
    folder.mkdir(parents=True, exist_ok=True)
    path = medmnist_path(folder, flag, 28)
    np.savez_compressed(path, **arrays)
    return path


class LogClock(threading.Thread):
    """Time-stamps the lines appended to some log files, every 20 ms (Flower's INFO lines carry no time)."""

    def __init__(self, paths: list[Path]) -> None:
        super().__init__(daemon=True)
        self.paths, self.lines, self.done = paths, [], threading.Event()

    def run(self) -> None:
        offsets = dict.fromkeys(self.paths, 0)
        while not self.done.wait(0.02):
            for path in self.paths:
                try:
                    with open(path, "rb") as handle:
                        handle.seek(offsets[path])
                        chunk = handle.read()
                except OSError:
                    continue
                complete = chunk[: chunk.rfind(b"\n") + 1]
                offsets[path] += len(complete)
                now = time.monotonic()
                self.lines += [(now, path.stem, re.sub(r"\x1b\[\d+m", "", line))
                               for line in complete.decode(errors="replace").splitlines()]


def messages_by_node(lines: list[tuple[float, str, str]]) -> list[dict]:
    """Each message a node handled: its round and the time of each event (a node handles one at a time)."""
    rounds: dict[str, tuple[int, str]] = {}
    current: dict[str, dict] = {}
    done = []
    for at, node, line in lines:
        if match := ROUND.search(line):  # printed before both "Receiving" and "Sending"
            rounds[node] = (int(match.group(2)), match.group(1))
        if "Receiving:" in line and node in rounds:
            current[node] = {"node": node, "round": rounds[node]}
            done.append(current[node])
        for text, event in EVENTS.items():
            if text in line and node in current:
                current[node].setdefault(event, at)
    return [m for m in done if len(m) == 2 + len(EVENTS)]


def breakdown(messages: list[dict]) -> dict[str, dict[str, float]]:
    """Median seconds of each phase per message kind (train / evaluate), over nodes and stages >= 1."""
    last_upload: dict[tuple[int, str], float] = {}
    for m in messages:
        last_upload[m["round"]] = max(last_upload.get(m["round"], 0), m["uploaded"])
    rounds = sorted(last_upload, key=last_upload.get)
    table: dict[str, dict[str, list[float]]] = {}
    for m in messages:
        position = rounds.index(m["round"])
        if m["round"][0] < 1 or position == 0:
            continue
        phases = {"to node": m["received"] - last_upload[rounds[position - 1]],
                  "download": m["downloaded"] - m["received"],
                  "ClientApp up": m["started"] - m["received"],
                  "ClientApp work": m["replied"] - max(m["started"], m["downloaded"]),
                  "upload": m["uploaded"] - m["replied"],
                  "round": last_upload[m["round"]] - last_upload[rounds[position - 1]]}
        kind = "train" if m["round"][1] == "stage" else "evaluate"
        for phase, seconds in phases.items():
            table.setdefault(kind, {}).setdefault(phase, []).append(seconds)
    return {kind: {phase: statistics.median(values) for phase, values in phases.items()}
            for kind, phases in table.items()}


LOAD = ("import sys, time; from meduniverse_flwr.data.node_task import DataOptions, load_node_task; t = time.perf_counter(); "
        "load_node_task(sys.argv[1], 0, 1, DataOptions(root=sys.argv[2])); print(time.perf_counter() - t)")


def write_sources(root: Path, n: int) -> dict[str, str]:
    """Dataset entries, by description, of made-here sources of N / N/5 / 2N/5 images."""
    rng = np.random.default_rng(0)
    counts = {"train": n, "val": n // 5, "test": 2 * n // 5}
    arrays = {}
    for split, count in counts.items():
        arrays[f"{split}_images"] = rng.integers(0, 256, (count, 224, 224, 3), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(count) % 8)[:, None]
    np.savez(medmnist_path(root, "bloodmnist", 224), **arrays)
    for split, count in counts.items():
        for i in range(count):
            path = root / "site" / split / f"class-{i % 2}" / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)).save(path)
    load_embedded("ct-tissue", root)  # built once here: its build is not a node's load
    return {"embedded ct-tissue, 28 px (fixed 1000/200/400)": "embedded:ct-tissue",
            "MedMNIST file, 224 px RGB -> 28 px": f"medmnist:{medmnist_path(root, 'bloodmnist', 224)}",
            "image folder, PNG 128 px RGB -> 28 px": "folder:site"}


def data_load(n: int) -> None:
    print(f"a node's task load in a fresh process (imports excluded), {n} train images:")
    with tempfile.TemporaryDirectory() as tmp:
        for what, entry in write_sources(Path(tmp), n).items():
            seconds = [float(subprocess.run([sys.executable, "-c", LOAD, entry, tmp], capture_output=True, text=True,
                                            check=True).stdout) for _ in range(3)]
            print(f"  {what:48s} decode + write cache {seconds[0]:6.3f}s   from the cache {min(seconds[1:]):6.3f}s")


def timed(code: str, env: dict | None = None) -> float:
    """Wall seconds of ``python -c code`` in a fresh process."""
    started = time.monotonic()
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
    return time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stages", type=int, default=2)
    parser.add_argument("--images", type=int, default=64, help="train images per node (0: the --datasets as they are)")
    parser.add_argument("--datasets", default=None,
                        help=f"MedMNIST flags with --images (default {SYNTHETIC}), else dataset entries "
                             "(default ct-tissue,histology-stain,brain-tissue)")
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument("--data-load", type=int, metavar="N", help="only time data loads, decoded vs cached")
    args = parser.parse_args()
    if args.data_load:
        data_load(args.data_load)
        return

    state = create_backbone("vit-micro", 28).state_dict()
    print(f"vit-micro backbone: {len(state)} arrays, {len(pack(state, 'fp32'))} record entries packed, "
          f"{len(get_all_nested_objects(pack(state, 'fp32')))} Flower objects "
          f"({len(get_all_nested_objects(ArrayRecord(state)))} one array per entry), "
          f"{pack(state, 'fp32').count_bytes() / 1e6:.1f} MB")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if args.images:
            flags = (args.datasets or SYNTHETIC).split(",")
            datasets = [f"medmnist:{write_site(root / f'site-{i}', flag, args.images, i)}"
                        for i, flag in enumerate(flags)]
        else:
            datasets = (args.datasets or "ct-tissue,histology-stain,brain-tissue").split(",")
        link = LocalDeployment(root / "link", datasets, str(root / "data"), root / "flwr-home", port=free_port(),
                               node_ports=[free_port() for _ in datasets])
        started = time.monotonic()
        link.start()
        clock = LogClock([link.log(f"node-{i}") for i in range(len(datasets))])
        clock.start()
        try:
            print(f"deployment up in {time.monotonic() - started:.1f}s ({len(datasets)} SuperNodes, "
                  f"{args.images or 'all'} train images each)")
            config = (f"num-stages={args.stages} clients-per-stage={len(datasets)} local-epochs={args.local_epochs} "
                      f"pretrain='none' data-root='{root / 'data'}' output-dir='runs'")
            started = time.monotonic()
            run_id, output = finish_flwr_run(start_flwr_run(link.env, config, root / "run.log",
                                                            connection=LOCAL_CONNECTION), root / "run.log")
            total = time.monotonic() - started
            status = run_status(link.env, run_id)
            if status != "finished:completed":
                raise SystemExit(f"run {run_id} ended {status}:\n{output[-2000:]}")
            stages = json.loads((root / "link" / "runs" / "latest" / "results.json").read_text())["stages"]
        finally:
            clock.done.set()
            clock.join()
            link.stop()
        node_env = {**link.env, "OMP_NUM_THREADS": "1"}
        load = (f"from meduniverse_flwr.data.node_task import DataOptions, load_node_task; "
                f"load_node_task({datasets[0]!r}, 0, 1, DataOptions(root={str(root / 'data')!r}))")
        alone = {"flwr-clientapp imports": timed("import flwr.supernode.cli.flwr_clientapp", node_env),
                 "ClientApp module imports": timed("import meduniverse_flwr.client_app", node_env),
                 "data: imports + first load": timed(load, node_env),
                 "data: imports + load again": timed(load, node_env)}
    for stage in stages:
        print(f"stage {stage['stage']}: {stage['seconds']:6.1f}s  mean accuracy {stage['mean_accuracy']:.4f}")
    print(f"flwr run total {total:.1f}s")
    table = breakdown(messages_by_node(clock.lines))
    print("per message, median over nodes and stages >= 1 (s):")
    print(f"  {'':16s}" + "".join(f"{kind:>10s}" for kind in table))
    for phase in [*PHASES, "round"]:
        print(f"  {phase:16s}" + "".join(f"{phases[phase]:10.2f}" for phases in table.values()))
    print("alone, in a fresh process with 1 thread, after the deployment stopped:")
    for what, seconds in alone.items():
        print(f"  {what:28s} {seconds:5.2f}s")


if __name__ == "__main__":
    main()
