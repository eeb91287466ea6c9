"""Faults and hostile input on the server: failing and silent clients, bad replies, bad
run configs, checkpoints and resume (run_server on an in-process Grid, no Ray)."""

import json
import logging
import time

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode

from dpsign_fl import SignMajorityVote, majority_vote, pack_signs
from dpsign_fl.checkpoint import CHECKPOINT_FILE, load_checkpoint
from dpsign_fl.settings import ConfigError
from dpsign_fl.flower.client import handle_train
from dpsign_fl.flower.records import arrays_to_flat, train_reply_content
from dpsign_fl.flower.server import METRICS_FILE, run_server
from dpsign_fl.flower.inprocess import InProcessGrid, Interrupted

from ..test_settings import pyproject_defaults
from .messages import FakeGrid, reply
from .test_strategy import D, LEARNING_RATE, global_arrays, signs_for, valid_reply


pytestmark = pytest.mark.usefixtures("server_identity")


def strategy_for(nodes, **kwargs):
    kwargs.setdefault("min_train_nodes", 1)
    strategy = SignMajorityVote(learning_rate=LEARNING_RATE, min_available_nodes=1, **kwargs)
    arrays = global_arrays()
    strategy.configure_train(1, arrays, ConfigRecord(), FakeGrid(nodes))
    return strategy, arrays


def raised(node_id):
    """The reply Flower makes for a ClientApp that raised (code 2)."""
    reason = "<class 'RuntimeError'>:<'deliberate failure'>"
    return reply(node_id=node_id, error=Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason))


def vote_step(arrays, signs):
    return arrays_to_flat(arrays) - LEARNING_RATE * majority_vote([pack_signs(s) for s in signs], D)


# --- failing and silent clients -------------------------------------------------------------


def test_a_client_that_raises_is_dropped_and_the_others_still_update_the_model(caplog):
    strategy, arrays = strategy_for([11, 12, 13], min_train_nodes=2)
    good = [signs_for(0), signs_for(1)]

    new_arrays, metrics = strategy.aggregate_train(1, [valid_reply(11, good[0]), raised(12), valid_reply(13, good[1])])

    np.testing.assert_allclose(arrays_to_flat(new_arrays), vote_step(arrays, good), rtol=1e-6)
    assert (metrics["voters"], metrics["dropped"], metrics["missing"]) == (2, 1, 0)
    assert "dropped reply of node 12: error 2" in caplog.text


def test_a_node_that_does_not_reply_in_time_is_counted_missing_and_the_round_goes_on(caplog):
    strategy, arrays = strategy_for([11, 12, 13], min_train_nodes=2)
    good = [signs_for(0), signs_for(1)]

    new_arrays, metrics = strategy.aggregate_train(1, [valid_reply(11, good[0]), valid_reply(13, good[1])])

    np.testing.assert_allclose(arrays_to_flat(new_arrays), vote_step(arrays, good), rtol=1e-6)
    assert (metrics["voters"], metrics["dropped"], metrics["missing"]) == (2, 0, 1)
    assert "1 of 3 sampled nodes did not reply in time" in caplog.text


def test_fewer_valid_replies_than_min_train_nodes_leave_the_model_unchanged(caplog):
    strategy, _ = strategy_for([11, 12, 13], min_train_nodes=3)
    replies = [valid_reply(11, signs_for(0)), raised(12), valid_reply(13, signs_for(1))]

    new_arrays, metrics = strategy.aggregate_train(1, replies)

    assert new_arrays is None  # Strategy.start keeps the current model
    assert metrics["voters"] == 2 and metrics["dropped"] == 1
    assert "fewer than min-train-nodes=3; the model is unchanged" in caplog.text


def test_a_second_reply_from_the_same_node_is_dropped_one_node_one_vote():
    strategy, arrays = strategy_for([11, 12, 13])
    honest, attacker = signs_for(0), signs_for(1)
    replies = [valid_reply(11, honest), valid_reply(12, attacker), valid_reply(12, attacker)]

    new_arrays, metrics = strategy.aggregate_train(1, replies)

    assert metrics["voters"] == 2 and metrics["dropped"] == 1
    np.testing.assert_allclose(arrays_to_flat(new_arrays), vote_step(arrays, [honest, attacker]), rtol=1e-6)


