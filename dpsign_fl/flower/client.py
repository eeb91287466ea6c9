"""The ClientApp's train handler: Message + Context -> one client round -> reply Message.

Privacy: the reply carries only the packed signs and the epsilon spent
(:mod:`dpsign_fl.flower.records`). No loss, accuracy, batch size or dataset size.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from functools import lru_cache
from logging import INFO, WARNING
from typing import Callable, Iterator

import torch
from flwr.app import ConfigRecord, Context, Error, Message
from flwr.common import log

from ..attacks import byzantine_payload, is_byzantine
from ..data import load_dataset, partition
from ..mechanism import secure_generator
from ..models import build_model
from ..privacy import PrivacyLedger
from ..privacy.ledger_store import lock_ledger_file, read_ledger_file, write_ledger_file
from ..release import ReleaseSettings, seeded_generator
from ..rounds import Budget, Refusal, client_round, plan_release
from ..settings import RunSettings, from_mapping, to_mapping
from .node import NodeConfig, parse_node_config, running_in_simulation
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


def handle_train(message: Message, context: Context, *, simulation: bool | None = None) -> Message:
    """Make this client's DP-SIGN release for the received model, or refuse.

    Refuses (an error reply with :data:`BUDGET_EXHAUSTED_CODE`) when the next
    release would push this client's epsilon above ``target-epsilon``. The
    ledger is the file named by node-config ``ledger-path`` when set (read at
    the start of every message under a lock, rewritten right after the
    release is recorded and before the reply leaves), else ``context.state``.

    Experiment-only settings (Byzantine attacks, synthetic gradient noise,
    reproducible noise) take effect only in simulation; a deployed node
    ignores them with a warning and trains honestly with secure randomness.

    Args:
        message: the train instruction (model arrays and the round number).
        context: this node's Flower context.
        simulation: whether this node is simulated; None = detect it
            (:func:`running_in_simulation`). In-process tests pass True.
    """
    settings = from_mapping(RunSettings, context.run_config)
    node = parse_node_config(context.node_config)
    simulated = running_in_simulation() if simulation is None else simulation
    if not simulated and settings.experiment_only:
        log(WARNING, "ignoring experiment-only run-config settings on a deployed node: %s", settings.experiment_only)
    server_round = int(message.content[CONFIG_KEY].get(ROUND_KEY, 0)) if CONFIG_KEY in message.content else 0
    inputs, targets, classes = client_data(settings, node)
    release = release_plan(settings, context)
    client = node.client_number(context.node_id)
    with open_ledger(node, context, accountant=settings.accountant) as (ledger, save):
        model = build_model(settings.model_name, input_shape=tuple(inputs.shape[1:]), num_classes=classes)
        load_arrays_into_model(model, message.content[ARRAYS_KEY])
        if simulated and settings.reproducible_noise:
            generator = seeded_generator(settings.noise_seed, client=client, server_round=server_round)
        else:
            generator = secure_generator()
        outcome = client_round(
            model,
            inputs,
            targets,
            release,
            ledger,
            Budget(settings.target_epsilon, settings.target_delta),
            generator=generator,
            gradient_noise=settings.gradient_noise if simulated else "none",
        )
        if isinstance(outcome, Refusal):
            reason = f"{node.name(context.node_id)}: {outcome.reason}"
            log(WARNING, reason)
            return Message(Error(code=BUDGET_EXHAUSTED_CODE, reason=reason), reply_to=message)
        save(ledger)
    packed = outcome.packed
    if simulated and node.partition_id is not None and is_byzantine(client, node.num_partitions, settings.byzantine_fraction):
        d = sum(p.numel() for p in model.parameters() if p.requires_grad)
        packed = byzantine_payload(packed, d, attack=settings.byzantine_attack, generator=generator)
    return Message(train_reply_content(packed, epsilon=outcome.epsilon), reply_to=message)


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


def release_plan(settings: RunSettings, context: Context) -> ReleaseSettings:
    """Return this run's release settings, planned once per run and kept in ``context.state``.

    The plan (:func:`dpsign_fl.rounds.plan_release`) must stay fixed for the
    whole run: the budget holds because every release of the run uses it. It
    is kept in the state rather than recomputed because a deployed ClientApp
    runs in a fresh process for every message.
    """
    key = json.dumps(
        [settings.target_epsilon, settings.target_delta, settings.sample_rate, settings.num_rounds,
         settings.accountant, settings.clip_norm, settings.clipping]
    )
    stored = context.state[NOISE_STATE_KEY] if NOISE_STATE_KEY in context.state else None
    if stored is not None and stored.get("key") == key:
        return ReleaseSettings(
            sample_rate=settings.sample_rate,
            clip_norm=settings.clip_norm,
            noise_multiplier=float(stored["noise-multiplier"]),
            clipping=settings.clipping,
        )
    release = plan_release(settings)
    log(INFO, "calibrated noise multiplier %.4f for epsilon=%g over %d releases",
        release.noise_multiplier, settings.target_epsilon, settings.num_rounds)
    context.state[NOISE_STATE_KEY] = ConfigRecord({"key": key, "noise-multiplier": release.noise_multiplier})
    return release


@lru_cache(maxsize=4)
def _load_client_data(data_settings: tuple, partition_id: int | None, num_partitions: int | None):
    settings = from_mapping(RunSettings, dict(data_settings))
    data = load_dataset(settings.dataset, data_dir=settings.data_dir or None, seed=settings.data_seed)
    if partition_id is None:
        return data.train_inputs, data.train_targets, data.num_classes
    inputs, targets = partition(
        data,
        partition_id=partition_id,
        num_partitions=num_partitions,
        partitioner=settings.partitioner,
        alpha=settings.dirichlet_alpha,
        classes_per_partition=settings.classes_per_partition,
        seed=settings.data_seed,
    )
    return inputs, targets, data.num_classes


_DATA_KEYS = ("dataset", "data-dir", "partitioner", "dirichlet-alpha", "classes-per-partition", "data-seed")


def client_data(settings: RunSettings, node: NodeConfig) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Return (inputs, targets, num_classes) of this client's training data.

    The dataset is run-config ``dataset``, read from node-config ``data-dir``
    when set (else run-config ``data-dir``); the node keeps its partition, or
    the whole training split when it has no ``partition-id``. Loaded once per
    process and node config (:func:`clear_data_cache` resets), not per round.

    Raises:
        ValueError: if node-config ``data-dir`` is set for ``digits``, which
            ships with scikit-learn and reads no folder.
    """
    if node.data_dir is not None and settings.dataset == "digits":
        raise ValueError(
            f"node config data-dir is set ({node.data_dir!r}) but dataset 'digits' ships with scikit-learn "
            "and reads no folder: use a dataset with local files, or partition-id/num-partitions"
        )
    values = to_mapping(settings)
    if node.data_dir is not None:
        values["data-dir"] = node.data_dir
    key = tuple((name, values[name]) for name in _DATA_KEYS)
    return _load_client_data(key, node.partition_id, node.num_partitions)


def clear_data_cache() -> None:
    """Forget the data loaded in this process (tests, or a changed data-dir)."""
    _load_client_data.cache_clear()
