"""Differential privacy: clipping, the noise's scale, the accountant against Opacus's own, DP off unchanged."""

import json
import math

import numpy as np
import pytest
import torch
from conftest import default_run_config
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
from test_registries import sites, tiny_run  # noqa: F401 (fixture)
from torch import nn

from meduniverse_flwr.config import ConfigError, RunConfig
from meduniverse_flwr.data.node_task import TaskData
from meduniverse_flwr.learn import privacy
from meduniverse_flwr.learn.finetune import TrainSettings, fit, shuffled_batches
from meduniverse_flwr.server.aggregation import RunningAggregate
from meduniverse_flwr.server.norms import update_norm
from meduniverse_flwr.server.privacy import server_privacy
from meduniverse_flwr.server.results import read_results


def sgd_private(model, dp, batch_size, seed=0):
    """Opacus around plain SGD with lr 1: a step moves the parameters by exactly -(clipped sum + noise) / B."""
    return privacy.make_private(model, torch.optim.SGD(model.parameters(), lr=1.0), dp, batch_size, seed,
                                torch.device("cpu"))


def test_dp_sgd_clips_every_example_gradient():
    torch.manual_seed(0)
    model = nn.Linear(20, 3)
    forward, optimizer, close = sgd_private(model, privacy.DPSGD(0.5, 1e-9, False), batch_size=8)
    x, y = 10 * torch.randn(8, 20), torch.arange(8) % 3  # raw per-example gradients far above the bound
    before = [p.detach().clone() for p in model.parameters()]
    nn.functional.cross_entropy(forward(x), y).backward()
    raw = [p.grad_sample.flatten(1) for p in model.parameters()]
    assert torch.cat(raw, 1).norm(dim=1).max() > 10 * 0.5  # clipping has work to do
    optimizer.step()
    close()
    step = torch.cat([(b - p.detach()).flatten() for b, p in zip(before, model.parameters())])
    # each clipped example contributes at most 0.5; their sum over the expected batch of 8
    assert 0.1 < step.norm() * 8 <= 8 * 0.5 * (1 + 1e-5)


def test_site_level_dp_clips_every_update_to_the_dp_bound_on_its_way_into_the_aggregate():
    privacy = server_privacy(RunConfig.with_defaults(dp="site", aggregation="mean", dp_clip_norm=0.25))
    base = {"w": np.zeros(1000, np.float32)}
    for scale in (0.01, 1.0, 100.0):
        aggregate = privacy.wrap(RunningAggregate("mean"), base, 1, stage=1)
        aggregate.add({"w": np.full(1000, scale, np.float32)}, 10)
        clipped = aggregate.inner.result()  # what the noise is then added to
        assert update_norm(base, clipped) <= 0.25 * (1 + 1e-6)
        assert math.isclose(update_norm(base, clipped), min(0.25, scale * math.sqrt(1000)), rel_tol=1e-5)


def test_site_level_noise_has_the_configured_scale():
    """Zero updates: what is left is the noise over K, std noise_multiplier * clip / K per coordinate."""
    base = {"w": np.ones((400, 500), np.float32), "b": np.zeros(1000, np.float32)}
    rng = np.random.default_rng(0)
    noisy = privacy.noisy_sum_mean(base, base, count=3, denominator=4, noise_std=1.5 * 0.2, rng=rng)
    draws = np.concatenate([(noisy[k].astype(np.float64) - base[k]).ravel() for k in base])  # 201000 draws
    expected = 1.5 * 0.2 / 4
    # the sample std of n normal draws has relative standard error 1/sqrt(2n) = 0.16%: 1% is 6 of them
    assert abs(draws.std() / expected - 1) < 0.01
    assert abs(draws.mean()) < 5 * expected / math.sqrt(draws.size)
    # the normalised draws are normal: a Kolmogorov-Smirnov test does not reject at 1%
    from scipy import stats
    assert stats.kstest(draws / expected, "norm").pvalue > 0.01


