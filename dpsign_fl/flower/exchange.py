"""Send a round's instructions and collect the replies, without waiting out a silent node.

Flower's ``Grid.send_and_receive`` returns when every message has a reply or
when the timeout has passed: one node that stays silent (its ClientApp hangs,
its machine sleeps while the SuperNode still holds the connection) costs the
whole ``round-timeout`` in every round it is sampled. :func:`collect_replies`
pushes the messages and pulls the replies itself, through the Grid's own
``push_messages`` and ``pull_messages``, and stops at the first of:

- every message has a reply (an error reply counts: the node answered);
- a quorum of replies that count is in and ``grace`` seconds have passed
  since it was reached (stragglers get that long to catch up);
- ``timeout`` seconds have passed since the push.

A reply that comes after the wait ended is never pulled: it cannot enter a
later round, whose messages have other ids.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable

from flwr.app import Message
from flwr.serverapp import Grid

DEPLOYMENT_PULL_SECONDS = 3.0
"""Seconds between two pulls on a Grid without ``pull_interval`` (Flower's deployment Grid pulls every 3 s)."""


def collect_replies(
    grid: Grid,
    messages: Iterable[Message],
    *,
    timeout: float,
    grace: float,
    quorum: int,
    counts: Callable[[Message], bool] = lambda reply: not reply.has_error(),
) -> list[Message]:
    """Push ``messages`` and return the replies pulled before the wait ended (see the module).

    Args:
        grid: the ServerApp's Grid.
        messages: the instructions, one per node.
        timeout: seconds after the push at which the wait ends in any case, > 0.
        grace: seconds to wait for the other replies once ``quorum`` replies
            count, >= 0.
        quorum: replies that must count before the grace starts; 0 starts it
            at the push.
        counts: which replies count towards the quorum (default: those
            without an error).

    Returns:
        The replies, in the order they were pulled.

    Raises:
        ValueError: for a negative ``grace`` or ``quorum``, or a ``timeout`` <= 0.
    """
    if not timeout > 0:
        raise ValueError(f"timeout must be > 0, got {timeout!r}")
    if not grace >= 0:
        raise ValueError(f"grace must be >= 0, got {grace!r}")
    if quorum < 0:
        raise ValueError(f"quorum must be >= 0, got {quorum!r}")
    waiting = {message_id for message_id in grid.push_messages(list(messages)) if message_id}  # None: not pushed
    pull_seconds = float(getattr(grid, "pull_interval", DEPLOYMENT_PULL_SECONDS))
    started = time.monotonic()
    deadline = started + timeout
    quorum_at = started if quorum == 0 else None
    replies: list[Message] = []
    while waiting:
        pulled = list(grid.pull_messages(waiting))
        replies.extend(pulled)
        waiting -= {reply.metadata.reply_to_message_id for reply in pulled}
        now = time.monotonic()
        if quorum_at is None and sum(1 for reply in replies if counts(reply)) >= quorum:
            quorum_at = now
        end = min(deadline, quorum_at + grace if quorum_at is not None else math.inf)
        if not waiting or now >= end:
            break
        time.sleep(min(pull_seconds, end - now))
    return replies
