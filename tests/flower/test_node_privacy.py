"""What a server operator cannot do to a deployed node's privacy (docs/privacy.md, threat model).

Each test drives the shipped ClientApp handler with real Flower messages, as a
deployed SuperNode (``simulation=False``) unless it says otherwise, and each
would fail on the code before the privacy hardening.
"""

from functools import partial

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, RecordDict

from dpsign_fl import rounds
from dpsign_fl.flower import client as client_module
from dpsign_fl.flower.client import BUDGET_EXHAUSTED_CODE, RELEASE_FAILED_CODE, clear_data_cache
from dpsign_fl.flower.node import DEFAULT_NODE_MAX_EPSILON
from dpsign_fl.flower.records import model_to_arrays
from dpsign_fl.models import build_model
from dpsign_fl.privacy.ledger_store import read_ledger_file
from dpsign_fl.release import ReleaseSettings, client_release, seeded_generator

from ..e2e.harness import digits_as_mnist, write_idx_folder
from ..test_settings import pyproject_defaults
from .messages import instruction, reply_signs

deployed = partial(client_module.handle_train, simulation=False)
simulated = partial(client_module.handle_train, simulation=True)


@pytest.fixture(autouse=True)
def fresh_data_cache():
    clear_data_cache()
    yield
    clear_data_cache()


def run_config(**overrides):
    config = dict(pyproject_defaults(), **{"num-server-rounds": 3, "target-epsilon": 2.0, "model": "logreg"})
    config.update(overrides)
    return config


def context(node_config, **overrides):
    return Context(run_id=1, node_id=5, node_config=node_config, state=RecordDict(), run_config=run_config(**overrides))


def model(dataset="digits"):
    shape = (1, 8, 8) if dataset == "digits" else (1, 28, 28)
    return build_model("logreg", input_shape=shape, num_classes=10, seed=0)


def train_message(server_round, dataset="digits"):
    content = RecordDict({"arrays": model_to_arrays(model(dataset)), "config": ConfigRecord({"server-round": server_round})})
    return instruction(content, dst_node_id=5)


# ------------------------------------------------------------- nothing data-dependent on the wire


def test_replies_for_d_and_d_minus_one_example_hold_the_same_keys_and_non_sign_values(tmp_path):
    images, labels = digits_as_mnist(np.arange(0, 60))
    test_images, test_labels = digits_as_mnist(np.arange(60, 80))
    full = write_idx_folder(tmp_path / "full", images, labels, test_images, test_labels)
    minus_one = write_idx_folder(tmp_path / "minus-one", images[1:], labels[1:], test_images, test_labels)

    replies = []
    for name, folder in (("full", full), ("minus-one", minus_one)):
        node = {"data-dir": str(folder), "ledger-path": str(tmp_path / f"{name}.json")}
        replies.append(deployed(train_message(1, "mnist"), context(node, dataset="mnist")))

    first, second = replies
    assert not first.has_error() and not second.has_error()
    assert set(first.content.keys()) == set(second.content.keys()) == {"arrays", "metrics"}
    assert list(first.content["arrays"].keys()) == list(second.content["arrays"].keys()) == ["signs"]
    assert first.content["arrays"]["signs"].shape == second.content["arrays"]["signs"].shape
    assert dict(first.content["metrics"]) == dict(second.content["metrics"])  # only epsilon, and equal


# ------------------------------------------------------------- the device owner's budget


def idx_folder(path):
    images, labels = digits_as_mnist(np.arange(0, 60))
    test_images, test_labels = digits_as_mnist(np.arange(60, 80))
    return write_idx_folder(path, images, labels, test_images, test_labels)


