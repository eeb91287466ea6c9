"""The model a client keeps between rounds, and how it follows the server with the votes alone.

Sign-SGD with majority vote needs one bit per coordinate on the downlink too: a
client that holds the model of round s reaches the model of round t by
replaying the votes of rounds s .. t - 1 with the server's own update rule
(:class:`dpsign_fl.vote.server_update.VoteUpdater`: schedule and momentum), which is
deterministic float32 arithmetic, so both sides end with the same bytes. A
digest of the model (and of the update rule's state) says which model a vote
applies to and which one it produces; a client whose replica does not match
must be sent the full model instead.

Privacy: nothing here depends on any client's data. The model, the votes and
the digests are post-processing of released bits.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np

from ..parameters import flatten, unflatten
from .server_update import VoteUpdater

BATCHNORM_STATISTICS = ("running_mean", "running_var", "num_batches_tracked")
"""Array-name endings of a ``state_dict`` that are statistics, not trainable parameters."""


def default_trainable(arrays: dict[str, np.ndarray]) -> tuple[str, ...]:
    """The arrays of a model's ``state_dict`` that votes move, when nobody names them.

    Every floating-point array except BatchNorm's running statistics (names
    ending in :data:`BATCHNORM_STATISTICS`). A model with other buffers must
    name its trainable parameters explicitly (``SignMajorityVote(trainable=...)``).
    """
    return tuple(
        name for name, array in arrays.items()
        if np.issubdtype(np.asarray(array).dtype, np.floating) and not name.endswith(BATCHNORM_STATISTICS)
    )


def state_digest(weights: np.ndarray, update_state: np.ndarray | None) -> str:
    """SHA-256 (hex) of the trainable weights (float32 bytes) and the momentum, if any."""
    digest = hashlib.sha256(np.ascontiguousarray(weights, dtype=np.float32).tobytes())
    if update_state is not None:
        digest.update(b"update-state")
        digest.update(np.ascontiguousarray(update_state, dtype=np.float32).tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class UpdateRule:
    """The server's update rule, as the server sends it: enough to replay a vote exactly."""

    learning_rate: float
    schedule: str
    momentum: float
    num_rounds: int
    step_scale: float | None = None

    def updater(self, update_state: np.ndarray | None) -> VoteUpdater:
        """A :class:`VoteUpdater` in the given state (momentum, or the automatic steps' agreement)."""
        updater = VoteUpdater(
            learning_rate=self.learning_rate, schedule=self.schedule, momentum=self.momentum, step_scale=self.step_scale
        )
        updater.load_state_dict({"update-state": update_state})
        return updater


@dataclass(frozen=True)
class ModelReplica:
    """A client's copy of the global model: every array, which of them votes move, the momentum.

    Attributes:
        arrays: name -> array, the whole model as the server sent it (buffers too).
        trainable: the names whose flattened concatenation the signs and votes cover.
        update_state: the server update's state: momentum, or the automatic steps' agreement and last
            vote (None when the rule keeps none, or before its first step).
    """

    arrays: dict[str, np.ndarray]
    trainable: tuple[str, ...]
    update_state: np.ndarray | None = field(default=None)

    @property
    def weights(self) -> np.ndarray:
        """The trainable arrays as one float32 vector (the coordinate order of signs and votes)."""
        return flatten(self.arrays[name] for name in self.trainable)

    @property
    def digest(self) -> str:
        """:func:`state_digest` of this replica."""
        return state_digest(self.weights, self.update_state)

    def with_weights(self, weights: np.ndarray, update_state: np.ndarray | None) -> "ModelReplica":
        """This replica with new trainable weights and momentum (other arrays unchanged)."""
        shapes = {name: (self.arrays[name].shape, self.arrays[name].dtype) for name in self.trainable}
        return ModelReplica({**self.arrays, **unflatten(weights, shapes)}, self.trainable, update_state)

    def replay(self, votes: Iterable[tuple[int, np.ndarray]], rule: UpdateRule) -> "ModelReplica":
        """Apply the votes ``(round, int8 vote)`` in order, with the server's update rule."""
        updater = rule.updater(self.update_state)
        weights = self.weights
        for server_round, vote in votes:
            weights = updater.step(weights, vote, server_round, rule.num_rounds)
        return self.with_weights(weights, updater.state_dict()["update-state"])


def check_trainable(arrays: dict[str, np.ndarray], trainable: Sequence[str]) -> tuple[str, ...]:
    """Validate that ``trainable`` names floating-point arrays of ``arrays``; return it as a tuple.

    Raises:
        ValueError: naming an unknown or non-floating-point array, or an empty list.
    """
    trainable = tuple(trainable)
    if not trainable:
        raise ValueError("trainable must name at least one array")
    for name in trainable:
        if name not in arrays:
            raise ValueError(f"trainable names {name!r}, which is not an array of the model ({list(arrays)[:8]}...)")
        if not np.issubdtype(np.asarray(arrays[name]).dtype, np.floating):
            raise ValueError(f"trainable names {name!r}, whose dtype {np.asarray(arrays[name]).dtype} is not floating point")
    return trainable


def write_replica_file(path, replica: ModelReplica) -> None:
    """Store a replica in a node-local ``.npz`` file, atomically (a crash leaves the old or the new)."""
    import io
    import json

    from ..atomic_file import write_atomic

    buffer = io.BytesIO()
    arrays = {f"array/{name}": np.asarray(value) for name, value in replica.arrays.items()}
    if replica.update_state is not None:
        arrays["update-state"] = replica.update_state
    meta = json.dumps({"names": list(replica.arrays), "trainable": list(replica.trainable)})
    np.savez(buffer, meta=np.frombuffer(meta.encode("utf-8"), dtype=np.uint8), **arrays)
    write_atomic(path, buffer.getvalue())


def read_replica_file(path) -> ModelReplica | None:
    """Read a replica stored by :func:`write_replica_file`; None if there is none or it is unreadable.

    An unreadable replica is only a cost (the server then sends the full model),
    never a privacy risk, so it is not an error.
    """
    import json

    try:
        with np.load(path, allow_pickle=False) as stored:
            meta = json.loads(stored["meta"].tobytes().decode("utf-8"))
            arrays = {name: stored[f"array/{name}"] for name in meta["names"]}
            update_state = stored["update-state"] if "update-state" in stored.files else None
        return ModelReplica(arrays, tuple(meta["trainable"]), update_state)
    except (OSError, ValueError, KeyError):
        return None
