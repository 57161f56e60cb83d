"""``meduniverse_flwr.report.arrival``: the arrival gain over the MIM base (Fig. 3) from hand-made
results.json files with known numbers: 3 seeds, 5 tasks (+ a held-out one), two stage-wise arms, random
init and a longer-pretrained control, two eval-labels levels."""

import json
import subprocess
import sys

import numpy as np
import pytest
from scipy import stats as scipy_stats

from meduniverse_flwr.report import arrival as arrival_report
from meduniverse_flwr.report import multi as report
from meduniverse_flwr.report import stats
from meduniverse_flwr.report.arrival_runs import CLIENT_RECIPE, DEFAULTS, arm_label, arrival_stages, level_label
from meduniverse_flwr.server.results import read_results

TASKS = ("a", "b", "c", "d", "e")
SEEDS = (0, 1, 2)
LEVELS = (300, 0)
# the tasks training at stages 1, 2, 3, per seed (seed % 3)
ORDER = {0: [["a", "b"], ["c", "d"], ["e"]], 1: [["c", "e"], ["a", "d"], ["b"]], 2: [["b", "d"], ["a", "e"], ["c"]]}
BASE = {"a": 0.60, "b": 0.70, "c": 0.50, "d": 0.80, "e": 0.65, "h": 0.40}
RATE = {"mean": {"a": 0.02, "b": 0.03, "c": -0.01, "d": 0.01, "e": 0.04},
        "ties": {"a": 0.01, "b": -0.02, "c": 0.02, "d": 0.0, "e": 0.03, "h": 0.015}}
FACTOR = {300: 1.0, 0: 0.5}  # with every label, the base matters less
ARMS = {"mean": "stage-wise: mean", "ties": "stage-wise: ties, density 0.2",
        "mae20": "mae base, 20 epochs (no stages)", "random": "random init"}
CARDS = {t: {"modality": "x-ray" if t < "c" else "ct", "n_classes": 2, "label_kind": "multiclass",
             "classes": [f"{t}-no", f"{t}-yes"]} for t in TASKS}


def accuracy(arm, level, seed, stage, task):
    """Known numbers. The MIM base (stage 0, and what controls are measured from): BASE, + 1 point per
    seed, + 10 with every label; a stage-wise base s adds s x RATE x FACTOR + 0.2 s points per seed.
    Controls score their base only: random init 20 points below the MIM base (less for later tasks), the
    longer-pretrained base a little above it."""
    i = TASKS.index(task) if task in TASKS else 0
    mim = BASE[task] + 0.01 * seed + (0.1 if level == 0 else 0.0)
    if arm == "random":
        return round(mim - 0.2 + 0.01 * i + 0.001 * seed, 4)
    if arm == "mae20":
        return round(mim + 0.005 * (i + 1) + 0.001 * seed, 4)
    return round(mim + stage * RATE[arm][task] * FACTOR[level] + 0.002 * seed * stage, 4)


def auc(arm, level, seed, stage, task):
    """AUC moves half as much as accuracy; task e has none (a task at its majority class)."""
    return None if task == "e" else round(0.45 + 0.5 * accuracy(arm, level, seed, stage, task), 4)


def score(metric, *key):
    return (accuracy if metric == "accuracy" else auc)(*key)


def stage_entry(arm, level, seed, number, tasks, held_out=()):
    per_task = {t: {"accuracy": accuracy(arm, level, seed, number, t), "auc": auc(arm, level, seed, number, t),
                    "n_test": 100, "held_out": t in held_out} for t in [*tasks, *held_out]}
    trained = [m["accuracy"] for m in per_task.values() if not m["held_out"]]
    return {"stage": number, "participants": ORDER[seed % 3][number - 1] if number and arm in RATE else [],
            "per_task": per_task, "mean_accuracy": float(np.mean(trained)) if trained else None,
            "train_loss": 0.5 if number else None, "rejected": [], "nodes": [], "bytes_up": 0, "bytes_down": 0,
            "seconds": 1.0}


