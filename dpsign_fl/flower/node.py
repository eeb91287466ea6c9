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

import dataclasses
import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from ..data import NATURAL_PARTITIONERS
from ..data.files import names_for_the_same_files
from ..privacy.limits import TARGET_DELTA_RANGE, TARGET_EPSILON_RANGE
from ..settings import SEED_LIMIT, ConfigError, RunSettings, check_fields, from_mapping, setting, specs

DEFAULT_NODE_DELTA = RunSettings.target_delta
"""The node's delta when it sets ``max-epsilon`` without ``delta``: the run config's default."""

DEFAULT_NODE_MAX_EPSILON = RunSettings.target_epsilon
"""A deployed node's cap when its config sets no ``max-epsilon``: the run config's default budget
(at :data:`DEFAULT_NODE_DELTA`), so that no run config can make a device that was never configured
spend more. A device owner who wants a larger budget says so in the node config."""

STATE_FOLDER = "dpsign-fl"
"""The node's own folder (ledger, model) inside Flower's home, ``$FLWR_HOME`` or ``~/.flwr``."""

LEDGER_FILE = "ledger.json"
"""The default ledger file before ledgers were kept per data set; read once into a new per-data-set ledger."""

NODE_DATA_KEYS = ("dataset", "partitioner", "dirichlet-alpha", "classes-per-partition", "data-seed")
"""Run-config keys that decide which examples a node trains on. A deployed node takes them from its
own node config (unset: the run's ``dataset``, the defaults of :class:`dpsign_fl.settings.RunSettings`
for the others), never from the server's run config: otherwise a server could move an example from
one node's ledger to another's between runs (data-seed 0 puts it on node 0, data-seed 2 on node 1)."""


