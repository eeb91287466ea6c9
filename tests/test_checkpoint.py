"""Server checkpoints: exact round trip, atomic replacement, clear errors for bad files."""

import os
import random

import numpy as np
import pytest

from dpsign_fl import atomic_file
from dpsign_fl import checkpoint as checkpoint_module
from dpsign_fl.checkpoint import (
    Checkpoint,
    CheckpointError,
    load_checkpoint,
    python_rng_state,
    restore_python_rng_state,
    save_checkpoint,
)
from dpsign_fl.vote.server_update import VoteUpdater


def example(update_state=True, server_round=3):
    rng = np.random.default_rng(0)
    weights = rng.normal(size=50).astype(np.float32)
    return Checkpoint(
        server_round=server_round,
        weights=weights,
        updater_state={"update-state": rng.normal(size=50).astype(np.float32) if update_state else None},
        epsilon_seen={"123456789012345": 1.25, "7": 0.5},
        draws={"123456789012345": 3, "7": 2},
        rng_state=random.Random(4).getstate(),
        metrics=[{"round": r, "accuracy": None if r == 2 else 0.5, "epsilon": 0.1 * r} for r in range(1, server_round + 1)],
        run_config={"num-server-rounds": 10, "seed": "", "resume": False},
    )


@pytest.mark.parametrize("update_state", [True, False])
def test_a_saved_checkpoint_loads_back_equal(tmp_path, update_state):
    saved = example(update_state=update_state)
    save_checkpoint(tmp_path / "c.npz", saved)

    loaded = load_checkpoint(tmp_path / "c.npz")

    assert loaded.server_round == saved.server_round
    np.testing.assert_array_equal(loaded.weights, saved.weights)
    if update_state:
        np.testing.assert_array_equal(loaded.updater_state["update-state"], saved.updater_state["update-state"])
    else:
        assert loaded.updater_state["update-state"] is None
    assert loaded.epsilon_seen == saved.epsilon_seen
    assert loaded.draws == saved.draws
    assert loaded.rng_state == saved.rng_state
    assert loaded.metrics == saved.metrics
    assert loaded.run_config == saved.run_config


def test_the_restored_rng_state_repeats_the_same_client_sampling():
    restore_python_rng_state(random.Random(9).getstate())
    state = python_rng_state()
    first = random.sample(range(100), 10)
    path_state = checkpoint_module._rng_state_from_json(checkpoint_module._rng_state_to_json(state))

    restore_python_rng_state(path_state)

    assert random.sample(range(100), 10) == first


def test_the_restored_updater_steps_exactly_as_the_original(tmp_path):
    updater = VoteUpdater(learning_rate=0.1, momentum=0.9)
    weights = np.zeros(8, np.float32)
    votes = [np.array([1, -1, 0, 1, 1, -1, 1, 1], np.int8), np.array([1, 1, -1, 0, 1, -1, -1, 1], np.int8)]
    weights = updater.step(weights, votes[0], 1, 10)
    save_checkpoint(tmp_path / "c.npz", Checkpoint(server_round=1, weights=weights, updater_state=updater.state_dict()))
    restored = VoteUpdater(learning_rate=0.1, momentum=0.9)
    loaded = load_checkpoint(tmp_path / "c.npz")
    restored.load_state_dict(loaded.updater_state)

    np.testing.assert_array_equal(restored.step(loaded.weights, votes[1], 2, 10), updater.step(weights, votes[1], 2, 10))


def test_saving_replaces_the_old_checkpoint_and_leaves_no_temporary_file(tmp_path):
    save_checkpoint(tmp_path / "c.npz", example(server_round=2))
    save_checkpoint(tmp_path / "c.npz", example(server_round=4))

    assert load_checkpoint(tmp_path / "c.npz").server_round == 4
    assert os.listdir(tmp_path) == ["c.npz"]


def test_a_write_that_fails_midway_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    save_checkpoint(tmp_path / "c.npz", example(server_round=2))

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(atomic_file.os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path / "c.npz", example(server_round=4))

    assert load_checkpoint(tmp_path / "c.npz").server_round == 2
    assert os.listdir(tmp_path) == ["c.npz"]


