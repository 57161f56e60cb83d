"""Trackers: each stage of a results.json goes to TensorBoard / MLflow, read back with the library's
own reader and compared with the file; ``none`` needs neither library."""

import json
import logging
import subprocess
import sys

import pytest

from meduniverse_flwr import registry
from meduniverse_flwr.server.outcome import NodeReport, StageOutcome
from meduniverse_flwr.server.results import RunOutputs, read_results, stage_entry, summarize
from meduniverse_flwr.server.tracking import MLFLOW_POINTER, artifact_root, mlflow_target

CONFIG = {"strategy": "stagewise", "num-stages": 2, "lr": 0.001, "node-metrics": True, "resume-from": ""}


def open_tracker(name, run_dir, run_config, run_name):
    """The tracker ``tracker = name`` for one run directory, as the ServerApp opens it."""
    return registry.resolve(registry.TRACKERS[name])(run_dir, run_config, run_name)


def outcome(stage):
    """Three tasks (one held out, one whose name MLflow would refuse), a missing score at stage 1."""
    per_task = {"organ+ct": {"accuracy": 0.5 + 0.1 * stage, "auc": 0.7 + 0.05 * stage, "held_out": False},
                "blood": {"accuracy": None if stage == 1 else 0.4, "auc": None, "held_out": False},
                "derma": {"accuracy": 0.3, "auc": 0.6, "held_out": True}}
    nodes = [NodeReport(node=11, task="organ+ct", train_loss=1.0 / (stage + 1), val_accuracy=0.6, val_auc=None,
                        seconds=2.0, update_ratio=0.01 * stage, clipped=False)] if stage else []
    return StageOutcome(participants=["organ+ct", "blood"] if stage else [], nodes=nodes,
                        train_loss=0.9 - 0.1 * stage if stage else None, bytes_up=123_456 * stage,
                        bytes_down=654_321 * stage, per_task=per_task)


@pytest.fixture
def results(tmp_path):
    """A 3-stage results.json written by RunOutputs, read back checked: (run dir, its stages)."""
    outputs = RunOutputs(tmp_path / "outputs" / "run-a", CONFIG, [])
    outputs.dir.mkdir(parents=True)
    for stage in range(3):
        entry = stage_entry(stage, outcome(stage), seconds=1.5 + stage)
        if stage == 2:
            entry.update(epsilon=3.25, delta=1e-5, privacy_events=[])  # what a DP run adds
        outputs.add_stage(entry)
    return outputs.dir, read_results(outputs.results_path)["stages"]


def track(name, run_dir, stages, run_config=CONFIG):
    """Log stage by stage as the ServerApp does: the summary of the stages so far."""
    tracker = open_tracker(name, run_dir, run_config, run_dir.name)
    for i, entry in enumerate(stages):
        tracker.log_stage(entry, summarize(stages[: i + 1]))
    tracker.close()


def expected(stages):
    """{metric: {step: value}} straight from results.json, None left out."""
    series = {}

    def put(name, step, value):
        if value is not None:
            series.setdefault(name, {})[step] = value

    gains = summarize(stages)["accuracy_gain"]
    for s in stages:
        step = s["stage"]
        for key in ("mean_accuracy", "mean_accuracy_held_out", "train_loss", "bytes_up", "bytes_down", "seconds",
                    "epsilon"):
            put(key, step, s.get(key))
        put("accuracy_gain", step, gains[step])
        for task, scores in s["per_task"].items():
            for key in ("accuracy", "auc"):
                put(f"per_task/{task.replace('+', '_')}/{key}", step, scores[key])
        for node in s["nodes"]:
            for key in ("val_accuracy", "val_auc", "train_loss", "update_ratio"):
                put(f"node/{node['task'].replace('+', '_')}-{node['node']}/{key}", step, node[key])
    return series


