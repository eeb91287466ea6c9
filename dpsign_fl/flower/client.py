"""The ClientApp's train handler: Message + Context -> one client round -> reply Message.

Privacy: the reply carries only the packed signs and the epsilon spent
(:mod:`dpsign_fl.flower.records`). No loss, accuracy, batch size or dataset size.

Who decides what (docs/privacy.md has the threat model):

- The budget is the smaller of the run config's (``target-epsilon`` at
  ``target-delta``) and the node's own cap (node-config ``max-epsilon`` at its
  ``delta``; a deployed node that sets none: epsilon 8 at delta 1e-5,
  :data:`dpsign_fl.flower.node.DEFAULT_NODE_MAX_EPSILON`), over every release in
  the node's ledger, across runs. A run that
  asks for more than the node's cap is not refused: the node plans its noise
  for its own cap and logs that it did.
- The ledger of a deployed node is a file (node-config ``ledger-path``, else
  one ``ledger-<digest>.json`` per data set in the node's own folder:
  :meth:`NodeConfig.durable_ledger_path`) unless the node opts into
  ``per-run-budget``; a simulated node keeps it in ``context.state``.
- Sampling and noise come from the OS's secure source, except in simulation
  with run-config ``reproducible-noise`` and on a node that sets its own
  ``noise-seed`` (experiments; not private against whoever knows the seed).
"""

from __future__ import annotations

import json
import traceback
from contextlib import contextmanager
from functools import lru_cache
from logging import ERROR, INFO, WARNING
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Error, Message
from flwr.common import log
from torch.nn import functional as F

from ..data import partition_dataset
from ..data.features import load_run_dataset
from ..release.mechanism import secure_generator
from ..vote.model_sync import ModelReplica, read_replica_file, write_replica_file
from ..models import build_model
from ..parameters import trainable_parameters
from ..privacy import PrivacyLedger, Release
from ..privacy.accounting import BudgetExhausted
from ..privacy.ledger_store import lock_ledger_file, read_ledger_file, write_ledger_file
from ..release import PerExampleTransform, ReleaseSettings, UnsafeRelease, seeded_generator
from ..rounds import Budget, FailedRelease, ReleasePlan, Refusal, client_round, plan_for_round, plan_release, planned_releases, refusal_reason
from ..settings import ConfigError, RunSettings, from_mapping, to_mapping
from .node import NodeConfig, data_identity, parse_node_config, running_in_simulation
from .records import (
    BUDGET_EXHAUSTED_CODE,
    CONFIG_KEY,
    INVALID_INSTRUCTION_CODE,
    NODE_ERROR_CODE,
    NODE_ERROR_REASON,
    NOISE_STATE_KEY,
    OUT_OF_SYNC_CODE,
    RELEASE_FAILED_CODE,
    ROUND_KEY,
    SYNC_ONLY_KEY,
    OutOfSync,
    load_ledger,
    load_momentum,
    load_replica,
    received_model,
    save_ledger,
    save_momentum,
    save_replica,
    sync_reply_content,
    train_reply_content,
)

class BadInstruction(ValueError):
    """The server's instruction (its run config) is invalid; the message is derived from the instruction alone."""


@contextmanager
def instruction_checks() -> Iterator[None]:
    """Turn a ConfigError raised inside the block into :class:`BadInstruction`.

    For blocks that check only what the server sent (the run config) or the
    app's own arguments: their messages may go back to the server.
    """
    try:
        yield
    except ConfigError as error:
        raise BadInstruction(str(error)) from None


def guarded_reply(message: Message, context: Context, work: Callable[[], Message]) -> Message:
    """Run ``work`` (a train handler's body); any error becomes one of the fixed, data-independent replies.

    Privacy: an error reply is sent before or instead of a release and costs no
    budget, so it must not depend on the node's data (a message such as "in
    [1, 9] (the classes present)" would tell whether an example is there, and
    could be asked for again and again). Only two kinds of error carry text:
    :class:`BadInstruction` and :class:`dpsign_fl.release.UnsafeRelease`, whose
    messages are functions of what the server sent (code
    :data:`INVALID_INSTRUCTION_CODE`). Every other exception is logged in full
    on the node only and answered with :data:`NODE_ERROR_CODE` and the fixed
    :data:`NODE_ERROR_REASON`. (The other codes, 4601-4603, are composed from
    public numbers: the ledger's release parameters, model digests.)
    """
    try:
        return work()
    except (BadInstruction, UnsafeRelease) as error:
        log(WARNING, "refusing the instruction: %s", error)
        return Message(Error(code=INVALID_INSTRUCTION_CODE, reason=str(error)), reply_to=message)
    except Exception:  # noqa: BLE001 - the reply must not carry the detail, whatever failed
        log(ERROR, "node %s could not prepare a release (the server is told only that it failed):\n%s",
            context.node_id, traceback.format_exc())
        return Message(Error(code=NODE_ERROR_CODE, reason=NODE_ERROR_REASON), reply_to=message)