def config(arm, level, seed):
    config = {"schedule": "arrival", "seed": seed, "eval-labels": level, "eval-mode": "finetune", "pretrain": "mae",
              "pretrain-epochs": 10, "num-stages": 3, "clients-per-stage": 2, "strategy": "stagewise",
              "aggregation": "mean", "server-mix": 1.0, "merge-density": 0.2, "datasets": "a,b,c,d,e", "held-out": "",
              **{key: DEFAULTS[key] for key in CLIENT_RECIPE}}
    if arm == "ties":
        config.update({"aggregation": "ties", "datasets": "a,b,c,d,e,h", "held-out": "h"})
    elif arm == "random":
        config.update({"pretrain": "none", "num-stages": 0})
    elif arm == "mae20":
        config.update({"pretrain-epochs": 20, "num-stages": 0})
    return config


def payload(arm, level, seed):
    held_out = ("h",) if arm == "ties" else ()
    if arm in RATE:
        trained = [t for tasks in ORDER[seed % 3] for t in tasks]
        stages = [stage_entry(arm, level, seed, s, trained[len(sum(ORDER[seed % 3][:s], [])):], held_out)
                  for s in range(4)]  # stage s scores the tasks not trained yet, and the held-out one
    else:
        stages = [stage_entry(arm, level, seed, 0, TASKS)]
    return {"config": config(arm, level, seed), "stages": stages, "tasks": CARDS}


def write(path, content):
    path.mkdir(parents=True, exist_ok=True)
    (path / "results.json").write_text(json.dumps(content))
    return path


@pytest.fixture
def sweep(tmp_path):
    """A Hydra-like sweep directory, one job per (arm, level, seed)."""
    root = tmp_path / "multirun" / "12-00-00"
    keys = [(arm, level, seed) for arm in ARMS for level in LEVELS for seed in SEEDS]
    for job, key in enumerate(keys):
        write(root / str(job), payload(*key))
    return root


def expected(arm, level, metric, stages=(1, 2, 3)):
    """(task, seed, arrival stage, gain in points) from the formulas, computed as the report does
    (each score in points, then the difference)."""
    rows = []
    for seed in SEEDS:
        for a, tasks in enumerate(ORDER[seed], start=1):
            for task in tasks:
                sent = (arm, level, seed, a - 1, task) if arm in RATE else (arm, level, seed, 0, task)
                mine, mim = score(metric, *sent), score(metric, "mean", level, seed, 0, task)
                if a in stages and mine is not None:
                    rows.append((task, seed, a, 100 * mine - 100 * mim))
    return rows


@pytest.fixture
def written(sweep, tmp_path):
    out = tmp_path / "out"
    assert arrival_report.main([str(sweep), "--out", str(out)]) == 0
    return out, json.loads((out / "arrival.json").read_text())


def result(numbers, arm, level, metric):
    [found] = [r for r in numbers["results"]
               if (r["arm"], r["eval_labels"], r["metric"]) == (ARMS[arm], level, metric)]
    return found


def test_the_fixtures_are_valid_results_json(sweep):
    for job in sweep.iterdir():
        read_results(job / "results.json")  # raises on a bad one
    last = json.loads((sweep / "0" / "results.json").read_text())["stages"][3]
    assert last["per_task"] == {} and last["mean_accuracy"] is None  # every task trained


def test_arms_and_arrival_stages():
    assert [arm_label(config(arm, 0, 0)) for arm in ARMS] == list(ARMS.values())
    mixed = {**config("mean", 0, 0), "server-mix": 0.5}
    assert arm_label(mixed) == "stage-wise: mean, mix 0.5"
    # a file from before the clients' own recipe: its clients trained with the scoring recipe
    older = {k: v for k, v in config("mean", 0, 0).items() if k not in CLIENT_RECIPE}
    assert arm_label({**older, "lr": 0.001, "layer-decay": 1.0}) == (
        "stage-wise: mean; client lr 0.001, layer decay 1, head epochs 0")
    assert arm_label({**older, "lr": DEFAULTS["client-lr"], "layer-decay": DEFAULTS["client-layer-decay"]}) == (
        "stage-wise: mean")
    assert arrival_stages(payload("mean", 0, 1)["stages"]) == {"c": 1, "e": 1, "a": 2, "d": 2, "b": 3}
    stages = payload("mean", 0, 1)["stages"]
    stages[3]["participants"] = ["c"]
    with pytest.raises(ValueError, match="task 'c' trains in stages 1 and 3"):
        arrival_stages(stages)
    assert level_label(0) == "eval-labels = all" and level_label(300) == "eval-labels = 300"


