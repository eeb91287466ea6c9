"""Conversions between the core's objects and Flower records; the wire keys live here only.

Train instruction (server -> client), a ``RecordDict`` with ``"config"`` (a
ConfigRecord: ``server-round``; with the vote downlink also ``model-digest``,
the update rule ``learning-rate``, ``lr-schedule``, ``server-momentum``,
``step-scale`` (0 unless automatic steps), ``num-rounds``, and ``sync-only``) and either

- the full model: ``"arrays"`` (every array of the model, buffers too),
  ``"server-state"`` (``update-state``, the update rule's state: momentum or vote agreement, when there is one) and
  config ``trainable`` (the names the signs and votes cover); or
- the votes the client missed: ``"votes"``, one uint8 Array per round named by
  the round number (:func:`dpsign_fl.vote.packing.pack_vote`: 1 bit per coordinate
  without ties, 1.6 with), with config ``vote-rounds`` and ``base-digest`` (the
  model they apply to). :mod:`dpsign_fl.vote.model_sync` has the digest and the replay.

Train reply (client -> server), a ``RecordDict`` with exactly:

- ``"arrays"``: ArrayRecord with one Array ``"signs"``: the packed signs
  (:mod:`dpsign_fl.vote.packing` gives the bit order; coordinates follow the order
  of the trainable arrays of the global model, each flattened row-major), as
  raw bytes: dtype ``uint8``, shape ``[ceil(d/8)]``, stype
  :data:`PACKED_STYPE`, exactly ``ceil(d/8)`` bytes of data (no ``.npy``
  header: 1 bit per coordinate on the wire). Votes on the downlink travel the
  same way.
- ``"metrics"``: MetricRecord with exactly ``"epsilon"``, the epsilon the
  client has spent with this release (a function of q, sigma and its number of
  releases: public). Nothing else: under add/remove-one neighbours even the
  dataset size n_m would tell D from D minus one example.
"""

from __future__ import annotations

import json

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from ..vote.model_sync import BATCHNORM_STATISTICS, ModelReplica, UpdateRule, check_trainable
from ..vote.packing import payload_bytes, unpack_vote
from ..parameters import flatten, trainable_parameters, unflatten
from ..privacy import PrivacyLedger
from ..release.momentum import ClientMomentum

ARRAYS_KEY = "arrays"
CONFIG_KEY = "config"
METRICS_KEY = "metrics"
SIGNS_KEY = "signs"
EPSILON_KEY = "epsilon"
ROUND_KEY = "server-round"
LEDGER_STATE_KEY = "dpsign-ledger"
NOISE_STATE_KEY = "dpsign-noise"
MOMENTUM_STATE_KEY = "dpsign-momentum"
VOTES_KEY = "votes"
SERVER_STATE_KEY = "server-state"
SYNC_KEY = "sync"
DIGEST_KEY = "model-digest"
BASE_DIGEST_KEY = "base-digest"
VOTE_ROUNDS_KEY = "vote-rounds"
TRAINABLE_KEY = "trainable"
SYNC_ONLY_KEY = "sync-only"
REPLICA_ARRAYS_KEY = "dpsign-model"
REPLICA_STATE_KEY = "dpsign-model-state"
REPLICA_META_KEY = "dpsign-model-meta"
BUDGET_EXHAUSTED_CODE = 4601
"""Error reply: one more release would exceed the node's privacy budget."""
RELEASE_FAILED_CODE = 4602
"""Error reply: a release failed after its data was sampled (counted in the ledger)."""
OUT_OF_SYNC_CODE = 4603
"""Error reply: the client does not hold the model the votes apply to (the server resends the model)."""
INVALID_INSTRUCTION_CODE = 4604
"""Error reply: the run config or the model the server sent cannot be released at; the reason is
derived from the instruction alone (a bad run-config value, a model entry out of range)."""
NODE_ERROR_CODE = 4605
"""Error reply: anything else failed before a release. The reason is always :data:`NODE_ERROR_REASON`;
the detail (which may describe the node's data) goes only to the node's own log."""
NODE_ERROR_REASON = "this node could not prepare a release; the reason is in the node's own log"
"""The one reason a :data:`NODE_ERROR_CODE` reply carries."""
NPY_HEADER_BYTES = 128
"""The header of an Array serialised as ``.npy`` (the model's arrays on a full sync)."""
PACKED_STYPE = "dpsign-fl.packed-bits"
"""The Array serialisation type of packed signs and votes: their bytes, nothing else."""
MAX_REPORTED_EPSILON = 1e6
"""Above this a reported epsilon is treated as absurd and the reply dropped."""