def handle_train(
    message: Message, context: Context, *, simulation: bool | None = None, experiments: Any | None = None
) -> Message:
    """The shipped ClientApp's train handler: this node's DP-SIGN release, or its refusal.

    The model is run-config ``model`` (or the dataset's default) and the data
    this node's share of run-config ``dataset`` (:func:`client_data`); the rest
    is :func:`receive_model` and :func:`release_with_model`. Experiment-only
    settings (attacks, synthetic gradient noise, reproducible noise) take
    effect only in simulation; a deployed node ignores them with a warning and
    trains honestly with secure randomness.

    Args:
        message: the train instruction.
        context: this node's Flower context.
        simulation: whether this node is simulated; None = detect it
            (:func:`running_in_simulation`). In-process tests pass True.
        experiments: the experiments' seam, installed by the app
            (``client_app.py`` passes :data:`dpsign_fl.experiments.hooks.FLOWER_EXPERIMENTS`):
            ``asked(run_config)`` names the experiment-only settings a run
            config changes, ``client_hooks(run_config, client=, num_clients=)``
            gives a simulated client's per-example transform and reply
            transform. Used only in simulation; None = no experiments.

    Errors become fixed replies (:func:`guarded_reply`).
    """
    return guarded_reply(message, context, lambda: _train(message, context, simulation, experiments))


def _train(message: Message, context: Context, simulation: bool | None, experiments: Any | None) -> Message:
    with instruction_checks():
        settings = from_mapping(RunSettings, context.run_config)
        asked = {} if experiments is None else experiments.asked(context.run_config)
    node = parse_node_config(context.node_config)
    simulated = running_in_simulation() if simulation is None else simulation
    if not simulated:
        ignored = {**asked, **({"reproducible-noise": True} if settings.reproducible_noise else {})}
        if ignored:
            log(WARNING, "ignoring experiment-only run-config settings on a deployed node: %s", ignored)
    settings, overridden = node.data_settings(settings, simulated)
    if overridden:
        log(INFO, "this node decides which examples it trains on: run-config %s ignored, using %s",
            overridden, {key: value for key, value in to_mapping(settings).items() if key in overridden})
    received = receive_model(message, context, node, simulated)
    if isinstance(received, Message):
        return received
    inputs, targets, classes = client_data(settings, node)
    model = build_model(
        settings.model_name, input_shape=tuple(inputs.shape[1:]), num_classes=classes, **settings.model_options
    )
    hooks = None
    if simulated and experiments is not None:
        with instruction_checks():
            hooks = experiments.client_hooks(
                context.run_config, client=node.client_number(context.node_id), num_clients=node.num_partitions
            )
    return release_with_model(
        message, context, received, model, inputs, targets, settings, node, simulated,
        identity=data_identity(settings, node),
        per_example_transform=None if hooks is None else hooks.per_example_transform,
        reply_transform=None if hooks is None else hooks.reply_transform,
    )


def receive_model(
    message: Message, context: Context, node: NodeConfig, simulated: bool, *, model: torch.nn.Module | None = None
) -> ModelReplica | Message:
    """Bring this node's replica to the model the instruction names; return it, or the reply to send.

    The replica (:class:`ReplicaStore`) is updated from the votes or the full
    model and saved before any release. Returns a Message instead for a
    sync-only instruction (its acknowledgement) or when the votes do not apply
    to the model this node holds (error :data:`OUT_OF_SYNC_CODE`: the server
    then sends the model).
    """
    config = message.content[CONFIG_KEY] if CONFIG_KEY in message.content else {}
    replicas = ReplicaStore(node, context, simulated)
    try:
        replica = received_model(message.content, replicas.load())
    except OutOfSync as error:
        return Message(Error(code=OUT_OF_SYNC_CODE, reason=str(error)), reply_to=message)
    replicas.save(replica)
    if config.get(SYNC_ONLY_KEY, False):
        return Message(sync_reply_content(replica), reply_to=message)
    return replica


