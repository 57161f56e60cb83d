"""The site decides (site.py, site_ledger.py): what its node reads, writes, fetches and runs on comes from
its node config alone, and its privacy floor is enforced by the node, with a ledger that spans runs."""

import dataclasses
import json
import math
import threading

import pytest
from conftest import EVERY_STAGE, default_run_config, write_medmnist
from flwr.app import Context, RecordDict

from meduniverse_flwr import server_app
from meduniverse_flwr.client_app import app as client_app
from meduniverse_flwr.config import ConfigError
from meduniverse_flwr.data.cache import CACHE_DIR
from meduniverse_flwr.data.node_task import load_node_task
from meduniverse_flwr.data.npz import DataError
from meduniverse_flwr.learn.privacy import PrivacyLedger, example_steps
from meduniverse_flwr.node.ledger import Refused, charge, ledger_path, read_ledger, site_epsilon
from meduniverse_flwr.node.site import Site, site_from
from simulation.inprocess import InProcessGrid

SUBMITTED = {**default_run_config(), "data-root": "/submitter/data", "download": True, "skip-unreadable": True,
             "device": "cuda", "data": "folder", "datasets": "medmnist:/submitter/a.npz,medmnist:/submitter/b.npz"}


def test_a_deployed_node_takes_what_it_reads_fetches_and_runs_on_from_its_node_config_only():
    site = site_from({"dataset": "medmnist:pneumoniamnist", "data-root": "/site/data"}, SUBMITTED)
    assert site == Site("medmnist:pneumoniamnist", data_root="/site/data")  # every other key at the site's default
    assert not site.download and not site.skip_unreadable and site.device == "auto" and site.source == "embedded"
    options = site.data_options(SUBMITTED, 28)
    assert (options.root, options.download, options.skip_unreadable, options.source) == ("/site/data", False,
                                                                                           False, "embedded")
    assert str(site.write_dir()) == "/site/data"
    own = site_from({"dataset": "x.npz", "cache-dir": "/site/cache", "download": True, "device": "cpu"}, SUBMITTED)
    assert (str(own.write_dir()), own.download, own.device) == ("/site/cache", True, "cpu")


def test_a_run_that_asks_for_a_download_fetches_nothing_on_a_site_that_does_not_allow_it(tmp_path):
    site = site_from({"dataset": "medmnist:pneumoniamnist", "data-root": str(tmp_path)}, SUBMITTED)
    with pytest.raises(DataError, match="not found; download it"):  # not an attempt to fetch it
        load_node_task(site.dataset, 0, 1, site.data_options(SUBMITTED, 28))


def test_a_node_writes_only_in_its_cache_dir_so_its_data_root_may_be_read_only(tmp_path):
    data_root, cache_dir = tmp_path / "data", tmp_path / "cache"
    data_root.mkdir()
    write_medmnist(data_root, "pneumoniamnist", n=(12, 4, 6))
    site = site_from({"dataset": "medmnist:pneumoniamnist", "data-root": str(data_root),
                      "cache-dir": str(cache_dir)}, SUBMITTED)
    task = load_node_task.__wrapped__(site.dataset, 0, 1, site.data_options(SUBMITTED, 28))  # not the process cache
    assert task.card.name == "pneumoniamnist" and len(task.train) == 12
    assert [p.name for p in data_root.iterdir()] == ["pneumoniamnist.npz"]
    assert list((cache_dir / CACHE_DIR).iterdir())  # the decoded copy a node's next process reads


def test_a_simulated_site_is_played_by_the_run():
    site = site_from({"partition-id": 3, "num-partitions": 4}, SUBMITTED)
    assert (site.dataset, site.shard, site.n_shards) == ("medmnist:/submitter/b.npz", 1, 2)
    assert (site.data_root, site.download, site.skip_unreadable, site.device, site.source) == (
        "/submitter/data", True, True, "cuda", "folder")
    assert not site.has_floor
    floor = site_from({"partition-id": 0, "num-partitions": 4, "require-dp": "example"}, SUBMITTED)
    assert floor.has_floor and floor.dataset == "medmnist:/submitter/a.npz"


