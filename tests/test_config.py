import dataclasses
import re

import pytest
from conftest import ROOT, default_run_config

from meduniverse_flwr.config import KEYS, ConfigError, RunConfig


def test_the_declaration_parses_and_round_trips():
    config = RunConfig.from_run_config(default_run_config())
    assert RunConfig.from_run_config(config.to_run_config()) == config
    assert config.datasets == ("fundus-vessel", "histology-stain", "brain-tissue", "ct-tissue")


def test_runconfig_declares_no_defaults_of_its_own():
    assert set(KEYS) == set(default_run_config())  # one field per declared key, no more
    assert all(f.default is dataclasses.MISSING for f in dataclasses.fields(RunConfig))


def test_the_readme_table_lists_exactly_the_declared_keys_with_their_defaults():
    def shown(value):
        if isinstance(value, bool):
            return str(value).lower()
        return (f"`{value}`" if value else '`""`') if isinstance(value, str) else repr(value)

    table = (ROOT / "docs" / "run-config.md").read_text().split("## Run configuration", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `([a-z-]+)` \| ([^|]+) \|", table, flags=re.M)
    assert rows == [(key, shown(value)) for key, value in default_run_config().items()]


@pytest.mark.parametrize(
    "override, message",
    [
        ({"num-stage": 3}, "unknown key 'num-stage'"),
        ({"num-stages": "3"}, "'num-stages' must be an integer"),
        ({"num-stages": -1}, "'num-stages' = -1: must be >= 0"),
        ({"server-mix": 1.5}, "'server-mix' = 1.5: must be in"),
        ({"aggregation": "avg"}, "'aggregation' = 'avg': must be one of"),
        ({"strategy": "scaffold"}, "'strategy' = 'scaffold': must be one of \\('stagewise',"),
        ({"eval-mode": "probe"}, "'eval-mode'"),
        ({"held-out": "lung"}, "'held-out'.*not among the dataset names"),
        ({"data": "hub"}, "'data' = 'hub': must be one of"),
        ({"partition": "skewed"}, "'partition'"),
        ({"download": "yes"}, "'download' must be true or false"),
        ({"node-metrics": 1}, "'node-metrics' must be true or false"),
        ({"datasets": "a", "held-out": "a"}, "leaves no dataset"),
        ({"lr": True}, "'lr' must be a number"),
        ({"pretrain": "/nowhere/encoder.safetensors"}, "'pretrain' = '/nowhere/encoder.safetensors': must be one of"),
        ({"resume-from": "/nowhere/run"}, "'resume-from'"),
        ({"output-dir": str(ROOT / "pyproject.toml")}, "'output-dir'.*exists and is not a directory"),
    ],
)
def test_bad_values_fail_with_one_line_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message) as err:
        RunConfig.from_run_config({**default_run_config(), **override})
    assert "\n" not in str(err.value)


def test_a_missing_key_is_named():
    run_config = {k: v for k, v in default_run_config().items() if k != "lr"}
    with pytest.raises(ConfigError, match="missing key 'lr'"):
        RunConfig.from_run_config(run_config)
