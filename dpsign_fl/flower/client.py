"""The ClientApp's train handler: Context + Message -> core DP-SIGN release -> reply.

Privacy: the reply carries only the packed signs and public numbers
(``num-examples`` n_m and the epsilon spent). No loss, accuracy or batch size.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from logging import INFO, WARNING
from typing import Any, Callable, Iterator, Mapping

import torch
from flwr.app import ConfigRecord, Context, Error, Message
from flwr.common import log

from ..attacks import byzantine_signs, is_byzantine
from ..config import RunConfig, parse_run_config
from ..data import load_dataset, partition
from ..models import build_model, default_model
from ..packing import pack_signs
from ..privacy import PrivacyLedger, calibrate_noise_multiplier
from ..privacy.ledger_store import lock_ledger_file, read_ledger_file, write_ledger_file
from ..training import ReleaseSettings, client_generator, client_release
from .records import (
    ARRAYS_KEY,
    CONFIG_KEY,
    NOISE_STATE_KEY,
    ROUND_KEY,
    load_arrays_into_model,
    load_ledger,
    save_ledger,
    train_reply_content,
)

BUDGET_EXHAUSTED_CODE = 4601
"""Error code of a reply refused because the privacy budget would be exceeded."""


def handle_train(message: Message, context: Context) -> Message:
    """Make this client's DP-SIGN release for the received model, or refuse.

    Refuses (an error reply with :data:`BUDGET_EXHAUSTED_CODE`) when the next
    release would push this client's epsilon above ``target-epsilon``. The
    ledger is the file named by node-config ``ledger-path`` when set (read at
    the start of every message under a lock, rewritten right after the
    release is recorded and before the reply leaves), else ``context.state``.
    """
    config = parse_run_config(context.run_config)
    node = parse_node_config(context.node_config)
    server_round = int(message.content[CONFIG_KEY].get(ROUND_KEY, 0)) if CONFIG_KEY in message.content else 0
    inputs, targets, classes = client_data(config, node)
    noise_multiplier = planned_noise_multiplier(config, context)
    with open_ledger(node, context, accountant=config.accountant) as (ledger, save):
        epsilon_after = ledger.epsilon_after(
            target_delta=config.target_delta, sample_rate=config.sample_rate, noise_multiplier=noise_multiplier
        )
        if not epsilon_after <= config.target_epsilon:
            spent = ledger.epsilon(config.target_delta)
            reason = (
                f"privacy budget exhausted: {node.name(context.node_id)} has spent epsilon={spent:.4f} in "
                f"{ledger.num_releases} releases; one more would reach {epsilon_after:.4f} > "
                f"target-epsilon={config.target_epsilon} (delta={config.target_delta})"
            )
            log(WARNING, reason)
            return Message(Error(code=BUDGET_EXHAUSTED_CODE, reason=reason), reply_to=message)

        model = build_model(
            config.model or default_model(config.dataset),
            input_shape=tuple(inputs.shape[1:]),
            num_classes=classes,
        )
        load_arrays_into_model(model, message.content[ARRAYS_KEY])
        generator = client_generator(config.seed_value, partition_id=node.seed_id(context.node_id), server_round=server_round)
        settings = ReleaseSettings(
            sample_rate=config.sample_rate,
            clip_norm=config.clip_norm,
            noise_multiplier=noise_multiplier,
            clipping=config.clipping,
        )
        signs = client_release(model, inputs, targets, settings, generator=generator, gradient_noise=config.gradient_noise)
        if node.partition_id is not None and is_byzantine(node.partition_id, node.num_partitions, config.byzantine_fraction):
            signs = byzantine_signs(signs, attack=config.byzantine_attack, generator=generator)
        ledger.record(sample_rate=config.sample_rate, noise_multiplier=noise_multiplier)
        save(ledger)
    content = train_reply_content(pack_signs(signs), num_examples=inputs.shape[0], epsilon=epsilon_after)
    return Message(content, reply_to=message)


NODE_CONFIG_KEYS = ("partition-id", "num-partitions", "data-dir", "ledger-path")
"""The node-config keys this ClientApp reads (``flower-supernode --node-config``)."""


@dataclass(frozen=True)
class NodeConfig:
    """This SuperNode's settings, from ``--node-config`` (simulation: Flower's partition keys).

    Attributes:
        partition_id, num_partitions: this node's share of the dataset; both
            None when the node uses the whole dataset in ``data_dir``.
        data_dir: the node's own data folder (overrides run-config ``data-dir``
            on this node); None = the run config's.
        ledger_path: the file holding this node's privacy ledger; None = keep
            it in ``context.state`` (simulation: it lives as long as the run).
    """

    partition_id: int | None = None
    num_partitions: int | None = None
    data_dir: str | None = None
    ledger_path: str | None = None

    def name(self, node_id: int) -> str:
        """A name for messages: the partition, else the node ID."""
        return f"partition {self.partition_id}" if self.partition_id is not None else f"node {node_id}"

    def seed_id(self, node_id: int) -> int:
        """The number that makes a fixed ``seed`` distinct per client: the partition, else the node ID."""
        return self.partition_id if self.partition_id is not None else int(node_id)


def parse_node_config(node_config: Mapping[str, Any]) -> NodeConfig:
    """Validate the node config and return it as a :class:`NodeConfig`.

    Accepted keys are :data:`NODE_CONFIG_KEYS`; an unknown key is an error
    (a misspelt ``ledger-path`` would otherwise silently lose the budget):

    - ``partition-id`` and ``num-partitions`` (together): this node trains on
      that partition of the dataset (from ``data-dir`` when set);
    - ``data-dir`` alone: this node trains on the whole dataset found there;
    - ``ledger-path``: absolute path of this node's ledger file.

    Raises:
        ValueError: naming the key that is missing, unknown or out of range.
        TypeError: naming the key whose value has the wrong kind.
    """
    unknown = sorted(set(node_config) - set(NODE_CONFIG_KEYS))
    if unknown:
        raise ValueError(f"node config has unknown key(s) {unknown}; known keys are {list(NODE_CONFIG_KEYS)}")
    partition_id = _node_int(node_config, "partition-id")
    num_partitions = _node_int(node_config, "num-partitions")
    data_dir = _node_str(node_config, "data-dir")
    ledger_path = _node_str(node_config, "ledger-path")
    if (partition_id is None) != (num_partitions is None):
        missing = "num-partitions" if num_partitions is None else "partition-id"
        raise ValueError(f"node config must set {missing!r} too: 'partition-id' and 'num-partitions' go together")
    if partition_id is None and data_dir is None:
        raise ValueError(
            "node config must set 'partition-id' and 'num-partitions' (e.g. --node-config "
            "'partition-id=0 num-partitions=3'), or 'data-dir' (e.g. --node-config 'data-dir=\"/data\"')"
        )
    if num_partitions is not None and num_partitions < 1:
        raise ValueError(f"num-partitions must be >= 1, got {num_partitions}")
    if partition_id is not None and not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition-id must be in [0, {num_partitions}), got {partition_id}")
    return NodeConfig(partition_id, num_partitions, data_dir, ledger_path)


def _node_int(node_config: Mapping[str, Any], key: str) -> int | None:
    if key not in node_config:
        return None
    value = node_config[key]
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise TypeError(f"node config {key} must be an integer, got {value!r}")
    try:
        return int(value)
    except ValueError:
        raise TypeError(f"node config {key} must be an integer, got {value!r}") from None


def _node_str(node_config: Mapping[str, Any], key: str) -> str | None:
    if key not in node_config:
        return None
    value = node_config[key]
    if not isinstance(value, str):
        raise TypeError(f"node config {key} must be a quoted string (e.g. {key}=\"/path\"), got {value!r}")
    if value == "":
        raise ValueError(f"node config {key} must not be empty")
    return value


@contextmanager
def open_ledger(
    node: NodeConfig, context: Context, *, accountant: str
) -> Iterator[tuple[PrivacyLedger, Callable[[PrivacyLedger], None]]]:
    """Yield (ledger, save) for this node; call ``save(ledger)`` after recording a release.

    With ``ledger-path`` the file is locked for the whole block and is the
    source of truth (``context.state`` is not used for the ledger); without
    it the ledger lives in ``context.state``.

    Raises:
        LedgerFileError: if the ledger file is unusable (see
            :func:`dpsign_fl.privacy.ledger_store.read_ledger_file`).
    """
    if node.ledger_path is None:
        yield load_ledger(context.state, accountant=accountant), lambda ledger: save_ledger(context.state, ledger)
        return
    with lock_ledger_file(node.ledger_path):
        ledger = read_ledger_file(node.ledger_path, accountant=accountant)
        yield ledger, lambda updated: write_ledger_file(node.ledger_path, updated)


def planned_noise_multiplier(config: RunConfig, context: Context) -> float:
    """Return sigma calibrated so that ``num-server-rounds`` releases meet the target.

    A client releases at most once per round, so it plans for every round (no
    amplification from the server's client sampling is assumed: the client
    cannot verify it). Calibrated once per run and kept in ``context.state``.
    """
    key = json.dumps(
        [config.target_epsilon, config.target_delta, config.sample_rate, config.num_server_rounds, config.accountant]
    )
    if NOISE_STATE_KEY in context.state and context.state[NOISE_STATE_KEY].get("key") == key:
        return float(context.state[NOISE_STATE_KEY]["noise-multiplier"])
    sigma = calibrate_noise_multiplier(
        target_epsilon=config.target_epsilon,
        target_delta=config.target_delta,
        sample_rate=config.sample_rate,
        num_steps=config.num_server_rounds,
        accountant=config.accountant,
    )
    log(INFO, "calibrated noise multiplier %.4f for epsilon=%g over %d releases", sigma, config.target_epsilon, config.num_server_rounds)
    context.state[NOISE_STATE_KEY] = ConfigRecord({"key": key, "noise-multiplier": sigma})
    return sigma


@lru_cache(maxsize=4)
def _load_client_data(
    dataset: str, data_dir: str, partitioner: str, alpha: float, classes: int, seed: int,
    partition_id: int | None, num_partitions: int | None,
):
    data = load_dataset(dataset, data_dir=data_dir or None)
    if partition_id is None:
        return data.train_inputs, data.train_targets, data.num_classes
    inputs, targets = partition(
        data,
        partition_id=partition_id,
        num_partitions=num_partitions,
        partitioner=partitioner,
        alpha=alpha,
        classes_per_partition=classes,
        seed=seed,
    )
    return inputs, targets, data.num_classes


def client_data(config: RunConfig, node: NodeConfig) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Return (inputs, targets, num_classes) of this client's training data.

    The dataset is run-config ``dataset``, read from node-config ``data-dir``
    when set (else run-config ``data-dir``); the node keeps its partition, or
    the whole training split when it has no ``partition-id``. Loaded once per
    process and node config (:func:`clear_data_cache` resets), not per round.

    Raises:
        ValueError: if node-config ``data-dir`` is set for ``digits``, which
            ships with scikit-learn and reads no folder.
    """
    if node.data_dir is not None and config.dataset == "digits":
        raise ValueError(
            f"node config data-dir is set ({node.data_dir!r}) but dataset 'digits' ships with scikit-learn "
            "and reads no folder: use a dataset with local files, or partition-id/num-partitions"
        )
    return _load_client_data(
        config.dataset,
        node.data_dir if node.data_dir is not None else config.data_dir,
        config.partitioner,
        config.dirichlet_alpha,
        config.classes_per_partition,
        config.partition_seed,
        node.partition_id,
        node.num_partitions,
    )


def clear_data_cache() -> None:
    """Forget the data loaded in this process (tests, or a changed data-dir)."""
    _load_client_data.cache_clear()