def release_with_model(
    message: Message,
    context: Context,
    replica: ModelReplica,
    model: torch.nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    settings: RunSettings,
    node: NodeConfig,
    simulated: bool,
    *,
    identity: Mapping[str, Any],
    loss_fn=F.cross_entropy,
    per_example_transform: PerExampleTransform | None = None,
    reply_transform: Callable[[np.ndarray, int, torch.Generator], np.ndarray] | None = None,
) -> Message:
    """One client round at the replica's model, with the node's ledger; the reply Message.

    Refuses (an error reply with :data:`BUDGET_EXHAUSTED_CODE`) when the next
    release would push this node's ledger past its budget (module docstring).
    The ledger is read at the start (a file: under a lock) and written right
    after the release is recorded, before the reply leaves. ``identity`` names
    the data set the examples come from: a deployed node's default ledger file
    is kept per data set (:meth:`NodeConfig.durable_ledger_path`). The two
    transforms are the experiments' seam (simulation only, :func:`handle_train`):
    the reply transform replaces the packed signs after the honest release was
    recorded.
    """
    server_round = int(message.content[CONFIG_KEY].get(ROUND_KEY, 0)) if CONFIG_KEY in message.content else 0
    budget = node_budget(settings, node, simulated)
    name = node.name(context.node_id)
    client = node.client_number(context.node_id)
    load_replica_into_model(model, replica)
    ledger_file = node.durable_ledger_path(simulated, identity)
    legacy = node.legacy_ledger_path() if ledger_file is not None and node.ledger_path is None else None
    with open_ledger(ledger_file, context, accountant=settings.accountant, legacy=legacy) as (ledger, save):
        plan = run_plan(settings, budget, ledger, context)
        if isinstance(plan, str):
            log(WARNING, "%s: %s", name, plan)
            return Message(Error(code=BUDGET_EXHAUSTED_CODE, reason=f"{name}: {plan}"), reply_to=message)
        plan = plan_for_round(plan, settings, server_round)
        generator = client_randomness(
            settings, node, simulated, client=client, server_round=server_round, releases=ledger.num_releases
        )
        momentum = load_momentum(context.state, settings.client_momentum)
        outcome = client_round(
            model, inputs, targets, plan, ledger, generator=generator, loss_fn=loss_fn,
            per_example_transform=per_example_transform, momentum=momentum,
        )
        if isinstance(outcome, Refusal):
            log(WARNING, "%s: %s", name, outcome.reason)
            return Message(Error(code=BUDGET_EXHAUSTED_CODE, reason=f"{name}: {outcome.reason}"), reply_to=message)
        save(ledger)
        if isinstance(outcome, FailedRelease):
            log(WARNING, "%s: %s (%s)", name, outcome.reason, outcome.error_type)
            return Message(Error(code=RELEASE_FAILED_CODE, reason=outcome.reason), reply_to=message)
        save_momentum(context.state, momentum)
        epsilon = ledger.epsilon(budget.target_delta)
    packed = outcome.packed
    if reply_transform is not None:
        packed = reply_transform(packed, replica.weights.shape[0], generator)
    return Message(train_reply_content(packed, epsilon=epsilon), reply_to=message)


def load_replica_into_model(model: torch.nn.Module, replica: ModelReplica) -> None:
    """Set ``model``'s parameters and buffers from the replica.

    Raises:
        BadInstruction: if the replica's trainable arrays are not exactly the
            model's trainable parameters (names, in order), or it holds an
            array the model does not have (names only: the server's model
            against the app's model class, not the data).
    """
    names = tuple(name for name, _ in trainable_parameters(model))
    if names != replica.trainable:
        raise BadInstruction(
            f"the server's trainable arrays {list(replica.trainable)[:6]} are not this model's trainable parameters "
            f"{list(names)[:6]} (names, in parameters() order): pass trainable=[...] to SignMajorityVote"
        )
    state = model.state_dict()
    unknown = [name for name in replica.arrays if name not in state]
    if unknown:
        raise BadInstruction(f"the server's model holds arrays this model does not have: {unknown[:6]}")
    with torch.no_grad():
        for name, array in replica.arrays.items():
            state[name].copy_(torch.from_numpy(np.ascontiguousarray(array)).view_as(state[name]))