@pytest.mark.parametrize(
    "damage",
    [
        lambda data: data[: len(data) // 2],  # truncated
        lambda data: b"not a zip file at all",
        lambda data: b"",
    ],
    ids=["truncated", "garbage", "empty"],
)
def test_a_damaged_file_raises_checkpoint_error(tmp_path, damage):
    save_checkpoint(tmp_path / "c.npz", example())
    path = tmp_path / "c.npz"
    path.write_bytes(damage(path.read_bytes()))

    with pytest.raises(CheckpointError, match="could not be read"):
        load_checkpoint(path)


def test_a_missing_file_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "absent.npz")


def test_non_finite_weights_are_refused_before_anything_is_written(tmp_path):
    bad = example()
    weights = bad.weights.copy()
    weights[3] = np.nan

    with pytest.raises(ValueError, match="finite"):
        save_checkpoint(tmp_path / "c.npz", Checkpoint(server_round=1, weights=weights))
    assert not (tmp_path / "c.npz").exists()


def test_a_file_of_another_format_version_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint_module, "FORMAT_VERSION", 99)
    save_checkpoint(tmp_path / "c.npz", example())
    monkeypatch.setattr(checkpoint_module, "FORMAT_VERSION", 1)

    with pytest.raises(CheckpointError, match="format 99"):
        load_checkpoint(tmp_path / "c.npz")


def test_a_checkpoint_of_format_1_with_its_velocity_array_still_loads(tmp_path):
    # Format 1 named the update rule's state "velocity"; a run checkpointed before the rename resumes.
    import io
    import json

    saved = example()
    save_checkpoint(tmp_path / "new.npz", saved)
    with np.load(tmp_path / "new.npz", allow_pickle=False) as stored:
        meta = json.loads(str(stored["meta"]))
        meta["format"] = 1
        buffer = io.BytesIO()
        np.savez(buffer, weights=stored["weights"], velocity=stored["update-state"], meta=np.array(json.dumps(meta)))
    (tmp_path / "old.npz").write_bytes(buffer.getvalue())

    loaded = load_checkpoint(tmp_path / "old.npz")

    np.testing.assert_array_equal(loaded.updater_state["update-state"], saved.updater_state["update-state"])
    np.testing.assert_array_equal(loaded.weights, saved.weights)


def _with_meta(tmp_path, change):
    """A copy of example()'s file whose JSON meta went through ``change(meta)``."""
    import io
    import json

    save_checkpoint(tmp_path / "new.npz", example())
    with np.load(tmp_path / "new.npz", allow_pickle=False) as stored:
        meta = json.loads(str(stored["meta"]))
        change(meta)
        buffer = io.BytesIO()
        np.savez(buffer, weights=stored["weights"], meta=np.array(json.dumps(meta)))
    (tmp_path / "changed.npz").write_bytes(buffer.getvalue())
    return tmp_path / "changed.npz"


def test_a_checkpoint_written_before_the_sampling_counts_loads_with_none_counted(tmp_path):
    loaded = load_checkpoint(_with_meta(tmp_path, lambda meta: meta.pop("draws")))

    assert loaded.draws == {}
    assert loaded.epsilon_seen == example().epsilon_seen


@pytest.mark.parametrize("bad", [-1, 1.5, "3", True, [1]])
def test_a_sampling_count_that_is_not_a_whole_number_is_refused(tmp_path, bad):
    def damage(meta):
        meta["draws"]["7"] = bad

    with pytest.raises(CheckpointError, match="sampling count must be an integer"):
        load_checkpoint(_with_meta(tmp_path, damage))
    with pytest.raises(ValueError, match="sampling count must be an integer"):
        save_checkpoint(tmp_path / "bad.npz", Checkpoint(server_round=1, weights=example().weights, draws={"7": bad}))


def test_draws_that_are_not_a_mapping_are_refused(tmp_path):
    def damage(meta):
        meta["draws"] = [1, 2]

    with pytest.raises(CheckpointError, match="incomplete"):
        load_checkpoint(_with_meta(tmp_path, damage))
