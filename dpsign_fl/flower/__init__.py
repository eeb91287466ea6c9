"""The Flower adapter: the only modules of dpsign_fl that import ``flwr``."""

from .strategy import SignMajorityVote

__all__ = ["SignMajorityVote"]
