"""The app's ServerApp and ClientApp logic in one process, without Flower's simulation engine.

:class:`InProcessGrid` is a Grid whose ``push_messages`` calls the
ClientApp's train handler directly for each node: no SuperLink, no Ray, no
serialisation. Each node keeps its own ``Context`` (with ``context.state``)
across rounds, as a simulated SuperNode does within one run, and the handler
is told it runs in a simulation (as Flower's simulation engine would show it).
Evaluate messages go to an optional evaluate handler (the app's
``@app.evaluate()``). A handler that raises becomes an error reply with code
2, as Flower reports a ClientApp that raised; one that returns None sends no
reply (a node gone silent). :func:`run_in_process` runs a whole app run this way.

For tests, debugging (a breakpoint in the ClientApp works) and the benchmark
that separates the app's own per-round cost from the simulation engine's
(``dpsign_fl.bench.flower_round``). Not a way to deploy: there is no network
and no privacy boundary between the nodes and the server.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from functools import partial

from flwr.app import Context, Error, Message, MessageType, RecordDict
from flwr.common.constant import ErrorCode
from flwr.supercore.task_identity import TaskIdentity

from ..experiments.hooks import FLOWER_EXPERIMENTS
from .client import handle_train
from .server import run_server


class Interrupted(Exception):
    """Raised by :class:`InProcessGrid` to stop a run at a given round (a stand-in for a crash)."""


class InProcessGrid:
    """Grid whose ``push_messages`` calls ``handler(message, context)`` for each node.

    Replies are ready as soon as the messages are pushed; ``pull_messages``
    hands them out. ``send_and_receive`` waits like Flower's grids: until every
    message has a reply or ``timeout`` has passed, so a silent node costs the
    whole timeout here too.

    Args:
        run_config: the run config every node's Context carries.
        num_nodes: simulated SuperNodes, with partition-id 0..num_nodes-1.
        handler: the train handler; ``handle_train`` in simulation mode by
            default. A handler that returns None sends no reply.
        evaluate_handler: the handler of evaluate messages; None answers them
            with an error, as a ClientApp without ``@app.evaluate()``.
        interrupt_at_round: raise :class:`Interrupted` when this round's train
            messages are sent (None = never).
        first_node_id: node ids are first_node_id, first_node_id + 1, ...
            (a new simulation run gets new node ids).
    """

    pull_interval = 0.01
    """Seconds between two pulls of a waiting strategy (as Flower's InMemoryGrid)."""

    def __init__(
        self, run_config, num_nodes, *, handler=None, evaluate_handler=None, interrupt_at_round=None, first_node_id=100
    ):
        self.handler = handler or partial(handle_train, simulation=True, experiments=FLOWER_EXPERIMENTS)
        self.evaluate_handler = evaluate_handler
        self.interrupt_at_round = interrupt_at_round
        self.contexts = {
            first_node_id + i: Context(
                run_id=1,
                node_id=first_node_id + i,
                node_config={"partition-id": i, "num-partitions": num_nodes},
                state=RecordDict(),
                run_config=dict(run_config),
            )
            for i in range(num_nodes)
        }
        self.rounds_sent: list[int] = []
        self.evaluate_rounds_sent: list[int] = []
        self._replies: dict[str, Message] = {}
        self._pushed = 0

    def get_node_ids(self):
        return list(self.contexts)

    def push_messages(self, messages):
        """Give each message an id, run its node's handler, keep the reply; return the ids."""
        messages = list(messages)
        if not messages:
            return []
        config = messages[0].content["config"]
        server_round = int(config["server-round"])
        if messages[0].metadata.message_type == MessageType.EVALUATE:
            self.evaluate_rounds_sent.append(server_round)
        elif server_round == self.interrupt_at_round:
            raise Interrupted(f"interrupted at round {server_round}")
        elif not config.get("sync-only", False):
            self.rounds_sent.append(server_round)
        message_ids = []
        for message in messages:
            self._pushed += 1
            message_id = f"in-process-{self._pushed}"
            message.metadata.__dict__["_message_id"] = message_id  # as Flower's InMemoryGrid sets it
            reply = self._reply(message)
            if reply is not None:
                self._replies[message_id] = reply
            message_ids.append(message_id)
        return message_ids

    def pull_messages(self, message_ids):
        """The replies to ``message_ids`` that have not been pulled yet."""
        return [self._replies.pop(message_id) for message_id in message_ids if message_id in self._replies]

    def send_and_receive(self, messages, *, timeout=None):
        """Push, then return the replies once all are in or ``timeout`` seconds have passed."""
        message_ids = self.push_messages(messages)
        replies = self.pull_messages(message_ids)
        if len(replies) < len(message_ids):  # a silent node never answers: the wait runs out
            if timeout is None:
                raise RuntimeError("send_and_receive without a timeout would wait forever for a silent node")
            time.sleep(timeout)
        return replies

    def _reply(self, message: Message) -> Message | None:
        context = self.contexts[message.metadata.dst_node_id]
        handler = self.evaluate_handler if message.metadata.message_type == MessageType.EVALUATE else self.handler
        try:
            if handler is None:
                raise ValueError("no evaluate handler registered")
            return handler(message, context)
        except Exception as error:  # as Flower reports a ClientApp that raised
            return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=f"{type(error)}:<'{error}'>"), reply_to=message)


def run_in_process(run_config: dict, num_nodes: int) -> list[dict]:
    """Run the app's rounds (:func:`~dpsign_fl.flower.server.run_server`) on an :class:`InProcessGrid`.

    Flower's ``Message`` reads the identity of the task it runs in, which a
    real ServerApp process has; it is set here for the duration of the run
    and restored afterwards.

    Args:
        run_config: the run config (every key; e.g. pyproject.toml's defaults
            with overrides).
        num_nodes: simulated nodes, partition-id 0..num_nodes-1.

    Returns:
        The per-round records (as ``metrics.json`` holds them).
    """
    grid = InProcessGrid(run_config, num_nodes)
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=dict(run_config))
    with server_task_identity():
        return run_server(grid, context, experiments=FLOWER_EXPERIMENTS)


@contextmanager
def server_task_identity():
    """Within the block, this process has the task identity of a ServerApp (run 1, node 0, task 1).

    Flower's ``Message`` constructor reads it; a ServerApp process started by
    Flower has one, a test or a benchmark does not. The previous identity is
    restored on exit.
    """
    names = ("_run_id", "_node_id", "_task_id")
    saved = [getattr(TaskIdentity, name, None) for name in names]
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = 1, 0, 1
    try:
        yield
    finally:
        for name, value in zip(names, saved):
            setattr(TaskIdentity, name, value)