def test_arrival_gain_per_stage(written):
    _, numbers = written
    stagewise = result(numbers, "mean", 300, "accuracy")["per_stage"]
    assert [e["stage"] for e in stagewise] == [1, 2, 3] and [e["n"] for e in stagewise] == [6, 6, 3]
    assert stagewise[0]["mean"] == 0 and (stagewise[0]["low"], stagewise[0]["high"]) == (0, 0)  # sent base 0
    # stage 2, base 1: c -1, d +1 (seed 0), a +2.2, d +1.2 (seed 1), a +2.4, e +4.4 (seed 2)
    assert stagewise[1]["mean"] == pytest.approx(10.2 / 6)
    assert stagewise[2]["mean"] == pytest.approx((8.0 + 6.4 - 1.2) / 3)  # base 2: e, b, c
    for arm in ARMS:
        for level in LEVELS:
            for metric in ("accuracy", "auc"):
                for e in result(numbers, arm, level, metric)["per_stage"]:
                    rows = expected(arm, level, metric, stages=(e["stage"],))
                    gains, tasks = [g for *_, g in rows], [t for t, *_ in rows]
                    assert e["n"] == len(rows) and e["mean"] == pytest.approx(np.mean(gains))
                    assert (e["low"], e["high"]) == pytest.approx(stats.bootstrap_ci(gains, tasks))
    control = result(numbers, "random", 0, "accuracy")["per_stage"]  # -20 + task index + 0.1 per seed
    assert control[0]["mean"] == pytest.approx(np.mean([-20, -19, -17.9, -15.9, -18.8, -16.8]))  # a b, c e, b d
    assert result(numbers, "mean", 300, "auc")["per_stage"][1]["n"] == 5  # e has no AUC


def test_pooled_gain_tests_match_scipy_and_holm_runs_across_the_report(written):
    _, numbers = written
    for arm in ARMS:
        for level in LEVELS:
            for metric in ("accuracy", "auc"):
                pooled = result(numbers, arm, level, metric)["pooled"]
                rows = expected(arm, level, metric, stages=(2, 3))
                gains, tasks = [g for *_, g in rows], [t for t, *_ in rows]
                assert pooled["n_pairs"] == len(gains) == (9 if metric == "accuracy" else 7)  # e: no AUC
                assert pooled["mean"] == pytest.approx(np.mean(gains))
                assert pooled["sd"] == pytest.approx(np.std(gains, ddof=1))
                assert pooled["wilcoxon_p"] == scipy_stats.wilcoxon(gains).pvalue
                assert pooled["ttest_p"] == pytest.approx(scipy_stats.ttest_1samp(gains, 0).pvalue, rel=1e-9)
                assert (pooled["low"], pooled["high"]) == pytest.approx(stats.bootstrap_ci(gains, tasks))
                assert pooled["low"] <= pooled["mean"] <= pooled["high"]
                means = [np.mean([g for t, *_, g in rows if t == task]) for task in sorted(set(tasks))]
                assert pooled["n_tasks"] == len(means)
                assert pooled["task_level_p"] == scipy_stats.wilcoxon(means).pvalue
                assert pooled["detectable_effect"] == pytest.approx(
                    (scipy_stats.t.ppf(0.975, len(gains) - 1) + scipy_stats.t.ppf(0.8, len(gains) - 1))
                    * np.std(gains, ddof=1) / np.sqrt(len(gains)))
                assert pooled["pairs_needed"] == stats.pairs_needed(np.std(gains, ddof=1), 2.0)
    primary = [r["pooled"]["wilcoxon_p"] for r in numbers["results"] + numbers["versus"]]
    assert len(primary) == 4 * 2 * 2 + 4 * 2 * 2
    adjusted = [r["pooled"]["holm_p"] for r in numbers["results"] + numbers["versus"]]
    assert adjusted == pytest.approx(stats.holm(primary))  # one family: gains and arm against arm
    assert numbers["results"][0]["pooled"]["holm_p"] > numbers["results"][0]["pooled"]["wilcoxon_p"]