class ReplicaStore:
    """Where this node keeps its copy of the global model between rounds.

    Simulation: ``context.state``. A deployed node:
    ``model-node<node id>-run<run id>.npz`` in its own folder (the replica then
    survives a SuperNode restart; SuperNodes sharing a folder keep theirs apart);
    this node's files of other runs are removed when it is written.
    """

    def __init__(self, node: NodeConfig, context: Context, simulated: bool) -> None:
        self.context = context
        self.prefix = f"model-node{context.node_id}-run"
        self.path = None if simulated else node.folder() / f"{self.prefix}{context.run_id}.npz"

    def load(self) -> ModelReplica | None:
        if self.path is None:
            return load_replica(self.context.state)
        return read_replica_file(self.path) if self.path.exists() else None

    def save(self, replica: ModelReplica) -> None:
        if self.path is None:
            save_replica(self.context.state, replica)
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_replica_file(self.path, replica)
        for other in self.path.parent.glob(f"{self.prefix}*.npz"):
            if other != self.path:
                other.unlink(missing_ok=True)


def node_budget(settings: RunSettings, node: NodeConfig, simulated: bool) -> Budget:
    """The budget this node accepts for the run: the run config's, never above the node's cap (:meth:`NodeConfig.cap`)."""
    cap = node.cap(simulated)
    if cap is None:
        return Budget(settings.target_epsilon, settings.target_delta)
    return Budget(min(settings.target_epsilon, cap[0]), min(settings.target_delta, cap[1]))


def client_randomness(
    settings: RunSettings, node: NodeConfig, simulated: bool, *, client: int, server_round: int, releases: int
) -> torch.Generator:
    """The generator of this round's sampling and noise (module docstring: who may fix it).

    A node's own ``noise-seed`` picks the stream by ``releases`` (the releases its
    ledger holds), not by the server's round number: a server that sends one
    round number twice, or a second run that counts from round 1 again, would
    otherwise get the same sample and noise for two releases of other models.
    """
    if node.noise_seed is not None:
        return seeded_generator(node.noise_seed, client=client, stream=releases)
    if simulated and settings.reproducible_noise:
        return seeded_generator(settings.noise_seed, client=client, stream=server_round)
    return secure_generator()


@contextmanager
def open_ledger(
    ledger_file: Path | None, context: Context, *, accountant: str, legacy: Path | None = None
) -> Iterator[tuple[PrivacyLedger, Callable[[PrivacyLedger], None]]]:
    """Yield (ledger, save) for this node; call ``save(ledger)`` after recording a release.

    With a ledger file, the file is locked for the whole block and is the
    source of truth (``context.state`` does not hold the ledger); without one
    the ledger lives in ``context.state`` (one run). A ledger file that does
    not exist yet starts from ``legacy`` when that file exists (the single
    default ledger of earlier versions: its releases may have used these
    examples, and counting them again is safe).

    Raises:
        LedgerFileError: if the ledger file is unusable (see
            :func:`dpsign_fl.privacy.ledger_store.read_ledger_file`).
    """
    if ledger_file is None:
        yield load_ledger(context.state, accountant=accountant), lambda ledger: save_ledger(context.state, ledger)
        return
    ledger_file.parent.mkdir(parents=True, exist_ok=True)
    with lock_ledger_file(ledger_file):
        source = legacy if legacy is not None and not ledger_file.exists() and legacy.exists() else ledger_file
        ledger = read_ledger_file(source, accountant=accountant)
        log(INFO, "privacy ledger %s: %d releases%s", ledger_file, ledger.num_releases,
            f" (carried over from {source})" if source != ledger_file else "")
        yield ledger, lambda updated: write_ledger_file(ledger_file, updated)


