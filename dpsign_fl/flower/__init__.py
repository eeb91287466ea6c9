"""The Flower adapter: the only modules of dpsign_fl that import ``flwr``."""

from .dropin import dp_sign_train
from .strategy import SignMajorityVote

__all__ = ["SignMajorityVote", "dp_sign_train"]
