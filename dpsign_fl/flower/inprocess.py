"""The app's ServerApp and ClientApp logic in one process, without Flower's simulation engine.

:class:`InProcessGrid` is a Grid whose ``send_and_receive`` calls the
ClientApp's train handler directly for each node: no SuperLink, no Ray, no
serialisation. Each node keeps its own ``Context`` (with ``context.state``)
across rounds, as a simulated SuperNode does within one run, and the handler
is told it runs in a simulation (as Flower's simulation engine would show it).
A handler that raises becomes an error reply with code 2, as Flower reports a
ClientApp that raised. :func:`run_in_process` runs a whole app run this way.

For tests, debugging (a breakpoint in the ClientApp works) and the benchmark
that separates the app's own per-round cost from the simulation engine's
(``dpsign_fl.bench.flower_round``). Not a way to deploy: there is no network
and no privacy boundary between the nodes and the server.
"""

from __future__ import annotations

from contextlib import contextmanager
from functools import partial

from flwr.app import Context, Error, Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.supercore.task_identity import TaskIdentity

from .client import handle_train
from .server import run_server


class Interrupted(Exception):
    """Raised by :class:`InProcessGrid` to stop a run at a given round (a stand-in for a crash)."""


class InProcessGrid:
    """Grid whose ``send_and_receive`` calls ``handler(message, context)`` for each node.

    Args:
        run_config: the run config every node's Context carries.
        num_nodes: simulated SuperNodes, with partition-id 0..num_nodes-1.
        handler: the train handler; ``handle_train`` in simulation mode by default.
        interrupt_at_round: raise :class:`Interrupted` when this round's train
            messages are sent (None = never).
        first_node_id: node ids are first_node_id, first_node_id + 1, ...
            (a new simulation run gets new node ids).
    """

    def __init__(self, run_config, num_nodes, *, handler=None, interrupt_at_round=None, first_node_id=100):
        self.handler = handler or partial(handle_train, simulation=True)
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

    def get_node_ids(self):
        return list(self.contexts)

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        if not messages:
            return []
        config = messages[0].content["config"]
        server_round = int(config["server-round"])
        if server_round == self.interrupt_at_round:
            raise Interrupted(f"interrupted at round {server_round}")
        if not config.get("sync-only", False):
            self.rounds_sent.append(server_round)
        replies = []
        for message in messages:
            context = self.contexts[message.metadata.dst_node_id]
            try:
                reply = self.handler(message, context)
            except Exception as error:  # as Flower reports a ClientApp that raised
                reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=f"{type(error)}:<'{error}'>"), reply_to=message)
            replies.append(reply)
        return replies


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
        return run_server(grid, context)


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