def run_plan(settings: RunSettings, budget: Budget, ledger: PrivacyLedger, context: Context) -> ReleasePlan | str:
    """This run's release plan, made at the node's first message of the run and kept in ``context.state``.

    The plan fixes sigma for the whole run (the budget holds because every
    release of the run uses it), planned for :func:`planned_releases` releases
    (run-config ``participation`` and ``participation-margin``) after the releases the ledger already
    holds; a server that samples this node more often is refused once the
    budget is spent. It is kept in the state because a deployed ClientApp runs
    in a fresh process for every message. Returns the reason instead when the
    ledger has already spent the budget.
    """
    key = json.dumps(
        [budget.target_epsilon, budget.target_delta, settings.sample_rate, settings.num_rounds,
         settings.participation, settings.participation_margin, settings.accountant, settings.clip_norm, settings.clipping]
    )
    stored = context.state[NOISE_STATE_KEY] if NOISE_STATE_KEY in context.state else None
    if stored is not None and stored.get("key") == key:
        prior = tuple(Release(*entry) for entry in json.loads(stored["prior"]))
        release = ReleaseSettings(
            settings.sample_rate, settings.clip_norm, float(stored["noise-multiplier"]), settings.clipping,
            adversarial=settings.adversarial,
        )
        return ReleasePlan(release, planned_releases(settings), budget, prior)
    if (budget.target_epsilon, budget.target_delta) != (settings.target_epsilon, settings.target_delta):
        log(WARNING, "the run asks for epsilon %g at delta %g; this node's cap is epsilon %g at delta %g: "
            "planning for the cap", settings.target_epsilon, settings.target_delta, budget.target_epsilon,
            budget.target_delta)
    try:
        plan = plan_release(settings, budget, ledger.releases)
    except BudgetExhausted:
        return refusal_reason(ledger.epsilon(budget.target_delta), ledger.num_releases, budget)
    log(INFO, "planned noise multiplier %.4f for %d releases in %d rounds (participation %g) within epsilon %g at "
        "delta %g (after %d earlier releases)", plan.release.noise_multiplier, plan.num_releases, settings.num_rounds,
        settings.participation, budget.target_epsilon, budget.target_delta, ledger.num_releases)
    context.state[NOISE_STATE_KEY] = ConfigRecord(
        {"key": key, "noise-multiplier": plan.release.noise_multiplier,
         "prior": json.dumps([[r.sample_rate, r.noise_multiplier, r.count] for r in plan.prior])}
    )
    return plan


@lru_cache(maxsize=2)
def _dataset(data_settings: tuple):
    settings = from_mapping(RunSettings, dict(data_settings))
    return load_run_dataset(settings)


@lru_cache(maxsize=2)
def _partitions(data_settings: tuple, num_partitions: int) -> tuple[torch.Tensor, ...]:
    # Every partition at once, so that the nodes a process serves (a Ray actor
    # serves many simulated nodes) share one partitioning.
    settings = from_mapping(RunSettings, dict(data_settings))
    shares = partition_dataset(
        _dataset(data_settings),
        num_partitions=num_partitions,
        partitioner=settings.partitioner,
        alpha=settings.dirichlet_alpha,
        classes_per_partition=settings.classes_per_partition,
        seed=settings.data_seed,
    )
    return tuple(torch.from_numpy(np.asarray(indices, dtype=np.int64)) for indices in shares)


_DATA_KEYS = ("dataset", "model", "data-dir", "partitioner", "dirichlet-alpha", "classes-per-partition", "data-seed")


def client_data(settings: RunSettings, node: NodeConfig) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Return (inputs, targets, num_classes) of this client's training data.

    The dataset is run-config ``dataset``, read from node-config ``data-dir``
    when set (else run-config ``data-dir``); the node keeps its partition, or
    the whole training split when it has no ``partition-id``. Loaded once per
    process (the dataset and its partitioning, shared by every node the process
    serves; :func:`clear_data_cache` resets), not per round.

    Raises:
        ValueError: if node-config ``data-dir`` is set for ``digits``, which
            ships with scikit-learn and reads no folder.
    """
    if node.partition_id is None and node.data_dir is None:
        raise ConfigError(
            "node config must set 'partition-id' and 'num-partitions' (e.g. --node-config "
            "'partition-id=0 num-partitions=3'), or 'data-dir' (e.g. --node-config 'data-dir=\"/data\"')"
        )
    if node.data_dir is not None and settings.dataset == "digits":
        raise ValueError(
            f"node config data-dir is set ({node.data_dir!r}) but dataset 'digits' ships with scikit-learn "
            "and reads no folder: use a dataset with local files, or partition-id/num-partitions"
        )
    values = to_mapping(settings)
    if node.data_dir is not None:
        values["data-dir"] = node.data_dir
    key = tuple((name, values[name]) for name in _DATA_KEYS)
    data = _dataset(key)
    if node.partition_id is None:
        return data.train_inputs, data.train_targets, data.num_classes
    index = _partitions(key, node.num_partitions)[node.partition_id]
    return data.train_inputs[index], data.train_targets[index], data.num_classes


def clear_data_cache() -> None:
    """Forget the data loaded in this process (tests, or a changed data-dir)."""
    _dataset.cache_clear()
    _partitions.cache_clear()
