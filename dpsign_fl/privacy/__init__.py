"""Privacy accounting: SGM events, calibration, a client's ledger, Jin et al.'s baseline."""

from .accounting import (
    ACCOUNTANTS,
    DEFAULT_ORDERS,
    calibrate_noise_multiplier,
    compute_epsilon,
    epsilon_of_events,
    sgm_event,
)
from .jin import jin_noise_multiplier, jin_true_epsilon
from .ledger import PrivacyLedger, Release

__all__ = [
    "ACCOUNTANTS",
    "DEFAULT_ORDERS",
    "PrivacyLedger",
    "Release",
    "calibrate_noise_multiplier",
    "compute_epsilon",
    "epsilon_of_events",
    "jin_noise_multiplier",
    "jin_true_epsilon",
    "sgm_event",
]
