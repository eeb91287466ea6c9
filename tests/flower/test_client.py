"""The ClientApp's train handler, called directly with a Message and a Context."""

from functools import partial

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, RecordDict

from dpsign_fl.data import load_dataset
from dpsign_fl.flower import client as client_module
from dpsign_fl.flower.client import BUDGET_EXHAUSTED_CODE, INVALID_INSTRUCTION_CODE, NODE_ERROR_CODE, NODE_ERROR_REASON
from dpsign_fl.settings import parse_run_config
from dpsign_fl.flower.records import LEDGER_STATE_KEY, MOMENTUM_STATE_KEY, load_ledger, model_to_arrays
from dpsign_fl.models import build_model, default_model
from dpsign_fl.vote.packing import payload_bytes

from .messages import instruction, reply_signs
from ..test_settings import pyproject_defaults
from ..test_shakespeare import write_tiny_plays

ROUNDS = 2
handle_train = partial(client_module.handle_train, simulation=True)  # as in Flower's simulation engine


def run_config(**overrides):
    config = dict(pyproject_defaults())
    config.update({"num-server-rounds": ROUNDS, "target-epsilon": 2.0, "model-seed": 3, "reproducible-noise": True, "noise-seed": 3})
    config.update(overrides)
    return config


def make_context(**overrides):
    return Context(
        run_id=1,
        node_id=5,
        node_config={"partition-id": 1, "num-partitions": 5},
        state=RecordDict(),
        run_config=run_config(**overrides),
    )


def train_message(server_round):
    dataset = load_dataset("digits")
    model = build_model(default_model("digits"), input_shape=dataset.input_shape, num_classes=10, seed=0)
    content = RecordDict({"arrays": model_to_arrays(model), "config": ConfigRecord({"server-round": server_round})})
    return instruction(content, dst_node_id=5), sum(p.numel() for p in model.parameters())


def test_reply_holds_exactly_the_packed_bits_and_the_epsilon_spent():
    context = make_context()
    message, num_coordinates = train_message(1)

    reply = handle_train(message, context)

    assert not reply.has_error()
    assert set(reply.content.keys()) == {"arrays", "metrics"}
    signs = reply_signs(reply)
    assert signs.dtype == np.uint8 and signs.shape == (payload_bytes(num_coordinates),)
    metrics = reply.content["metrics"]
    assert set(metrics.keys()) == {"epsilon"}
    assert 0 < metrics["epsilon"] <= 2.0


def test_each_release_is_recorded_in_context_state():
    context = make_context()
    for server_round in (1, 2):
        message, _ = train_message(server_round)
        handle_train(message, context)
    assert LEDGER_STATE_KEY in context.state
    ledger = load_ledger(context.state, accountant="pld")
    assert ledger.num_releases == 2
    settings, _ = parse_run_config(context.run_config)
    assert ledger.epsilon(settings.target_delta) <= settings.target_epsilon


def test_client_momentum_stays_in_context_state_and_only_the_signs_and_epsilon_leave():
    plain, with_momentum = make_context(), make_context(**{"client-momentum": 0.5})
    replies = {"plain": [], "momentum": []}
    for server_round in (1, 2):
        message, num_coordinates = train_message(server_round)
        replies["plain"].append(handle_train(message, plain))
        replies["momentum"].append(handle_train(message, with_momentum))
        assert with_momentum.state[MOMENTUM_STATE_KEY]["m"].numpy().shape == (num_coordinates,)
    assert MOMENTUM_STATE_KEY not in plain.state
    for first, second in zip(replies["plain"], replies["momentum"]):
        assert set(second.content.keys()) == {"arrays", "metrics"} and set(second.content["metrics"].keys()) == {"epsilon"}
        assert second.content["metrics"]["epsilon"] == first.content["metrics"]["epsilon"]
    # The first release has nothing to add to; the second is sign(0.5 m + noisy sum), not the plain one.
    np.testing.assert_array_equal(reply_signs(replies["plain"][0]), reply_signs(replies["momentum"][0]))
    assert not np.array_equal(reply_signs(replies["plain"][1]), reply_signs(replies["momentum"][1]))


def test_client_refuses_once_the_budget_is_spent():
    context = make_context()
    replies = []
    for server_round in range(1, ROUNDS + 2):
        message, _ = train_message(server_round)
        replies.append(handle_train(message, context))

    assert [r.has_error() for r in replies] == [False] * ROUNDS + [True]
    assert replies[-1].error.code == BUDGET_EXHAUSTED_CODE
    assert "privacy budget exhausted" in replies[-1].error.reason
    assert load_ledger(context.state, accountant="pld").num_releases == ROUNDS


