"""A hospital's node installs the package without extras (``pip install .``, the site image): its
ClientApp, site settings, privacy ledger and preflight must load, and its work (load the site's
data, fine-tune with DP-SGD, score) must run, without any extra's module.

Each check runs in a fresh interpreter whose imports of the extras' modules fail, as they would in
a lean install: a test process that already imported one of them would hide the dependency."""

import subprocess
import sys
import textwrap

from conftest import ROOT, write_medmnist

# the top-level modules of the [server], [sim] and [tracking] extras (pyproject.toml); not scipy,
# which opacus (DP-SGD, a node's) needs itself
EXTRAS_MODULES = ("hydra", "omegaconf", "matplotlib", "skimage", "nilearn", "ray", "mlflow", "tensorboard")
NODE_MODULES = ("meduniverse_flwr.client_app", "meduniverse_flwr.node.site", "meduniverse_flwr.node.ledger",
                "deploy.preflight", "deploy.launch")

BLOCKER = f"""
import importlib.abc, sys

class Lean(importlib.abc.MetaPathFinder):
    # a lean install lacks these: importing one fails as it would there
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {EXTRAS_MODULES!r}:
            raise ModuleNotFoundError(f"lean install: {{name}} belongs to an extra", name=name)
        return None

sys.meta_path.insert(0, Lean())
"""


def lean_python(code: str) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter, in the repository root, with the extras' modules blocked."""
    return subprocess.run([sys.executable, "-c", BLOCKER + textwrap.dedent(code)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)


def test_the_blocker_blocks():
    result = lean_python("import matplotlib.pyplot")
    assert result.returncode != 0 and "lean install: matplotlib belongs to an extra" in result.stderr


def test_node_modules_import_without_extras():
    result = lean_python("\n".join(f"import {name}" for name in NODE_MODULES))
    assert result.returncode == 0, result.stderr[-3000:]


def test_a_node_loads_its_data_and_fine_tunes_without_extras(tmp_path):
    entry = f"medmnist:{write_medmnist(tmp_path, 'pneumoniamnist', n=(32, 8, 8))}"
    result = lean_python(f"""
        import torch
        from meduniverse_flwr.client_app import node_task
        from meduniverse_flwr.config import RunConfig
        from meduniverse_flwr.learn.model import create_model
        from meduniverse_flwr.learn.privacy import DPSGD
        from meduniverse_flwr.node.site import site_from
        from meduniverse_flwr.node.ledger import charge
        from meduniverse_flwr.learn.finetune import TrainSettings, train_on_task
        from meduniverse_flwr.learn.evaluate import evaluate_base

        run = RunConfig.with_defaults().to_run_config()
        site = site_from({{"dataset": {entry!r}, "cache-dir": {str(tmp_path / "cache")!r}, "max-epsilon": 50.0}}, run)

        class Context:  # the node_config / run_config part of Flower's Context that node_task reads
            run_config = run

        task = node_task(Context, site, 28)
        charge(site, task.card.name, len(task.train), "example", 1.0, True, 16, 1)
        state = create_model("vit-micro", 28, num_classes=task.card.n_classes).state_dict()
        settings = TrainSettings(1, 1e-3, 0.05, 16, 0, torch.device("cpu"), dp_sgd=DPSGD(1.0, 1.0, True))
        backbone, _, metrics = train_on_task("vit-micro", 28, task, state, settings, validate=True)
        scores = evaluate_base("vit-micro", 28, task, backbone, "linear-probe", settings)
        print("node ok", metrics["num-examples"], sorted(scores))
    """)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "node ok 32" in result.stdout
