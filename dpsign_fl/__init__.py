"""dpsign-fl: differentially private sign-SGD with majority vote, for Flower.

The core (this package's top-level modules and :mod:`dpsign_fl.privacy`) never
imports ``flwr``; the Flower adapter lives in :mod:`dpsign_fl.flower`.
"""

from .compressors import jin_dp_sign, sign, sto_sign
from .mechanism import (
    AUTOMATIC_CLIPPING_GAMMA,
    clip_per_sample,
    dp_sign,
    noisy_clipped_sum,
    per_sample_gradients,
    poisson_sample,
    secure_generator,
)
from .packing import pack_signs, payload_bytes, unpack_signs
from .privacy import (
    PrivacyLedger,
    calibrate_noise_multiplier,
    compute_epsilon,
    jin_noise_multiplier,
    jin_true_epsilon,
)
from .vote import majority_vote

__version__ = "0.1.0"

__all__ = [
    "AUTOMATIC_CLIPPING_GAMMA",
    "PrivacyLedger",
    "SignMajorityVote",
    "calibrate_noise_multiplier",
    "clip_per_sample",
    "compute_epsilon",
    "dp_sign",
    "jin_dp_sign",
    "jin_noise_multiplier",
    "jin_true_epsilon",
    "majority_vote",
    "noisy_clipped_sum",
    "pack_signs",
    "payload_bytes",
    "per_sample_gradients",
    "poisson_sample",
    "secure_generator",
    "sign",
    "sto_sign",
    "unpack_signs",
]


def __getattr__(name: str):
    # The strategy needs flwr; import it lazily so the core stays usable (and
    # testable) without touching flwr.
    if name == "SignMajorityVote":
        from .flower.strategy import SignMajorityVote

        return SignMajorityVote
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
