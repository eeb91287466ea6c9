"""The vote downlink: clients follow the server with the votes alone, byte for byte.

run_server with the ClientApp handler on an in-process Grid (each node keeps its
Context, as a simulated SuperNode does), so these are the real messages.
"""

import math

import pytest
import torch
from flwr.app import Context, RecordDict

from dpsign_fl.flower.records import NPY_HEADER_BYTES, load_replica
from dpsign_fl.flower.server import run_server
from dpsign_fl.flower.inprocess import InProcessGrid

from ..test_settings import pyproject_defaults


pytestmark = pytest.mark.usefixtures("server_identity")


class RestartingGrid(InProcessGrid):
    """An in-process Grid where one node loses its state (a restart) before a given round."""

    def __init__(self, *args, restart_node, restart_before_round, **kwargs):
        super().__init__(*args, **kwargs)
        self.restart = (restart_node, restart_before_round)

    def push_messages(self, messages):
        messages = list(messages)
        node, before = self.restart
        if messages and int(messages[0].content["config"]["server-round"]) == before:
            self.contexts[node].state = RecordDict()
            self.restart = (node, None)
        return super().push_messages(messages)


def run(tmp_path, grid_type=InProcessGrid, nodes=6, **overrides):
    config = dict(pyproject_defaults(), **{
        "num-server-rounds": 6, "fraction-train": 0.5, "min-train-nodes": 2, "server-momentum": 0.5,
        "lr-schedule": "linear", "learning-rate": 0.05, "reproducible-noise": True, "noise-seed": 4,
        "results-dir": str(tmp_path / "results"),
    })
    config.update(overrides)
    extra = {"restart_node": 102, "restart_before_round": 4} if grid_type is RestartingGrid else {}
    grid = grid_type(config, nodes, **extra)
    rows = run_server(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=config))
    state = torch.load(tmp_path / "results" / "model.pt")
    return grid, rows, state


def test_with_half_the_nodes_sampled_and_a_restarted_node_every_node_ends_with_the_servers_model(tmp_path):
    grid, rows, state = run(tmp_path, RestartingGrid)

    final = {name: tensor.numpy() for name, tensor in state.items()}
    for node, context in grid.contexts.items():
        replica = load_replica(context.state)
        assert replica is not None, node
        assert list(replica.arrays) == list(final)
        for name, value in final.items():
            assert replica.arrays[name].tobytes() == value.tobytes(), (node, name)
    digests = {load_replica(c.state).digest for c in grid.contexts.values()}
    assert len(digests) == 1  # the momentum too
    assert all(row["voters"] >= 2 for row in rows)


def test_a_restarted_node_is_sent_the_model_in_the_same_round_and_still_votes(tmp_path):
    _, rows, _ = run(tmp_path, RestartingGrid, **{"fraction-train": 1.0})

    assert [row["voters"] for row in rows] == [6] * 6
    # Round 1: everyone gets the model. Round 4: only the restarted node, after it answered 4603.
    assert [row["full-syncs"] for row in rows] == [6, 0, 0, 1, 0, 0]


def test_after_the_first_round_a_node_is_sent_votes_of_at_most_1_6_bits_per_coordinate(tmp_path):
    _, rows, state = run(tmp_path, **{"fraction-train": 1.0, "server-momentum": 0.0})
    d = sum(t.numel() for t in state.values())

    arrays = len(state)  # each Array is sent as .npy: a 128-byte header and the data
    assert rows[0]["downlink-bytes"] == 6 * (4 * d + arrays * NPY_HEADER_BYTES)
    for row in rows[1:]:
        vote_bytes = row["downlink-bytes"] / 6  # one vote per node, raw bytes
        assert vote_bytes <= 1 + math.ceil(d / 5)  # ternary (1.6 bits) or binary (1 + ceil(d/8))
        assert row["full-syncs"] == 0


def test_the_weights_downlink_sends_the_model_every_round_negative_control(tmp_path):
    from dpsign_fl.flower import server as server_module

    build = server_module.build_strategy

    def weights_strategy(settings, options):
        strategy = build(settings, options)
        strategy.downlink_mode = "weights"
        return strategy

    server_module.build_strategy = weights_strategy
    try:
        _, rows, state = run(tmp_path, **{"fraction-train": 1.0})
    finally:
        server_module.build_strategy = build
    d = sum(t.numel() for t in state.values())
    assert all(row["downlink-bytes"] == 6 * (4 * d + len(state) * NPY_HEADER_BYTES) for row in rows)


def test_with_automatic_steps_every_node_ends_with_the_servers_model_and_state(tmp_path):
    # Automatic steps keep a [2d] state (vote agreement, last vote) that the replicas must follow bit for bit.
    grid, rows, state = run(tmp_path, RestartingGrid, **{"learning-rate": 0.0, "server-momentum": 0.0})

    final = {name: tensor.numpy() for name, tensor in state.items()}
    digests = set()
    for node, context in grid.contexts.items():
        replica = load_replica(context.state)
        assert all(replica.arrays[name].tobytes() == value.tobytes() for name, value in final.items()), node
        assert replica.update_state is not None and replica.update_state.shape == (2 * replica.weights.shape[0],)
        digests.add(replica.digest)
    assert len(digests) == 1
    assert sum(row["full-syncs"] for row in rows[1:]) <= 1 + sum(1 for row in rows)  # votes, not models, after round 1
