"""``python -m meduniverse_flwr.report``: the per-stage table of a results.json and where the run's files are;
a bad results.json is one line and exit status 2."""

import json
import subprocess
import sys

import pytest

from meduniverse_flwr.report import format_table, main


def stage(number, pneumonia, blood, derma, train_loss=None, seconds=10.0):
    """One hand-made stage: pneumonia and blood train, derma is held out."""
    trained = [pneumonia, blood]
    return {"stage": number, "participants": [], "rejected": [], "nodes": [], "bytes_up": 0, "bytes_down": 0,
            "per_task": {"pneumonia": {"accuracy": pneumonia, "auc": None, "held_out": False},
                         "blood": {"accuracy": blood, "auc": None, "held_out": False},
                         "derma": {"accuracy": derma, "auc": None, "held_out": True}},
            "mean_accuracy": None if None in trained else sum(trained) / 2, "mean_accuracy_held_out": derma,
            "train_loss": train_loss, "seconds": seconds}


STAGES = [stage(0, 0.70, 0.50, 0.40), stage(1, 0.80, None, 0.45, 0.9, 12.25), stage(2, 0.90, 0.60, 0.50, 0.5, 11.0)]


def write_run(path, stages=STAGES):
    path.mkdir(parents=True, exist_ok=True)
    (path / "results.json").write_text(json.dumps({"config": {"seed": 0}, "stages": stages, "summary": {}}))
    return path


def rows(table):
    """The table's cells, row by row, without the header and the rule."""
    return [[cell.strip() for cell in line.split("|")] for line in table.splitlines()[2:]]


def test_the_table_has_every_stage_task_gain_loss_and_time():
    table = format_table(STAGES)
    assert [c.strip() for c in table.splitlines()[0].split("|")] == [
        "stage", "mean acc", "held-out mean", "pneumonia", "blood", "derma (held out)", "gain", "train loss", "seconds"]
    assert rows(table) == [
        ["0", "0.6000", "0.4000", "0.7000", "0.5000", "0.4000", "+0.0000", "-", "10.0"],
        ["1", "-", "0.4500", "0.8000", "-", "0.4500", "-", "0.9000", "12.2"],  # blood missing: no mean, no gain
        ["2", "0.7500", "0.5000", "0.9000", "0.6000", "0.5000", "+0.1500", "0.5000", "11.0"]]
    assert len({len(line) for line in table.splitlines()}) == 1  # aligned


def test_a_task_missing_from_a_stage_and_no_held_out_task():
    stages = [stage(0, 0.7, 0.5, None), stage(1, 0.8, 0.6, None)]
    for s in stages:
        del s["mean_accuracy_held_out"], s["per_task"]["derma"]
    del stages[1]["per_task"]["blood"]
    table = format_table(stages)
    assert "held-out" not in table and rows(table)[1][3] == "-"


def test_a_run_directory_is_reported_with_its_files(tmp_path, capsys):
    run = write_run(tmp_path / "outputs" / "run-a")
    (run / "accuracy_gain.png").write_bytes(b"")
    (run / "checkpoints").mkdir()
    for s in range(3):
        (run / "checkpoints" / f"stage-{s}.safetensors").write_bytes(b"")
    (run / "tensorboard").mkdir()
    (run / "mlflow-run.json").write_text(json.dumps(
        {"tracking_uri": "sqlite:////srv/mlflow.db\x1b[2J", "experiment_id": "1", "run_id": "abc123"}))
    assert main([str(run)]) == 0
    out = capsys.readouterr().out
    assert format_table(STAGES) in out and "paired t-test over tasks: p = 0.205" in out  # t = 3, df = 1
    assert f"plot:        {run / 'accuracy_gain.png'}" in out
    assert f"checkpoints: {run / 'checkpoints'} (3 stages)" in out
    assert f"tensorboard: tensorboard --logdir {run / 'tensorboard'}" in out
    assert "mlflow:      run abc123: mlflow ui --backend-store-uri sqlite:////srv/mlflow.db\\x1b[2J" in out
    assert "\x1b" not in out


def test_a_results_json_or_a_hydra_job_directory(tmp_path, capsys):
    job = write_run(tmp_path / "job")  # a job holds a copy of results.json; the run itself is in runs/latest
    run = write_run(job / "runs" / "run-a")
    (run / "tensorboard").mkdir()
    (job / "runs" / "latest").symlink_to("run-a")
    assert main([str(job / "results.json"), str(job)]) == 0
    out = capsys.readouterr().out
    assert out.count(f"tensorboard --logdir {job / 'runs' / 'latest' / 'tensorboard'}") == 2


@pytest.mark.parametrize("tamper, field", [
    (lambda s: s[1].update(mean_accuracy=1.5), "stages[1].mean_accuracy"),
    (lambda s: s[2].update(stage=7), "stages[2].stage"),
    (lambda s: s[0]["per_task"]["blood"].update(accuracy="0.9"), "stages[0].per_task['blood'].accuracy"),
    (lambda s: s[1].update(train_loss="low"), "stages[1].train_loss"),
    (lambda s: s[1].update(mean_accuracy_held_out=[0.4]), "stages[1].mean_accuracy_held_out"),
    (lambda s: s[0].pop("mean_accuracy"), "stages[0].mean_accuracy"),
])
def test_a_tampered_results_json_is_one_line_and_exit_2(tmp_path, capsys, tamper, field):
    stages = json.loads(json.dumps(STAGES))
    tamper(stages)
    bad, good = write_run(tmp_path / "bad", stages), write_run(tmp_path / "good")
    assert main([str(bad), str(good)]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith(f"report: {bad / 'results.json'}: not a valid results.json ({field}")
    assert captured.err.count("\n") == 1
    assert format_table(STAGES) in captured.out  # the good run is still reported


def test_the_command_line(tmp_path):
    (tmp_path / "results.json").write_text("{not json")
    done = subprocess.run([sys.executable, "-m", "meduniverse_flwr.report", str(tmp_path), str(tmp_path / "none")],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 2 and done.stdout == ""
    assert [line.split(":")[0] for line in done.stderr.splitlines()] == ["report", "report"]


def test_a_gain_that_rounds_to_zero_has_no_minus_sign():
    stages = [stage(0, 0.1, 0.2, None), stage(1, 0.15, 0.15, None)]  # means 0.15000000000000002 and 0.15
    assert rows(format_table(stages))[1][6] == "+0.0000"
