"""dpsign-fl: differentially private sign-SGD with majority vote, for Flower.

The core (this package's top-level modules and :mod:`dpsign_fl.privacy`) never
imports ``flwr``; the Flower adapter lives in :mod:`dpsign_fl.flower`. Names
are imported on first use, so that ``import dpsign_fl`` (and the privacy
calculator, ``python -m dpsign_fl.privacy``) does not load torch.
"""

from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "AUTOMATIC_CLIPPING_GAMMA": "release.mechanism",
    "clip_per_sample": "release.mechanism",
    "dp_sign": "release.mechanism",
    "noisy_clipped_sum": "release.mechanism",
    "per_sample_gradients": "release.mechanism",
    "poisson_sample": "release.mechanism",
    "secure_generator": "release.mechanism",
    "jin_dp_sign": "experiments.compressors",
    "sign": "experiments.compressors",
    "sto_sign": "experiments.compressors",
    "pack_signs": "vote.packing",
    "payload_bytes": "vote.packing",
    "unpack_signs": "vote.packing",
    "PrivacyLedger": "privacy",
    "calibrate_noise_multiplier": "privacy",
    "compute_epsilon": "privacy",
    "jin_noise_multiplier": "experiments.jin",
    "jin_true_epsilon": "experiments.jin",
    "majority_vote": "vote",
    "ReleaseSettings": "release",
    "client_release": "release",
    "RunSettings": "settings",
    "SignMajorityVote": "flower.strategy",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
