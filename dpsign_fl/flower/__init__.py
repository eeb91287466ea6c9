"""The Flower adapter: the only modules of dpsign_fl that import ``flwr``."""

from .dropin import dp_sign_train
from .llm import adapter_arrays, save_adapters
from .strategy import SignMajorityVote

__all__ = ["SignMajorityVote", "adapter_arrays", "dp_sign_train", "save_adapters"]
