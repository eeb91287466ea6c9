"""Tests of dpsign_fl.release.adversarial: adversarial copies made on the client, per example.

The privacy argument (docs/privacy.md, "Adversarial training") needs each
example's copy, and so its clipped gradient, to depend on that example alone.
Golden values come from a one-example-at-a-time loop; the negative control is
a model with a layer that mixes the batch, where batch and loop must differ.
Models run in float64 so that agreement is checked far below float32 rounding.
"""

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from dpsign_fl.evaluation import evaluate, robust_accuracy
from dpsign_fl.release import ReleaseSettings, client_release
from dpsign_fl.release.adversarial import (
    AdversarialSettings, adversarial_examples, attack_from, evaluation_attack, random_start,
)
from dpsign_fl.release.clipped_sum import clipped_gradient_sum
from dpsign_fl.settings import ConfigError, RunSettings

MEAN, STD = (0.1307,), (0.3081,)
TIGHT = dict(rtol=1e-9, atol=1e-12)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


class BatchCentre(nn.Module):
    """Subtracts the batch mean: a cross-example layer (as BatchNorm in training mode)."""

    def forward(self, x):
        return x - x.mean(dim=0, keepdim=True)


def tiny_cnn(*, mix_batch: bool = False) -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Conv2d(1, 3, 3), nn.Tanh()] + ([BatchCentre()] if mix_batch else []) + [nn.Flatten(), nn.Linear(3 * 6 * 6, 4)]
    return nn.Sequential(*layers).double()


