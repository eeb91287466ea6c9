"""Client-side evaluation for SignMajorityVote, as FedAvg runs it, and what it costs in privacy.

With ``fraction_evaluate > 0``, after each round a sample of nodes gets the
whole model and runs the app's own ``@app.evaluate()`` handler, as with
Flower's ``FedAvg``: the message holds the model under ``arrayrecord_key`` and
the evaluate config (with ``server-round``) under ``configrecord_key``; the
replies' MetricRecords are averaged, weighted by ``weighted_by_key``, with
``evaluate_metrics_aggr_fn`` (Flower's weighted average by default).

Privacy: those replies (typically a loss and an accuracy on the client's own
data) are computed from the data without noise and are NOT covered by the DP
guarantee of the sign releases; :data:`EVALUATION_WARNING` says so once per
run. ``fraction_evaluate=0`` (SignMajorityVote's default) sends no evaluate
message, so every reply a client sends is a DP release.

Replies are client text: an error reason or a metric name reaches the log only
through :func:`~dpsign_fl.flower.logs.printable`, and a set of replies that
cannot be averaged is logged and skipped, never stopping the run (FedAvg raises
``InconsistentMessageReplies`` there).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from logging import WARNING

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp.exception import InconsistentMessageReplies
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords, validate_message_reply_consistency

from .logs import printable
from .records import ROUND_KEY

MetricsAggrFn = Callable[[list[RecordDict], str], MetricRecord]

DEFAULT_WEIGHTED_BY_KEY = "num-examples"
DEFAULT_ARRAYRECORD_KEY = "arrays"
DEFAULT_CONFIGRECORD_KEY = "config"
"""FedAvg's defaults for the three keys (Flower 1.42, ``flwr.serverapp.strategy.FedAvg``)."""

DEFAULT_EVALUATE_AGGREGATION: MetricsAggrFn = aggregate_metricrecords
"""FedAvg's default ``evaluate_metrics_aggr_fn``: the average weighted by ``weighted_by_key``."""

EVALUATION_WARNING = (
    "fraction_evaluate=%g: after each round, sampled clients also run their evaluate handler on their own data "
    "and reply with what it returns (typically a loss and an accuracy). Those replies are NOT covered by the "
    "differential-privacy guarantee, which holds for the sign releases only; fraction_evaluate=0 keeps every "
    "reply private (docs/privacy.md)."
)
"""Logged once per run (WARNING) when clients evaluate."""


def evaluate_messages(
    node_ids: Iterable[int], server_round: int, arrays: ArrayRecord, config: ConfigRecord,
    *, arrayrecord_key: str, configrecord_key: str,
) -> list[Message]:
    """One EVALUATE message per node, holding the model and the config with ``server-round``, as FedAvg's."""
    config = ConfigRecord(dict(config))
    config[ROUND_KEY] = server_round
    content = RecordDict({arrayrecord_key: arrays, configrecord_key: config})
    return [Message(content=content, message_type=MessageType.EVALUATE, dst_node_id=node) for node in node_ids]


def aggregate_evaluate_replies(
    server_round: int, replies: Iterable[Message], *, weighted_by_key: str, aggregate: MetricsAggrFn,
    describe_error: Callable[[Message], str],
) -> MetricRecord | None:
    """Average the evaluation replies as FedAvg does; None when none could be averaged.

    Error replies are logged (``describe_error``, through ``printable``) and
    left out; replies that are inconsistent (different metric names, no
    ``weighted_by_key``) or whose values break ``aggregate`` are logged and
    give None for the round.
    """
    valid = []
    for reply in replies:
        if reply.has_error():
            log(WARNING, "round %d: dropped evaluation reply of node %s: %s", server_round,
                reply.metadata.src_node_id, printable(describe_error(reply)))
        else:
            valid.append(reply.content)
    if not valid:
        return None
    try:
        validate_message_reply_consistency(valid, weighted_by_key, check_arrayrecord=False)
        return aggregate(valid, weighted_by_key)
    except (InconsistentMessageReplies, ArithmeticError, ValueError, TypeError, KeyError) as error:
        reason = getattr(error, "reason", None) or str(error) or type(error).__name__
        log(WARNING, "round %d: the %d evaluation replies were not averaged: %s", server_round, len(valid), printable(reason))
        return None


def metrics_text(metrics: MetricRecord) -> str:
    """``name value, ...`` of client metrics for one log line, through ``printable``."""
    shown = (f"{name} {value:.4f}" if isinstance(value, float) else f"{name} {value}" for name, value in metrics.items())
    return printable(", ".join(shown))


def check_fedavg_arguments(
    *, fraction_evaluate: float, min_evaluate_nodes: int, weighted_by_key: str, arrayrecord_key: str,
    configrecord_key: str, train_metrics_aggr_fn: MetricsAggrFn | None, evaluate_metrics_aggr_fn: MetricsAggrFn | None,
) -> None:
    """Check FedAvg's constructor arguments; warn about those that change nothing in a sign vote.

    Raises:
        ValueError: for ``fraction_evaluate`` outside [0, 1] or a negative ``min_evaluate_nodes``.
        TypeError: for a key that is not a string, or an aggregation function that is not callable.
    """
    if isinstance(fraction_evaluate, bool) or not isinstance(fraction_evaluate, (int, float)) or not 0 <= fraction_evaluate <= 1:
        raise ValueError(f"fraction_evaluate must be in [0, 1], got {fraction_evaluate!r}")
    if isinstance(min_evaluate_nodes, bool) or not isinstance(min_evaluate_nodes, int) or min_evaluate_nodes < 0:
        raise ValueError(f"min_evaluate_nodes must be an integer >= 0, got {min_evaluate_nodes!r}")
    for name, value in (("weighted_by_key", weighted_by_key), ("arrayrecord_key", arrayrecord_key),
                        ("configrecord_key", configrecord_key)):
        if not isinstance(value, str) or not value:
            raise TypeError(f"{name} must be a non-empty string, got {value!r}")
    for name, value in (("train_metrics_aggr_fn", train_metrics_aggr_fn), ("evaluate_metrics_aggr_fn", evaluate_metrics_aggr_fn)):
        if value is not None and not callable(value):
            raise TypeError(f"{name} must be callable or None, got {type(value).__name__}")
    if train_metrics_aggr_fn is not None:
        log(WARNING, "train_metrics_aggr_fn is not used: a sign reply carries only its epsilon, and a round's train "
            "metrics are the vote's own (voters, dropped, missing, epsilon, ...)")
    if weighted_by_key != DEFAULT_WEIGHTED_BY_KEY:
        log(WARNING, "weighted_by_key=%r weights the client-side evaluation metrics only: the vote is unweighted "
            "(one node, one vote)", weighted_by_key)
    if (arrayrecord_key, configrecord_key) != (DEFAULT_ARRAYRECORD_KEY, DEFAULT_CONFIGRECORD_KEY):
        log(WARNING, "arrayrecord_key=%r and configrecord_key=%r name the records of evaluate messages only: train "
            "messages keep dpsign-fl's wire format, which dp_sign_train reads", arrayrecord_key, configrecord_key)

