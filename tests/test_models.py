"""Tests of dpsign_fl.models: sizes, per-example gradients, seeded initialisation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dpsign_fl.data import DATASETS
from dpsign_fl.release.mechanism import per_sample_gradients
from dpsign_fl.models import MODELS, CharTransformer, build_model, default_model, num_parameters

SEQUENCE_MODELS = ("char-transformer",)
INPUT_SHAPES = {
    "logreg": (117,), "mlp": (1, 8, 8), "tanh-cnn": (1, 28, 28), "tanh-cnn-public-norm": (1, 28, 28), "cifar-cnn": (3, 32, 32),
    "scatternet-linear": (81, 7, 7), "scatternet-cnn": (243, 8, 8), "char-transformer": (12,),
}
DATASET_INPUT_SHAPES = {
    "digits": (1, 8, 8),
    "mnist": (1, 28, 28),
    "fashion-mnist": (1, 28, 28),
    "cifar10": (3, 32, 32),
    "mushroom": (117,),
    "shakespeare": (80,),
}


def _batch(input_shape, batch_size=3, num_classes=10, seed=0, sequence=False):
    """Random inputs and targets; for a sequence model, ids ``[B, T]`` and a target per position."""
    generator = torch.Generator().manual_seed(seed)
    if sequence:
        inputs = torch.randint(0, num_classes, (batch_size, *input_shape), generator=generator)
        return inputs, torch.randint(0, num_classes, (batch_size, *input_shape), generator=generator)
    inputs = torch.randn(batch_size, *input_shape, generator=generator)
    targets = torch.randint(0, num_classes, (batch_size,), generator=generator)
    return inputs, targets


def _model_batch(name, batch_size=3, num_classes=10, seed=0):
    return _batch(INPUT_SHAPES[name], batch_size, num_classes, seed, sequence=name in SEQUENCE_MODELS)


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
def test_model_maps_a_batch_to_one_logit_per_class_on_dim_1(name):
    model = build_model(name, input_shape=INPUT_SHAPES[name], num_classes=7, seed=0)
    inputs, targets = _model_batch(name, batch_size=5, num_classes=7)

    # Classes on dim 1 for every model: [B, classes], or [B, classes, T] with a target per position.
    assert model(inputs).shape == (5, 7, *targets.shape[1:])


@pytest.mark.parametrize("name", MODELS)
def test_per_sample_gradients_run_and_have_one_row_of_d_entries_per_example(name):
    model = build_model(name, input_shape=INPUT_SHAPES[name], num_classes=10, seed=0)
    inputs, targets = _model_batch(name, batch_size=4)

    grads = per_sample_gradients(model, F.cross_entropy, inputs, targets)

    assert grads.shape == (4, num_parameters(model))
    assert torch.isfinite(grads).all()


@pytest.mark.parametrize("name", ["tanh-cnn", "cifar-cnn", "scatternet-cnn", "char-transformer"])
def test_per_sample_gradients_equal_one_example_at_a_time_backprop(name):
    model = build_model(name, input_shape=INPUT_SHAPES[name], num_classes=10, seed=1)
    inputs, targets = _model_batch(name, batch_size=2)

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
    assert not torch.equal(list(first.parameters())[-2], list(other.parameters())[-2])  # the last weight


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
    name = default_model(dataset_name)
    model = build_model(name, input_shape=DATASET_INPUT_SHAPES[dataset_name], num_classes=10)
    inputs, targets = _batch(DATASET_INPUT_SHAPES[dataset_name], batch_size=2, sequence=name in SEQUENCE_MODELS)

    assert model(inputs).shape == (2, 10, *targets.shape[1:])


def test_default_model_of_an_unknown_dataset_is_rejected():
    with pytest.raises(ValueError, match="dataset_name must be one of"):
        default_model("imagenet")


# ---------------------------------------------------------------- char-transformer


def _char_transformer_size(vocab, steps, width, depth, previous):
    """Parameters by hand: embeddings; per block two LayerNorms, qkv, out, up, down; final LayerNorm; head."""
    embeddings = vocab * width + previous * (vocab + 1) * width + steps * width
    block = 2 * 2 * width + (width * 3 * width + 3 * width) + (width * width + width)
    block += (width * 4 * width + 4 * width) + (4 * width * width + width)
    return embeddings + depth * block + 2 * width + (width * vocab + vocab)


def test_char_transformer_default_has_136545_parameters_for_97_symbols_and_80_positions():
    model = build_model("char-transformer", input_shape=(80,), num_classes=97)

    assert num_parameters(model) == _char_transformer_size(97, 80, 64, 2, 3) == 136_545


@pytest.mark.parametrize(("width", "depth", "previous"), [(16, 1, 0), (32, 3, 1), (128, 2, 5)])
def test_char_transformer_size_follows_width_depth_and_previous_characters(width, depth, previous):
    model = build_model(
        "char-transformer", input_shape=(10,), num_classes=11, width=width, depth=depth, previous_characters=previous
    )

    assert num_parameters(model) == _char_transformer_size(11, 10, width, depth, previous)
    assert len(model.blocks) == depth and (model.previous is None) == (previous == 0)
    assert model.blocks[0].heads == width // 16


def test_char_transformer_logits_at_a_position_depend_only_on_characters_up_to_it():
    model = build_model("char-transformer", input_shape=(12,), num_classes=10, seed=2).eval()
    inputs, _ = _model_batch("char-transformer", batch_size=2)
    changed = inputs.clone()
    changed[:, 7] = (changed[:, 7] + 1) % 10

    before, after = model(inputs), model(changed)

    torch.testing.assert_close(after[:, :, :7], before[:, :, :7], rtol=0, atol=1e-6)
    assert (after[:, :, 7:] - before[:, :, 7:]).abs().amax(dim=1).min() > 1e-4  # t >= 7 sees the change


def test_previous_character_ids_read_t_minus_k_or_the_row_before_the_chunk():
    model = build_model("char-transformer", input_shape=(4,), num_classes=5, previous_characters=2)
    ids = torch.tensor([[3, 1, 4, 0]])

    rows = model.previous_ids(ids)

    before, offset = 5, 6  # row 5 = "before the chunk"; offset k's rows start at (k - 1) * 6
    expected = [[before, before + offset], [3, before + offset], [1, 3 + offset], [4, 1 + offset]]
    assert rows.tolist() == [expected]


def test_previous_characters_change_the_prediction_of_the_next_character():
    model = build_model("char-transformer", input_shape=(6,), num_classes=10, seed=3).eval()
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    shift = torch.linspace(-1, 1, 64)  # not constant across channels, which LayerNorm would remove
    reference = model(ids)[0]

    with torch.no_grad():
        model.previous.weight[2 * 11 + 3].add_(shift)  # offset 3 of character 3: read at position 5 only
    logits = model(ids)[0]

    torch.testing.assert_close(logits[:, :5], reference[:, :5], rtol=0, atol=0)
    assert (logits[:, 5] - reference[:, 5]).abs().max() > 1e-3


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"width": 40}, "width must be a positive multiple of 16, got 40"),
        ({"width": 0}, "width must be a positive multiple of 16"),
        ({"depth": 0}, "depth must be an integer >= 1, got 0"),
        ({"previous_characters": -1}, "previous_characters must be an integer >= 0, got -1"),
        ({"input_shape": (1, 12)}, "input_shape must be \\(sequence length,\\) for char-transformer"),
    ],
)
def test_char_transformer_rejects_sizes_it_cannot_build(kwargs, message):
    arguments = {"input_shape": (12,), "num_classes": 10, **kwargs}
    with pytest.raises(ValueError, match=message):
        build_model("char-transformer", **arguments)


def test_run_settings_size_options_reach_the_model():
    from dpsign_fl.settings import RunSettings

    settings = RunSettings(model="char-transformer", model_width=32, model_depth=1, model_previous_characters=0)

    model = build_model(settings.model_name, input_shape=(10,), num_classes=11, **settings.model_options)

    assert isinstance(model, CharTransformer)
    assert num_parameters(model) == _char_transformer_size(11, 10, 32, 1, 0)
