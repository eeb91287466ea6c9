"""Build real Flower Messages for tests (as the SuperLink would deliver them)."""

from __future__ import annotations

import time

from flwr.app import ConfigRecord, Error, Message, MessageType, Metadata, RecordDict

SERVER_NODE = 0


def instruction(content: RecordDict, *, dst_node_id: int, message_type: str = MessageType.TRAIN) -> Message:
    """An instruction message from the server to ``dst_node_id``."""
    metadata = Metadata(
        run_id=1,
        message_id=f"instruction-{dst_node_id}",
        src_node_id=SERVER_NODE,
        dst_node_id=dst_node_id,
        reply_to_message_id="",
        group_id="1",
        created_at=time.time(),
        ttl=3600.0,
        message_type=message_type,
    )
    return Message(content=content, metadata=metadata)


def reply(content: RecordDict | None = None, *, node_id: int, error: Error | None = None) -> Message:
    """A train reply from ``node_id`` carrying ``content`` (or an error)."""
    train = instruction(RecordDict({"config": ConfigRecord({"server-round": 1})}), dst_node_id=node_id)
    if error is not None:
        return Message(error, reply_to=train)
    return Message(content, reply_to=train)


class FakeGrid:
    """A Grid with fixed connected nodes; records the messages it is given."""

    def __init__(self, node_ids):
        self.node_ids = list(node_ids)

    def get_node_ids(self):
        return self.node_ids


def reply_signs(message: Message):
    """The packed signs a train reply carries (raw bytes on the wire)."""
    import numpy as np

    return np.frombuffer(message.content["arrays"]["signs"].data, dtype=np.uint8)