def test_example_level_noise_has_the_configured_scale():
    """An empty Poisson batch: the step is noise alone, std noise_multiplier * clip / expected batch."""
    torch.manual_seed(0)
    model = nn.Linear(500, 200)
    forward, optimizer, close = sgd_private(model, privacy.DPSGD(clip_norm=0.3, noise_multiplier=2.0,
                                                                 secure_noise=False), batch_size=16)
    before = torch.cat([p.detach().clone().flatten() for p in model.parameters()])
    privacy.noise_only_step(model, optimizer)
    close()
    noise = (torch.cat([p.detach().flatten() for p in model.parameters()]) - before).double()
    expected = 2.0 * 0.3 / 16
    assert abs(noise.std().item() / expected - 1) < 0.02  # 100200 draws: relative SE 0.22%
    assert abs(noise.mean().item()) < 5 * expected / math.sqrt(noise.numel())


def test_secure_noise_is_not_repeatable_and_seeded_noise_is():
    assert privacy.noise_seed(7, secure=False) == 7
    assert len({privacy.noise_seed(7, secure=True) for _ in range(5)}) == 5


def test_the_ledger_matches_opacus_own_accounting():
    ledger = privacy.PrivacyLedger(delta=1e-5)
    reference = RDPAccountant()
    for rate, steps in [(0.064, 32), (0.064, 32), (0.5, 3)]:
        ledger.spend("ct-tissue", 1.1, rate, steps)
        for _ in range(steps):
            reference.step(noise_multiplier=1.1, sample_rate=rate)
    assert ledger.epsilon("ct-tissue") == pytest.approx(reference.get_epsilon(1e-5), rel=1e-12)
    # and the RDP analysis itself, for the same steps
    orders = RDPAccountant.DEFAULT_ALPHAS
    rdp = sum(compute_rdp(q=rate, noise_multiplier=1.1, steps=steps, orders=orders)
              for rate, steps in [(0.064, 64), (0.5, 3)])
    assert ledger.epsilon("ct-tissue") == pytest.approx(get_privacy_spent(orders=orders, rdp=rdp, delta=1e-5)[0])
    assert ledger.epsilon("other") == 0.0 and ledger.worst_epsilon() == ledger.epsilon("ct-tissue")


def test_calibration_reaches_the_target_epsilon():
    sigma = privacy.noise_multiplier_for(4.0, 1e-5, 0.064, 96)
    ledger = privacy.PrivacyLedger(1e-5)
    ledger.spend("site", sigma, 0.064, 96)
    assert 3.99 <= ledger.epsilon("site") <= 4.0


def test_a_run_reports_the_accountants_epsilon_for_every_stage(run_config, sites, tmp_path):  # noqa: F811
    results = tiny_run(run_config, sites, tmp_path, dp="example", num_stages=2, dp_noise_multiplier=1.3)
    stages = results["stages"]
    cards = {stage_task: 24 for stage_task in stages[0]["per_task"]}  # write_medmnist n=(24, 8, 8)
    reference = {task: RDPAccountant() for task in cards}
    expected = [0.0]
    for _ in range(2):
        for task, n in cards.items():
            rate, steps = privacy.example_steps(n, 16, 1)
            for _ in range(steps):
                reference[task].step(noise_multiplier=1.3, sample_rate=rate)
        expected.append(max(acc.get_epsilon(1e-5) for acc in reference.values()))
    assert [s["epsilon"] for s in stages] == pytest.approx(expected, rel=1e-9)
    assert all(s["delta"] == 1e-5 for s in stages)
    assert read_results(tmp_path / "out" / "latest" / "results.json")["stages"][2]["epsilon"] > expected[1]


