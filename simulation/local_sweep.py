"""Run an experiment preset's sweep in this process, resumably, into a folder that can be committed.

    python -m simulation.local_sweep arrival-cpu2 --out docs/experiments/arrival-cpu2
    python -m simulation.local_sweep arrival-cpu2 --out ... --only arm=distill-weight0   # a part of it

The preset (``conf/experiment/<name>.yaml``) and its ``hydra.sweeper.params`` are composed with Hydra's
compose API, exactly as ``python -m simulation.run --multirun +experiment=<name>`` would, and each job
runs through the real ServerApp and ClientApp handlers on an in-process grid (``simulation/inprocess``:
the same results as ``flwr run`` for the same config, without a SuperLink or Ray per job, which on a
2-core machine cost more than a small job). Each job writes ``<out>/<job>/results.json``, where
``<job>`` names its overrides; a job whose file has every stage is skipped, and one that stopped part-way
is resumed after its last completed stage (``resume-from``), so a sweep can span several sessions.
Evaluate replies are memoised by content (``ScoreMemo``): arms that share a seed score the shared MIM
base once, not once per arm.
Checkpoints stay in ``<out>/<job>/runs/`` (ignored by git); the report reads the committed files:
``python -m meduniverse_flwr.report.arrival <out> --out <out>/report``.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import logging
import shutil
import time
from pathlib import Path

from flwr.app import Context, Message, MessageType, MetricRecord, RecordDict
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from meduniverse_flwr import server_app
from meduniverse_flwr.client_app import app as client_app
from meduniverse_flwr.common.files import write_json_atomic
from meduniverse_flwr.config import KEYS, NODE_DATA_KEYS, read_keys
from meduniverse_flwr.node.site import SIMULATED_SITE_KEYS
from meduniverse_flwr.server.results import read_results
from simulation.experiment import register, to_run_config
from simulation.inprocess import InProcessGrid

log = logging.getLogger("local_sweep")
CONF = Path(__file__).resolve().parents[1] / "conf"


class ScoreMemo:
    """The ClientApp, with its evaluate replies memoised on disk by everything the handler reads: the
    message (arrays and config), the node's config and the run-config keys a simulated node reads. The
    handlers are deterministic on one machine, so a memoised reply is the reply the node would give."""

    def __init__(self, app, folder: Path) -> None:
        self.app, self.folder = app, folder
        folder.mkdir(parents=True, exist_ok=True)

    def __call__(self, message: Message, context: Context) -> Message:
        if message.metadata.message_type != MessageType.EVALUATE or message.content["config"]["node-keeps"] != "nothing":
            return self.app(message, context)  # a node that keeps a model between messages is scored on it
        path = self.folder / f"{self.key(message, context)}.json"
        if path.is_file():
            return Message(RecordDict({"metrics": MetricRecord(json.loads(path.read_text()))}), reply_to=message)
        reply = self.app(message, context)
        if not reply.has_error():
            write_json_atomic(path, dict(reply.content["metrics"]))
        return reply

    @staticmethod
    def key(message: Message, context: Context) -> str:
        digest = hashlib.sha256()
        for name, array in sorted(message.content["arrays"].items()):
            digest.update(name.encode() + array.data)
        node_keys = (*NODE_DATA_KEYS, *SIMULATED_SITE_KEYS)
        digest.update(json.dumps([sorted(dict(message.content["config"]).items()), sorted(context.node_config.items()),
                                  sorted((k, context.run_config[k]) for k in node_keys)]).encode())
        return digest.hexdigest()


def sweep_jobs(preset: str, only: list[str]) -> list[list[str]]:
    """Every job's overrides: the product of the preset's ``hydra.sweeper.params`` (the arguments of
    ``--only`` replace a parameter's values)."""
    register()
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        cfg = compose("config", overrides=[f"+experiment={preset}"], return_hydra_config=True)
    params = dict(OmegaConf.to_container(cfg.hydra.sweeper.params))
    for item in only:
        key, _, values = item.partition("=")
        params[key] = values
    axes = [[f"{key}={value.strip()}" for value in str(values).split(",")] for key, values in params.items()]
    return [list(job) for job in itertools.product(*axes)]


def job_name(overrides: list[str]) -> str:
    """``seed=1 arm=x`` -> ``seed-1_arm-x``: no commas (Flower's app bundle splits file lists on them,
    so a committed path with one breaks ``flwr run .``), no ``=`` or ``/``."""
    return "_".join(o.replace("=", "-").replace("/", "-").replace(",", "-") for o in overrides)


# keys a job's run may differ in from its composed config without being another job
JOB_ONLY = ("output-dir", "resume-from", "device", "stage-timeout")


def finished(results_path: Path, run_config: dict | None = None) -> bool:
    """The job's results.json holds every stage it asked for; with ``run_config``, ValueError if it
    was made with other settings (a preset changed since: its folder must not pass for this job's)."""
    if not results_path.is_file():
        return False
    results = read_results(results_path)
    if run_config is not None:
        other = sorted(k for k in run_config if k not in JOB_ONLY and results["config"].get(k) != run_config[k])
        if other:
            raise ValueError(f"{results_path} was made with other settings ({', '.join(other[:3])}): "
                             "move it away or use another --out")
    return len(results["stages"]) == results["config"]["num-stages"] + 1


def last_run(job_dir: Path) -> Path | None:
    """The job's newest run directory that wrote a results.json (run names start with their UTC time)."""
    runs = sorted(path.parent for path in (job_dir / "runs").glob("2*/results.json"))
    return runs[-1] if runs else None


def composed(preset: str, overrides: list[str], job_dir: Path):
    """The job's Hydra config and its run config."""
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        cfg = compose("config", overrides=[f"+experiment={preset}", *overrides])
    return cfg, to_run_config(cfg, output_dir=str(job_dir / "runs"))


def run_job(preset: str, overrides: list[str], job_dir: Path, memo: Path) -> float:
    """One job, resumed after its last completed stage if it stopped part-way; returns its seconds."""
    cfg, run_config = composed(preset, overrides, job_dir)
    partial = last_run(job_dir)
    if partial is not None and not finished(partial / "results.json"):
        run_config["resume-from"] = str(partial.resolve())
    read_keys(run_config, KEYS)
    started = time.monotonic()
    grid = InProcessGrid(ScoreMemo(client_app, memo), run_config, cfg.federation.num_supernodes)
    server_app.main(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config))
    shutil.copy2(last_run(job_dir) / "results.json", job_dir / "results.json")
    return time.monotonic() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulation.local_sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument("preset", help="conf/experiment/<preset>.yaml")
    parser.add_argument("--out", type=Path, required=True, help="one folder per job, results.json in each")
    parser.add_argument("--only", action="append", default=[], metavar="KEY=V1,V2",
                        help="replace a swept parameter's values (repeatable)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("flwr").setLevel(logging.WARNING)
    failed = 0
    for overrides in sweep_jobs(args.preset, args.only):
        job_dir = args.out / job_name(overrides)
        try:
            if finished(job_dir / "results.json", composed(args.preset, overrides, job_dir)[1]):
                log.info("%s: done, skipped", job_dir)
                continue
            seconds = run_job(args.preset, overrides, job_dir, args.out / "score-memo")
        except Exception as err:  # one failed job does not stop the sweep; it is listed and the exit is non-zero
            failed += 1
            log.error("%s: failed (%s)", job_dir, err)
            continue
        log.info("%s: %.0fs", job_dir, seconds)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