class InvalidReply(ValueError):
    """A train reply that does not follow the wire format; the message says why."""


def model_to_arrays(model: torch.nn.Module) -> ArrayRecord:
    """Return the model's trainable parameters, in ``parameters()`` order, then its frozen statistics.

    The statistics are the buffers named as BatchNorm's
    (:data:`dpsign_fl.vote.model_sync.BATCHNORM_STATISTICS`, e.g. the public
    statistics of ``tanh-cnn-public-norm``): they travel with the model on a
    full sync and the votes never move them (:func:`dpsign_fl.vote.model_sync.default_trainable`).
    """
    arrays = {name: Array(p.detach().cpu().numpy()) for name, p in trainable_parameters(model)}
    arrays.update({name: Array(b.detach().cpu().numpy()) for name, b in _statistics(model).items()})
    return ArrayRecord(array_dict=arrays)


def _statistics(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {
        name: b for name, b in model.named_buffers() if b.is_floating_point() and name.endswith(BATCHNORM_STATISTICS)
    }


def arrays_to_flat(arrays: ArrayRecord) -> np.ndarray:
    """Concatenate all arrays of a record, flattened, in the record's order (float32)."""
    return flatten(array.numpy() for array in arrays.values())


def flat_to_arrays(flat: np.ndarray, template: ArrayRecord) -> ArrayRecord:
    """Split a flat vector back into a record shaped like ``template``.

    Raises:
        ValueError: if the sizes do not match.
    """
    shapes = {name: (tuple(array.shape), np.dtype(array.dtype)) for name, array in template.items()}
    return ArrayRecord(array_dict={name: Array(value) for name, value in unflatten(flat, shapes).items()})


def num_coordinates(arrays: ArrayRecord) -> int:
    """Return d, the total number of entries of the record's arrays."""
    return sum(int(np.prod(array.shape)) for array in arrays.values())


def load_arrays_into_model(model: torch.nn.Module, arrays: ArrayRecord) -> None:
    """Copy a record from :func:`model_to_arrays` into ``model``.

    Raises:
        ValueError: if names or shapes differ from the model's trainable parameters and statistics.
    """
    params = dict(trainable_parameters(model)) | _statistics(model)
    if list(arrays.keys()) != list(params.keys()):
        raise ValueError(
            f"model arrays must be named {list(params.keys())} in that order, got {list(arrays.keys())}"
        )
    with torch.no_grad():
        for name, array in arrays.items():
            value = torch.from_numpy(np.ascontiguousarray(array.numpy()))
            if value.shape != params[name].shape:
                raise ValueError(f"array {name!r} must have shape {tuple(params[name].shape)}, got {tuple(value.shape)}")
            params[name].copy_(value)


def train_reply_content(packed: np.ndarray, *, epsilon: float) -> RecordDict:
    """Build the content of a train reply (see the module docstring)."""
    return RecordDict(
        {
            ARRAYS_KEY: ArrayRecord(array_dict={SIGNS_KEY: packed_array(packed)}),
            METRICS_KEY: MetricRecord({EPSILON_KEY: float(epsilon)}),
        }
    )


def packed_array(packed: np.ndarray) -> Array:
    """An Array holding packed bits as raw bytes (:data:`PACKED_STYPE`)."""
    packed = np.ascontiguousarray(packed, dtype=np.uint8)
    return Array(dtype="uint8", shape=(int(packed.shape[0]),), stype=PACKED_STYPE, data=packed.tobytes())


def packed_bytes(array: Array, expected: int, *, name: str) -> np.ndarray:
    """The packed bits an Array carries, after checking its type, dtype, shape and length.

    Raises:
        ValueError: naming what is wrong.
    """
    if array.stype != PACKED_STYPE:
        raise ValueError(f"{name} must be serialised as {PACKED_STYPE!r} (raw packed bits), got {array.stype!r}")
    if array.dtype != "uint8":
        raise ValueError(f"{name} must have dtype uint8, got {array.dtype}")
    if list(array.shape) != [expected]:
        raise ValueError(f"{name} must have shape [{expected}], got {list(array.shape)}")
    if not isinstance(array.data, bytes) or len(array.data) != expected:
        raise ValueError(f"{name} must hold exactly {expected} bytes, got {len(array.data)}")
    return np.frombuffer(array.data, dtype=np.uint8)


def parse_train_reply(content: RecordDict, num_coordinates: int) -> tuple[np.ndarray, float, int]:
    """Validate a train reply and return (packed signs, epsilon, payload bytes).

    Raises:
        InvalidReply: naming what is wrong (keys, dtype, length, metric values).
    """
    if set(content.keys()) != {ARRAYS_KEY, METRICS_KEY}:
        raise InvalidReply(f"reply must hold exactly {[ARRAYS_KEY, METRICS_KEY]}, got {sorted(content.keys())}")
    arrays, metrics = content[ARRAYS_KEY], content[METRICS_KEY]
    if not isinstance(arrays, ArrayRecord) or not isinstance(metrics, MetricRecord):
        raise InvalidReply("reply must hold an ArrayRecord 'arrays' and a MetricRecord 'metrics'")
    if list(arrays.keys()) != [SIGNS_KEY]:
        raise InvalidReply(f"arrays must hold exactly one array {SIGNS_KEY!r}, got {list(arrays.keys())}")
    signs = arrays[SIGNS_KEY]
    try:
        packed = packed_bytes(signs, payload_bytes(num_coordinates), name="signs")
    except ValueError as error:
        raise InvalidReply(str(error)) from None
    if list(metrics.keys()) != [EPSILON_KEY]:
        raise InvalidReply(f"metrics must hold exactly [{EPSILON_KEY!r}], got {sorted(metrics.keys())}")
    epsilon = metrics[EPSILON_KEY]
    if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or not (0 <= epsilon <= MAX_REPORTED_EPSILON):
        raise InvalidReply(f"{EPSILON_KEY} must be a finite number in [0, {MAX_REPORTED_EPSILON:g}], got {epsilon!r}")
    return packed, float(epsilon), len(signs.data)


def load_ledger(state: RecordDict, *, accountant: str) -> PrivacyLedger:
    """Return the ledger kept in a Flower ``context.state`` (a new one if absent)."""
    if LEDGER_STATE_KEY not in state:
        return PrivacyLedger(accountant=accountant)
    return PrivacyLedger.from_dict(json.loads(state[LEDGER_STATE_KEY]["json"]))


def save_ledger(state: RecordDict, ledger: PrivacyLedger) -> None:
    """Store ``ledger`` in a Flower ``context.state``."""
    state[LEDGER_STATE_KEY] = ConfigRecord({"json": json.dumps(ledger.to_dict())})


class OutOfSync(ValueError):
    """The client does not hold the model the server's votes apply to; it needs the full model."""


def instruction_config(server_round: int, *, digest: str, rule: UpdateRule, sync_only: bool = False) -> dict:
    """The config entries of a vote-downlink instruction (module docstring)."""
    return {
        ROUND_KEY: int(server_round), DIGEST_KEY: digest, SYNC_ONLY_KEY: bool(sync_only),
        "learning-rate": float(rule.learning_rate), "lr-schedule": rule.schedule,
        "server-momentum": float(rule.momentum), "num-rounds": int(rule.num_rounds),
        "step-scale": float(rule.step_scale or 0.0),
    }


def full_model_content(arrays: ArrayRecord, trainable, update_state: np.ndarray | None, config: dict) -> RecordDict:
    """An instruction carrying the whole model (and the server momentum)."""
    content = {ARRAYS_KEY: arrays, CONFIG_KEY: ConfigRecord({**config, TRAINABLE_KEY: list(trainable)})}
    if update_state is not None:
        content[SERVER_STATE_KEY] = ArrayRecord(array_dict={"update-state": Array(np.asarray(update_state, dtype=np.float32))})
    return RecordDict(content)


def votes_content(votes: list[tuple[int, np.ndarray]], base_digest: str, config: dict) -> RecordDict:
    """An instruction carrying the packed votes ``(round, pack_vote(...))`` the client missed."""
    return RecordDict(
        {
            VOTES_KEY: ArrayRecord(array_dict={str(r): packed_array(packed) for r, packed in votes}),
            CONFIG_KEY: ConfigRecord({**config, BASE_DIGEST_KEY: base_digest, VOTE_ROUNDS_KEY: [r for r, _ in votes]}),
        }
    )


def content_bytes(content: RecordDict) -> int:
    """The array payload bytes of a message content (what ``downlink-bytes`` counts)."""
    return sum(len(array.data) for record in content.array_records.values() for array in record.values())


def received_model(content: RecordDict, stored: ModelReplica | None) -> ModelReplica:
    """The model an instruction brings this client to, from the full model or the votes.

    Raises:
        OutOfSync: if the votes apply to a model the client does not hold, or
            the result's digest is not the one the server announced.
        ValueError: if the content is malformed.
    """
    config = content[CONFIG_KEY]
    if ARRAYS_KEY in content:
        arrays = {name: array.numpy() for name, array in content[ARRAYS_KEY].items()}
        trainable = check_trainable(arrays, config[TRAINABLE_KEY]) if TRAINABLE_KEY in config else tuple(arrays)
        update_state = content[SERVER_STATE_KEY]["update-state"].numpy() if SERVER_STATE_KEY in content else None
        replica = ModelReplica(arrays, trainable, update_state)
    elif VOTES_KEY in content:
        if stored is None or stored.digest != config[BASE_DIGEST_KEY]:
            raise OutOfSync("this client does not hold the model the votes apply to")
        d = stored.weights.shape[0]
        records = content[VOTES_KEY]
        votes = [
            (int(r), unpack_vote(packed_bytes(records[str(r)], records[str(r)].shape[0], name="vote"), d))
            for r in config[VOTE_ROUNDS_KEY]
        ]
        replica = stored.replay(votes, update_rule(config))
    else:
        raise ValueError(f"an instruction must hold {ARRAYS_KEY!r} or {VOTES_KEY!r}, got {sorted(content.keys())}")
    if DIGEST_KEY in config and replica.digest != config[DIGEST_KEY]:
        raise OutOfSync("the model this client reached does not match the server's digest")
    return replica


def update_rule(config: ConfigRecord) -> UpdateRule:
    """The server's update rule, from an instruction's config."""
    return UpdateRule(
        learning_rate=float(config["learning-rate"]), schedule=str(config["lr-schedule"]),
        momentum=float(config["server-momentum"]), num_rounds=int(config["num-rounds"]),
        step_scale=float(config["step-scale"]) or None,
    )


def sync_reply_content(replica: ModelReplica) -> RecordDict:
    """The reply to a sync-only instruction: the digest of the model the client now holds."""
    return RecordDict({SYNC_KEY: ConfigRecord({DIGEST_KEY: replica.digest})})


def load_momentum(state: RecordDict, beta: float) -> ClientMomentum | None:
    """This node's momentum over its noisy sums, kept in ``context.state`` (None when ``beta`` is 0).

    Flower keeps ``context.state`` local to the node for the run: the momentum
    is never sent (:mod:`dpsign_fl.release.momentum`).
    """
    if beta == 0:
        return None
    stored = state[MOMENTUM_STATE_KEY]["m"].numpy() if MOMENTUM_STATE_KEY in state else None
    return ClientMomentum(beta, stored)


def save_momentum(state: RecordDict, momentum: ClientMomentum | None) -> None:
    """Keep ``momentum``'s state in ``context.state`` (nothing when None or before its first release)."""
    if momentum is not None and momentum.state is not None:
        state[MOMENTUM_STATE_KEY] = ArrayRecord(array_dict={"m": Array(momentum.state)})


def load_replica(state: RecordDict) -> ModelReplica | None:
    """The model replica kept in a Flower ``context.state`` (None if absent)."""
    if REPLICA_ARRAYS_KEY not in state:
        return None
    arrays = {name: array.numpy() for name, array in state[REPLICA_ARRAYS_KEY].items()}
    update_state = state[REPLICA_STATE_KEY]["update-state"].numpy() if REPLICA_STATE_KEY in state else None
    return ModelReplica(arrays, tuple(state[REPLICA_META_KEY][TRAINABLE_KEY]), update_state)


def save_replica(state: RecordDict, replica: ModelReplica) -> None:
    """Keep a model replica in a Flower ``context.state``."""
    state[REPLICA_ARRAYS_KEY] = ArrayRecord(array_dict={n: Array(np.asarray(a)) for n, a in replica.arrays.items()})
    state[REPLICA_META_KEY] = ConfigRecord({TRAINABLE_KEY: list(replica.trainable)})
    if replica.update_state is not None:
        state[REPLICA_STATE_KEY] = ArrayRecord(array_dict={"update-state": Array(np.asarray(replica.update_state))})
    elif REPLICA_STATE_KEY in state:
        del state[REPLICA_STATE_KEY]
