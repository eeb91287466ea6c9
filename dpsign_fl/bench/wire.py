"""Bits per coordinate on the wire, both ways, measured on the messages themselves.

Uplink: a train reply (:func:`dpsign_fl.flower.records.train_reply_content`)
with packed signs. Downlink: the instruction a node that voted last round gets
(one packed vote: binary without ties, ternary with), and the full model a new
node gets. Sizes are the serialised array payloads (``.npy``: data and a
128-byte header each), as ``uplink-bytes`` and ``downlink-bytes`` count them.
"""

from __future__ import annotations

import numpy as np
from flwr.app import ArrayRecord

from ..models import build_model
from ..vote.packing import pack_signs, pack_vote
from ..flower.records import content_bytes, model_to_arrays, train_reply_content, votes_content

SHAPES = {"mlp": (1, 8, 8), "tanh-cnn": (1, 28, 28), "cifar-cnn": (3, 32, 32)}


def measure_wire(model_name: str) -> dict:
    """Bits per coordinate of one uplink reply and of the downlink instructions, for a model."""
    model = build_model(model_name, input_shape=SHAPES[model_name], num_classes=10, seed=0)
    arrays = model_to_arrays(model)
    d = sum(p.numel() for p in model.parameters())
    rng = np.random.default_rng(0)
    signs = rng.choice(np.array([-1, 1], dtype=np.int8), size=d)
    ternary = rng.choice(np.array([-1, 0, 1], dtype=np.int8), size=d)
    uplink = content_bytes(train_reply_content(pack_signs(signs), epsilon=1.0))
    vote_binary = content_bytes(votes_content([(1, pack_vote(signs))], "digest", {}))
    vote_ternary = content_bytes(votes_content([(1, pack_vote(ternary))], "digest", {}))
    full = content_bytes_of_arrays(arrays)
    return {
        "model": model_name,
        "num_coordinates": d,
        "uplink_bits_per_coordinate": 8 * uplink / d,
        "downlink_vote_bits_per_coordinate": 8 * vote_binary / d,
        "downlink_tied_vote_bits_per_coordinate": 8 * vote_ternary / d,
        "downlink_model_bits_per_coordinate": 8 * full / d,
    }


def content_bytes_of_arrays(arrays: ArrayRecord) -> int:
    """Serialised bytes of an ArrayRecord's arrays."""
    return sum(len(array.data) for array in arrays.values())
