"""What a SuperNode is: its own settings (``--node-config``) and whether it is simulated.

The node config belongs to whoever runs the SuperNode (the device owner); the
run config belongs to whoever starts the run (the server operator). Settings
that protect the device's data are therefore node-config keys.

In Flower's simulation engine every ClientApp runs inside a Ray actor and the
node config is Flower's ``partition-id`` / ``num-partitions``; on a deployed
SuperNode the ClientApp runs in a ``flwr-clientapp`` process without Ray. A
server operator can set neither, so :func:`running_in_simulation` is a
decision the device makes on its own.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Mapping

from ..settings import ConfigError, check_fields, from_mapping, setting, specs


@dataclass(frozen=True)
class NodeConfig:
    """This SuperNode's settings, from ``flower-supernode --node-config``.

    Attributes:
        partition_id, num_partitions: this node's share of the dataset (both
            None: the node uses the whole dataset in ``data_dir``).
        data_dir: the node's own data folder (overrides run-config ``data-dir``).
        ledger_path: the file holding this node's privacy ledger; None = keep
            it in ``context.state``.
    """

    partition_id: int | None = setting(None, kind=int, low=0, high=1_000_000, help="this node's partition of the dataset")
    num_partitions: int | None = setting(None, kind=int, low=1, high=1_000_000, help="how many partitions the dataset is cut into")
    data_dir: str | None = setting(None, kind=str, help="absolute path of this node's own data folder")
    ledger_path: str | None = setting(None, kind=str, help="absolute path of this node's privacy ledger file")

    def __post_init__(self) -> None:
        check_fields(self)
        for name in ("data_dir", "ledger_path"):
            if getattr(self, name) == "":
                raise ConfigError(f"node config {specs(NodeConfig)[name].key} must not be empty")
        if (self.partition_id is None) != (self.num_partitions is None):
            missing = "num-partitions" if self.num_partitions is None else "partition-id"
            raise ConfigError(f"node config must set {missing!r} too: 'partition-id' and 'num-partitions' go together")
        if self.partition_id is None and self.data_dir is None:
            raise ConfigError(
                "node config must set 'partition-id' and 'num-partitions' (e.g. --node-config "
                "'partition-id=0 num-partitions=3'), or 'data-dir' (e.g. --node-config 'data-dir=\"/data\"')"
            )
        if self.partition_id is not None and not self.partition_id < self.num_partitions:
            raise ConfigError(f"partition-id must be in [0, {self.num_partitions}), got {self.partition_id}")

    def name(self, node_id: int) -> str:
        """A name for messages: the partition, else the node ID."""
        return f"partition {self.partition_id}" if self.partition_id is not None else f"node {node_id}"

    def client_number(self, node_id: int) -> int:
        """The number that tells clients apart in seeds and attacks: the partition, else the node ID."""
        return self.partition_id if self.partition_id is not None else int(node_id)


NODE_CONFIG_KEYS = tuple(spec.key for spec in specs(NodeConfig).values())
"""The node-config keys this ClientApp reads."""


def parse_node_config(node_config: Mapping[str, Any]) -> NodeConfig:
    """Validate the node config and return it as a :class:`NodeConfig`.

    An unknown key is an error: a misspelt ``ledger-path`` would otherwise
    silently lose the budget.

    Raises:
        ConfigError: naming the key that is unknown, missing or out of range.
    """
    try:
        return from_mapping(NodeConfig, node_config, ignore_unknown=False)
    except ConfigError as error:
        raise type(error)(f"node config: {error}") from None


def running_in_simulation() -> bool:
    """True inside Flower's simulation engine (a Ray actor), False on a deployed SuperNode."""
    ray = sys.modules.get("ray")
    if ray is None:  # Flower's simulation engine imports Ray before any ClientApp runs
        return False
    try:
        return bool(ray.is_initialized()) and ray.get_runtime_context().get_actor_id() is not None
    except Exception:  # noqa: BLE001 - any doubt means: not a simulation
        return False