def test_a_node_whose_epsilon_goes_down_is_warned_about(caplog):
    strategy, _ = strategy_for([11])
    strategy.aggregate_train(1, [valid_reply(11, signs_for(0), epsilon=2.0)])
    strategy.configure_train(2, global_arrays(), ConfigRecord(), FakeGrid([11]))

    strategy.aggregate_train(2, [valid_reply(11, signs_for(0), epsilon=0.5)])

    assert "privacy ledger was reset" in caplog.text
    assert strategy.epsilon_seen == {11: 2.0}


HOSTILE_REASONS = {
    "terminal escapes": "\x1b[32mINFO round 9: accuracy 0.999\x1b[0m\n",
    "carriage return and bidi override": "real reason\r\x1b[2KINFO :      round 9: accuracy 0.999\u202e",
    "1 MB": "A" * 1_000_000,
}


@pytest.mark.parametrize("kind", sorted(HOSTILE_REASONS))
def test_a_clients_error_reason_is_logged_and_raised_as_one_bounded_line_without_control_characters(kind, caplog):
    def refusing(message, context):
        return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=HOSTILE_REASONS[kind]), reply_to=message)

    grid = InProcessGrid({}, num_nodes=2, handler=refusing)
    strategy = SignMajorityVote(learning_rate=LEARNING_RATE, min_train_nodes=1, min_available_nodes=1, max_failed_rounds=1)

    with pytest.raises(RuntimeError) as stopped:
        strategy.start(grid=grid, initial_arrays=global_arrays(), num_rounds=3, timeout=60)

    lines = [r.getMessage() for r in caplog.records if "dropped reply" in r.getMessage()] + [str(stopped.value)]
    assert len(lines) == 3  # two nodes' replies, then the run stops quoting the last one
    assert all(line.isprintable() and len(line) < 500 for line in lines), lines


def test_an_error_reply_without_a_reason_is_dropped_and_the_others_still_vote(caplog):
    strategy, _ = strategy_for([11, 12])

    new_arrays, metrics = strategy.aggregate_train(1, [valid_reply(11, signs_for(0)), reply(node_id=12, error=Error(code=2))])

    assert new_arrays is not None and (metrics["voters"], metrics["dropped"]) == (1, 1)
    assert "dropped reply of node 12: error 2: " in caplog.text


def test_a_rejected_replys_own_metric_names_are_logged_escaped_and_bounded(caplog):
    strategy, _ = strategy_for([11, 12])
    good = train_reply_content(pack_signs(signs_for(0)), epsilon=1.0)
    names = MetricRecord({f"\x1b[32mINFO round 9 {i}": 1.0 for i in range(10_000)})

    strategy.aggregate_train(1, [reply(RecordDict({"arrays": good["arrays"], "metrics": names}), node_id=12)])

    [line] = [r.getMessage() for r in caplog.records if "dropped reply of node 12" in r.getMessage()]
    assert line.isprintable() and len(line) < 500 and "metrics must hold exactly" in line


# --- hostile payloads not covered by test_strategy.py ----------------------------------------


def hostile_contents():
    good = train_reply_content(pack_signs(signs_for(0)), epsilon=1.0)
    int64_npy = Array(np.zeros(3, np.int64))
    lying_header = Array(dtype="uint8", shape=(3,), stype=int64_npy.stype, data=int64_npy.data)

    def with_arrays(array):
        return RecordDict({"arrays": ArrayRecord(array_dict={"signs": array}), "metrics": good["metrics"]})

    def with_metrics(metrics):
        return RecordDict({"arrays": good["arrays"], "metrics": metrics})

    return {
        "corrupt buffer": with_arrays(Array(dtype="uint8", shape=(3,), stype="numpy.ndarray", data=b"\x93NUMPY garbage")),
        "header says uint8, buffer holds int64": with_arrays(lying_header),
        "2-D signs": with_arrays(Array(np.zeros((3, 1), np.uint8))),
        "not a numpy buffer": with_arrays(Array(dtype="uint8", shape=(3,), stype="torch.raw", data=b"\x00\x01\x02")),
        "negative epsilon": with_metrics(MetricRecord({"epsilon": -1.0})),
        "infinite epsilon": with_metrics(MetricRecord({"epsilon": float("inf")})),
        "a list for epsilon": with_metrics(MetricRecord({"epsilon": [1.0, 2.0]})),
        "metrics as a ConfigRecord": with_metrics(ConfigRecord({"epsilon": 1.0})),
        "empty reply": RecordDict({}),
    }


