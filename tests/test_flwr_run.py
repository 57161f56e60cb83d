"""The real thing: ``flwr run .`` on a local simulation SuperLink (Ray), tiny settings. The runs share
one SuperLink, as a user's runs do; each writes its own output directory."""

import json

import pytest
import torch
from conftest import with_every_stage
from safetensors.torch import load_file

from meduniverse_flwr.learn.model import create_backbone
from simulation.flower import flwr_run, local_superlink, run_status


@pytest.fixture(scope="module")
def superlink(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("superlink")
    with local_superlink(cwd / "flwr-home", cwd=cwd) as link:
        yield link.env, cwd


def test_four_nodes_on_the_default_data(superlink, data_root):
    """Also with site-level DP: the run reports the accountant's epsilon after its stage (DP-SGD at
    the sites runs through the same ClientApp handlers in tests/test_privacy.py and in EXPERIMENTS.md's
    dp-cpu sweep)."""
    env, cwd = superlink
    run_id, output = flwr_run(
        env,
        with_every_stage(f"num-stages=1 local-epochs=1 probe-epochs=3 pretrain-epochs=1 data-root='{data_root}' "
                         "output-dir='default-data' dp='site' aggregation='mean' dp-noise-multiplier=1.5"),
        "num-supernodes=4 client-resources-num-cpus=1",
    )
    assert run_status(env, run_id) == "finished:completed", output[-3000:]
    run_dir = cwd / "default-data" / "latest"  # relative output-dir: against the SuperLink's directory
    results = json.loads((run_dir / "results.json").read_text())
    assert [s["stage"] for s in results["stages"]] == [0, 1]
    assert len(results["stages"][1]["participants"]) == 4
    assert len(results["stages"][-1]["per_task"]) == 4
    assert len(results["summary"]["accuracy_gain"]) == 2
    epsilons = [s["epsilon"] for s in results["stages"]]
    assert epsilons[0] == 0.0 < epsilons[1] and results["stages"][1]["delta"] == 1e-5
    assert "differential privacy (site level): epsilon" in output
    assert (run_dir / "accuracy_gain.png").stat().st_size > 10_000
    for stage in range(2):
        assert (run_dir / "checkpoints" / f"stage-{stage}.safetensors").is_file()
    # the last base loads into a fresh timm ViT of the run's model name, nothing missing or unexpected
    model = create_backbone(results["config"]["model"], results["config"]["image-size"])
    outcome = model.load_state_dict(load_file(run_dir / "checkpoints" / "stage-1.safetensors"), strict=True)
    assert not outcome.missing_keys and not outcome.unexpected_keys


def test_a_bad_run_config_fails_the_run_with_a_clear_reason(superlink, data_root):
    env, cwd = superlink
    run_id, output = flwr_run(env, f"num-stages=-1 data-root='{data_root}' output-dir='bad-config'", "num-supernodes=2")
    assert run_status(env, run_id).startswith("finished:failed")
    assert "'num-stages' = -1: must be >= 0" in output
    assert not (cwd / "bad-config").exists()


def test_local_baseline_keeps_each_node_model_across_messages(superlink, tiny_sites):
    """``local`` needs what Flower keeps per node between messages (context.state): the base never
    changes, yet each stage scores every node on its own, further-trained model."""
    env, cwd = superlink
    run_id, output = flwr_run(
        env,
        with_every_stage(f"strategy='local' num-stages=2 local-epochs=1 probe-epochs=3 pretrain='none' "
                         f"clients-per-stage=2 datasets='{','.join(tiny_sites[:2])}' data-root='{cwd / 'cache'}' "
                         "output-dir='local'"),
        "num-supernodes=2 client-resources-num-cpus=1",
    )
    assert run_status(env, run_id) == "finished:completed", output[-3000:]
    run_dir = cwd / "local" / "latest"
    stages = json.loads((run_dir / "results.json").read_text())["stages"]
    checkpoints = [load_file(run_dir / "checkpoints" / f"stage-{stage}.safetensors") for stage in range(3)]
    assert all(torch.equal(checkpoints[0][k], c[k]) for c in checkpoints[1:] for k in checkpoints[0])
    scores = [[(s["per_task"][task]["accuracy"], s["per_task"][task]["auc"]) for task in sorted(s["per_task"])]
              for s in stages]
    # the same base, scored with the same seed, would repeat
    assert scores[0] != scores[1] and scores[1] != scores[2] and scores[0] != scores[2]


def test_distill_curates_on_the_servers_corpus_under_flwr_run(superlink, tiny_sites):
    """The curation rule through the real runtime: each stage's base is trained on the server (its
    seconds recorded), the MAE decoder written beside the checkpoint and never sent."""
    env, cwd = superlink
    run_id, output = flwr_run(
        env,
        with_every_stage(f"aggregation='distill' distill-epochs=1 num-stages=1 local-epochs=1 probe-epochs=2 "
                         f"pretrain-epochs=1 clients-per-stage=2 datasets='{','.join(tiny_sites[:2])}' "
                         f"data-root='{cwd / 'cache'}' output-dir='distill'"),
        "num-supernodes=2 client-resources-num-cpus=1",
    )
    assert run_status(env, run_id) == "finished:completed", output[-3000:]
    run_dir = cwd / "distill" / "latest"
    stages = json.loads((run_dir / "results.json").read_text())["stages"]
    assert len(stages[1]["participants"]) == 2 and stages[1]["server_seconds"] > 0
    decoder = load_file(run_dir / "checkpoints" / "stage-1.decoder.safetensors")
    base = load_file(run_dir / "checkpoints" / "stage-1.safetensors")
    assert decoder and not set(decoder) & set(base)
    before = load_file(run_dir / "checkpoints" / "stage-0.safetensors")
    assert any(not torch.equal(before[k], base[k]) for k in base)
