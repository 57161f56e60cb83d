"""The real thing: ``flwr run .`` on a local simulation SuperLink (Ray), tiny settings."""

import json

import pytest
from simulation.flower import flwr_run, local_superlink, run_status
from safetensors.torch import load_file

from meduniverse_flwr.model import create_backbone


@pytest.fixture
def superlink(tmp_path):
    with local_superlink(tmp_path / "flwr-home", cwd=tmp_path) as link:
        yield link.env, tmp_path


def test_four_nodes_three_stages(superlink, data_root):
    env, cwd = superlink
    run_id, output = flwr_run(
        env,
        f"num-stages=3 local-epochs=1 probe-epochs=3 pretrain-epochs=1 data-root='{data_root}' output-dir='outputs'",
        "num-supernodes=4 client-resources-num-cpus=1",
    )
    assert run_status(env, run_id) == "finished:completed", output[-3000:]
    run_dir = cwd / "outputs" / "latest"  # relative output-dir: against the SuperLink's directory
    results = json.loads((run_dir / "results.json").read_text())
    assert [s["stage"] for s in results["stages"]] == [0, 1, 2, 3]
    assert all(len(s["participants"]) == 4 for s in results["stages"][1:])
    assert len(results["stages"][-1]["per_task"]) == 4
    assert len(results["summary"]["accuracy_gain"]) == 4
    assert (run_dir / "accuracy_gain.png").stat().st_size > 10_000
    for stage in range(4):
        assert (run_dir / "checkpoints" / f"stage-{stage}.safetensors").is_file()
    # the last base loads into a fresh timm ViT of the run's model name, nothing missing or unexpected
    model = create_backbone(results["config"]["model"], results["config"]["image-size"])
    outcome = model.load_state_dict(load_file(run_dir / "checkpoints" / "stage-3.safetensors"), strict=True)
    assert not outcome.missing_keys and not outcome.unexpected_keys


def test_a_bad_run_config_fails_the_run_with_a_clear_reason(superlink, data_root):
    env, cwd = superlink
    run_id, output = flwr_run(env, f"num-stages=0 data-root='{data_root}'", "num-supernodes=2")
    assert run_status(env, run_id).startswith("finished:failed")
    assert "'num-stages' = 0: must be >= 1" in output
    assert not (cwd / "outputs").exists()