def test_site_level_run_reports_one_event_per_stage(run_config, sites, tmp_path):  # noqa: F811
    results = tiny_run(run_config, sites, tmp_path, dp="site", aggregation="mean", num_stages=2)
    assert [s["privacy_events"] for s in results["stages"][1:]] == [
        [{"party": "federation", "noise_multiplier": 1.0, "sample_rate": 1.0, "steps": 1}]] * 2
    accountant = RDPAccountant()
    for stage in results["stages"][1:]:
        accountant.step(noise_multiplier=1.0, sample_rate=1.0)
        assert stage["epsilon"] == pytest.approx(accountant.get_epsilon(1e-5))


def old_fit_loop(model, data, settings):
    """``task.fit``'s loop as it was before DP-SGD (commit 8fbd31a): the reference for dp = off."""
    from meduniverse_flwr.learn.augment import random_flip
    from meduniverse_flwr.learn.finetune import cosine_with_warmup, param_groups, to_input, train_step

    device = settings.device
    model.to(device).train()
    images, labels = data.images.to(device), data.labels.to(device)
    generator = torch.Generator().manual_seed(settings.seed)
    optimizer = torch.optim.AdamW(param_groups(model, settings.weight_decay, settings.lr, settings.layer_decay))
    steps_per_epoch = math.ceil(len(data) / settings.batch_size)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(settings.epochs * steps_per_epoch))
    for _ in range(settings.epochs):
        order = torch.randperm(len(data), generator=generator).to(device)
        total = torch.zeros((), dtype=torch.float64, device=device)
        for start in range(0, len(data), settings.batch_size):
            index = order[start : start + settings.batch_size]
            x = random_flip(to_input(images[index], device), generator)
            total += train_step(model, x, labels[index], "multiclass", optimizer, schedule, device).double() * len(index)
    return total.item() / len(data)


def test_dp_off_trains_exactly_as_before():
    from meduniverse_flwr.learn.model import create_model

    data = TaskData(torch.randint(0, 256, (40, 1, 28, 28), dtype=torch.uint8), torch.arange(40) % 3)
    settings = TrainSettings(2, 1e-3, 0.05, 16, 5, torch.device("cpu"))
    models = []
    for train in (lambda m: fit(m, data, "multiclass", settings), lambda m: old_fit_loop(m, data, settings)):
        torch.manual_seed(0)
        model = create_model("vit-micro", 28, num_classes=3)
        models.append((train(model), model.state_dict()))
    (loss, state), (old_loss, old_state) = models
    assert loss == old_loss
    assert all(torch.equal(state[k], old_state[k]) for k in state)
    assert [b.tolist() for b in shuffled_batches(5, 2, torch.Generator().manual_seed(0))] == \
        [b.tolist() for b in torch.randperm(5, generator=torch.Generator().manual_seed(0)).split(2)]


