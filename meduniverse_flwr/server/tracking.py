"""Experiment tracking, opt-in (run-config ``tracker``): every stage of ``results.json`` also goes to
TensorBoard or MLflow, so a run can be watched while it trains and runs compared side by side.

Each ``registry.TRACKERS`` entry, called with ``(run_dir, run_config, run_name)``, returns a tracker with
``log_stage(entry, summary)``
(one item of ``results.json`` ``stages`` and ``results.summarize(stages)``) and ``close()``.
The libraries are imported inside the factories: ``none`` needs neither.

- ``tensorboard``: event files in ``<run_dir>/tensorboard/``, the run config as hparams
  (``tensorboard --logdir outputs`` shows every run below it, a Hydra sweep's directory every job).
- ``mlflow``: one MLflow run per run directory in the experiment ``$MLFLOW_EXPERIMENT_NAME``
  (default ``meduniverse``) of the store ``$MLFLOW_TRACKING_URI`` (default
  ``sqlite:///<output-dir>/mlflow.db``: MLflow 3 refuses plain ``mlruns/`` file stores). A caller
  that wants several output dirs in one experiment (a Hydra sweep) sets both variables for the
  ServerApp's process. ``<run_dir>/mlflow-run.json`` names the store and the run, so that a
  resumed run continues the same MLflow run. When it cannot (the file is corrupt, names another
  store, or MLflow refuses to reopen the run) a new run starts and one warning line says so,
  naming the file, the reason and the new run: the run's metrics are then split across two runs.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any, Protocol

from meduniverse_flwr.common.files import write_json_atomic
from meduniverse_flwr.common.text import safe_label

INSTALL_HINT = "pip install 'meduniverse-flwr[tracking]'"
DEFAULT_EXPERIMENT = "meduniverse"
MLFLOW_POINTER = "mlflow-run.json"
TENSORBOARD_DIR = "tensorboard"

logger = logging.getLogger("flwr")  # Flower's log, as the ServerApp's other lines

STAGE_KEYS = ("mean_accuracy", "mean_accuracy_held_out", "train_loss", "bytes_up", "bytes_down", "seconds",
              "epsilon")
TASK_KEYS = ("accuracy", "auc")
NODE_KEYS = ("val_accuracy", "val_auc", "train_loss", "update_ratio")


class Tracker(Protocol):
    def log_stage(self, entry: dict[str, Any], summary: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


def metric_segment(name: str) -> str:
    """A task name as one segment of a metric name: MLflow accepts only ``\\w . - space`` there
    (card names may also hold ``+``), and both trackers get the same names."""
    return re.sub(r"[^\w.\- ]", "_", name)


def stage_metrics(entry: dict[str, Any], summary: dict[str, Any]) -> dict[str, float]:
    """Every number of one stage, by metric name; missing (None) values are left out."""
    values: dict[str, Any] = {key: entry.get(key) for key in STAGE_KEYS}
    values["accuracy_gain"] = summary["accuracy_gain"][entry["stage"]]
    for task, scores in entry["per_task"].items():
        for key in TASK_KEYS:
            values[f"per_task/{metric_segment(task)}/{key}"] = scores.get(key)
    for node in entry.get("nodes", []):
        for key in NODE_KEYS:
            values[f"node/{metric_segment(node['task'])}-{node['node']}/{key}"] = node.get(key)
    return {name: float(value) for name, value in values.items() if value is not None}


def _require(module: str, tracker: str) -> Any:
    """Import a tracker's library (named like the tracker), or stop with one line naming the extra."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(f"tracker = '{tracker}' needs the {tracker} package: {INSTALL_HINT}") from None


