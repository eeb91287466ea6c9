"""What a node sends before or instead of a release does not depend on its data; its data is its own choice.

The attack these guard against (found on an earlier version): a node with its own
``data-dir`` and ``partition-id`` was sent ``partitioner='pathological'
classes-per-partition=1000000`` and answered "... in [1, 10] (the classes
present)" when it held its only class-9 example x0 and "[1, 9]" when it did not;
nothing was recorded, so the server could ask again and again. And a server that
moved ``data-seed`` between runs moved x0 from one node's ledger to another's.

Neighbouring worlds: a deployed node's data folder with and without x0.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, RecordDict

from dpsign_fl.flower import client as client_module
from dpsign_fl.flower.node import data_identity, parse_node_config
from dpsign_fl.flower.records import (
    INVALID_INSTRUCTION_CODE,
    NODE_ERROR_CODE,
    NODE_ERROR_REASON,
    model_to_arrays,
)
from dpsign_fl.models import build_model
from dpsign_fl.settings import RunSettings

from ..e2e.harness import digits_as_mnist, write_idx_folder
from ..test_settings import pyproject_defaults
from .messages import instruction


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    """Two MNIST-layout folders that differ in one example, x0, the only one of class 9."""
    from sklearn.datasets import load_digits

    labels = load_digits().target
    others = np.flatnonzero(labels != 9)[:60]
    x0 = np.flatnonzero(labels == 9)[:1]
    test = np.arange(200, 260)
    folders = {}
    for name, train in (("with-x0", np.concatenate([others, x0])), ("without-x0", others)):
        root = tmp_path_factory.mktemp(name)
        write_idx_folder(root / "mnist", *digits_as_mnist(train), *digits_as_mnist(test))
        folders[name] = root
    return folders


def model_message(model_name="mlp", *, value=None):
    model = build_model(model_name, input_shape=(1, 28, 28), num_classes=10, seed=0)
    if value is not None:
        with torch.no_grad():
            next(model.parameters()).view(-1)[0] = value
    content = RecordDict({"arrays": model_to_arrays(model), "config": ConfigRecord({"server-round": 1})})
    return instruction(content, dst_node_id=5)


def deployed_reply(folder, tmp_path, run_overrides, message, node_extra=None):
    client_module.clear_data_cache()
    node_config = {"data-dir": str(folder), "partition-id": 0, "num-partitions": 2,
                   "ledger-path": str(Path(tempfile.mkdtemp(dir=tmp_path)) / "ledger.json"), **(node_extra or {})}
    run_config = {**pyproject_defaults(), "dataset": "mnist", "model": "mlp", "num-server-rounds": 3, **run_overrides}
    context = Context(run_id=1, node_id=5, node_config=node_config, state=RecordDict(), run_config=run_config)
    return client_module.handle_train(message, context, simulation=False)


def kind(reply):
    """An error reply as its exact code and reason; a release as its shape (its bits are random)."""
    if reply.has_error():
        return ("error", reply.error.code, reply.error.reason)
    return ("release", reply.content["arrays"]["signs"].shape)


SWEEP = [
    ({"partitioner": "pathological", "classes-per-partition": 1_000_000}, None),  # the attack: node-owned, ignored
    ({"partitioner": "pathological", "classes-per-partition": 10}, None),
    ({"partitioner": "dirichlet", "dirichlet-alpha": 1e-6}, None),
    ({"data-seed": 2}, None),
    ({"dataset": "fashion-mnist"}, None),  # a folder the node does not have
    ({"clip-norm": 8e-46}, None),  # refused by the run config's range
    ({"sample-rate": 2.0}, None),
    ({"model": "tanh-cnn"}, None),  # the server's arrays are not this model's
    ({}, float("nan")),  # a model entry the release refuses
    ({}, 1e30),
]


@pytest.mark.parametrize("run_overrides, model_value", SWEEP)
def test_a_deployed_nodes_reply_to_hostile_instructions_is_the_same_with_and_without_one_example(
    worlds, tmp_path, run_overrides, model_value
):
    replies = {  # the server always sends the mlp's arrays
        name: kind(deployed_reply(folder, tmp_path, run_overrides, model_message(value=model_value)))
        for name, folder in worlds.items()
    }

    assert replies["with-x0"] == replies["without-x0"]


def test_the_sweep_meets_every_kind_of_reply_so_that_it_compares_something(worlds, tmp_path):
    kinds = {
        kind(deployed_reply(worlds["with-x0"], tmp_path, overrides, model_message(value=value)))[:2]
        for overrides, value in SWEEP
    }
    codes = {k[1] for k in kinds if k[0] == "error"}
    assert ("release", (payload_length(),)) in kinds
    assert codes == {INVALID_INSTRUCTION_CODE, NODE_ERROR_CODE}


def payload_length():
    model = build_model("mlp", input_shape=(1, 28, 28), num_classes=10, seed=0)
    return (sum(p.numel() for p in model.parameters()) + 7) // 8


def test_a_simulated_nodes_partitioning_error_carries_no_count_of_the_classes_it_holds(worlds, tmp_path, caplog):
    # In simulation the run config keeps the data keys; the reply must still not describe the data.
    replies = []
    for folder in worlds.values():
        client_module.clear_data_cache()
        run_config = {**pyproject_defaults(), "dataset": "mnist", "model": "mlp", "data-dir": str(folder),
                      "partitioner": "pathological", "classes-per-partition": 1_000_000}
        context = Context(run_id=1, node_id=5, node_config={"partition-id": 0, "num-partitions": 2},
                          state=RecordDict(), run_config=run_config)
        replies.append(client_module.handle_train(model_message(), context, simulation=True))

    assert [(r.error.code, r.error.reason) for r in replies] == [(NODE_ERROR_CODE, NODE_ERROR_REASON)] * 2
    assert "(the classes present)" in caplog.text  # the detail stays in the node's own log


def test_a_run_config_cannot_move_an_example_between_deployed_nodes_ledgers(worlds, tmp_path):
    # The data-seed shift: with the run's data-seed the examples of partition 0 would change; a deployed
    # node keeps its own (node config, else the default), so its examples and its ledger stay put.
    folder = str(worlds["with-x0"])
    node = parse_node_config({"data-dir": folder, "partition-id": 0, "num-partitions": 2})
    chosen = []
    for seed in (0, 2):
        settings, overridden = node.data_settings(RunSettings(dataset="mnist", data_seed=seed), simulated=False)
        client_module.clear_data_cache()
        inputs, _, _ = client_module.client_data(settings, node)
        chosen.append((inputs.numpy().tobytes(), node.durable_ledger_path(False, data_identity(settings, node))))
        assert overridden == ({} if seed == 0 else {"data-seed": 2})

    assert chosen[0] == chosen[1]


def test_deployed_nodes_with_different_partitions_keep_different_default_ledgers_and_a_restart_finds_its_own(tmp_path):
    settings = RunSettings()
    paths = []
    for partition in (0, 1, 2, 0):
        node = parse_node_config({"partition-id": partition, "num-partitions": 3, "state-dir": str(tmp_path)})
        node_settings, _ = node.data_settings(settings, simulated=False)
        paths.append(node.durable_ledger_path(False, data_identity(node_settings, node)))

    assert len(set(paths[:3])) == 3 and paths[3] == paths[0]
    assert all(path.parent == tmp_path and path.name.startswith("ledger-") for path in paths)


def test_a_node_config_may_choose_its_partitioning_and_a_simulated_node_keeps_the_run_configs():
    node = parse_node_config({"partition-id": 0, "num-partitions": 2, "data-seed": "5", "partitioner": "dirichlet"})
    run = RunSettings(data_seed=1, partitioner="iid")

    deployed, overridden = node.data_settings(run, simulated=False)
    simulated, _ = parse_node_config({"partition-id": 0, "num-partitions": 2}).data_settings(run, simulated=True)

    assert (deployed.data_seed, deployed.partitioner) == (5, "dirichlet")
    assert overridden == {"data-seed": 1, "partitioner": "iid"}
    assert (simulated.data_seed, simulated.partitioner) == (1, "iid")


def test_a_deployed_node_reads_only_its_own_data_folder_never_the_run_configs():
    # A run-config data-dir could point a node at a second copy of its data, under a second ledger.
    node = parse_node_config({"partition-id": 0, "num-partitions": 2})
    settings, overridden = node.data_settings(RunSettings(dataset="mnist", data_dir="/elsewhere/copy"), simulated=False)
    simulated, _ = node.data_settings(RunSettings(dataset="mnist", data_dir="/elsewhere/copy"), simulated=True)

    assert settings.data_dir == "" and overridden == {"data-dir": "/elsewhere/copy"}
    assert data_identity(settings, node)["data-dir"] == ""
    assert simulated.data_dir == "/elsewhere/copy"
