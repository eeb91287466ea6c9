"""Byzantine clients for robustness experiments (simulation only).

An attacker replaces its honest signs before packing. Majority vote tolerates
a minority of such clients (Bernstein et al. 2019, arXiv:1810.05291, Thm 2).
"""

from __future__ import annotations

import torch

BYZANTINE_ATTACKS = ("sign-flip", "random", "all-ones")


def is_byzantine(partition_id: int, num_partitions: int, fraction: float) -> bool:
    """Return True for the first ``floor(fraction * num_partitions)`` partitions."""
    return partition_id < int(fraction * num_partitions + 1e-9)


def byzantine_signs(signs: torch.Tensor, *, attack: str, generator: torch.Generator) -> torch.Tensor:
    """Return the signs an attacker sends instead of ``signs`` (int8 +-1).

    Raises:
        ValueError: on an unknown attack.
    """
    if attack == "sign-flip":
        return (-signs).to(torch.int8)
    if attack == "random":
        bits = torch.randint(0, 2, signs.shape, generator=generator, device=signs.device)
        return (2 * bits - 1).to(torch.int8)
    if attack == "all-ones":
        return torch.ones_like(signs, dtype=torch.int8)
    raise ValueError(f"byzantine_attack must be one of {BYZANTINE_ATTACKS}, got {attack!r}")
