"""SignMajorityVote on real Flower Messages: votes, dropped replies, unchanged model."""

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, MetricRecord, RecordDict

from dpsign_fl import SignMajorityVote, majority_vote, pack_signs
from dpsign_fl.flower.records import PACKED_STYPE, arrays_to_flat, packed_array, train_reply_content

from .messages import FakeGrid, reply

D = 21  # not a multiple of 8: the last byte is partly padding
LEARNING_RATE = 0.5


pytestmark = pytest.mark.usefixtures("server_identity")


def global_arrays():
    weights = np.linspace(-1, 1, D).astype(np.float32)
    return ArrayRecord(array_dict={"w": Array(weights[:15].reshape(3, 5)), "b": Array(weights[15:])})


def configured_strategy(**kwargs):
    strategy = SignMajorityVote(learning_rate=LEARNING_RATE, min_train_nodes=1, min_available_nodes=1, **kwargs)
    arrays = global_arrays()
    messages = list(strategy.configure_train(1, arrays, ConfigRecord(), FakeGrid([11, 12, 13])))
    return strategy, arrays, messages


def signs_for(seed):
    rng = np.random.default_rng(seed)
    return rng.choice(np.array([-1, 1], dtype=np.int8), size=D)


def valid_reply(node_id, signs, epsilon=0.5):
    return reply(train_reply_content(pack_signs(signs), epsilon=epsilon), node_id=node_id)


def test_valid_replies_move_weights_by_the_core_majority_vote():
    strategy, arrays, _ = configured_strategy()
    signs = [signs_for(seed) for seed in range(3)]
    replies = [valid_reply(11 + i, s, epsilon=0.1 * (i + 1)) for i, s in enumerate(signs)]

    new_arrays, metrics = strategy.aggregate_train(1, replies)

    expected_vote = majority_vote([pack_signs(s) for s in signs], D)
    np.testing.assert_allclose(arrays_to_flat(new_arrays), arrays_to_flat(arrays) - LEARNING_RATE * expected_vote, rtol=1e-6)
    assert metrics["voters"] == 3 and metrics["dropped"] == 0
    assert metrics["epsilon"] == pytest.approx(0.3)
    assert metrics["payload-bytes"] == 3


def test_reply_order_does_not_change_the_result():
    strategy, _, _ = configured_strategy()
    replies = [valid_reply(11 + i, signs_for(i)) for i in range(5)]
    forward, _ = strategy.aggregate_train(1, replies)
    strategy, _, _ = configured_strategy()
    backward, _ = strategy.aggregate_train(1, replies[::-1])
    np.testing.assert_array_equal(arrays_to_flat(forward), arrays_to_flat(backward))


def malformed_replies():
    """kind -> (reply content, what the logged reason must say)."""
    good = train_reply_content(pack_signs(signs_for(0)), epsilon=1.0)
    packed = pack_signs(signs_for(1))

    def content(arrays=None, metrics=None, extra=None):
        record = {
            "arrays": arrays if arrays is not None else good["arrays"],
            "metrics": metrics if metrics is not None else good["metrics"],
        }
        record.update(extra or {})
        return RecordDict(record)

    def raw(dtype="uint8", shape=(3,), data=b"\x00" * 3):
        return ArrayRecord(array_dict={"signs": Array(dtype=dtype, shape=shape, stype=PACKED_STYPE, data=data)})

    return {
        "wrong length": (content(arrays=ArrayRecord(array_dict={"signs": packed_array(np.zeros(4, np.uint8))})), "shape [3]"),
        "wrong dtype": (content(arrays=raw(dtype="int16", data=b"\x00" * 6)), "dtype uint8"),
        "float payload": (content(arrays=raw(dtype="float32", data=b"\x00" * 12)), "dtype uint8"),
        "declared 3 bytes, holds more": (content(arrays=raw(data=b"\x00" * 300)), "exactly 3 bytes"),
        "the .npy format": (content(arrays=ArrayRecord(array_dict={"signs": Array(packed)})), "raw packed bits"),
        "extra array": (
            content(arrays=ArrayRecord(array_dict={"signs": packed_array(packed), "loss": Array(np.zeros(1, np.float32))})),
            "exactly one array",
        ),
        "missing arrays": (RecordDict({"metrics": good["metrics"]}), "reply must hold exactly"),
        "missing metric": (content(metrics=MetricRecord({})), "metrics must hold exactly"),
        "the dataset size": (content(metrics=MetricRecord({"num-examples": 10, "epsilon": 1.0})), "metrics must hold exactly"),
        "extra metric": (content(metrics=MetricRecord({"epsilon": 1.0, "train-loss": 0.3})), "metrics must hold exactly"),
        "non-finite epsilon": (content(metrics=MetricRecord({"epsilon": float("nan")})), "epsilon must be a finite number"),
        "absurd epsilon": (content(metrics=MetricRecord({"epsilon": 1e12})), "epsilon must be a finite number"),
        "oversized payload": (content(arrays=ArrayRecord(array_dict={"signs": packed_array(np.zeros(10_000, np.uint8))})), "shape [3]"),
        "other model size": (content(arrays=ArrayRecord(array_dict={"signs": packed_array(np.zeros(2, np.uint8))})), "shape [3]"),
        "extra record": (content(extra={"config": ConfigRecord({"x": 1})}), "reply must hold exactly"),
    }


