"""A Grid that delivers each message to a ClientApp handler in this process.

Each node keeps its own Context (node config, run config, state) across
rounds, as a SuperNode does; replies are real Flower Messages.
"""

from __future__ import annotations

from flwr.app import Context, RecordDict


class InProcessGrid:
    """Route messages to ``handler(message, context)`` of the destination node."""

    def __init__(self, handler, *, num_nodes: int, run_config: dict):
        self.handler = handler
        self.contexts = {
            1000 + i: Context(
                run_id=1,
                node_id=1000 + i,
                node_config={"partition-id": i, "num-partitions": num_nodes},
                state=RecordDict(),
                run_config=dict(run_config),
            )
            for i in range(num_nodes)
        }

    def get_node_ids(self):
        return list(self.contexts)

    def send_and_receive(self, messages, *, timeout=None):
        return [self.handler(message, self.contexts[message.metadata.dst_node_id]) for message in messages]