@pytest.mark.parametrize("node_config, message", [
    ({}, "node config: no 'dataset': start the SuperNode with --node-config 'dataset=\"<entry or .npz path>\"' "
         "naming this site's data"),
    ({"dataset": "x.npz", "max_epsilon": 1.0}, "node config: unknown key 'max_epsilon'"),
    ({"dataset": "x.npz", "download": "yes"}, "node config: 'download' = 'yes': must be a bool"),
    ({"dataset": "x.npz", "max-epsilon": True}, "node config: 'max-epsilon' = True: must be a float"),
    ({"dataset": "x.npz", "require-dp": "site"}, "node config: 'require-dp' = 'site': must be one of ('', 'example')"),
    ({"dataset": "x.npz", "max-epsilon": 0}, "node config: 'max-epsilon' = 0.0: must be > 0"),
    ({"dataset": "x.npz", "max-epsilon-delta": 1.0}, "node config: 'max-epsilon-delta' = 1.0: must be in (0, 1)"),
    ({"dataset": "x.npz", "device": "tpu"}, "node config: 'device' = 'tpu': must be one of"),
    ({"dataset": ""}, "node config: 'dataset' is empty"),
])
def test_a_bad_node_config_is_one_line_naming_its_key(node_config, message):
    with pytest.raises(ConfigError) as err:
        site_from(node_config, SUBMITTED)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


# ------------------------------------------------------------------ the floor and the ledger
FLOOR = Site("x.npz", require_dp="example", max_epsilon=2.0)
RELEASE = dict(dp="example", noise_multiplier=3.0, secure_noise=True, batch_size=16, epochs=1)


def release(site, tmp_path, dataset="pneumoniamnist", n_train=48, **changes):
    return charge(dataclasses.replace(site, cache_dir=str(tmp_path)), dataset, n_train, **{**RELEASE, **changes})


def test_the_floor_refuses_a_release_without_dp_sgd_or_with_noise_the_server_could_remove(tmp_path):
    with pytest.raises(Refused, match=r"the run asks dp='off', and this site releases only DP-SGD-trained"):
        release(FLOOR, tmp_path, dp="off")
    with pytest.raises(Refused, match=r"seeded from the run seed \(dp-secure-noise = false\)"):
        release(FLOOR, tmp_path, secure_noise=False)
    with pytest.raises(Refused, match="releases only DP-SGD"):  # a budget alone rules out non-DP releases too
        release(Site("x.npz", max_epsilon=5.0), tmp_path, dp="off")
    assert not ledger_path(tmp_path).exists()  # nothing charged


def test_the_ledger_charges_each_release_and_refuses_the_one_past_max_epsilon(tmp_path):
    rate, steps = example_steps(48, 16, 1)
    server = PrivacyLedger(FLOOR.max_epsilon_delta)  # the server's accountant on the same releases
    spent = []
    while True:
        try:
            spent.append(release(FLOOR, tmp_path))
        except Refused as err:
            refusal = str(err)
            break
        server.spend("pneumoniamnist", 3.0, rate, steps)
        assert spent[-1] == pytest.approx(server.epsilon("pneumoniamnist"))
    assert len(spent) >= 2 and spent == sorted(spent) and spent[-1] <= FLOOR.max_epsilon
    assert f"from {spent[-1]:.4g} to " in refusal and "past max-epsilon=2.0" in refusal and "\n" not in refusal
    # the refused release was not charged; the ledger is the file, so a restarted node reads the same
    assert read_ledger(ledger_path(tmp_path)) == {"pneumoniamnist": [(3.0, rate, steps)] * len(spent)}
    assert site_epsilon(dataclasses.replace(FLOOR, cache_dir=str(tmp_path)), "pneumoniamnist") == pytest.approx(spent[-1])
    # the budget is per dataset: another dataset of the site starts at zero
    assert site_epsilon(dataclasses.replace(FLOOR, cache_dir=str(tmp_path)), "bloodmnist") == 0.0
    assert release(FLOOR, tmp_path, dataset="bloodmnist") == pytest.approx(spent[0])