@pytest.mark.parametrize("kind", sorted(malformed_replies()))
def test_each_malformed_reply_is_dropped_for_its_own_reason_and_the_rest_still_vote(kind, caplog):
    strategy, arrays, _ = configured_strategy()
    good_signs = [signs_for(10), signs_for(11)]
    bad, reason = malformed_replies()[kind]
    replies = [valid_reply(11, good_signs[0]), reply(bad, node_id=12), valid_reply(13, good_signs[1])]

    new_arrays, metrics = strategy.aggregate_train(1, replies)

    assert metrics["voters"] == 2 and metrics["dropped"] == 1
    expected = arrays_to_flat(arrays) - LEARNING_RATE * majority_vote([pack_signs(s) for s in good_signs], D)
    np.testing.assert_allclose(arrays_to_flat(new_arrays), expected, rtol=1e-6)
    assert "dropped reply of node 12" in caplog.text and reason in caplog.text


def test_error_replies_are_dropped_with_their_reason(caplog):
    strategy, _, _ = configured_strategy()
    replies = [valid_reply(11, signs_for(0)), reply(node_id=12, error=Error(code=4601, reason="privacy budget exhausted"))]
    _, metrics = strategy.aggregate_train(1, replies)
    assert metrics["voters"] == 1 and metrics["dropped"] == 1
    assert "privacy budget exhausted" in caplog.text


def test_a_round_with_no_valid_reply_leaves_the_model_unchanged():
    strategy, _, _ = configured_strategy()
    bad = malformed_replies()
    replies = [reply(bad["wrong length"][0], node_id=11), reply(bad["wrong dtype"][0], node_id=12)]
    new_arrays, metrics = strategy.aggregate_train(1, replies)
    assert new_arrays is None  # Strategy.start keeps the current arrays on None
    assert metrics["voters"] == 0 and metrics["dropped"] == 2


def test_configure_train_sends_the_model_and_round_to_each_sampled_node():
    _, arrays, messages = configured_strategy()
    assert sorted(m.metadata.dst_node_id for m in messages) == [11, 12, 13]
    for message in messages:
        assert message.content["config"]["server-round"] == 1
        np.testing.assert_array_equal(arrays_to_flat(message.content["arrays"]), arrays_to_flat(arrays))


def test_server_momentum_accumulates_votes():
    strategy, arrays, _ = configured_strategy(server_momentum=0.5)
    signs = signs_for(3)
    first, _ = strategy.aggregate_train(1, [valid_reply(11, signs)])
    strategy.configure_train(2, first, ConfigRecord(), FakeGrid([11]))
    second, _ = strategy.aggregate_train(2, [valid_reply(11, signs)])
    # update_state: v1 = s, v2 = 0.5 s + s = 1.5 s; total step 2.5 * lr * s
    expected = arrays_to_flat(arrays) - 2.5 * LEARNING_RATE * signs
    np.testing.assert_allclose(arrays_to_flat(second), expected, rtol=1e-5)


def test_replies_from_nodes_that_were_not_sampled_this_round_do_not_vote(caplog):
    strategy, arrays, _ = configured_strategy()  # sampled 11, 12, 13
    signs = [signs_for(seed) for seed in range(2)]
    outsiders = [valid_reply(21, np.ones(D, dtype=np.int8)), valid_reply(22, np.ones(D, dtype=np.int8))]

    new_arrays, metrics = strategy.aggregate_train(1, [valid_reply(11, signs[0]), valid_reply(12, signs[1]), *outsiders])

    expected_vote = majority_vote([pack_signs(s) for s in signs], D)
    np.testing.assert_allclose(arrays_to_flat(new_arrays), arrays_to_flat(arrays) - LEARNING_RATE * expected_vote, rtol=1e-6)
    assert (metrics["voters"], metrics["dropped"], metrics["missing"]) == (2, 2, 1)
    assert "dropped reply of node 21: the node was not sampled this round" in caplog.text


