"""Tests of dpsign_fl.models: sizes, per-example gradients, seeded initialisation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dpsign_fl.data import DATASETS
from dpsign_fl.mechanism import per_sample_gradients
from dpsign_fl.models import MODELS, build_model, default_model, num_parameters

INPUT_SHAPES = {
    "logreg": (117,), "mlp": (1, 8, 8), "tanh-cnn": (1, 28, 28), "cifar-cnn": (3, 32, 32),
    "scatternet-linear": (81, 7, 7), "scatternet-cnn": (243, 8, 8),
}
DATASET_INPUT_SHAPES = {
    "digits": (1, 8, 8),
    "mnist": (1, 28, 28),
    "fashion-mnist": (1, 28, 28),
    "cifar10": (3, 32, 32),
    "mushroom": (117,),
}


def _batch(input_shape, batch_size=3, num_classes=10, seed=0):
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(batch_size, *input_shape, generator=generator)
    targets = torch.randint(0, num_classes, (batch_size,), generator=generator)
    return inputs, targets


def test_tanh_cnn_has_the_papers_26010_parameters():
    model = build_model("tanh-cnn", input_shape=(1, 28, 28), num_classes=10)

    # Conv(1,16,8): 1,040 + Conv(16,32,4): 8,224 + Linear(512,32): 16,416 + Linear(32,10): 330.
    assert 25_000 <= num_parameters(model) <= 27_000
    assert num_parameters(model) == 26_010


def test_cifar_cnn_stays_under_600k_parameters():
    model = build_model("cifar-cnn", input_shape=(3, 32, 32), num_classes=10)

    assert num_parameters(model) == 551_466
    assert num_parameters(model) < 600_000


def test_small_models_have_the_documented_sizes():
    assert num_parameters(build_model("logreg", input_shape=(117,), num_classes=2)) == 117 * 2 + 2
    assert num_parameters(build_model("mlp", input_shape=(1, 8, 8), num_classes=10)) == 64 * 64 + 64 + 64 * 10 + 10


@pytest.mark.parametrize("name", MODELS)
def test_model_maps_a_batch_to_one_logit_per_class(name):
    model = build_model(name, input_shape=INPUT_SHAPES[name], num_classes=7, seed=0)
    inputs, _ = _batch(INPUT_SHAPES[name], batch_size=5)

    assert model(inputs).shape == (5, 7)


@pytest.mark.parametrize("name", MODELS)
def test_per_sample_gradients_run_and_have_one_row_of_d_entries_per_example(name):
    model = build_model(name, input_shape=INPUT_SHAPES[name], num_classes=10, seed=0)
    inputs, targets = _batch(INPUT_SHAPES[name], batch_size=4)

    grads = per_sample_gradients(model, F.cross_entropy, inputs, targets)

    assert grads.shape == (4, num_parameters(model))
    assert torch.isfinite(grads).all()


@pytest.mark.parametrize("name", ["tanh-cnn", "cifar-cnn", "scatternet-cnn"])
def test_per_sample_gradients_equal_one_example_at_a_time_backprop(name):
    model = build_model(name, input_shape=INPUT_SHAPES[name], num_classes=10, seed=1)
    inputs, targets = _batch(INPUT_SHAPES[name], batch_size=2)

    grads = per_sample_gradients(model, F.cross_entropy, inputs, targets)

    for i in range(inputs.shape[0]):
        model.zero_grad()
        F.cross_entropy(model(inputs[i : i + 1]), targets[i : i + 1]).backward()
        reference = torch.cat([p.grad.flatten() for p in model.parameters()])
        torch.testing.assert_close(grads[i], reference, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", MODELS)
def test_models_hold_no_batchnorm_and_no_in_place_activations(name):
    model = build_model(name, input_shape=INPUT_SHAPES[name], num_classes=10)

    for module in model.modules():
        assert not isinstance(module, nn.modules.batchnorm._BatchNorm)
        assert not getattr(module, "inplace", False)


@pytest.mark.parametrize("name", MODELS)
def test_same_seed_gives_the_same_weights_and_another_seed_others(name):
    shape = INPUT_SHAPES[name]

    first = build_model(name, input_shape=shape, num_classes=10, seed=5)
    again = build_model(name, input_shape=shape, num_classes=10, seed=5)
    other = build_model(name, input_shape=shape, num_classes=10, seed=6)

    assert all(torch.equal(a, b) for a, b in zip(first.parameters(), again.parameters()))
    assert not torch.equal(first[-1].weight, other[-1].weight)


@pytest.mark.parametrize("name", MODELS)
def test_seeded_build_neither_reads_nor_changes_the_global_random_state(name):
    torch.manual_seed(123)
    state = torch.get_rng_state()

    build_model(name, input_shape=INPUT_SHAPES[name], num_classes=10, seed=5)

    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("name", MODELS)
def test_seeded_weights_equal_pytorch_default_init_after_manual_seed(name):
    # The reference: PyTorch's own reset_parameters, drawing from the global generator.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(9)
        reference = build_model(name, input_shape=INPUT_SHAPES[name], num_classes=10)

    model = build_model(name, input_shape=INPUT_SHAPES[name], num_classes=10, seed=9)

    for (key, value), expected in zip(model.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(value, expected), key


@pytest.mark.parametrize(
    ("name", "input_shape"), [("tanh-cnn", (1, 8, 8)), ("tanh-cnn", (784,)), ("cifar-cnn", (3, 30, 30))]
)
def test_cnn_rejects_an_input_shape_it_cannot_take(name, input_shape):
    with pytest.raises(ValueError, match="input_shape must be"):
        build_model(name, input_shape=input_shape, num_classes=10)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "resnet"}, "name must be one of"),
        ({"num_classes": 1}, "num_classes must be an integer >= 2"),
        ({"input_shape": (0, 4)}, "input_shape must be a non-empty tuple"),
    ],
)
def test_bad_model_arguments_raise_value_errors(kwargs, message):
    arguments = {"name": "logreg", "input_shape": (4,), "num_classes": 3, **kwargs}
    with pytest.raises(ValueError, match=message):
        build_model(arguments.pop("name"), **arguments)


def test_default_models_follow_the_dataset():
    assert {name: default_model(name) for name in DATASETS} == {
        "digits": "mlp",
        "mnist": "tanh-cnn",
        "fashion-mnist": "tanh-cnn",
        "cifar10": "cifar-cnn",
        "mushroom": "logreg",
        "shakespeare": "char-transformer",
    }


@pytest.mark.parametrize("dataset_name", DATASETS)
def test_default_model_builds_for_its_datasets_input_shape(dataset_name):
    model = build_model(default_model(dataset_name), input_shape=DATASET_INPUT_SHAPES[dataset_name], num_classes=10)
    inputs, _ = _batch(DATASET_INPUT_SHAPES[dataset_name], batch_size=2)

    assert model(inputs).shape == (2, 10)


def test_default_model_of_an_unknown_dataset_is_rejected():
    with pytest.raises(ValueError, match="dataset_name must be one of"):
        default_model("imagenet")