@dataclass(frozen=True)
class NodeConfig:
    """This SuperNode's settings, from ``flower-supernode --node-config``.

    Attributes:
        partition_id, num_partitions: this node's share of the dataset (both
            None: the node uses the whole dataset in ``data_dir``).
        data_dir: the node's own data folder (overrides run-config ``data-dir``).
        ledger_path: the file holding this node's privacy ledger. A deployed
            node without it keeps its ledger in ``state_dir``; a simulated one
            in ``context.state``.
        state_dir: the node's own folder for its ledger (and model); None =
            ``$FLWR_HOME/dpsign-fl`` (``~/.flwr/dpsign-fl``).
        per_run_budget: a deployed node keeps its ledger in ``context.state``,
            so that each run starts a new budget (NOT a guarantee over runs).
        max_epsilon: the most epsilon, at ``delta``, this node's data may ever
            spend, over every release it records; no run config can raise it.
            Unset on a deployed node: :data:`DEFAULT_NODE_MAX_EPSILON` (:meth:`cap`).
        delta: the node's own delta (default 1e-5 when ``max_epsilon`` is set).
        noise_seed: experiments only: derive this node's sampling and noise
            from this seed (NOT private against anyone who knows it).
    """

    partition_id: int | None = setting(None, kind=int, low=0, high=1_000_000, help="this node's partition of the dataset")
    num_partitions: int | None = setting(None, kind=int, low=1, high=1_000_000, help="how many partitions the dataset is cut into")
    data_dir: str | None = setting(None, kind=str, help="absolute path of this node's own data folder")
    ledger_path: str | None = setting(None, kind=str, help="absolute path of this node's privacy ledger file")
    state_dir: str | None = setting(None, kind=str, help="absolute path of this node's folder for its ledger and model")
    per_run_budget: bool = setting(False, help="keep the ledger per run (context.state): the budget restarts every run")
    max_epsilon: float | None = setting(None, kind=float, low=TARGET_EPSILON_RANGE[0], high=TARGET_EPSILON_RANGE[1], help="the most epsilon this node's data may ever spend")
    delta: float | None = setting(None, kind=float, low=TARGET_DELTA_RANGE[0], high=TARGET_DELTA_RANGE[1], help="the node's own delta (default: the run config's default target-delta)")
    noise_seed: int | None = setting(None, kind=int, low=0, high=SEED_LIMIT, high_open=True, help="experiments only: a fixed seed for this node's randomness (NOT private)")
    data: tuple[tuple[str, Any], ...] = ()
    """The :data:`NODE_DATA_KEYS` this node's config sets, as (key, value) pairs (checked like the run config's)."""

    def __post_init__(self) -> None:
        check_fields(self)
        for name in ("data_dir", "ledger_path", "state_dir"):
            value = getattr(self, name)
            if value == "":
                raise ConfigError(f"node config {specs(NodeConfig)[name].key} must not be empty")
            if name != "data_dir" and value is not None and not Path(value).expanduser().is_absolute():
                raise ConfigError(f"node config {specs(NodeConfig)[name].key} must be an absolute path, got {value!r}")
        if self.delta is not None and self.max_epsilon is None:
            raise ConfigError("node config delta is the delta of max-epsilon: set max-epsilon too")
        if self.per_run_budget and self.ledger_path is not None:
            raise ConfigError("node config per-run-budget keeps the ledger in the run's state: do not set ledger-path too")
        if (self.partition_id is None) != (self.num_partitions is None):
            missing = "num-partitions" if self.num_partitions is None else "partition-id"
            raise ConfigError(f"node config must set {missing!r} too: 'partition-id' and 'num-partitions' go together")
        if self.partition_id is not None and not self.partition_id < self.num_partitions:
            raise ConfigError(f"partition-id must be in [0, {self.num_partitions}), got {self.partition_id}")

    def name(self, node_id: int) -> str:
        """A name for messages: the partition, else the node ID."""
        return f"partition {self.partition_id}" if self.partition_id is not None else f"node {node_id}"

    def client_number(self, node_id: int) -> int:
        """The number that tells clients apart in seeds and attacks: the partition, else the node ID."""
        return self.partition_id if self.partition_id is not None else int(node_id)

    def cap(self, simulated: bool) -> tuple[float, float] | None:
        """The most ``(epsilon, delta)`` this node's data may ever spend, or None (the run config decides).

        ``max-epsilon`` at ``delta`` (default :data:`DEFAULT_NODE_DELTA`) when set;
        else, on a deployed node, the default cap (:data:`DEFAULT_NODE_MAX_EPSILON`
        at :data:`DEFAULT_NODE_DELTA`); a simulated node without ``max-epsilon`` has
        none: in simulation whoever starts the run also owns every node.
        """
        if self.max_epsilon is not None:
            return self.max_epsilon, self.delta if self.delta is not None else DEFAULT_NODE_DELTA
        return None if simulated else (DEFAULT_NODE_MAX_EPSILON, DEFAULT_NODE_DELTA)

    def folder(self) -> Path:
        """The node's own folder (created on first use by its caller)."""
        if self.state_dir is not None:
            return Path(self.state_dir).expanduser()
        home = os.environ.get("FLWR_HOME") or str(Path.home() / ".flwr")
        return Path(home).expanduser() / STATE_FOLDER

    def durable_ledger_path(self, simulated: bool, identity: Mapping[str, Any]) -> Path | None:
        """Where this node's ledger file lives, or None when it lives in ``context.state``.

        ``ledger-path`` when set; else, on a deployed node, one file per data set
        in the state folder, ``ledger-<digest of identity>.json``
        (:func:`data_identity`), unless ``per-run-budget`` is set: nodes with
        different data never share a ledger, and a node restarted on the same
        data finds its own. A simulated node keeps it in the run's state.

        Raises:
            ConfigError: on a deployed node whose node config names no
                ``dataset`` (nor ``ledger-path``) when the files its data
                folder holds are read by another dataset name too (IDX files
                straight in ``data-dir``: ``mnist`` and ``fashion-mnist``): the
                run config would choose the name, and each name its own ledger.
        """
        if self.ledger_path is not None:
            return Path(self.ledger_path).expanduser()
        if simulated or self.per_run_budget:
            return None
        dataset = identity.get("dataset")  # the drop-in's identity names none: its app reads its own files
        if dataset and "dataset" not in dict(self.data) and identity.get("data-dir"):
            others = names_for_the_same_files(dataset, identity["data-dir"])
            if others:  # the ledger is kept per name: the run config could pick the other name for a second budget
                raise ConfigError(
                    f"node config must set 'dataset' (or 'ledger-path'): the files of data-dir are read as "
                    f"{dataset!r} and as {', '.join(map(repr, others))}, and the run config chooses "
                    "the name, so two runs could each spend this node's budget on the same examples"
                )
        digest = hashlib.sha256(json.dumps(dict(identity), sort_keys=True).encode()).hexdigest()[:16]
        return self.folder() / f"ledger-{digest}.json"

    def legacy_ledger_path(self) -> Path:
        """The one default ledger file of earlier versions (``<state folder>/ledger.json``)."""
        return self.folder() / LEDGER_FILE

    def data_settings(self, settings: RunSettings, simulated: bool) -> tuple[RunSettings, dict[str, Any]]:
        """The run settings with this node's say over its data; and the run-config values it overrode.

        A deployed node decides every :data:`NODE_DATA_KEYS` value itself (its
        node config, else the defaults; ``dataset``: else the run's) and its
        data folder (node-config ``data-dir``, else none: the embedded data or
        the hub; a run-config ``data-dir`` could point it at a second copy of
        its data, under a second ledger); a simulated node keeps the run
        config's unless its node config sets one.
        """
        fields = {spec.key: name for name, spec in specs(RunSettings).items()}
        chosen = dict(self.data)
        if not simulated:
            defaults = RunSettings()
            for key in NODE_DATA_KEYS:
                if key != "dataset":
                    chosen.setdefault(key, getattr(defaults, fields[key]))
            chosen["data-dir"] = self.data_dir if self.data_dir is not None else defaults.data_dir
        asked = {key: getattr(settings, fields[key]) for key in chosen}
        if asked.get("data-dir") == "":
            del asked["data-dir"]  # the run config named no folder: nothing to ignore
        overridden = {key: value for key, value in asked.items() if value != chosen[key]}
        return dataclasses.replace(settings, **{fields[key]: value for key, value in chosen.items()}), overridden


