"""SignMajorityVote as a drop-in for FedAvg: FedAvg's arguments, and client-side evaluation outside the DP guarantee."""

import inspect
import logging

import pytest
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from dpsign_fl import SignMajorityVote, pack_signs
from dpsign_fl.flower.inprocess import InProcessGrid
from dpsign_fl.flower.records import train_reply_content

from .test_strategy import global_arrays, signs_for

pytestmark = pytest.mark.usefixtures("server_identity")

WARNING_TEXT = "NOT covered by the differential-privacy guarantee"


def voting(message, context):
    """A train handler that replies with fixed valid signs (the vote is not under test here)."""
    return Message(train_reply_content(pack_signs(signs_for(context.node_id)), epsilon=0.5), reply_to=message)


def evaluating(seen):
    """An evaluate handler shaped like Flower's quickstart: reads the model, replies eval_loss, eval_acc, num-examples."""

    def handler(message, context):
        seen.append((int(message.content["config"]["server-round"]), tuple(sorted(message.content["arrays"].keys())),
                     message.content["config"].get("batch-size")))
        partition = int(context.node_config["partition-id"])
        metrics = {"eval_loss": 0.5, "eval_acc": 0.25 * (partition + 1), "num-examples": 10}
        return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=message)

    return handler


def run(strategy, *, evaluate_handler=None, num_rounds=2, **start):
    grid = InProcessGrid({}, num_nodes=3, handler=voting, evaluate_handler=evaluate_handler)
    result = strategy.start(grid=grid, initial_arrays=global_arrays(), num_rounds=num_rounds, **start)
    return grid, result


def warnings(caplog, text):
    return [r for r in caplog.records if r.levelno == logging.WARNING and text in r.getMessage()]


def test_sign_majority_vote_takes_every_fedavg_argument_in_fedavgs_order_and_every_start_argument():
    fedavg = list(inspect.signature(FedAvg.__init__).parameters.values())[1:]
    ours = list(inspect.signature(SignMajorityVote.__init__).parameters.values())[1:]

    assert [p.name for p in ours[: len(fedavg)]] == [p.name for p in fedavg]
    assert all(p.kind == p.POSITIONAL_OR_KEYWORD for p in ours[: len(fedavg)])
    different = {p.name for p, q in zip(fedavg, ours) if p.default != q.default}
    assert different == {"fraction_evaluate"}  # 0 here: evaluation replies are outside the DP guarantee
    assert set(inspect.signature(FedAvg.start).parameters) <= set(inspect.signature(SignMajorityVote.start).parameters)


def test_with_fraction_evaluate_sampled_clients_evaluate_every_round_and_the_log_warns_once(caplog):
    seen = []
    strategy = SignMajorityVote(fraction_evaluate=0.5, learning_rate=0.5, min_available_nodes=1)

    grid, result = run(strategy, evaluate_handler=evaluating(seen), evaluate_config=ConfigRecord({"batch-size": 32}))

    assert grid.evaluate_rounds_sent == [1, 2]
    assert len(seen) == 4  # max(int(3 * 0.5), min_evaluate_nodes=2) nodes per round, as FedAvg samples
    assert set(seen) == {(1, ("b", "w"), 32), (2, ("b", "w"), 32)}  # the whole model, the config
    assert sorted(result.evaluate_metrics_clientapp) == [1, 2]
    assert all(set(m) == {"eval_loss", "eval_acc"} and m["eval_loss"] == pytest.approx(0.5)
               for m in result.evaluate_metrics_clientapp.values())
    assert len(warnings(caplog, WARNING_TEXT)) == 1
    assert "round 2: client-side evaluation, 2 of 2 nodes (outside the DP guarantee): eval_loss 0.5000" in caplog.text


def test_the_default_fraction_evaluate_0_sends_no_evaluate_message_and_warns_nothing(caplog):
    grid, result = run(SignMajorityVote(learning_rate=0.5, min_available_nodes=1), evaluate_handler=evaluating([]))

    assert grid.evaluate_rounds_sent == [] and result.evaluate_metrics_clientapp == {}
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


@pytest.mark.parametrize("kwargs, text", [
    ({"weighted_by_key": "batches"}, "weights the client-side evaluation metrics only: the vote is unweighted"),
    ({"arrayrecord_key": "model"}, "name the records of evaluate messages only"),
    ({"configrecord_key": "settings"}, "name the records of evaluate messages only"),
    ({"train_metrics_aggr_fn": lambda records, key: MetricRecord()}, "train_metrics_aggr_fn is not used"),
])
def test_a_fedavg_argument_without_meaning_for_the_vote_is_accepted_and_logged(kwargs, text, caplog):
    SignMajorityVote(**kwargs)

    assert len(warnings(caplog, text)) == 1


@pytest.mark.parametrize("kwargs, error, message", [
    ({"fraction_evaluate": 1.5}, ValueError, "fraction_evaluate must be in [0, 1], got 1.5"),
    ({"min_evaluate_nodes": -1}, ValueError, "min_evaluate_nodes must be an integer >= 0, got -1"),
    ({"weighted_by_key": 3}, TypeError, "weighted_by_key must be a non-empty string, got 3"),
    ({"evaluate_metrics_aggr_fn": "mean"}, TypeError, "evaluate_metrics_aggr_fn must be callable or None, got str"),
])
def test_a_bad_fedavg_argument_is_refused_naming_it(kwargs, error, message):
    with pytest.raises(error, match=message.replace("[", r"\[").replace("]", r"\]")):
        SignMajorityVote(**kwargs)


def test_evaluation_replies_that_cannot_be_averaged_are_logged_escaped_and_the_run_goes_on(caplog):
    def inconsistent(message, context):
        metrics = {f"\x1b[32mINFO round 9: accuracy 0.999 {context.node_id}": 1.0, "num-examples": 10}
        return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=message)

    grid, result = run(SignMajorityVote(fraction_evaluate=1.0, learning_rate=0.5, min_available_nodes=1),
                       evaluate_handler=inconsistent)

    assert sorted(result.train_metrics_clientapp) == [1, 2] and result.evaluate_metrics_clientapp == {}
    lines = [r.getMessage() for r in warnings(caplog, "evaluation replies were not averaged")]
    assert len(lines) == 2 and all(line.isprintable() for line in lines)


def test_an_evaluation_error_reply_is_logged_escaped_and_the_other_replies_are_averaged(caplog):
    def failing_on_partition_0(message, context):
        if int(context.node_config["partition-id"]) == 0:
            raise RuntimeError("\x1b[32mINFO round 9: accuracy 0.999")
        return evaluating([])(message, context)

    _, result = run(SignMajorityVote(fraction_evaluate=1.0, learning_rate=0.5, min_available_nodes=1),
                    evaluate_handler=failing_on_partition_0, num_rounds=1)

    assert result.evaluate_metrics_clientapp[1]["eval_acc"] == pytest.approx((0.5 + 0.75) / 2)
    [line] = [r.getMessage() for r in warnings(caplog, "dropped evaluation reply of node 100")]
    assert line.isprintable() and "\\x1b[32mINFO" in line