def test_arms_are_compared_with_the_first_stage_wise_arm_and_the_longer_pretrained_one(written):
    out, numbers = written
    versus = {(v["arm"], v["against"], v["eval_labels"], v["metric"]): v for v in numbers["versus"]}
    pairs = [("ties", "mean"), ("random", "mean"), ("mean", "mae20"), ("ties", "mae20")]
    assert {(arm, against) for arm, against, *_ in versus} == {(ARMS[a], ARMS[b]) for a, b in pairs}
    for arm, against in pairs:
        for level in LEVELS:
            for metric in ("accuracy", "auc"):
                mine = {(t, seed): g for t, seed, _, g in expected(arm, level, metric, stages=(2, 3))}
                first = {(t, seed): g for t, seed, _, g in expected(against, level, metric, stages=(2, 3))}
                differences = [mine[key] - first[key] for key in sorted(mine) if key in first]
                pooled = versus[ARMS[arm], ARMS[against], level, metric]["pooled"]
                assert pooled["n_pairs"] == len(differences) > 0
                assert pooled["mean"] == pytest.approx(np.mean(differences))
                assert pooled["wilcoxon_p"] == pytest.approx(scipy_stats.wilcoxon(differences).pvalue)
    assert "## Arm against arm" in (out / "report.md").read_text()


def test_per_task_absolute_unseen_and_held_out(written):
    _, numbers = written
    mean = result(numbers, "mean", 300, "accuracy")
    # task a arrives at 2 in seeds 1 and 2 (+2.2, +2.4), at 1 in seed 0 (left out)
    assert mean["per_task"]["a"] == {"mean": pytest.approx(2.3), "n": 2}
    assert mean["per_task"]["e"] == {"mean": pytest.approx((8.0 + 4.4) / 2), "n": 2}
    late = expected("mean", 300, "accuracy", stages=(2, 3))
    mim = [100 * accuracy("mean", 300, seed, 0, task) for task, seed, *_ in late]
    assert mean["absolute"] == {"n": 9, "score": pytest.approx(np.mean(mim) + np.mean([g for *_, g in late])),
                                "mim": pytest.approx(np.mean(mim))}
    control = result(numbers, "mae20", 300, "accuracy")["absolute"]
    assert control["score"] == pytest.approx(np.mean([100 * accuracy("mae20", 300, s, 0, t) for t, s, *_ in late]))
    # unseen at stage 1: every task not trained at 1, its stage-1 score minus its stage-0 score
    unseen = mean["unseen"]
    assert [u["stage"] for u in unseen] == [1, 2, 3] and [u["n"] for u in unseen] == [9, 3, 0]
    assert unseen[0]["mean"] == pytest.approx((-1 + 1 + 4 + 2.2 + 1.2 + 3.2 + 2.4 + 4.4 - 0.6) / 9)
    assert unseen[2]["mean"] is None and mean["held_out"] == []
    held = result(numbers, "ties", 300, "accuracy")["held_out"]
    assert [h["n"] for h in held] == [3, 3, 3]
    assert held[2]["mean"] == pytest.approx(np.mean([4.5 + 0.6 * seed for seed in SEEDS]))  # 3 x 1.5 + 0.2 x 3 x seed
    assert result(numbers, "random", 300, "accuracy")["unseen"] == []  # controls have no stages
    assert numbers["tasks"]["c"] == {"modality": "ct", "classes": ["c-no", "c-yes"]}


