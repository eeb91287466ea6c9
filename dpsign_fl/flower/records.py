"""Conversions between the core's objects and Flower records; the wire keys live here only.

Train reply (client -> server), a ``RecordDict`` with exactly:

- ``"arrays"``: ArrayRecord with one Array ``"signs"``: uint8, shape
  ``[ceil(d/8)]``, the packed signs (:mod:`dpsign_fl.packing` gives the bit
  order; coordinates follow the order of the arrays in the global model's
  ArrayRecord, each flattened row-major). Serialised as a ``.npy`` buffer:
  ``ceil(d/8)`` bytes plus a 128-byte header.
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

from ..packing import check_packed, payload_bytes
from ..parameters import flatten, trainable_parameters, unflatten
from ..privacy import PrivacyLedger

ARRAYS_KEY = "arrays"
CONFIG_KEY = "config"
METRICS_KEY = "metrics"
SIGNS_KEY = "signs"
EPSILON_KEY = "epsilon"
ROUND_KEY = "server-round"
LEDGER_STATE_KEY = "dpsign-ledger"
NOISE_STATE_KEY = "dpsign-noise"
NPY_HEADER_BYTES = 128
MAX_REPORTED_EPSILON = 1e6
"""Above this a reported epsilon is treated as absurd and the reply dropped."""


class InvalidReply(ValueError):
    """A train reply that does not follow the wire format; the message says why."""


def model_to_arrays(model: torch.nn.Module) -> ArrayRecord:
    """Return the model's trainable parameters as an ArrayRecord, in ``parameters()`` order."""
    return ArrayRecord(array_dict={name: Array(p.detach().cpu().numpy()) for name, p in trainable_parameters(model)})


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
        ValueError: if names or shapes differ from the model's trainable parameters.
    """
    params = dict(trainable_parameters(model))
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
            ARRAYS_KEY: ArrayRecord(array_dict={SIGNS_KEY: Array(np.ascontiguousarray(packed, dtype=np.uint8))}),
            METRICS_KEY: MetricRecord({EPSILON_KEY: float(epsilon)}),
        }
    )


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
    expected = payload_bytes(num_coordinates)
    # Check the declared dtype and shape before deserialising anything.
    if signs.dtype != "uint8":
        raise InvalidReply(f"signs must have dtype uint8, got {signs.dtype}")
    if list(signs.shape) != [expected]:
        raise InvalidReply(f"signs must have shape [{expected}] (ceil({num_coordinates}/8)), got {list(signs.shape)}")
    if len(signs.data) > expected + 4 * NPY_HEADER_BYTES:
        raise InvalidReply(f"signs payload is {len(signs.data)} bytes, expected about {expected + NPY_HEADER_BYTES}")
    try:
        packed = check_packed(signs.numpy(), num_coordinates)
    except Exception as error:  # a corrupt buffer must not crash the round
        raise InvalidReply(f"signs could not be decoded: {error}") from None
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

