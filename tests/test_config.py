import pytest
from conftest import default_run_config

from meduniverse_flwr.config import ConfigError, RunConfig


def test_pyproject_defaults_parse_and_round_trip():
    config = RunConfig.from_run_config(default_run_config())
    assert config == RunConfig()  # pyproject and dataclass defaults agree
    assert RunConfig.from_run_config(config.to_run_config()) == config
    assert config.datasets == ("fundus-vessel", "histology-stain", "brain-tissue", "ct-tissue")


@pytest.mark.parametrize(
    "override, message",
    [
        ({"num-stage": 3}, "unknown key 'num-stage'"),
        ({"num-stages": "3"}, "'num-stages' must be an integer"),
        ({"num-stages": 0}, "'num-stages' = 0: must be >= 1"),
        ({"server-mix": 1.5}, "'server-mix' = 1.5: must be in"),
        ({"aggregation": "avg"}, "'aggregation' = 'avg': must be one of"),
        ({"eval-mode": "probe"}, "'eval-mode'"),
        ({"held-out": "lung"}, "'held-out'.*not among the dataset names"),
        ({"data": "hub"}, "'data' = 'hub': must be one of"),
        ({"partition": "skewed"}, "'partition'"),
        ({"download": "yes"}, "'download' must be true or false"),
        ({"datasets": "a", "held-out": "a"}, "leaves no dataset"),
        ({"lr": True}, "'lr' must be a number"),
    ],
)
def test_bad_values_fail_with_one_line_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message) as err:
        RunConfig.from_run_config({**default_run_config(), **override})
    assert "\n" not in str(err.value)