def data_identity(settings: RunSettings, node: NodeConfig) -> dict[str, Any]:
    """What decides which examples this node trains on: the key of its default ledger file.

    The dataset, its folder (resolved, so two spellings of one folder are one
    data set), and when the node holds a partition: the partition, the number
    of partitions (not for a natural partitioner such as ``role``: partition i
    is the same role whatever the number), and the partitioner's parameters
    that shape it. ``settings``
    must already hold the node's data choices (:meth:`NodeConfig.data_settings`).
    """
    data_dir = node.data_dir if node.data_dir is not None else settings.data_dir
    identity: dict[str, Any] = {
        "dataset": settings.dataset,
        "data-dir": str(Path(data_dir).expanduser().resolve()) if data_dir else "",
        "data-seed": settings.data_seed,  # also the train/test split of digits and mushroom
    }
    if node.partition_id is not None:
        identity.update({"partition-id": node.partition_id, "partitioner": settings.partitioner})
        if settings.partitioner not in NATURAL_PARTITIONERS:  # a role's examples do not depend on it
            identity["num-partitions"] = node.num_partitions
        if settings.partitioner == "dirichlet":
            identity["dirichlet-alpha"] = settings.dirichlet_alpha
        if settings.partitioner == "pathological":
            identity["classes-per-partition"] = settings.classes_per_partition
    return identity


def parse_node_config(node_config: Mapping[str, Any], *, require_data: bool = True) -> NodeConfig:
    """Validate the node config and return it as a :class:`NodeConfig`.

    An unknown key is an error: a misspelt ``ledger-path`` would otherwise
    silently lose the budget.

    Args:
        node_config: ``context.node_config``.
        require_data: the shipped ClientApp needs ``partition-id`` and
            ``num-partitions`` or ``data-dir``; the drop-in helper, whose app
            finds its own data, does not.

    Raises:
        ConfigError: naming the key that is unknown, missing or out of range.
    """
    data_specs = {spec.key: spec for spec in specs(RunSettings).values() if spec.key in NODE_DATA_KEYS}
    data = tuple((key, data_specs[key].coerce(value, f"node config {key}")) for key, value in node_config.items() if key in data_specs)
    try:
        node = from_mapping(NodeConfig, {k: v for k, v in node_config.items() if k not in data_specs}, ignore_unknown=False)
    except ConfigError as error:
        raise type(error)(f"node config: {error}") from None
    node = dataclasses.replace(node, data=data)
    if require_data and node.partition_id is None and node.data_dir is None:
        raise ConfigError(
            "node config must set 'partition-id' and 'num-partitions' (e.g. --node-config "
            "'partition-id=0 num-partitions=3'), or 'data-dir' (e.g. --node-config 'data-dir=\"/data\"')"
        )
    return node


def running_in_simulation() -> bool:
    """True inside Flower's simulation engine (a Ray actor), False on a deployed SuperNode."""
    ray = sys.modules.get("ray")
    if ray is None:  # Flower's simulation engine imports Ray before any ClientApp runs
        return False
    try:
        return bool(ray.is_initialized()) and ray.get_runtime_context().get_actor_id() is not None
    except Exception:  # noqa: BLE001 - any doubt means: not a simulation
        return False