def test_dp_sgd_repeats_with_the_seed():
    from meduniverse_flwr.learn.model import create_model

    data = TaskData(torch.randint(0, 256, (40, 1, 28, 28), dtype=torch.uint8), torch.arange(40) % 3)
    settings = TrainSettings(1, 1e-3, 0.05, 16, 5, torch.device("cpu"), dp_sgd=privacy.DPSGD(1.0, 1.0, False))
    states = []
    for _ in range(2):
        torch.manual_seed(0)
        model = create_model("vit-micro", 28, num_classes=3)
        fit(model, data, "multiclass", settings)
        states.append(model.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert not hasattr(next(iter(model.parameters())), "grad_sample")  # Opacus's hooks and buffers are gone


def test_dp_off_ignores_the_dp_and_attack_settings(run_config, sites, tmp_path):  # noqa: F811
    plain = tiny_run(run_config, sites, tmp_path / "a")
    other = tiny_run(run_config, sites, tmp_path / "b", dp_clip_norm=0.01, dp_noise_multiplier=9.0,
                     attack_factor=100.0, trim_fraction=0.4)
    strip = lambda r: [{k: v for k, v in s.items() if k != "seconds" and k != "nodes"} for s in r["stages"]]  # noqa: E731
    assert strip(plain) == strip(other)
    assert "epsilon" not in json.dumps(plain["stages"])


def test_poisson_batches_sample_each_example_at_the_accounted_rate():
    generator = torch.Generator().manual_seed(0)
    sizes = [len(b) for _ in range(200) for b in privacy.poisson_batches(100, 10, generator)]
    assert len(sizes) == 200 * 10
    assert abs(np.mean(sizes) - 10) < 0.2  # binomial(100, 0.1): std 3, 2000 batches


@pytest.mark.parametrize("overrides, message", [
    ({"dp": "site", "aggregation": "weighted"}, "dp = 'site' needs aggregation = 'mean'"),
    ({"dp": "site", "aggregation": "mean", "strategy": "cyclic"}, "'dp' = 'site': strategy 'cyclic' supports dp in"),
    ({"dp": "example", "compile": True}, "'compile' = True: not with dp = 'example'"),
    ({"dp": "laplace"}, "'dp' = 'laplace': must be one of"),
    ({"dp-noise-multiplier": 0.0}, "'dp-noise-multiplier' = 0.0: must be > 0"),
    ({"dp-delta": 1.0}, "'dp-delta' = 1.0: must be in"),
    ({"trim-fraction": 0.5}, "'trim-fraction' = 0.5: must be in"),
])
def test_bad_privacy_settings_are_one_line_errors(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        RunConfig.from_run_config({**default_run_config(), **overrides})


def test_privacy_events_read_back_are_checked(tmp_path):
    stage = {"stage": 0, "mean_accuracy": 0.5, "train_loss": None, "participants": [], "rejected": [], "bytes_up": 0,
             "bytes_down": 0, "seconds": 1.0, "per_task": {}, "epsilon": 1.0, "delta": 1e-5,
             "privacy_events": [{"party": "x", "noise_multiplier": 1.0, "sample_rate": 2.0, "steps": 3}]}
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"config": {}, "stages": [stage]}))
    with pytest.raises(ValueError, match=r"stages\[0\].privacy_events: .* is not a privacy event"):
        read_results(path)
    stage["privacy_events"][0]["sample_rate"] = 0.5
    path.write_text(json.dumps({"config": {}, "stages": [stage]}))
    assert read_results(path)["stages"][0]["epsilon"] == 1.0


def test_the_calibration_cli_prints_the_noise(capsys):
    privacy.main(["--epsilon", "4", "--level", "example", "--num-stages", "3", "--n-train", "1000", "3882"])
    lines = capsys.readouterr().out.split()
    assert float(lines[-1]) == pytest.approx(privacy.noise_multiplier_for(4, 1e-5, 0.064, 96), abs=1e-4)


def test_the_cli_gives_the_epsilon_after_each_stage_of_a_noise_multiplier(capsys):
    """The inverse of the calibration: the noise it gives for epsilon 4 after 3 stages spends about 4 by stage 3."""
    sigma = privacy.noise_multiplier_for(4, 1e-5, 0.064, 96)
    privacy.main(["--noise-multiplier", str(sigma), "--level", "example", "--num-stages", "3", "--n-train", "1000"])
    line = capsys.readouterr().out.strip()
    assert line.startswith("n-train 1000: epsilon after stages 1..3: ")
    per_stage = [float(e) for e in line.rsplit(": ", 1)[1].split(" / ")]
    assert per_stage == [round(privacy.epsilon_of([(sigma, 0.064, 32)] * s, 1e-5), 2) for s in (1, 2, 3)]
    assert per_stage[0] < per_stage[1] < per_stage[2] == pytest.approx(4, abs=0.01)
    privacy.main(["--noise-multiplier", "2.005", "--level", "site", "--num-stages", "2"])
    assert capsys.readouterr().out.startswith("federation: epsilon after stages 1..2: ")