def test_the_strategy_remembers_each_node_across_rounds_and_leaves_out_the_ones_that_repeat_a_push(caplog):
    from dpsign_fl.vote.robust import REPETITION_HORIZON
    from tests.test_robust_vote import D as BIG_D, adaptive_push_rounds

    _, attacked = adaptive_push_rounds(2 * REPETITION_HORIZON)
    nodes = [101 + i for i in range(20)]  # nodes 101-104 push
    strategy = SignMajorityVote(learning_rate=0.01, min_train_nodes=1, min_available_nodes=1)
    arrays = ArrayRecord(array_dict={"w": Array(np.zeros(BIG_D, dtype=np.float32))})

    excluded = []
    for current, payloads in enumerate(attacked, start=1):
        list(strategy.configure_train(current, arrays, ConfigRecord(), FakeGrid(nodes)))
        replies = [reply(train_reply_content(p, epsilon=0.5), node_id=n) for n, p in zip(nodes, payloads)]
        arrays, metrics = strategy.aggregate_train(current, replies)
        excluded.append(metrics["excluded"])

    assert excluded[0] == 0 and excluded[-1] == 4
    assert "left out node 101 (repetition)" in caplog.text and "left out node 105" not in caplog.text


@pytest.mark.parametrize("schedule", ["balanced", "random"])
def test_the_balanced_schedule_samples_the_least_sampled_nodes_and_random_sampling_does_not(schedule):
    strategy = SignMajorityVote(
        learning_rate=LEARNING_RATE, fraction_train=0.2, min_train_nodes=2, min_available_nodes=1,
        client_schedule=schedule,
    )
    grid, arrays = FakeGrid(range(100, 110)), global_arrays()
    counts = dict.fromkeys(grid.node_ids, 0)
    spreads = []
    for server_round in range(1, 51):
        sampled = [m.metadata.dst_node_id for m in strategy.configure_train(server_round, arrays, ConfigRecord(), grid)]
        assert len(sampled) == len(set(sampled)) == 2 and set(sampled) <= set(counts)
        for node in sampled:
            counts[node] += 1
        spreads.append(max(counts.values()) - min(counts.values()))
    if schedule == "balanced":
        assert max(spreads) <= 1 and set(counts.values()) == {10}  # 100 samplings of 10 nodes: 10 each
    else:  # the negative control: Flower's random sampling spreads the counts wider
        assert max(spreads) > 1


@pytest.mark.parametrize("restored", [True, False])
def test_a_resumed_balanced_schedule_goes_on_from_the_checkpointed_counts(tmp_path, restored):
    from dpsign_fl.checkpoint import Checkpoint, load_checkpoint, save_checkpoint

    def strategy(seed):
        made = SignMajorityVote(
            learning_rate=LEARNING_RATE, fraction_train=0.2, min_train_nodes=2, min_available_nodes=1,
            client_schedule="balanced",
        )
        made._schedule_rng = np.random.default_rng(seed)  # fixed ties: the control below is not left to chance
        return made

    grid, arrays = FakeGrid(range(100, 110)), global_arrays()
    counts = dict.fromkeys(grid.node_ids, 0)

    def sample(strategy, rounds):
        for server_round in rounds:
            for message in strategy.configure_train(server_round, arrays, ConfigRecord(), grid):
                counts[message.metadata.dst_node_id] += 1

    first = strategy(1)
    sample(first, range(1, 24))  # 46 samplings of 10 nodes: six at 5, four at 4
    state = first.state_dict()
    save_checkpoint(tmp_path / "c.npz", Checkpoint(server_round=23, weights=np.zeros(3, np.float32),
                                                   epsilon_seen=state["epsilon-seen"], draws=state["draws"]))
    resumed = strategy(2)
    if restored:  # what the ServerApp does with resume=true
        checkpoint = load_checkpoint(tmp_path / "c.npz")
        resumed.load_state_dict({"updater": state["updater"], "epsilon-seen": checkpoint.epsilon_seen,
                                 "draws": checkpoint.draws})
    sample(resumed, range(24, 51))

    if restored:
        assert set(counts.values()) == {10}  # as if never stopped: 100 samplings, 10 each
    else:  # the negative control: counting again from zero samples some nodes 11 times and others 9
        assert max(counts.values()) - min(counts.values()) == 2


def test_an_unknown_client_schedule_is_refused_naming_it():
    with pytest.raises(ValueError, match="client_schedule must be one of"):
        SignMajorityVote(client_schedule="fair")
