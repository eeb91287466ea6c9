"""Privacy accounting: SGM events, calibration, a client's ledger."""

from .accounting import (
    ACCOUNTANTS,
    DEFAULT_ORDERS,
    calibrate_noise_multiplier,
    compute_epsilon,
    epsilon_of_events,
    sgm_event,
)
from .ledger import PrivacyLedger, Release

__all__ = [
    "ACCOUNTANTS",
    "DEFAULT_ORDERS",
    "PrivacyLedger",
    "Release",
    "calibrate_noise_multiplier",
    "compute_epsilon",
    "epsilon_of_events",
    "sgm_event",
]