@pytest.mark.parametrize(
    ("layout", "node_keys", "releases"),
    [
        ("straight", {}, []),  # mnist and fashion-mnist read these files: refused, or each name would get a budget
        ("straight", {"dataset": "mnist"}, [2]),  # the owner names it: both runs train on mnist, one ledger
        ("straight", {"ledger-path": "one.json"}, [2]),  # one ledger whatever the name
        ("subfolder", {}, [1]),  # data-dir/mnist is read as mnist only (fashion-mnist finds no files)
    ],
)
def test_a_folder_two_dataset_names_read_needs_the_node_to_name_it(tmp_path, layout, node_keys, releases):
    data_dir = tmp_path / "data"
    idx_folder(data_dir if layout == "straight" else data_dir / "mnist")
    node = {"data-dir": str(data_dir), "state-dir": str(tmp_path / "state"), "max-epsilon": 1.0}
    node.update({key: str(tmp_path / value) if key == "ledger-path" else value for key, value in node_keys.items()})

    replies = [deployed(train_message(1, "mnist"), context(node, dataset=name)) for name in ("mnist", "fashion-mnist")]

    if not releases:
        assert all(reply.has_error() and reply.error.code == client_module.NODE_ERROR_CODE for reply in replies)
    files = [*(tmp_path / "state").glob("ledger-*.json"), *tmp_path.glob("one.json")]
    # Never two ledgers for one set of examples (the code before: [1, 1] in two files).
    assert sorted(read_ledger_file(path, accountant="pld").num_releases for path in files) == releases


def test_the_drop_ins_identity_names_no_dataset_and_keeps_its_default_ledger(tmp_path):
    """The drop-in keys its ledger by partition and data-dir: the same folder is not refused there."""
    folder = idx_folder(tmp_path / "data")
    node = client_module.parse_node_config({"data-dir": str(folder), "state-dir": str(tmp_path / "state")})
    identity = {"partition-id": None, "num-partitions": None, "data-dir": str(folder)}

    assert node.durable_ledger_path(False, identity).parent == tmp_path / "state"
    with pytest.raises(client_module.ConfigError, match="must set 'dataset'"):  # control: named as the app's dataset
        node.durable_ledger_path(False, {**identity, "dataset": "mnist"})


@pytest.mark.parametrize(
    "asked", [{"target-epsilon": 8.0}, {"target-delta": 0.5}, {"target-epsilon": 8.0, "target-delta": 0.5}],
    ids=["epsilon-8", "delta-0.5", "both"],
)
def test_a_run_config_cannot_spend_more_than_the_nodes_max_epsilon_at_its_own_delta(tmp_path, asked):
    ledger_path = tmp_path / "ledger.json"
    node = {"partition-id": 0, "num-partitions": 5, "ledger-path": str(ledger_path), "max-epsilon": 1.0, "delta": 1e-5}

    replies = []
    for run in range(2):  # two runs, one ledger
        run_context = context(node, **asked)
        replies += [deployed(train_message(t), run_context) for t in (1, 2, 3)]

    ledger = read_ledger_file(ledger_path, accountant="pld")
    assert ledger.num_releases >= 3
    assert ledger.epsilon(1e-5) <= 1.0
    # Every reply is the node's bits or its refusal: the runs go on.
    assert all(not r.has_error() or r.error.code == BUDGET_EXHAUSTED_CODE for r in replies)


def test_without_the_node_cap_a_run_config_asking_for_epsilon_8_spends_it_negative_control(tmp_path):
    ledger_path = tmp_path / "ledger.json"
    node = {"partition-id": 0, "num-partitions": 5, "ledger-path": str(ledger_path)}
    run_context = context(node, **{"target-epsilon": 8.0})
    for t in (1, 2, 3):
        deployed(train_message(t), run_context)
    assert read_ledger_file(ledger_path, accountant="pld").epsilon(1e-5) > 7.0


def test_a_deployed_node_that_sets_no_cap_spends_at_most_the_default_budget_whatever_the_runs_ask(tmp_path):
    ledger_path = tmp_path / "ledger.json"
    node = {"partition-id": 0, "num-partitions": 5, "ledger-path": str(ledger_path)}
    asked = {"target-epsilon": 40.0, "target-delta": 0.5}

    replies = []
    for run in range(2):  # two runs, one ledger
        run_context = context(node, **asked)
        replies += [deployed(train_message(t), run_context) for t in (1, 2, 3)]

    ledger = read_ledger_file(ledger_path, accountant="pld")
    default = DEFAULT_NODE_MAX_EPSILON
    assert default == 8.0
    assert default - 1 < ledger.epsilon(1e-5) <= default  # spent up to the default cap, at its delta, not past it
    assert all(not r.has_error() or r.error.code == BUDGET_EXHAUSTED_CODE for r in replies)
    # Control: a simulated node (the run's owner owns it too) spends what the run asks.
    run_context = context({"partition-id": 0, "num-partitions": 5}, **asked)
    spent = [simulated(train_message(t), run_context).content["metrics"]["epsilon"] for t in (1, 2, 3)]
    assert spent[-1] > 30.0