@pytest.mark.parametrize("kind", sorted(hostile_contents()))
def test_each_hostile_reply_is_dropped_and_the_rest_still_vote(kind, caplog):
    strategy, arrays = strategy_for([11, 12, 13])
    good = [signs_for(10), signs_for(11)]
    replies = [valid_reply(11, good[0]), reply(hostile_contents()[kind], node_id=12), valid_reply(13, good[1])]

    new_arrays, metrics = strategy.aggregate_train(1, replies)

    assert metrics["voters"] == 2 and metrics["dropped"] == 1
    np.testing.assert_allclose(arrays_to_flat(new_arrays), vote_step(arrays, good), rtol=1e-6)
    assert "dropped reply of node 12" in caplog.text


# --- bad run config: fails at start, one message naming the key ------------------------------


def run_config(tmp_path, **overrides):
    config = dict(pyproject_defaults())
    config.update(
        {
            "num-server-rounds": 2,
            "model-seed": 7, "reproducible-noise": True, "noise-seed": 7,
            "accountant": "rdp",  # fast calibration; the accountant is not under test here
            "min-train-nodes": 2,
            "min-available-nodes": 2,
            "results-dir": str(tmp_path / "results"),
        }
    )
    config.update(overrides)
    return config


def server_context(config):
    return Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=config)


class UntouchableGrid(FakeGrid):
    """A Grid a run that fails at start must never use."""

    def __init__(self):
        super().__init__([])

    def get_node_ids(self):
        raise AssertionError("the run reached the Grid")

    def push_messages(self, messages):
        raise AssertionError("the run reached the Grid")

    def send_and_receive(self, messages, *, timeout=None):
        raise AssertionError("the run reached the Grid")


@pytest.mark.parametrize(
    "key, value",
    [
        ("target-epsilon", 0.0),
        ("target-epsilon", -2.0),
        ("target-delta", 1.0),
        ("target-delta", 0.0),
        ("sample-rate", 0.0),
        ("sample-rate", 1.5),
        ("dataset", "imagenet"),
        ("model", "resnet"),
        ("partitioner", "random"),
        ("num-server-rounds", 0),
        ("data-dir", "/nonexistent/mnist"),
    ],
)
def test_a_bad_run_config_fails_before_round_one_with_one_logged_line_naming_the_key(key, value, tmp_path, caplog):
    config = run_config(tmp_path, **{key: value})

    with pytest.raises(ConfigError) as error, caplog.at_level(logging.ERROR):
        run_server(UntouchableGrid(), server_context(config))

    assert str(error.value).startswith(key)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and key in errors[0] and "\n" not in errors[0]
    assert not (tmp_path / "results").exists()  # nothing was written


def test_a_data_dir_without_the_dataset_is_named_as_data_dir(tmp_path):
    (tmp_path / "empty").mkdir()
    config = run_config(tmp_path, dataset="mnist", **{"data-dir": str(tmp_path / "empty")})

    with pytest.raises(ConfigError, match=r"^data-dir .*mnist"):
        run_server(UntouchableGrid(), server_context(config))


# --- whole runs on an in-process Grid -------------------------------------------------------


def failing_on_partition(partition_id):
    def handler(message, context):
        if int(context.node_config["partition-id"]) == partition_id:
            raise RuntimeError(f"deliberate failure on partition {partition_id}")
        return handle_train(message, context, simulation=True)

    return handler


def test_a_run_with_one_failing_client_completes_every_round_with_the_others(tmp_path):
    config = run_config(tmp_path)
    grid = InProcessGrid(config, num_nodes=3, handler=failing_on_partition(1))

    rows = run_server(grid, server_context(config))

    assert [r["round"] for r in rows] == [1, 2]
    assert all((r["voters"], r["dropped"], r["missing"]) == (2, 1, 0) for r in rows)
    assert json.loads((tmp_path / "results" / METRICS_FILE).read_text()) == rows


def raising_once_then_silent_on_partition(partition_id):
    """Partition ``partition_id`` raises in round 1, then never replies again (final sync included)."""
    def handler(message, context):
        if int(context.node_config["partition-id"]) != partition_id:
            return handle_train(message, context, simulation=True)
        if int(message.content["config"]["server-round"]) == 1:
            raise RuntimeError("deliberate failure, then silence")
        return None

    return handler


