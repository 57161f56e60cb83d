"""``python -m meduniverse_flwr.report``: the per-stage table of a results.json and where the run's files are;
a bad results.json is one line and exit status 2."""

import json
import subprocess
import sys

import pytest

from meduniverse_flwr.report.multi import main
from meduniverse_flwr.report.run_table import format_table


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
    (lambda s: s[0]["per_task"]["blood"].update(n_scored=-1), "stages[0].per_task['blood'].n_scored"),
    (lambda s: s[1]["per_task"]["derma"].update(n_test=2.5), "stages[1].per_task['derma'].n_test"),
    (lambda s: s[2]["per_task"]["pneumonia"].update(split="train"), "stages[2].per_task['pneumonia'].split"),
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


# ------------------------------------------------------------------ several runs: report.md and figures
TASKS = ("a", "b", "c")
STEP = {"stagewise": 0.04, "centralized": 0.06, "fedavg": 0.02}


def accuracy(strategy, seed, number, task):
    """Known numbers: every task gains with the stage, more for later seeds and earlier tasks."""
    i = TASKS.index(task)
    return round(0.5 + 0.1 * i + number * STEP[strategy] * (1 + 0.3 * seed - 0.2 * i), 4)


def generic_stage(number, scores, held_out=(), seconds=5.0):
    trained = [v for t, v in scores.items() if t not in held_out]
    entry = {"stage": number, "participants": [], "rejected": [], "nodes": [], "bytes_up": 0, "bytes_down": 0,
             "per_task": {t: {"accuracy": v, "auc": None, "n_test": 100, "held_out": t in held_out}
                          for t, v in scores.items()},
             "mean_accuracy": sum(trained) / len(trained), "train_loss": None, "seconds": seconds}
    if held_out:
        entry["mean_accuracy_held_out"] = sum(scores[t] for t in held_out) / len(held_out)
    return entry


def write_job(job, strategy, seed, num_stages=3, held_out=()):
    """A Hydra job directory as simulation.run leaves it: the run in runs/<name>, runs/latest, a copy in the job."""
    from meduniverse_flwr.common.files import write_json_atomic

    stages = [generic_stage(s, {t: accuracy(strategy, seed, s, t) for t in TASKS}, held_out) for s in range(num_stages)]
    payload = {"config": {"strategy": strategy, "seed": seed, "held-out": ",".join(held_out),
                          "eval-mode": "linear-probe"}, "stages": stages, "summary": {}}
    run = job / "runs" / f"run-{strategy}-{seed}"
    run.mkdir(parents=True)
    (job / ".hydra").mkdir()
    write_json_atomic(run / "results.json", payload)
    write_json_atomic(job / "results.json", payload)
    (job / "runs" / "latest").symlink_to(run.name)
    return job


def md_table(text, heading):
    """The markdown table under ``heading``: {first cell: [other cells]}."""
    section = text.split(f"## {heading}", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("|")]
    cells = [[c.strip() for c in line.strip("|").split(" | ")] for line in lines]
    return {row[0]: row[1:] for row in [cells[0]] + cells[2:]}


def spread(values):
    import numpy as np

    return f"{np.mean(values):.4f} ± {np.std(values, ddof=1):.4f}"