def test_a_node_whose_cap_is_spent_refuses_with_the_budget_code_and_public_numbers_only(tmp_path):
    ledger_path = tmp_path / "ledger.json"
    node = {"partition-id": 0, "num-partitions": 5, "ledger-path": str(ledger_path), "max-epsilon": 0.5}
    run_context = context(node)
    for t in (1, 2, 3):
        deployed(train_message(t), run_context)

    reply = deployed(train_message(1), context(node))  # a later run

    assert reply.has_error() and reply.error.code == BUDGET_EXHAUSTED_CODE
    assert "privacy budget exhausted" in reply.error.reason


# ------------------------------------------------------------- randomness the server cannot rebuild


def predicted_signs(seed, server_round):
    """What a server that knows the run config's noise-seed would compute for partition 0."""
    data = client_module.client_data(
        client_module.from_mapping(client_module.RunSettings, run_config()),
        client_module.parse_node_config({"partition-id": 0, "num-partitions": 5}),
    )
    plan_context = context({"partition-id": 0, "num-partitions": 5}, **{"reproducible-noise": True, "noise-seed": seed})
    simulated(train_message(server_round), plan_context)  # the same plan as the node's
    sigma = float(plan_context.state["dpsign-noise"]["noise-multiplier"])
    generator = seeded_generator(seed, client=0, stream=server_round)
    release = ReleaseSettings(sample_rate=0.3, clip_norm=1.0, noise_multiplier=sigma)
    signs = client_release(model(), data[0], data[1], release, generator=generator)
    return rounds.pack_signs(signs)


def test_a_deployed_node_ignores_the_run_configs_noise_seed_and_the_server_cannot_rebuild_its_bits():
    node = {"partition-id": 0, "num-partitions": 5, "per-run-budget": True}
    overrides = {"reproducible-noise": True, "noise-seed": 1234}

    reply = deployed(train_message(1), context(node, **overrides))

    bits = reply_signs(reply)
    assert not np.array_equal(bits, predicted_signs(1234, 1))


def test_in_simulation_the_same_seed_is_reproducible_as_documented_negative_control():
    node = {"partition-id": 0, "num-partitions": 5}
    reply = simulated(train_message(1), context(node, **{"reproducible-noise": True, "noise-seed": 1234}))
    np.testing.assert_array_equal(reply_signs(reply), predicted_signs(1234, 1))


def test_a_node_seed_gives_a_replayed_round_a_new_stream_and_stays_reproducible(tmp_path):
    """A node's own noise-seed picks the stream by its ledger's count, so a replayed round number gets new noise."""
    node = {"partition-id": 0, "num-partitions": 5, "ledger-path": str(tmp_path / "ledger.json"), "noise-seed": 1234}
    node_context = context(node)  # one run: the same plan for both
    first = reply_signs(deployed(train_message(7), node_context))
    replayed = reply_signs(deployed(train_message(7), node_context))  # the same round, the same model

    assert not np.array_equal(first, replayed)  # keyed by the round, these were the same sample and noise
    # Control: the seed still decides the bits: a fresh ledger with the same seed repeats the first release.
    again = dict(node, **{"ledger-path": str(tmp_path / "fresh.json")})
    np.testing.assert_array_equal(reply_signs(deployed(train_message(7), context(again))), first)


# ------------------------------------------------------------- errors that carry no data


def test_a_failure_after_sampling_is_recorded_and_answered_with_a_fixed_code_and_no_data(tmp_path, monkeypatch):
    def failing_release(model, inputs, targets, *args, **kwargs):
        raise ValueError("example 17 has label 99")  # a message that describes the data

    monkeypatch.setattr(rounds, "client_release", failing_release)
    ledger_path = tmp_path / "ledger.json"
    node = {"partition-id": 0, "num-partitions": 5, "ledger-path": str(ledger_path)}

    reply = deployed(train_message(1), context(node))

    assert reply.has_error() and reply.error.code == RELEASE_FAILED_CODE
    assert "17" not in reply.error.reason and "99" not in reply.error.reason
    assert read_ledger_file(ledger_path, accountant="pld").num_releases == 1