def test_the_expected_series_cover_every_kind_of_value(results):
    series = expected(results[1])
    assert series["per_task/blood/accuracy"] == {0: 0.4, 2: 0.4}  # the missing score is skipped
    assert series["epsilon"] == {2: 3.25} and "per_task/blood/auc" not in series
    assert set(series["node/organ_ct-11/val_accuracy"]) == {1, 2} and "node/organ_ct-11/val_auc" not in series
    assert series["accuracy_gain"][2] == pytest.approx(0.1) and "mean_accuracy_held_out" in series


def test_tensorboard_holds_results_json(results):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    run_dir, stages = results
    track("tensorboard", run_dir, stages)
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    logged = {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}
    want = expected(stages)
    assert logged.keys() == want.keys()
    for name, values in want.items():  # TensorBoard keeps float32
        assert logged[name] == pytest.approx(values, rel=1e-6), name
    start = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = HParamsPluginData.FromString(start).session_start_info.hparams
    assert {k: getattr(v, v.WhichOneof("kind")) for k, v in hparams.items()} == CONFIG


def test_mlflow_holds_results_json_in_a_store_next_to_the_runs(results, monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    run_dir, stages = results
    track("mlflow", run_dir, stages)
    client = MlflowClient(f"sqlite:///{run_dir.parent / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("meduniverse")
    assert experiment.artifact_location == (run_dir.parent / "mlartifacts").as_uri()
    [run] = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "run-a" and run.info.status == "FINISHED"
    assert run.data.tags["run_dir"] == str(run_dir.resolve())
    assert run.data.params == {k: str(v) for k, v in CONFIG.items()}
    want = expected(stages)
    assert run.data.metrics.keys() == want.keys()
    for name, values in want.items():
        assert {m.step: m.value for m in client.get_metric_history(run.info.run_id, name)} == values, name
    assert json.loads((run_dir / MLFLOW_POINTER).read_text())["run_id"] == run.info.run_id


@pytest.fixture(scope="module")
def shared_store(tmp_path_factory):
    """One MLflow store for the tests below (creating one costs ~2 s)."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def test_a_sweep_is_one_experiment_with_a_run_per_job(results, tmp_path, monkeypatch, shared_store):
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", shared_store)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "sweep-1")
    _, stages = results
    for job in ("0", "1"):  # each job has its own output-dir (<job>/runs)
        run_dir = tmp_path / "multirun" / job / "runs" / f"run-{job}"
        run_dir.mkdir(parents=True)
        track("mlflow", run_dir, stages, {**CONFIG, "seed": int(job)})
    client = MlflowClient(shared_store)
    runs = client.search_runs([client.get_experiment_by_name("sweep-1").experiment_id])
    assert sorted((r.info.run_name, r.data.params["seed"]) for r in runs) == [("run-0", "0"), ("run-1", "1")]
    assert not list(tmp_path.glob("multirun/*/runs/mlflow.db"))


def test_a_resumed_run_continues_its_mlflow_run(results, monkeypatch, shared_store):
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", shared_store)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "resume")
    run_dir, stages = results
    track("mlflow", run_dir, stages[:2])
    # resume-from and num-stages may change on resume; MLflow keeps a param's first value
    resumed = open_tracker("mlflow", run_dir, {**CONFIG, "num-stages": 3, "resume-from": str(run_dir)}, "ignored")
    resumed.log_stage(stages[2], summarize(stages))
    resumed.close()
    client = MlflowClient(shared_store)
    [run] = client.search_runs([client.get_experiment_by_name("resume").experiment_id])
    assert run.info.run_name == run_dir.name and run.info.status == "FINISHED"
    assert run.data.params["num-stages"] == "2"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "seconds")] == [0, 1, 2]


@pytest.fixture
def resume_store(monkeypatch, shared_store):
    """The shared store, in an experiment of its own: (client, experiment id)."""
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", shared_store)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "resume-warnings")
    client = MlflowClient(shared_store)
    return client, (client.get_experiment_by_name("resume-warnings")
                    or client.get_experiment(client.create_experiment("resume-warnings"))).experiment_id


def open_and_close(run_dir, caplog):
    """Open the run dir's MLflow tracker and close it: (its run id, the warning lines Flower's log got)."""
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="flwr"):
        tracker = open_tracker("mlflow", run_dir, CONFIG, run_dir.name)
        tracker.close()
    return tracker.run_id, [r.getMessage() for r in caplog.records
                            if r.name == "flwr" and r.levelno >= logging.WARNING]


def assert_one_new_run_line(lines, pointer, reason, new_id, client, experiment_id):
    """Exactly one line: it names the file, the reason and the new run, which exists and finished."""
    [line] = lines
    assert line.startswith(f"tracking: cannot resume the MLflow run of {pointer} (") and reason in line, line
    assert line.endswith(f"): started a new run {new_id}") and "\n" not in line and "\x1b" not in line, line
    assert json.loads(pointer.read_text())["run_id"] == new_id  # the next resume continues the new run
    assert client.get_run(new_id).info.status == "FINISHED"
    assert new_id in {r.info.run_id for r in client.search_runs([experiment_id])}


def test_a_good_pointer_resumes_its_run_with_no_warning(tmp_path, caplog, resume_store):
    run_dir = tmp_path / "run-good"
    run_dir.mkdir()
    first, lines = open_and_close(run_dir, caplog)
    assert lines == []  # no pointer yet: a run's first start is no resume
    again, lines = open_and_close(run_dir, caplog)
    assert again == first and lines == []
    assert resume_store[0].get_run(first).info.status == "FINISHED"


@pytest.mark.parametrize("text, reason", [
    ('{"tracking_uri": "sqlite:///x.db", "run_id": ', "unreadable: Expecting value"),  # cut short by a crash
    ('{"tracking_uri": 1, "experiment_id": "1", "run_id": "abc"}', "not an object of the strings"),
    ("[]", "not an object of the strings"),
    ("\udcff", "unreadable: "),  # not UTF-8
])
def test_a_corrupt_pointer_starts_a_new_run_in_one_warning_line(text, reason, tmp_path, caplog, resume_store):
    run_dir = tmp_path / "run-corrupt"
    run_dir.mkdir()
    pointer = run_dir / MLFLOW_POINTER
    pointer.write_bytes(text.encode("utf-8", "surrogateescape"))
    new_id, lines = open_and_close(run_dir, caplog)
    assert_one_new_run_line(lines, pointer, reason, new_id, *resume_store)


def test_a_run_mlflow_does_not_know_starts_a_new_run_in_one_warning_line(tmp_path, caplog, resume_store,
                                                                       shared_store):
    """The store refuses update_run (a run deleted from the store, a forged id): the line escapes the id."""
    run_dir = tmp_path / "run-unknown"
    run_dir.mkdir()
    pointer = run_dir / MLFLOW_POINTER
    forged = "0123456789abcdef\n\x1b[31mforged line"
    pointer.write_text(json.dumps({"tracking_uri": shared_store, "experiment_id": "0", "run_id": forged}))
    new_id, lines = open_and_close(run_dir, caplog)
    assert_one_new_run_line(lines, pointer, "MLflow refused to reopen run 0123456789abcdef\\n\\x1b[31mforged line",
                            new_id, *resume_store)


def test_a_failed_update_run_starts_a_new_run_in_one_warning_line(tmp_path, caplog, resume_store, monkeypatch):
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    run_dir = tmp_path / "run-refused"
    run_dir.mkdir()
    first, _ = open_and_close(run_dir, caplog)

    def refuse(self, run_id, **kwargs):  # what a tracking server that is down, or read-only, answers
        raise MlflowException("API request to endpoint /api/2.0/mlflow/runs/update failed\nwith error code 503")

    monkeypatch.setattr(MlflowClient, "update_run", refuse)
    new_id, lines = open_and_close(run_dir, caplog)
    assert new_id != first
    assert_one_new_run_line(lines, run_dir / MLFLOW_POINTER,
                            f"MLflow refused to reopen run {first}: API request to endpoint "
                            "/api/2.0/mlflow/runs/update failed with error code 503", new_id, *resume_store)


def test_a_pointer_to_another_store_starts_a_new_run_in_one_warning_line(tmp_path, caplog, resume_store):
    run_dir = tmp_path / "run-moved"
    run_dir.mkdir()
    pointer = run_dir / MLFLOW_POINTER
    elsewhere = "http://user:secret@tracking.example:5000"
    pointer.write_text(json.dumps({"tracking_uri": elsewhere, "experiment_id": "1", "run_id": "abc"}))
    new_id, lines = open_and_close(run_dir, caplog)
    assert_one_new_run_line(lines, pointer, "it names another tracking store than this run's", new_id, *resume_store)
    assert "secret" not in lines[0]  # a URI may hold credentials


def test_the_mlflow_target_follows_mlflows_variables(tmp_path):
    run_dir = tmp_path / "outputs" / "run-a"
    assert mlflow_target(run_dir, {}) == (f"sqlite:///{tmp_path.resolve() / 'outputs' / 'mlflow.db'}", "meduniverse")
    env = {"MLFLOW_TRACKING_URI": "http://127.0.0.1:5000", "MLFLOW_EXPERIMENT_NAME": "sweep"}
    assert mlflow_target(run_dir, env) == ("http://127.0.0.1:5000", "sweep")
    assert artifact_root("http://127.0.0.1:5000") is None  # a tracking server chooses


@pytest.mark.parametrize("tracker, module", [("mlflow", "mlflow"), ("tensorboard", "torch.utils.tensorboard")])
def test_a_missing_library_is_one_line_naming_the_extra(tracker, module, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, module, None)  # what an uninstalled package looks like to import
    with pytest.raises(ImportError) as err:
        open_tracker(tracker, tmp_path, CONFIG, "run")
    extra = "pip install 'meduniverse-flwr[tracking]'"
    assert str(err.value) == f"tracker = '{tracker}' needs the {tracker} package: {extra}"


def test_none_imports_neither_library(tmp_path):
    code = ("import sys; from meduniverse_flwr import registry; "
            f"t = registry.resolve(registry.TRACKERS['none'])({str(tmp_path)!r}, {{}}, 'run'); "
            "t.log_stage({}, {}); t.close(); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('mlflow', 'tensorboard') "
            "or m == 'torch.utils.tensorboard'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    assert not any(tmp_path.iterdir())


def tensorboard_series(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


@pytest.mark.parametrize("tracker", ["tensorboard", "mlflow"])
def test_a_federation_tracked_end_to_end_equals_its_results_json(tracker, run_config, tmp_path, monkeypatch):
    """The ServerApp itself logs every stage; the library's own reader gives back results.json."""
    from conftest import write_medmnist
    from flwr.app import Context, RecordDict

    from meduniverse_flwr import server_app
    from meduniverse_flwr.client_app import app as client_app
    from simulation.inprocess import InProcessGrid

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    sites = ",".join(f"medmnist:{write_medmnist(tmp_path, flag, n=(24, 8, 8))}" for flag in ("bloodmnist", "pathmnist"))
    config = run_config(datasets=sites, num_stages=2, clients_per_stage=2, pretrain="none", probe_epochs=1,
                        tracker=tracker)
    server_app.main(InProcessGrid(client_app, config, 2),
                    Context(run_id=4, node_id=0, node_config={}, state=RecordDict(), run_config=config))
    run_dir = (tmp_path / "outputs" / "latest").resolve()
    want = expected(read_results(run_dir / "results.json")["stages"])
    if tracker == "tensorboard":
        logged = tensorboard_series(run_dir / "tensorboard")
        assert logged.keys() == want.keys()
        for name, values in want.items():  # TensorBoard keeps float32
            assert logged[name] == pytest.approx(values, rel=1e-6), name
    else:
        from mlflow import MlflowClient

        client = MlflowClient(f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}")
        [run] = client.search_runs([client.get_experiment_by_name("meduniverse").experiment_id])
        assert run.info.status == "FINISHED" and run.data.params["tracker"] == "mlflow"
        assert run.data.metrics.keys() == want.keys()
        for name, values in want.items():
            assert {m.step: m.value for m in client.get_metric_history(run.info.run_id, name)} == values, name