# ------------------------------------------------------------------ none
class NoTracker:
    def log_stage(self, entry: dict[str, Any], summary: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


def no_tracker(run_dir: Path, run_config: dict[str, Any], run_name: str) -> NoTracker:
    return NoTracker()


# ------------------------------------------------------------------ TensorBoard
class TensorBoardTracker:
    def __init__(self, writer: Any) -> None:
        self.writer = writer

    def log_stage(self, entry: dict[str, Any], summary: dict[str, Any]) -> None:
        for name, value in stage_metrics(entry, summary).items():
            self.writer.add_scalar(name, value, global_step=entry["stage"])
        self.writer.flush()  # a TensorBoard open on the run shows each stage as it ends

    def close(self) -> None:
        self.writer.close()


def tensorboard_tracker(run_dir: Path, run_config: dict[str, Any], run_name: str) -> TensorBoardTracker:
    SummaryWriter = _require("torch.utils.tensorboard", "tensorboard").SummaryWriter
    from torch.utils.tensorboard.summary import hparams

    writer = SummaryWriter(log_dir=str(Path(run_dir) / TENSORBOARD_DIR))
    # written into the run's own event file (add_hparams would start a sub-run): the HParams
    # dashboard then lists each run's config next to its final mean accuracy and gain
    for summary in hparams(dict(run_config), {"mean_accuracy": None, "accuracy_gain": None}):
        writer.file_writer.add_summary(summary)
    return TensorBoardTracker(writer)


# ------------------------------------------------------------------ MLflow
def mlflow_target(run_dir: Path, environ: dict[str, str]) -> tuple[str, str]:
    """(tracking URI, experiment name): MLflow's own variables, else a store next to the run directories."""
    default_uri = "sqlite:///" + str((Path(run_dir).parent / "mlflow.db").resolve())
    return (environ.get("MLFLOW_TRACKING_URI") or default_uri,
            environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT)


def artifact_root(uri: str) -> str | None:
    """Where a new experiment keeps artifacts: next to a SQLite store (MLflow's default would be
    ``./mlruns`` of whatever directory the ServerApp runs in); a server's own choice otherwise."""
    prefix = "sqlite:///"
    return (Path(uri[len(prefix):]).resolve().parent / "mlartifacts").as_uri() if uri.startswith(prefix) else None


POINTER_KEYS = ("tracking_uri", "experiment_id", "run_id")


def load_pointer(path: Path) -> tuple[dict[str, str] | None, str]:
    """``mlflow-run.json`` read back: (pointer, "") or (None, why not); the reason is "" when the
    file is absent (a run's first start), else one line on what is wrong with it."""
    try:
        pointer = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None, ""
    except (OSError, ValueError) as err:
        return None, f"unreadable: {err}"
    if not isinstance(pointer, dict) or not all(isinstance(pointer.get(k), str) for k in POINTER_KEYS):
        return None, f"not an object of the strings {', '.join(POINTER_KEYS)}"
    return {k: pointer[k] for k in POINTER_KEYS}, ""


def read_pointer(path: Path) -> dict[str, str] | None:
    """``mlflow-run.json`` read back, or None when absent or not three strings (then a new run starts)."""
    return load_pointer(path)[0]


class MlflowTracker:
    def __init__(self, client: Any, run_id: str) -> None:
        self.client = client
        self.run_id = run_id

    def log_stage(self, entry: dict[str, Any], summary: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(name, value, now, entry["stage"]) for name, value in stage_metrics(entry, summary).items()]
        self.client.log_batch(self.run_id, metrics=metrics)  # the client splits it into MLflow's batch limits

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def mlflow_tracker(run_dir: Path, run_config: dict[str, Any], run_name: str) -> MlflowTracker:
    mlflow = _require("mlflow", "mlflow")
    from mlflow.entities import Param
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

    run_dir = Path(run_dir)
    uri, experiment = mlflow_target(run_dir, dict(os.environ))
    client = mlflow.MlflowClient(tracking_uri=uri)
    pointer_path = run_dir / MLFLOW_POINTER
    run_id, problem = _resumed_run(client, pointer_path, uri)
    if run_id is None:
        found = client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else client.create_experiment(experiment, artifact_root(uri))
        run_id = client.create_run(experiment_id, run_name=run_name,
                                   tags={"run_dir": str(run_dir.resolve())}).info.run_id
        write_json_atomic(pointer_path, {"tracking_uri": uri, "experiment_id": experiment_id, "run_id": run_id})
        if problem:  # a resumed run's metrics now go to two MLflow runs: say so, once
            logger.warning("tracking: cannot resume the MLflow run of %s (%s): started a new run %s",
                           safe_label(str(pointer_path)), safe_label(problem), run_id)
    # MLflow refuses to change a logged param: a resumed run (resume-from, num-stages, ...) keeps the first values
    logged = client.get_run(run_id).data.params
    params = [Param(key, str(value)[:MAX_PARAM_VAL_LENGTH]) for key, value in run_config.items() if key not in logged]
    client.log_batch(run_id, params=params)
    return MlflowTracker(client, run_id)


def _resumed_run(client: Any, path: Path, uri: str) -> tuple[str | None, str]:
    """(the run id named by the pointer file at ``path``, reopened, ""), when it is in this store; else
    (None, why not): "" when there is no pointer, one line when there is one that cannot be resumed."""
    pointer, problem = load_pointer(path)
    if pointer is None:
        return None, problem
    if pointer["tracking_uri"] != uri:  # the URIs themselves may hold credentials: not logged
        return None, "it names another tracking store than this run's"
    from mlflow.exceptions import MlflowException

    try:
        client.update_run(pointer["run_id"], status="RUNNING")
    except MlflowException as err:
        return None, f"MLflow refused to reopen run {pointer['run_id']}: {' '.join(str(err).split())}"
    return pointer["run_id"], ""