def images(count: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.rand(count, 1, 8, 8, generator=generator, dtype=torch.float64)
    return (pixels - MEAN[0]) / STD[0], torch.randint(0, 4, (count,), generator=generator)


def pgd(epsilon: float = 0.1, steps: int = 5) -> AdversarialSettings:
    return AdversarialSettings("pgd", epsilon, steps, 0.0, MEAN, STD)


def loop_copies(model, inputs, targets, start, settings) -> torch.Tensor:
    return torch.cat([
        attack_from(model, F.cross_entropy, inputs[i : i + 1], targets[i : i + 1], start[i : i + 1], settings)
        for i in range(inputs.shape[0])
    ])


def loop_clipped_sum(model, inputs, targets, clip_norm) -> torch.Tensor:
    params = [p for p in model.parameters() if p.requires_grad]
    total = torch.zeros(sum(p.numel() for p in params), dtype=torch.float64)
    for i in range(inputs.shape[0]):
        grads = torch.autograd.grad(F.cross_entropy(model(inputs[i : i + 1]), targets[i : i + 1]), params)
        flat = torch.cat([g.reshape(-1) for g in grads])
        total += flat * min(1.0, clip_norm / float(flat.norm()))
    return total


@pytest.mark.parametrize("attack", ["pgd", "fgsm-rs"])
def test_adversarial_copies_of_a_batch_equal_one_example_at_a_time(attack):
    model, (inputs, targets) = tiny_cnn(), images(6)
    settings = AdversarialSettings(attack, 0.1, 4, 0.0, MEAN, STD)
    start = random_start(inputs, settings, generator=torch.Generator().manual_seed(3))
    batch = attack_from(model, F.cross_entropy, inputs, targets, start, settings)
    torch.testing.assert_close(batch, loop_copies(model, inputs, targets, start, settings), **TIGHT)
    assert not torch.equal(batch, start)  # the attack moved


@pytest.mark.parametrize("method", ["vmap", "layers"])
def test_clipped_sum_at_adversarial_copies_equals_one_example_at_a_time(method):
    model, (inputs, targets) = tiny_cnn(), images(6)
    settings = pgd()
    start = random_start(inputs, settings, generator=torch.Generator().manual_seed(3))
    batch = attack_from(model, F.cross_entropy, inputs, targets, start, settings)
    expected = loop_clipped_sum(model, loop_copies(model, inputs, targets, start, settings), targets, 0.5)
    total = clipped_gradient_sum(model, F.cross_entropy, batch, targets, clip_norm=0.5, method=method)
    torch.testing.assert_close(total, expected, **TIGHT)


def test_negative_control_copies_differ_from_the_loop_when_the_model_mixes_the_batch():
    model, (inputs, targets) = tiny_cnn(mix_batch=True), images(6)
    settings = pgd()
    start = random_start(inputs, settings, generator=torch.Generator().manual_seed(3))
    batch = attack_from(model, F.cross_entropy, inputs, targets, start, settings)
    loop = loop_copies(model, inputs, targets, start, settings)
    assert (batch - loop).abs().max() > 1e-3


def test_copies_stay_within_epsilon_in_pixels_and_within_the_pixel_range():
    model, (inputs, targets) = tiny_cnn(), images(32)
    settings = AdversarialSettings("pgd", 0.3, 7, 0.2, MEAN, STD)  # a large step: projection must hold it
    copies = adversarial_examples(model, F.cross_entropy, inputs, targets, settings, generator=torch.Generator().manual_seed(0))
    pixels, clean = copies * STD[0] + MEAN[0], inputs * STD[0] + MEAN[0]
    assert float((pixels - clean).abs().max()) <= 0.3 + 1e-9
    assert float(pixels.min()) >= -1e-9 and float(pixels.max()) <= 1 + 1e-9
    assert float((pixels - clean).abs().max()) > 0.29  # it used the ball


def test_attack_leaves_parameters_and_their_grads_untouched():
    model, (inputs, targets) = tiny_cnn(), images(4)
    before = [p.detach().clone() for p in model.parameters()]
    adversarial_examples(model, F.cross_entropy, inputs, targets, pgd(), generator=torch.Generator().manual_seed(0))
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_release_with_adversarial_training_draws_only_from_the_release_generator():
    model, (inputs, targets) = tiny_cnn(), images(40)
    settings = ReleaseSettings(sample_rate=0.5, clip_norm=1.0, noise_multiplier=0.0, adversarial=pgd())
    first, again = (
        client_release(model, inputs, targets, settings, generator=torch.Generator().manual_seed(5)) for _ in range(2)
    )
    clean = client_release(
        model, inputs, targets, ReleaseSettings(0.5, 1.0, 0.0), generator=torch.Generator().manual_seed(5)
    )
    assert torch.equal(first, again)
    assert not torch.equal(first, clean)  # the gradient was taken at the copies


def test_robust_accuracy_is_at_most_clean_accuracy_and_equals_it_at_a_tiny_radius():
    model, (inputs, targets) = tiny_cnn(), images(64)
    _, clean = evaluate(model, inputs, targets)
    attacked = robust_accuracy(model, inputs, targets, evaluation_attack(0.3, mean=MEAN, std=STD),
                               generator=torch.Generator().manual_seed(0), batch_size=16)
    tiny = robust_accuracy(model, inputs, targets, evaluation_attack(1e-9, mean=MEAN, std=STD),
                           generator=torch.Generator().manual_seed(0))
    assert attacked < clean and tiny == clean


def test_evaluation_attack_is_pgd_20_with_step_2_5_eps_over_20():
    attack = evaluation_attack(0.1, mean=MEAN, std=STD)
    assert (attack.attack, attack.num_steps) == ("pgd", 20)
    assert attack.pixel_step == pytest.approx(2.5 * 0.1 / 20)
    assert AdversarialSettings("fgsm-rs", 0.1, 10, 0.0, MEAN, STD).num_steps == 1
    assert AdversarialSettings("fgsm-rs", 0.1, 10, 0.0, MEAN, STD).pixel_step == pytest.approx(0.125)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(attack="none"), "attack must be one of"),
        (dict(epsilon=0.0), "epsilon must be in"),
        (dict(steps=0), "steps must be an integer"),
        (dict(std=(0.0,)), "std must be finite"),
    ],
)
def test_bad_adversarial_settings_are_refused(kwargs, message):
    values = dict(attack="pgd", epsilon=0.1, steps=3, step_size=0.0, mean=MEAN, std=STD) | kwargs
    with pytest.raises(ValueError, match=message):
        AdversarialSettings(**values)


