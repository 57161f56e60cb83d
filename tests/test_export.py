"""``python -m meduniverse_flwr.tools.export``: a finished run's base as a timm folder, loaded by timm alone."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import EVERY_STAGE, default_run_config
from flwr.app import Context, RecordDict
from safetensors.torch import load_file, save_file

from meduniverse_flwr import server_app
from meduniverse_flwr.client_app import app as client_app
from meduniverse_flwr.learn.model import create_backbone, create_model, load_backbone
from meduniverse_flwr.server.results import read_results
from meduniverse_flwr.tools.export import DISCLAIMER, backbone_args, export, main, model_card
from simulation.inprocess import InProcessGrid

# Runs in a fresh interpreter: timm and torch only, from the exported folder.
CHILD = r"""
import json, sys
from pathlib import Path
import timm, torch
folder, out = Path(sys.argv[1]), sys.argv[2]
config = json.loads((folder / "config.json").read_text())
model = timm.create_model(config["architecture"], pretrained=True,
                          pretrained_cfg_overlay=dict(file=str(folder / "model.safetensors")),
                          num_classes=0, **config["model_args"]).eval()
hub = timm.create_model("local-dir:" + str(folder), pretrained=True).eval()  # config.json as timm's hub loader reads it
x = torch.rand(5, *config["pretrained_cfg"]["input_size"], generator=torch.Generator().manual_seed(0)) * 2 - 1
with torch.no_grad():
    torch.save({"x": x, "features": model.forward_features(x), "pooled": model(x), "hub": hub(x),
                "state": model.state_dict(), "data": timm.data.resolve_data_config(model=hub)}, out)