def test_a_sweep_of_two_strategies_and_three_seeds_is_reported(tmp_path, capsys):
    import numpy as np
    from scipy import stats as scipy_stats

    sweep = tmp_path / "multirun" / "12-00-00"
    jobs = [write_job(sweep / str(n), strategy, seed)
            for n, (strategy, seed) in zip((0, 1, 2, 3, 4, 10), [(s, k) for s in ("centralized", "stagewise") for k in range(3)])]
    bad = write_job(sweep / "5", "stagewise", 7)
    (bad / "results.json").write_text((bad / "results.json").read_text().replace('"stage": 2', '"stage": 5'))

    assert main([str(sweep)]) == 2
    captured = capsys.readouterr()
    assert captured.err == f"report: {bad / 'results.json'}: not a valid results.json (stages[2].stage = '5': " \
                           "must be 2 (stages in order from 0))\n"
    assert captured.out.count("final vs stage 0, paired t-test") == 6  # every good job once, not its runs/ too
    printed = [captured.out.index(f"{job / 'results.json'}\n") for job in jobs]
    assert printed == sorted(printed)  # jobs in numeric order: 10 after 4
    out = sweep / "report"
    for name in ("fig3_gain.png", "gain_heatmap.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = (out / "report.md").read_text()

    centralized = "centralized (pools data: breaks privacy, upper reference)"
    final = md_table(text, "Accuracy at the final stage (2), by strategy")
    assert final["task"] == ["stagewise", centralized]
    assert final["a"] == [spread([accuracy(s, k, 2, "a") for k in range(3)]) for s in ("stagewise", "centralized")]
    assert final["a"][0] == "0.6040 ± 0.0240"  # 0.58, 0.604, 0.628
    means = [np.mean([accuracy("stagewise", k, 2, t) for t in TASKS]) for k in range(3)]
    assert final["mean"][0] == spread(means)
    by_stage = md_table(text, f"Accuracy by stage: {centralized}")
    assert by_stage["task"] == ["stage 0", "stage 1", "stage 2"] and list(by_stage)[1:] == ["a", "b", "c", "mean"]
    assert by_stage["c"][1] == spread([accuracy("centralized", k, 1, "c") for k in range(3)])

    tests = md_table(text, "Paired tests")
    assert tests["comparison"] == ["n pairs", "mean diff", "Wilcoxon p", "t-test p", "Holm p (Wilcoxon)"]

    def pairs(strategy, number):
        return [accuracy(strategy, k, number, t) for t in TASKS for k in range(3)]

    expected = {"stagewise: stage 2 vs 0": (pairs("stagewise", 2), pairs("stagewise", 0)),
                f"{centralized}: stage 2 vs 0": (pairs("centralized", 2), pairs("centralized", 0)),
                f"stagewise vs {centralized} (stage 2)": (pairs("stagewise", 2), pairs("centralized", 2))}
    assert list(tests)[1:] == list(expected)
    for name, (after, before) in expected.items():
        n, diff, wilcoxon_p, t_p, holm_p = tests[name]
        assert n == "9" and diff == f"{np.mean(np.subtract(after, before)):+.4f}"
        assert wilcoxon_p == f"{scipy_stats.wilcoxon(after, before).pvalue:.3g}" == "0.00391"  # 9 of one sign
        assert t_p == f"{scipy_stats.ttest_rel(after, before).pvalue:.3g}"
        assert holm_p == "0.0117"  # three equal p-values: 3 x 2 / 2**9

    assert "Held-out" not in text
    wall = md_table(text, "Wall time per run (sum of stage seconds)")
    assert wall[str(jobs[0] / "results.json")] == [centralized, "-", "0", "3", "15.0"]
    assert centralized in text.split("##")[0]  # the legend


def test_held_out_tasks_different_stage_counts_and_an_explicit_out(tmp_path, capsys):
    runs = [write_job(tmp_path / f"{strategy}-{seed}", strategy, seed, num_stages=3 + seed, held_out=("c",))
            for strategy in ("fedavg", "stagewise") for seed in (0, 1)]
    runs.append(write_job(tmp_path / "all-trained", "stagewise", 0))
    out = tmp_path / "elsewhere"
    assert main([str(r) for r in runs] + ["--out", str(out)]) == 0
    assert capsys.readouterr().err == ""
    text = (out / "report.md").read_text()
    assert "- note: runs have 3 to 4 stages: the report uses stages 0..2, common to all" in text
    held = md_table(text, "Held-out tasks (never trained on: domain generalisation)")
    assert held["held-out task"] == ["stagewise stage 0", "stagewise stage 2", "fedavg stage 0", "fedavg stage 2"]
    assert held["c"] == [spread([accuracy(s, k, n, "c") for k in (0, 1)]) for s in ("stagewise", "fedavg") for n in (0, 2)]
    final = md_table(text, "Accuracy at the final stage (2), by strategy")
    assert final["task"] == ["stagewise", "stagewise [held out: c]", "fedavg [held out: c]"]
    assert final["c"] == [f"{accuracy('stagewise', 0, 2, 'c'):.4f}", "held out", "held out"]
    tests = md_table(text, "Paired tests")
    assert "stagewise [held out: c] vs fedavg [held out: c] (stage 2)" in tests
    held_c = [accuracy("stagewise", k, n, "c") for n in (0, 2) for k in (0, 1)]
    row = tests["stagewise [held out: c], held-out tasks: stage 2 vs 0"]
    assert row[:2] == ["2", f"{(held_c[2] + held_c[3] - held_c[0] - held_c[1]) / 2:+.4f}"]
    assert not any("pooled" in name for name in tests)  # one held-out set per strategy: nothing to pool


def test_one_run_writes_no_report_unless_asked_and_duplicates_count_once(tmp_path, capsys):
    job = write_job(tmp_path / "job", "stagewise", 0)
    assert main([str(job), str(job / "runs" / "latest")]) == 0  # the job's copy and the run itself: one seed
    assert "same strategy, held-out tasks and seed" in capsys.readouterr().err
    assert not (tmp_path / "report").exists()
    assert main([str(job), "--out", str(tmp_path / "one")]) == 0
    text = (tmp_path / "one" / "report.md").read_text()
    assert md_table(text, "Accuracy at the final stage (2), by strategy")["a"] == [f"{accuracy('stagewise', 0, 2, 'a'):.4f}"]
    assert md_table(text, "Paired tests")["stagewise: stage 2 vs 0"][:4] == ["3", "+0.0640", "0.25", "0.0202"]


@pytest.mark.parametrize("key, value", [("seed", True), ("strategy", ["stagewise"]), ("held-out", [1])])
def test_a_config_field_the_report_groups_by_is_checked(tmp_path, capsys, key, value):
    job = write_job(tmp_path / "job", "stagewise", 0)
    payload = json.loads((job / "results.json").read_text())
    payload["config"][key] = value
    (job / "results.json").write_text(json.dumps(payload))
    assert main([str(job)]) == 2
    assert capsys.readouterr().err.startswith(f"report: {job / 'results.json'}: not a valid results.json (config.{key} = ")


def test_an_unfinished_run_is_left_out_of_the_report(tmp_path, capsys):
    """A failed or still-running job (fewer stages than its num-stages) would cut every run to its stages."""
    jobs = [write_job(tmp_path / f"job-{seed}", "stagewise", seed) for seed in (0, 1)]
    failed = write_job(tmp_path / "job-2", "stagewise", 2, num_stages=1)
    for job, planned in ((jobs[0], 2), (jobs[1], 2), (failed, 2)):
        for path in (job / "results.json", *job.glob("runs/run-*/results.json")):
            payload = json.loads(path.read_text())
            payload["config"]["num-stages"] = planned
            path.write_text(json.dumps(payload))
    assert main([str(tmp_path), "--out", str(tmp_path / "out")]) == 0
    assert "job-2/results.json: unfinished (1 of 3 stages), left out" in capsys.readouterr().err
    text = (tmp_path / "out" / "report.md").read_text()
    assert "Accuracy at the final stage (2), by strategy" in text and "runs have" not in text


def test_privacy_and_attack_variants_are_groups_with_their_epsilon(tmp_path, capsys):
    """Runs of one strategy that differ in DP or robustness settings are separate groups, named by those
    settings; the final epsilon per group is reported, and epsilon is a column of a run's table."""
    from meduniverse_flwr.common.files import write_json_atomic

    sweep = tmp_path / "sweep"
    settings = [({}, None), ({"dp": "example", "dp-noise-multiplier": 2.0}, 0.5),
                ({"dp": "example", "dp-noise-multiplier": 1.0}, 2.0),
                ({"attack-nodes": 1, "attack-factor": -1.0, "aggregation": "median"}, None)]
    for n, (config, epsilon) in enumerate(settings):
        for seed in range(2):
            stages = [generic_stage(s, {t: accuracy("stagewise", seed, s, t) for t in TASKS}) for s in range(3)]
            if epsilon is not None:
                for s in stages:
                    s.update({"epsilon": epsilon * s["stage"], "delta": 1e-5, "privacy_events": []})
            job = sweep / f"{n}-{seed}"
            job.mkdir(parents=True)
            write_json_atomic(job / "results.json", {"config": {"strategy": "stagewise", "seed": seed, **config},
                                                     "stages": stages, "summary": {}})
    assert main([str(sweep)]) == 0
    capsys.readouterr()
    text = (sweep / "report" / "report.md").read_text()
    table = md_table(text, "Accuracy, gain and privacy by group")
    assert table["stagewise"][0] == "-"
    assert table["stagewise [dp=example, dp-noise-multiplier=2]"][0] == "1.000"
    assert table["stagewise [dp=example]"][0] == "4.000"  # noise 1.0 is the declared default
    assert "stagewise [aggregation=median, max-update-ratio=0.5, attack-nodes=1, attack-factor=-1]" in table
    for name in ("final_accuracy.png", "accuracy_vs_epsilon.png"):
        assert (sweep / "report" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the stagewise baseline is compared with each variant, paired by (task, seed)
    assert "stagewise vs stagewise [dp=example] (stage 2)" in md_table(text, "Paired tests")


def test_a_run_table_shows_epsilon_when_the_run_has_it():
    stages = [dict(s, epsilon=e, delta=1e-5, privacy_events=[]) for s, e in zip(STAGES, (0.0, 1.25, 2.5))]
    header = [c.strip() for c in format_table(stages).splitlines()[0].split("|")]
    assert header[-1] == "epsilon" and [row[-1] for row in rows(format_table(stages))] == ["0.000", "1.250", "2.500"]


def test_an_old_results_json_with_n_test_is_read_as_n_scored_of_its_eval_split(tmp_path, capsys):
    """Before the split was named, ``n_test`` counted the examples of the run's eval-split: the val
    split's with ``eval-split = val``. Such a file is read (and reported) as one that names it."""
    from meduniverse_flwr.common.files import write_json_atomic
    from meduniverse_flwr.server.results import read_results

    old = {split: write_job(tmp_path / f"old-{split}", "stagewise", seed) for seed, split in enumerate(("test", "val"))}
    payload = json.loads((old["val"] / "results.json").read_text())
    payload["config"]["eval-split"] = "val"
    write_json_atomic(old["val"] / "results.json", payload)
    for split, job in old.items():
        assert '"n_test": 100' in (job / "results.json").read_text()
        for entry in read_results(job / "results.json")["stages"]:
            assert {t: (s["n_scored"], s["split"], "n_test" in s) for t, s in entry["per_task"].items()} == {
                t: (100, split, False) for t in TASKS}
    new = json.loads(json.dumps(payload))
    for entry in new["stages"]:
        for scores in entry["per_task"].values():
            scores.update(n_scored=scores.pop("n_test") - 1, split="test")  # the scores name their own split
    write_json_atomic(tmp_path / "new" / "results.json", new)
    assert [s["per_task"]["a"] for s in read_results(tmp_path / "new" / "results.json")["stages"]][0] == {
        "accuracy": accuracy("stagewise", 1, 0, "a"), "auc": None, "n_scored": 99, "split": "test", "held_out": False}

    assert main([str(old["test"]), str(old["val"]), "--out", str(tmp_path / "out")]) == 0
    assert capsys.readouterr().out.count("final vs stage 0, paired t-test") == 2
    final = md_table((tmp_path / "out" / "report.md").read_text(), "Accuracy at the final stage (2), by strategy")
    assert final["a"] == [spread([accuracy("stagewise", k, 2, "a") for k in range(2)])]


def test_an_eval_split_a_run_cannot_have_is_refused(tmp_path):
    from meduniverse_flwr.server.results import read_results

    job = write_job(tmp_path / "job", "stagewise", 0)
    payload = json.loads((job / "results.json").read_text())
    payload["config"]["eval-split"] = "train"
    (job / "results.json").write_text(json.dumps(payload))
    with pytest.raises(ValueError, match="config.eval-split = 'train': must be one of test, val"):
        read_results(job / "results.json")
