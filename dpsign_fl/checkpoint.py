"""Server checkpoints: everything a stopped run needs to continue at round k + 1.

A checkpoint holds the global model (flat float32 vector, in the order of
:func:`dpsign_fl.flower.records.arrays_to_flat`), the last finished round k,
the server-update state (:meth:`dpsign_fl.vote.server_update.VoteUpdater.state_dict`:
the momentum), the largest epsilon each client node reported, how often the
strategy has sampled each node (its ``balanced`` schedule continues from these
counts), the state of Python's ``random`` module (Flower samples the round's
clients with it), the metrics rows of rounds 1..k and the run config of the run
that wrote it.

Privacy: nothing here is new information about a client's data. The model,
the momentum and the rows are post-processing of the released signs; the
epsilons are the public numbers clients reported. Clients' ledgers are NOT in
the checkpoint: they live where the clients run (docs/robustness.md). The
sampling counts are the server's own choices.

File format: one ``.npz`` (numpy, ``allow_pickle=False``) with the arrays
``weights`` and, with momentum or automatic steps, ``update-state`` (the update
rule's state: the momentum, or the automatic steps' vote agreement and last vote),
plus ``meta``: a JSON string with the rest (``draws``, the sampling counts, is
optional: format-2 files written before it existed load with no counts). Format 1
named that array ``velocity``; such checkpoints are still read. Written
atomically: a temporary file in the same folder, fsync, then rename over the old
checkpoint, so a crash leaves either the old or the new checkpoint, never half of one.
"""

from __future__ import annotations

import io
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .atomic_file import json_safe, write_atomic

CHECKPOINT_FILE = "checkpoint.npz"
FORMAT_VERSION = 2
"""2: the update rule's state is the array ``update-state``."""
READABLE_FORMATS = {1: "velocity", 2: "update-state"}
"""Format version -> the name of the update rule's state array in it."""


class CheckpointError(ValueError):
    """A checkpoint file is missing parts, corrupt, or does not fit this run."""


@dataclass(frozen=True)
class Checkpoint:
    """The server's state after round ``server_round``.

    Attributes:
        server_round: k >= 1, the last round whose update is in ``weights``.
        weights: the global model after round k, a 1-D float32 vector.
        updater_state: :meth:`VoteUpdater.state_dict` (``{"update-state": array or None, "step-scale": float or None}``).
        epsilon_seen: node id (as a string) -> largest epsilon that node reported.
        draws: node id (as a string) -> how many rounds the strategy sampled that node in.
        rng_state: ``random.getstate()`` at the end of round k.
        metrics: the metrics rows of rounds 1..k (JSON-safe dicts).
        run_config: the kebab-case run config of the run that wrote it.
    """

    server_round: int
    weights: np.ndarray
    updater_state: dict = field(default_factory=lambda: {"update-state": None})
    epsilon_seen: dict[str, float] = field(default_factory=dict)
    draws: dict[str, int] = field(default_factory=dict)
    rng_state: Any = None
    metrics: list[dict] = field(default_factory=list)
    run_config: dict[str, Any] = field(default_factory=dict)


def save_checkpoint(path: str | Path, checkpoint: Checkpoint) -> None:
    """Write ``checkpoint`` to ``path`` atomically (temporary file + fsync + rename).

    Raises:
        ValueError: if the weights are not a finite 1-D vector or the round < 1.
    """
    weights = np.asarray(checkpoint.weights, dtype=np.float32)
    if weights.ndim != 1 or not np.all(np.isfinite(weights)):
        raise ValueError(f"weights must be a finite 1-D vector, got shape {weights.shape}")
    if checkpoint.server_round < 1:
        raise ValueError(f"server_round must be >= 1, got {checkpoint.server_round}")
    arrays = {"weights": weights, "meta": np.array(json.dumps(_meta(checkpoint)))}
    update_state = checkpoint.updater_state.get("update-state")
    if update_state is not None:
        arrays["update-state"] = np.asarray(update_state, dtype=np.float32)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, buffer.getvalue())


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        CheckpointError: if the file is corrupt or of a format this version cannot read.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        with np.load(path, allow_pickle=False) as stored:
            meta = json.loads(str(stored["meta"]))
            weights = np.asarray(stored["weights"], dtype=np.float32)
            found = meta.get("format") if isinstance(meta, dict) else meta
            if type(found) is not int or found not in READABLE_FORMATS:
                raise CheckpointError(f"checkpoint {path} has format {found!r}, expected one of {sorted(READABLE_FORMATS)}")
            state_name = READABLE_FORMATS[found]
            update_state = np.asarray(stored[state_name], dtype=np.float32) if state_name in stored else None
    except CheckpointError:
        raise
    except Exception as error:  # zip, npy and JSON errors all mean "corrupt"
        raise CheckpointError(f"checkpoint {path} could not be read: {error}") from None
    if weights.ndim != 1:
        raise CheckpointError(f"checkpoint {path}: weights must be 1-D, got shape {weights.shape}")
    if update_state is not None and (update_state.ndim != 1 or update_state.shape[0] not in (weights.shape[0], 2 * weights.shape[0])):
        raise CheckpointError(
            f"checkpoint {path}: update_state shape {update_state.shape} fits neither momentum nor automatic steps "
            f"for weights {weights.shape}"
        )
    try:
        return Checkpoint(
            server_round=int(meta["server-round"]),
            weights=weights,
            updater_state={"update-state": update_state, "step-scale": meta.get("step-scale")},
            epsilon_seen={str(node): float(eps) for node, eps in meta["epsilon-seen"].items()},
            draws={str(node): _count(times) for node, times in meta.get("draws", {}).items()},
            rng_state=_rng_state_from_json(meta["rng-state"]),
            metrics=list(meta["metrics"]),
            run_config=dict(meta["run-config"]),
        )
    except (AttributeError, KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"checkpoint {path} is incomplete: {error!r}") from None


def python_rng_state() -> Any:
    """Return the state of Python's ``random`` module (Flower's client sampling draws from it)."""
    return random.getstate()


def restore_python_rng_state(state: Any) -> None:
    """Set the state of Python's ``random`` module; ``None`` leaves it as it is."""
    if state is not None:
        random.setstate(state)


def _meta(checkpoint: Checkpoint) -> dict:
    return {
        "format": FORMAT_VERSION,
        "server-round": int(checkpoint.server_round),
        "step-scale": checkpoint.updater_state.get("step-scale"),
        "epsilon-seen": {str(node): float(eps) for node, eps in checkpoint.epsilon_seen.items()},
        "draws": {str(node): _count(times) for node, times in checkpoint.draws.items()},
        "rng-state": _rng_state_to_json(checkpoint.rng_state),
        "metrics": json_safe(checkpoint.metrics),
        "run-config": json_safe(checkpoint.run_config),
    }


def _count(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"a sampling count must be an integer >= 0, got {value!r}")
    return int(value)


def _rng_state_to_json(state: Any) -> Any:
    # random.getstate() is (version, tuple of 625 ints, gauss_next).
    if state is None:
        return None
    version, internal, gauss_next = state
    return [version, list(internal), gauss_next]


def _rng_state_from_json(value: Any) -> Any:
    if value is None:
        return None
    version, internal, gauss_next = value
    return (version, tuple(internal), gauss_next)