def test_run_settings_build_the_attack_from_the_dataset_statistics():
    run = RunSettings(dataset="fashion-mnist", model="tanh-cnn", adversarial_training="fgsm-rs", adv_epsilon=0.1)
    assert (run.adversarial.attack, run.adversarial.mean, run.adversarial.std) == ("fgsm-rs", (0.2860,), (0.3530,))
    assert run.robust_evaluation.num_steps == 20
    assert RunSettings(dataset="mnist").adversarial is None and RunSettings(dataset="mnist").robust_evaluation is None


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(dataset="mnist", adversarial_training="pgd"), "adv-epsilon must be > 0"),
        (dict(dataset="mnist", model="scatternet-linear", adv_epsilon=0.1), "unless the model reads image pixels"),
        (dict(dataset="mushroom", adv_epsilon=0.1), "unless the model reads image pixels"),
    ],
)
def test_attack_settings_that_cannot_apply_are_refused(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        RunSettings(**kwargs)


def test_robust_accuracy_attacks_only_the_first_max_examples():
    model, (inputs, targets) = tiny_cnn(), images(20)
    attack = evaluation_attack(0.3, mean=MEAN, std=STD)
    first = robust_accuracy(model, inputs[:5], targets[:5], attack, generator=torch.Generator().manual_seed(0))
    assert robust_accuracy(model, inputs, targets, attack, generator=torch.Generator().manual_seed(0), max_examples=5) == first


def test_the_training_radius_grows_linearly_over_the_warmup_rounds_and_the_step_follows_it():
    run = RunSettings(dataset="mnist", model="tanh-cnn", adversarial_training="fgsm-rs", adv_epsilon=0.1, adv_warmup_rounds=4)

    radii = [run.adversarial_at(t).epsilon for t in (1, 2, 3, 4, 5, 100)]

    assert radii == pytest.approx([0.025, 0.05, 0.075, 0.1, 0.1, 0.1])
    assert run.adversarial_at(2).pixel_step == pytest.approx(1.25 * 0.05)
    assert run.adversarial_at(4) == run.adversarial  # the full attack from round W on
    no_warmup = RunSettings(dataset="mnist", model="tanh-cnn", adversarial_training="fgsm-rs", adv_epsilon=0.1)
    assert no_warmup.adversarial_at(1) == no_warmup.adversarial


def test_a_warmup_without_a_training_attack_is_refused():
    with pytest.raises(ConfigError, match="adv-warmup-rounds must be 0 without adversarial-training, got 3"):
        RunSettings(dataset="mnist", model="tanh-cnn", adv_epsilon=0.1, adv_warmup_rounds=3)


def test_the_round_plan_changes_the_attack_radius_only():
    from dpsign_fl.rounds import plan_for_round, plan_release

    run = RunSettings(dataset="mnist", model="tanh-cnn", adversarial_training="fgsm-rs", adv_epsilon=0.1, adv_warmup_rounds=4)
    plan = plan_release(run)

    first = plan_for_round(plan, run, 1)

    assert first.release.adversarial.epsilon == pytest.approx(0.025)
    assert (first.release.noise_multiplier, first.num_releases, first.budget) == (plan.release.noise_multiplier, plan.num_releases, plan.budget)
    assert plan_for_round(plan, run, 4) is plan


def radii_used(monkeypatch):
    """Patch the release's adversarial copies to record the radius of every call."""
    import dpsign_fl.release as release

    radii, original = [], release.adversarial_examples

    def recording(model, loss_fn, inputs, targets, settings, **kwargs):
        radii.append(round(settings.epsilon, 6))
        return original(model, loss_fn, inputs, targets, settings, **kwargs)

    monkeypatch.setattr(release, "adversarial_examples", recording)
    return radii


def test_the_loops_clients_train_at_each_rounds_warmup_radius(monkeypatch):
    from dpsign_fl.experiments.loop import Experiment, run_experiment

    radii = radii_used(monkeypatch)
    experiment = Experiment.create(
        dataset="digits", model="mlp", num_clients=2, num_rounds=3, adversarial_training="fgsm-rs", adv_epsilon=0.1,
        adv_warmup_rounds=4, sample_rate=0.5, reproducible_noise=True,
    )
    run_experiment(experiment, progress=False)

    assert radii == [0.025, 0.025, 0.05, 0.05, 0.075, 0.075]
