"""The ClientApp's train handler: Context + Message -> core DP-SIGN release -> reply.

Privacy: the reply carries only the packed signs and public numbers
(``num-examples`` n_m and the epsilon spent). No loss, accuracy or batch size.
"""

from __future__ import annotations

import json
from functools import lru_cache
from logging import INFO, WARNING

import torch
from flwr.app import ConfigRecord, Context, Error, Message
from flwr.common import log

from ..attacks import byzantine_signs, is_byzantine
from ..config import RunConfig, parse_run_config
from ..data import load_dataset, partition
from ..models import build_model, default_model
from ..packing import pack_signs
from ..privacy import calibrate_noise_multiplier
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
    release would push this client's epsilon above ``target-epsilon``.
    """
    config = parse_run_config(context.run_config)
    partition_id, num_partitions = node_partition(context)
    server_round = int(message.content[CONFIG_KEY].get(ROUND_KEY, 0)) if CONFIG_KEY in message.content else 0
    inputs, targets, classes = client_data(config, partition_id, num_partitions)
    ledger = load_ledger(context.state, accountant=config.accountant)
    noise_multiplier = planned_noise_multiplier(config, context)
    epsilon_after = ledger.epsilon_after(
        target_delta=config.target_delta, sample_rate=config.sample_rate, noise_multiplier=noise_multiplier
    )
    if not epsilon_after <= config.target_epsilon:
        spent = ledger.epsilon(config.target_delta)
        reason = (
            f"privacy budget exhausted: node {partition_id} has spent epsilon={spent:.4f} in "
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
    generator = client_generator(config.seed_value, partition_id=partition_id, server_round=server_round)
    settings = ReleaseSettings(
        sample_rate=config.sample_rate,
        clip_norm=config.clip_norm,
        noise_multiplier=noise_multiplier,
        clipping=config.clipping,
    )
    signs = client_release(model, inputs, targets, settings, generator=generator, gradient_noise=config.gradient_noise)
    if is_byzantine(partition_id, num_partitions, config.byzantine_fraction):
        signs = byzantine_signs(signs, attack=config.byzantine_attack, generator=generator)
    ledger.record(sample_rate=config.sample_rate, noise_multiplier=noise_multiplier)
    save_ledger(context.state, ledger)
    content = train_reply_content(pack_signs(signs), num_examples=inputs.shape[0], epsilon=epsilon_after)
    return Message(content, reply_to=message)


def node_partition(context: Context) -> tuple[int, int]:
    """Return (partition-id, num-partitions) from the node config.

    Raises:
        ValueError: if the node config lacks them or they are inconsistent.
    """
    node_config = context.node_config
    try:
        partition_id = int(node_config["partition-id"])
        num_partitions = int(node_config["num-partitions"])
    except KeyError as missing:
        raise ValueError(
            f"node config must set {missing.args[0]!r} (e.g. --node-config 'partition-id=0 num-partitions=3')"
        ) from None
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition-id must be in [0, {num_partitions}), got {partition_id}")
    return partition_id, num_partitions


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
def _load_partition(dataset: str, data_dir: str, partitioner: str, alpha: float, classes: int, seed: int, partition_id: int, num_partitions: int):
    data = load_dataset(dataset, data_dir=data_dir or None)
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


def client_data(config: RunConfig, partition_id: int, num_partitions: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Return (inputs, targets, num_classes) of this client's training partition.

    Loaded once per process and partition (:func:`clear_data_cache` resets), not per round.
    """
    return _load_partition(
        config.dataset,
        config.data_dir,
        config.partitioner,
        config.dirichlet_alpha,
        config.classes_per_partition,
        config.partition_seed,
        partition_id,
        num_partitions,
    )


def clear_data_cache() -> None:
    """Forget the partitions loaded in this process (tests, or a changed data-dir)."""
    _load_partition.cache_clear()