def test_report_md_figure_and_runs_read(written, sweep):
    out, numbers = written
    assert (out / "fig3_gain.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = (out / "report.md").read_text()
    assert "Unit: one (task, seed)" in text and "cluster bootstrap over tasks" in text and "t(0.975, n-1)" in text
    first = numbers["results"][0]
    assert (first["arm"], first["eval_labels"], first["metric"]) == (ARMS["mean"], 300, "accuracy")
    p = first["pooled"]
    row = (f"| eval-labels = 300 | stage-wise: mean | accuracy | 9 | 5 | {p['mean']:+.2f} | {p['sd']:.2f} | "
           f"[{p['low']:+.2f}, {p['high']:+.2f}] | {p['wilcoxon_p']:.3g} | {p['holm_p']:.3g} | {p['ttest_p']:.3g} |")
    assert row in text
    assert "| stage-wise: mean | +0.00 [+0.00, +0.00] (n=6) | +1.70 [" in text
    assert "| a | x-ray | a-no, a-yes | +2.30 (n=2) |" in text
    assert "## Held-out tasks at each stage: accuracy, eval-labels = 300" in text
    assert text.index("eval-labels = 300") < text.index("eval-labels = all")  # label-scarce first
    assert "no auc score for 24 of 120 arrivals (e), left out of the auc tables" in text  # 4 arms x 2 levels x 3 seeds
    assert len(numbers["runs"]) == 24 and str(sweep / "0" / "results.json") in text
    control = next(r for r in numbers["runs"] if r["arm"] == ARMS["random"] and r["seed"] == 1)
    reference = json.loads(open(control["reference"]).read())["config"]
    assert (reference["aggregation"], reference["seed"]) == ("mean", 1)
    assert reference["eval-labels"] == control["eval_labels"]


def test_report_main_dispatches_arrival_runs(sweep, tmp_path, capsys):
    out = tmp_path / "via-report"
    assert report.main([str(sweep), "--out", str(out)]) == 0
    assert "arrival_report: " in capsys.readouterr().out
    assert (out / "report.md").read_text().startswith("# MedUniverse arrival report")
    assert {p.name for p in out.iterdir()} == {"report.md", "fig3_gain.png", "arrival.json"}
    other = payload("mean", 300, 0)
    other["config"]["schedule"] = "every-stage"
    write(sweep / "95", other)  # not every run an arrival run: the report of several runs, as before
    assert report.main([str(sweep), "--out", str(tmp_path / "mixed")]) == 0
    assert (tmp_path / "mixed" / "report.md").read_text().startswith("# MedUniverse report\n")
    assert not (tmp_path / "mixed" / "arrival.json").exists()


def test_bad_files_are_one_line_and_unusable_runs_are_notes(sweep, tmp_path, capsys):
    (write(sweep / "90", {}) / "results.json").write_text("{not json")
    unfinished = payload("mean", 300, 5)
    unfinished["stages"] = unfinished["stages"][:2]
    write(sweep / "91", unfinished)
    write(sweep / "92", payload("random", 300, 7))  # no stage-wise run of seed 7
    twice = payload("ties", 0, 8)
    twice["stages"][3]["participants"] = ["a"]
    write(sweep / "93", twice)
    bad_cards = payload("mean", 0, 9)
    bad_cards["tasks"] = {"a": {"classes": "no-list"}}
    write(sweep / "94", bad_cards)
    out = tmp_path / "out"
    assert arrival_report.main([str(sweep), "--out", str(out)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [f"arrival_report: {sweep / '90' / 'results.json'}: not a valid results.json (Expecting property "
                   "name enclosed in double quotes: line 1 column 2 (char 1))",
                   f"arrival_report: {sweep / '94' / 'results.json'}: not a valid results.json "
                   "(tasks['a'].modality = 'None': must be a string)"]
    text = (out / "report.md").read_text()
    assert f"{sweep / '91' / 'results.json'}: unfinished (2 of 4 stages), left out" in text
    assert f"{sweep / '92' / 'results.json'}: no stage-wise run with seed 7" in text
    assert f"{sweep / '93' / 'results.json'}: task 'a' trains in stages 2 and 3, left out" in text
    assert len(json.loads((out / "arrival.json").read_text())["runs"]) == 24


def test_the_command_line_and_a_run_of_another_schedule(sweep, tmp_path):
    other = payload("mean", 300, 0)
    other["config"]["schedule"] = "every-stage"
    write(sweep / "95", other)
    out = tmp_path / "cli"
    done = subprocess.run([sys.executable, "-m", "meduniverse_flwr.report.arrival", str(sweep), "--out", str(out)],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0 and done.stderr == ""
    written = ", ".join(str(out / name) for name in ("report.md", "fig3_gain.png", "arrival.json"))
    assert done.stdout == f"arrival_report: {written}\n"
    assert "schedule 'every-stage', not an arrival run, left out" in (out / "report.md").read_text()