assert "meduniverse_flwr" not in sys.modules
"""


@pytest.fixture(scope="module")
def run_dir(data_root, tiny_sites, tmp_path_factory) -> Path:
    """One finished run (stages 0 and 1, server-side DP so epsilon is recorded) on three tiny sites."""
    config = {**default_run_config(), **EVERY_STAGE, "data-root": str(data_root), "num-stages": 1, "local-epochs": 1,
              "probe-epochs": 2, "pretrain": "none", "batch-size": 16, "clients-per-stage": 3,
              "datasets": ",".join(tiny_sites), "dp": "site", "aggregation": "mean",
              "output-dir": str(tmp_path_factory.mktemp("export-run"))}
    grid = InProcessGrid(client_app, config, 3)
    server_app.main(grid, Context(run_id=11, node_id=0, node_config={}, state=RecordDict(), run_config=config))
    return (Path(config["output-dir"]) / "latest").resolve()


@pytest.fixture(scope="module")
def exported(run_dir, tmp_path_factory) -> Path:
    return export(run_dir, tmp_path_factory.mktemp("exports") / "base", licenses=["CC-BY-4.0"])


def section(card: str, heading: str) -> str:
    return card.split(f"## {heading}", 1)[1].split("\n## ", 1)[0]


def table(text: str) -> list[list[str]]:
    """The body rows of the Markdown table in ``text``, cells stripped."""
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines() if line.startswith("|")]
    return rows[2:]


def test_timm_alone_loads_the_exact_backbone(run_dir, exported, tmp_path):
    out = tmp_path / "child.pt"
    subprocess.run([sys.executable, "-c", CHILD, str(exported), str(out)], cwd=tmp_path, check=True, timeout=300)
    child = torch.load(out, weights_only=False)
    checkpoint = load_file(str(run_dir / "checkpoints" / "stage-1.safetensors"))
    assert set(child["state"]) == set(checkpoint)  # nothing left at timm's random init
    assert all(torch.equal(child["state"][k], v) for k, v in checkpoint.items())
    backbone = create_backbone("vit-micro", 28)
    load_backbone(run_dir / "checkpoints" / "stage-1.safetensors", backbone)
    with torch.no_grad():
        assert torch.equal(child["features"], backbone.eval().forward_features(child["x"]))
        pooled = backbone(child["x"])
    assert pooled.shape == (5, 96) and torch.equal(child["pooled"], pooled) and torch.equal(child["hub"], pooled)
    assert tuple(child["data"]["input_size"]) == (3, 28, 28) and tuple(child["data"]["mean"]) == (0.5, 0.5, 0.5)


def test_folder_has_the_timm_layout(run_dir, exported):
    assert sorted(p.name for p in exported.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    config = json.loads((exported / "config.json").read_text())
    assert config["architecture"] == "vit_tiny_patch16_224" and config["num_classes"] == 0
    assert config["num_features"] == 96 and config["global_pool"] == "avg"
    assert config["model_args"] == {"img_size": 28, "patch_size": 4, "in_chans": 3, "embed_dim": 96, "depth": 6,
                                    "num_heads": 3, "global_pool": "avg", "fc_norm": False, "class_token": True}
    assert config["pretrained_cfg"]["input_size"] == [3, 28, 28] and config["pretrained_cfg"]["std"] == [0.5] * 3
    tensors, checkpoint = load_file(str(exported / "model.safetensors")), load_file(
        str(run_dir / "checkpoints" / "stage-1.safetensors"))
    assert set(tensors) == set(checkpoint) and all(torch.equal(tensors[k], v) for k, v in checkpoint.items())


def test_card_numbers_are_results_json(run_dir, exported):
    results, card = read_results(run_dir / "results.json"), (exported / "README.md").read_text()
    final = results["stages"][1]
    assert card.startswith("---\nlibrary_name: timm\nlicense: cc-by-4.0\ntags:\n- image-feature-extraction\n")
    scores = {row[0]: row for row in table(section(card, "Scores of the stage-1 base"))}
    assert set(scores) == set(final["per_task"]) and len(scores) == 3
    for task, metrics in final["per_task"].items():
        assert float(scores[task][1]) == round(metrics["accuracy"], 4)
        assert float(scores[task][2]) == round(metrics["auc"], 4)
        assert scores[task][3] == metrics["split"] == "test"
    stages = {row[0]: row for row in table(section(card, "How it was built"))}
    assert stages["1"][1] == "3" and stages["1"][2].split(", ") == final["participants"]
    tasks = {row[0]: row[1:] for row in table(section(card, "Sites' tasks"))}
    assert {t: (r[0], int(r[1])) for t, r in tasks.items()} == {
        t: (f["modality"], f["n_classes"]) for t, f in results["tasks"].items()}
    epsilon = re.search(r"epsilon = ([0-9.]+), delta = (\S+)", card)
    assert float(epsilon[1]) == round(final["epsilon"], 4) and float(epsilon[2]) == final["delta"]
    assert "- CC-BY-4.0" in section(card, "Data licences") and DISCLAIMER in card
    assert ('timm.create_model("vit_tiny_patch16_224", pretrained=True, pretrained_cfg_overlay=dict('
            'file="<DIR>/model.safetensors"), num_classes=0, img_size=28, patch_size=4, in_chans=3, embed_dim=96, '
            "depth=6, num_heads=3, global_pool='avg', fc_norm=False, class_token=True)") in card


def test_model_card_licence_and_missing_records(run_dir):
    results = read_results(run_dir / "results.json")
    _, args = backbone_args("vit-micro", 28, run_dir / "checkpoints" / "stage-0.safetensors")
    del results["tasks"]  # an older results.json
    card = model_card(results, 0, "vit_tiny_patch16_224", args, [])
    assert "license: other" in card and "Not given: the user of this card must supply them" in card
    assert all(row[1] == "not recorded" for row in table(section(card, "Sites' tasks")))
    two = model_card(results, 0, "vit_tiny_patch16_224", args, ["CC-BY-4.0", "images from site A: CC BY-NC"])
    assert "license: other" in two and "- images from site A: CC BY-NC" in two


def test_stage_0_exports_stage_0(run_dir, tmp_path):
    assert main([str(run_dir), "--stage", "0", "--out", str(tmp_path / "zero")]) == 0
    tensors = load_file(str(tmp_path / "zero" / "model.safetensors"))
    stage0, stage1 = (load_file(str(run_dir / "checkpoints" / f"stage-{s}.safetensors")) for s in (0, 1))
    assert all(torch.equal(tensors[k], v) for k, v in stage0.items()) and set(tensors) == set(stage0)
    assert not all(torch.equal(stage0[k], stage1[k]) for k in stage0)  # stage 1 trained
    assert "Exported stage: 0" in (tmp_path / "zero" / "README.md").read_text()


def one_line_error(argv, capsys) -> str:
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("export: ") and err.count("\n") == 1 and "Traceback" not in err
    return err


def test_refusals_are_one_line(run_dir, tmp_path, capsys):
    assert "stage 5: not in" in one_line_error([str(run_dir), "--stage", "5", "--out", str(tmp_path / "a")], capsys)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    err = one_line_error([str(run_dir), "--out", str(tmp_path / "full")], capsys)
    assert "exists and is not an empty directory" in err and (tmp_path / "full" / "keep.txt").read_text() == "mine"
    broken = tmp_path / "run"
    shutil.copytree(run_dir, broken)
    (broken / "checkpoints" / "stage-1.safetensors").unlink()
    assert "stage-1.safetensors: missing" in one_line_error([str(broken), "--out", str(tmp_path / "b")], capsys)
    assert "not a directory" in one_line_error([str(tmp_path / "nowhere"), "--out", str(tmp_path / "c")], capsys)
    (broken / "results.json").unlink()
    assert "results.json: missing" in one_line_error([str(broken), "--out", str(tmp_path / "d")], capsys)
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no build folder left behind
    (tmp_path / "empty").mkdir()
    assert main([str(run_dir), "--out", str(tmp_path / "empty")]) == 0  # an empty --out is used


def test_cli_exits_1_without_traceback(run_dir, tmp_path):
    done = subprocess.run([sys.executable, "-m", "meduniverse_flwr.tools.export", str(run_dir), "--stage", "9",
                           "--out", str(tmp_path / "x")], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 1 and done.stderr.count("\n") == 1 and "stage 9: not in" in done.stderr


def test_patch_size_comes_from_the_weights(tmp_path):
    def checkpoint(model) -> Path:
        path = tmp_path / f"{len(list(tmp_path.iterdir()))}.safetensors"
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
        return path

    _, args = backbone_args("vit-micro", 28, checkpoint(create_model("vit-micro", 28, patch_size=7)))
    assert args["patch_size"] == 7
    with pytest.raises(ValueError, match="patch size 5 does not divide the run's image-size 28"):
        backbone_args("vit-micro", 28, checkpoint(create_model("vit-micro", 30, patch_size=5)))
    with pytest.raises(ValueError, match="does not fit the model"):  # a vit-tiny checkpoint in a vit-micro run
        backbone_args("vit-micro", 28, checkpoint(create_model("vit-tiny", 28)))
    with pytest.raises(ValueError, match="does not fit the model"):  # patch 4 weights, a 32 px grid
        backbone_args("vit-micro", 28, checkpoint(create_model("vit-micro", 32)))