def test_same_seed_same_round_gives_the_same_bits_and_other_rounds_differ():
    first = reply_signs(handle_train(train_message(1)[0], make_context()))
    again = reply_signs(handle_train(train_message(1)[0], make_context()))
    other = reply_signs(handle_train(train_message(2)[0], make_context()))
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


def test_missing_partition_in_node_config_names_the_key_in_the_nodes_log_and_replies_the_fixed_node_error(caplog):
    context = make_context()
    context.node_config = {}
    reply = handle_train(train_message(1)[0], context)
    assert reply.has_error() and reply.error.code == NODE_ERROR_CODE and reply.error.reason == NODE_ERROR_REASON
    assert "node config must set 'partition-id'" in caplog.text


def test_a_client_sampled_in_more_rounds_than_it_planned_for_is_refused_and_never_exceeds_its_budget():
    # participation 0.1 of 12 rounds plans ceil(1.2 + 3 * 1.04) = 5 releases; a server that asks every round
    # (it may: the client cannot check its sampling) gets those, then refusals, never a release past the budget.
    context = make_context(**{"num-server-rounds": 12, "participation": 0.1})
    replies = [handle_train(train_message(server_round)[0], context) for server_round in range(1, 13)]

    released = [not reply.has_error() for reply in replies]
    ledger = load_ledger(context.state, accountant="pld")
    assert ledger.epsilon(1e-5) <= 2.0 and ledger.num_releases == sum(released)
    assert released[:5] == [True] * 5  # the plan is honoured
    assert released[-1] is False and released == sorted(released, reverse=True)  # refused from then on
    assert all(reply.error.code == BUDGET_EXHAUSTED_CODE for reply in replies if reply.has_error())


def test_a_changed_participation_is_planned_again_and_never_reuses_the_smaller_noise():
    context = make_context(**{"num-server-rounds": 12, "participation": 0.1})
    handle_train(train_message(1)[0], context)
    context.run_config = {**context.run_config, "participation": 1.0}

    for server_round in range(2, 13):
        handle_train(train_message(server_round)[0], context)

    assert load_ledger(context.state, accountant="pld").epsilon(1e-5) <= 2.0


def test_a_bad_participation_is_refused_with_the_key_named():
    reply = handle_train(train_message(1)[0], make_context(participation=1.5))
    assert reply.has_error() and reply.error.code == INVALID_INSTRUCTION_CODE
    assert reply.error.reason == "participation must be in (0, 1], got 1.5"


@pytest.fixture
def role_settings(tmp_path):
    from dpsign_fl.settings import RunSettings

    client_module.clear_data_cache()
    yield RunSettings(dataset="shakespeare", data_dir=str(write_tiny_plays(tmp_path)), partitioner="role")
    client_module.clear_data_cache()


def test_a_supernodes_partition_id_names_one_speaking_role_whatever_num_partitions_is(role_settings):
    from dpsign_fl.flower.node import parse_node_config

    dataset = load_dataset("shakespeare", data_dir=role_settings.data_dir)
    role = dataset.natural_partitions["role"]
    gloster = role.clients.index("richard_iii/GLOSTER")

    inputs, targets, classes = client_module.client_data(
        role_settings, parse_node_config({"partition-id": gloster, "num-partitions": 3})
    )
    fewer, _, _ = client_module.client_data(role_settings, parse_node_config({"partition-id": gloster, "num-partitions": 2}))

    assert torch.equal(inputs, dataset.train_inputs[role.train_clients == gloster]) and classes == 97
    assert torch.equal(targets, dataset.train_targets[role.train_clients == gloster])
    assert torch.equal(fewer, inputs)


def test_a_role_nodes_default_ledger_does_not_depend_on_num_partitions(role_settings):
    import dataclasses

    from dpsign_fl.flower.node import data_identity, parse_node_config

    def identity(settings, num_partitions):
        return data_identity(settings, parse_node_config({"partition-id": 1, "num-partitions": num_partitions}))

    # One role, one ledger: partition 1 is the same role for 2 or 3 partitions.
    assert identity(role_settings, 2) == identity(role_settings, 3)
    iid = dataclasses.replace(role_settings, partitioner="iid")
    assert identity(iid, 2) != identity(iid, 3)  # control: iid shares change with the number
