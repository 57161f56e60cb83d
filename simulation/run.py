"""Hydra entry point: compose an experiment from ``conf/``, run it through ``flwr run``.

    python -m simulation.run model=vit-tiny clients_per_stage=2 seed=1
    python -m simulation.run --multirun seed=0,1 aggregation=mean,weighted

Each job starts its own simulation SuperLink (own FLWR_HOME, free loopback
ports) in the job directory, runs the app with run-config and federation
overrides built from the composed config (each value checked first, so a bad one
stops before any process starts), checks the run's final status, and
stops every Flower process it started. ``results.json``, the plot and the
checkpoints land in the job directory. Jobs of a sweep run one after another.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from meduniverse_flwr.config import KEYS, read_keys
from simulation.experiment import federation_config, register, to_override_string, to_run_config
from simulation.flower import REPO, flwr_run, hostile_app_dir, local_superlink, run_status

log = logging.getLogger(__name__)
register()


def run_experiment(cfg: DictConfig, job_dir: Path) -> Path:
    """Run one experiment; returns the run directory. Raises RuntimeError on failure."""
    run_config = to_run_config(cfg, output_dir=str(job_dir / "runs"))
    read_keys(run_config, KEYS)  # types and choices; server-side paths are checked by the ServerApp
    started = time.monotonic()
    app = hostile_app_dir(job_dir) if run_config["attack-nodes"] > 0 else REPO  # simulation/hostile_app.py
    with local_superlink(job_dir / ".flwr", cwd=job_dir) as link:
        run_id, output = flwr_run(link.env, to_override_string(run_config), federation_config(cfg), app=app)
        (job_dir / "flwr-run.log").write_text(output)
        status = run_status(link.env, run_id)
    if status != "finished:completed":
        tail = "\n".join(output.splitlines()[-40:])
        raise RuntimeError(f"run {run_id} ended with status '{status}'; log tail:\n{tail}")
    run_dir = (job_dir / "runs" / "latest").resolve()
    for name in ("results.json", "accuracy_gain.png"):
        shutil.copy2(run_dir / name, job_dir / name)
    log.info("run %s completed in %.0fs: %s", run_id, time.monotonic() - started, job_dir / "results.json")
    return run_dir


def one_mlflow_experiment_per_sweep() -> None:
    """A sweep's jobs log to one MLflow store and experiment (a user's own settings win); the
    ServerApp inherits the environment through the Flower processes."""
    sweep = Path(HydraConfig.get().sweep.dir).resolve()
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{sweep / 'mlflow.db'}")
    os.environ.setdefault("MLFLOW_EXPERIMENT_NAME", f"{sweep.parent.name}/{sweep.name}")


@hydra.main(version_base=None, config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    job_dir = Path(HydraConfig.get().runtime.output_dir)
    if HydraConfig.get().mode.name == "MULTIRUN":
        one_mlflow_experiment_per_sweep()
    try:
        run_experiment(cfg, job_dir)
    except (RuntimeError, ValueError) as err:  # ConfigError is a ValueError
        log.error("%s", err)
        (job_dir / "FAILED").write_text(str(err) + "\n")
        if HydraConfig.get().mode.name == "RUN":
            sys.exit(1)
        # in a sweep the next job still runs; the summary lists this one as failed
        # and the sweep exits non-zero


if __name__ == "__main__":
    main()