def test_a_ledger_that_cannot_be_read_refuses_every_release_and_is_kept(tmp_path):
    path = ledger_path(tmp_path)
    for text in ("{not json", json.dumps({"version": 2, "datasets": {}}),
                 json.dumps({"version": 1, "datasets": {"a": [[0.0, 0.5, 3]]}}),  # no noise: no DP
                 json.dumps({"version": 1, "datasets": {"a": [[1.0, 0.5, True]]}})):
        path.write_text(text)
        with pytest.raises(Refused, match=f"privacy ledger {path} cannot be read .*refusing to release"):
            release(FLOOR, tmp_path)
        assert path.read_text() == text  # never reset: a lost ledger must not hand the budget back


def test_two_releases_at_once_cannot_both_spend_the_last_of_a_budget(tmp_path):
    one = release(Site("x.npz", max_epsilon=math.inf, require_dp="example"), tmp_path)
    site = Site("x.npz", require_dp="example", max_epsilon=one * 1.5)  # room for one more release, not two
    outcomes = []

    def attempt():
        try:
            outcomes.append(release(site, tmp_path))
        except Refused:
            outcomes.append("refused")

    threads = [threading.Thread(target=attempt) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes, key=str)[-1] == "refused" and len(read_ledger(ledger_path(tmp_path))["pneumoniamnist"]) == 2


# ------------------------------------------------------------------ in a federation (in-process)
def federation(tiny_sites, tmp_path, name, sites, **overrides):
    config = {**default_run_config(), **EVERY_STAGE,
              "datasets": ",".join(tiny_sites), "data-root": str(tmp_path / "cache"),
              "output-dir": str(tmp_path / name), "num-stages": 1, "clients-per-stage": 3, "local-epochs": 1,
              "probe-epochs": 2, "pretrain": "none", "batch-size": 16, **overrides}
    server_app.main(InProcessGrid(client_app, config, 3, sites=sites),
                    Context(run_id=5, node_id=0, node_config={}, state=RecordDict(), run_config=config))
    return json.loads((tmp_path / name / "latest" / "results.json").read_text())["stages"]


def test_a_site_with_a_floor_is_left_out_of_a_run_without_dp_and_spends_only_what_it_allows(tiny_sites, tmp_path):
    ledger_dir = tmp_path / "site-0"
    floor = {0: {"require-dp": "example", "max-epsilon": 40.0, "cache-dir": str(ledger_dir)}}
    plain = federation(tiny_sites, tmp_path, "plain", floor)[1]
    assert sorted(plain["participants"]) == ["bloodmnist", "organamnist"]
    assert len(plain["rejected"]) == 1 and "site privacy floor: the run asks dp='off'" in plain["rejected"][0]
    assert "site_epsilon" in plain["per_task"]["pneumoniamnist"]  # its evaluation still reports its ledger
    assert plain["per_task"]["pneumoniamnist"]["site_epsilon"] == 0.0
    assert not ledger_path(ledger_dir).exists()

    private = {"dp": "example", "dp-secure-noise": True, "dp-noise-multiplier": 1.0}
    first = federation(tiny_sites, tmp_path, "private", floor, **private)[1]
    assert sorted(first["participants"]) == ["bloodmnist", "organamnist", "pneumoniamnist"]
    spent = first["per_task"]["pneumoniamnist"]["site_epsilon"]
    assert spent == pytest.approx(site_epsilon(Site("x", cache_dir=str(ledger_dir), max_epsilon=40.0), "pneumoniamnist")) and spent > 0
    assert "site_epsilon" not in first["per_task"]["bloodmnist"]  # sites without a floor keep no ledger
    # a second run spends from the same ledger; one whose release would pass the budget is refused
    tight = {0: {**floor[0], "max-epsilon": spent * 1.01}}  # any further release passes it
    second = federation(tiny_sites, tmp_path, "second", tight, **private)[1]
    assert "pneumoniamnist" not in second["participants"]
    assert "past max-epsilon" in second["rejected"][0]
    assert second["per_task"]["pneumoniamnist"]["site_epsilon"] == pytest.approx(spent)