def test_a_node_that_fails_then_goes_silent_costs_the_grace_not_the_round_timeout(tmp_path, caplog):
    config = run_config(tmp_path, **{"num-server-rounds": 3, "round-timeout": 600.0, "round-grace": 1.0})
    grid = InProcessGrid(config, num_nodes=3, handler=raising_once_then_silent_on_partition(1))
    started = time.monotonic()

    rows = run_server(grid, server_context(config))

    assert time.monotonic() - started < 60  # three rounds and the final sync, not 3 x 600 s
    assert [(r["voters"], r["dropped"], r["missing"]) for r in rows] == [(2, 1, 0), (2, 0, 1), (2, 0, 1)]
    assert [r["missing-nodes"] for r in rows] == [[], [101], [101]]
    assert json.loads((tmp_path / "results" / METRICS_FILE).read_text()) == rows
    assert "final sync: 2 of 3 nodes hold the final model" in caplog.text and "no reply from nodes [101]" in caplog.text


RESUME_SETTINGS = {
    "num-server-rounds": 4,
    "checkpoint-every": 2,
    "lr-schedule": "linear",  # the schedule must continue, not restart
    "server-momentum": 0.5,  # the momentum must survive the interruption
    "learning-rate": 0.05,
}


def final_weights(results_dir):
    import torch

    state = torch.load(results_dir / "model.pt")
    return np.concatenate([t.reshape(-1).numpy() for t in state.values()])


AUTOMATIC_STEPS = {**RESUME_SETTINGS, "server-momentum": 0.0, "learning-rate": 0.0}  # state: agreement + step scale


@pytest.mark.parametrize("settings", [RESUME_SETTINGS, AUTOMATIC_STEPS], ids=["momentum", "automatic-steps"])
def test_an_interrupted_run_resumed_from_its_checkpoint_ends_where_an_uninterrupted_run_ends(tmp_path, caplog, settings):
    straight = run_config(tmp_path / "straight", **settings)
    run_server(InProcessGrid(straight, num_nodes=2), server_context(straight))
    interrupted = run_config(tmp_path / "interrupted", **settings)
    results = tmp_path / "interrupted" / "results"

    with pytest.raises(Interrupted):
        run_server(InProcessGrid(interrupted, num_nodes=2, interrupt_at_round=3), server_context(interrupted))
    rows_before = json.loads((results / METRICS_FILE).read_text())
    assert load_checkpoint(results / CHECKPOINT_FILE).server_round == 2
    resumed = {**interrupted, "resume": True}
    grid = InProcessGrid(resumed, num_nodes=2, first_node_id=200)  # a new run: new node ids, new ledgers
    rows = run_server(grid, server_context(resumed))

    assert grid.rounds_sent == [3, 4]  # the clients see the true round numbers
    assert [r["round"] for r in rows] == [1, 2, 3, 4]
    assert rows[:2] == rows_before[:2]  # nothing lost from metrics.json
    np.testing.assert_array_equal(final_weights(results), final_weights(tmp_path / "straight" / "results"))
    assert "privacy ledgers are not in the server checkpoint" in caplog.text


@pytest.mark.parametrize("same_nodes", [True, False])
def test_a_resumed_balanced_schedule_counts_on_from_the_checkpoint_for_the_nodes_it_knows(tmp_path, same_nodes):
    config = run_config(tmp_path, **{**RESUME_SETTINGS, "checkpoint-every": 1, "fraction-train": 0.5,
                                     "client-schedule": "balanced", "min-train-nodes": 2})
    results = tmp_path / "results"
    with pytest.raises(Interrupted):
        run_server(InProcessGrid(config, num_nodes=4, interrupt_at_round=3), server_context(config))
    assert sorted(load_checkpoint(results / CHECKPOINT_FILE).draws.values()) == [1, 1, 1, 1]  # rounds 1-2, 2 a round
    resumed = {**config, "resume": True}
    # The ServerApp restarted beside the same SuperLink keeps its node ids; a new simulation draws new ones.
    grid = InProcessGrid(resumed, num_nodes=4, first_node_id=100 if same_nodes else 200)

    run_server(grid, server_context(resumed))

    draws = load_checkpoint(results / CHECKPOINT_FILE).draws
    if same_nodes:  # rounds 1-4 counted: every node twice
        assert draws == {str(node): 2 for node in range(100, 104)}
    else:  # the old ids are never sampled again and the new ones counted from zero (the control)
        assert {node: draws[str(node)] for node in range(100, 104)} == {node: 1 for node in range(100, 104)}
        assert sorted(draws[str(node)] for node in range(200, 204)) == [1, 1, 1, 1]


