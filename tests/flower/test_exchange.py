"""collect_replies: a round waits for every node, or for the quorum and a grace, or until the timeout."""

import time
from types import SimpleNamespace

import pytest

from dpsign_fl.flower.exchange import collect_replies


class TimedGrid:
    """A Grid whose node i answers ``delays[i]`` seconds after the push (None: never), with an error if asked."""

    pull_interval = 0.01

    def __init__(self, delays, errors=()):
        self.delays, self.errors = delays, set(errors)
        self.pushed_at = None

    def push_messages(self, messages):
        self.pushed_at = time.monotonic()
        return [f"m{i}" for i, _ in enumerate(messages)]

    def pull_messages(self, message_ids):
        elapsed = time.monotonic() - self.pushed_at
        return [
            SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=f"m{i}", src_node_id=i),
                            has_error=lambda i=i: i in self.errors)
            for i, delay in enumerate(self.delays)
            if f"m{i}" in message_ids and delay is not None and delay <= elapsed
        ]


def timed(grid, **kwargs):
    started = time.monotonic()
    replies = collect_replies(grid, [None] * len(grid.delays), **kwargs)
    return sorted(r.metadata.src_node_id for r in replies), time.monotonic() - started


def test_the_wait_ends_when_every_node_answered_an_error_included_whatever_the_grace():
    nodes, seconds = timed(TimedGrid([0.0, 0.05, 0.1], errors=[1]), timeout=60, grace=60, quorum=3)

    assert nodes == [0, 1, 2] and seconds < 5


def test_a_straggler_within_the_grace_is_waited_for_and_a_silent_node_costs_only_the_grace():
    nodes, seconds = timed(TimedGrid([0.0, 0.0, 0.3, None]), timeout=60, grace=0.6, quorum=2)

    assert nodes == [0, 1, 2]
    assert 0.6 <= seconds < 5


def test_error_replies_do_not_make_the_quorum_so_the_wait_runs_to_the_timeout():
    nodes, seconds = timed(TimedGrid([0.0, 0.0, None], errors=[1]), timeout=0.5, grace=0.0, quorum=2)

    assert nodes == [0, 1] and 0.5 <= seconds < 5


@pytest.mark.parametrize("kwargs, message", [
    ({"timeout": 0.0, "grace": 1.0, "quorum": 1}, "timeout must be > 0, got 0.0"),
    ({"timeout": 1.0, "grace": -1.0, "quorum": 1}, "grace must be >= 0, got -1.0"),
    ({"timeout": 1.0, "grace": 1.0, "quorum": -1}, "quorum must be >= 0, got -1"),
])
def test_bad_wait_arguments_are_refused_naming_them(kwargs, message):
    with pytest.raises(ValueError, match=message):
        collect_replies(TimedGrid([0.0]), [None], **kwargs)