def test_a_resumed_run_takes_its_weights_from_the_checkpoint_without_pretraining_again(tmp_path, monkeypatch):
    from dpsign_fl import initial_model

    from ..test_shakespeare import write_tiny_plays

    (tmp_path / "data").mkdir()
    folder = write_tiny_plays(tmp_path / "data")
    (folder / "shakespeare" / "sonnets_gut.txt").write_text("THE SONNETS\n\n" + "Shall I compare thee to a summer's day?\n" * 20)
    pretrained = []
    monkeypatch.setattr(initial_model, "pretrain", lambda model, *args, **kwargs: pretrained.append(1))
    config = run_config(tmp_path, **RESUME_SETTINGS, dataset="shakespeare", partitioner="role", **{
        "data-dir": str(folder), "pretrain-steps": 3, "model-width": 16, "model-depth": 1, "model-previous-characters": 1,
        "min-train-nodes": 3, "min-available-nodes": 3,
    })
    with pytest.raises(Interrupted):
        run_server(InProcessGrid(config, num_nodes=3, interrupt_at_round=3), server_context(config))
    assert pretrained == [1]
    resumed = {**config, "resume": True}

    rows = run_server(InProcessGrid(resumed, num_nodes=3, first_node_id=200), server_context(resumed))

    assert pretrained == [1]  # not again
    assert [r["round"] for r in rows] == [1, 2, 3, 4]


def test_resume_with_a_changed_privacy_setting_is_refused_naming_the_key(tmp_path):
    config = run_config(tmp_path, **RESUME_SETTINGS)
    with pytest.raises(Interrupted):
        run_server(InProcessGrid(config, num_nodes=2, interrupt_at_round=3), server_context(config))
    changed = {**config, "resume": True, "target-epsilon": 20.0}

    with pytest.raises(ConfigError, match="target-epsilon must stay 8.0, got 20.0"):
        run_server(UntouchableGrid(), server_context(changed))


def test_resume_without_a_checkpoint_starts_at_round_one(tmp_path, caplog):
    config = run_config(tmp_path, resume=True, **{"num-server-rounds": 1})
    grid = InProcessGrid(config, num_nodes=2)

    rows = run_server(grid, server_context(config))

    assert [r["round"] for r in rows] == [1] and grid.rounds_sent == [1]
    assert "no checkpoint.npz" in caplog.text


def test_a_fresh_run_deletes_the_checkpoint_of_an_earlier_run(tmp_path):
    config = run_config(tmp_path, **RESUME_SETTINGS)
    with pytest.raises(Interrupted):
        run_server(InProcessGrid(config, num_nodes=2, interrupt_at_round=3), server_context(config))
    fresh = {**config, "num-server-rounds": 1, "checkpoint-every": 0}

    run_server(InProcessGrid(fresh, num_nodes=2), server_context(fresh))

    assert not (tmp_path / "results" / CHECKPOINT_FILE).exists()


# --- a real Flower simulation (Ray) with one ClientApp that raises -----------------------------


def failing_client_app(config, partition_id):
    """A ClientApp that is ``handle_train`` except that ``partition_id`` raises."""
    from flwr.clientapp import ClientApp

    app = ClientApp()
    handler = failing_on_partition(partition_id)

    @app.train()
    def train(message, context):
        # run_simulation passes no run config, and a ClientApp may not modify it.
        context = Context(context.run_id, context.node_id, context.node_config, context.state, dict(config))
        return handler(message, context)

    return app


@pytest.mark.slow
def test_a_flower_simulation_with_a_raising_client_completes_every_round(tmp_path, monkeypatch):
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    # Flower's Ray backend exports the driver's sys.path as PYTHONPATH; undo that afterwards.
    monkeypatch.delenv("PYTHONPATH", raising=False)
    config = run_config(tmp_path, **{"num-server-rounds": 2})
    server_app, rows = ServerApp(), []

    @server_app.main()
    def main(grid, context):
        context.run_config = dict(config)
        rows.extend(run_server(grid, context))

    run_simulation(
        server_app=server_app,
        client_app=failing_client_app(config, partition_id=1),
        num_supernodes=3,
        backend_config={"client_resources": {"num_cpus": 1}, "init_args": {"num_cpus": 2}},
    )

    assert [r["round"] for r in rows] == [1, 2]
    assert all((r["voters"], r["dropped"], r["missing"]) == (2, 1, 0) for r in rows)
