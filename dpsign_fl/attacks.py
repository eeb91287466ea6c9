"""Byzantine clients, for robustness experiments only (simulation and the research loop).

An attacker replaces the packed signs it would honestly send. Majority vote
tolerates a minority of blind attackers (Bernstein et al. 2019,
arXiv:1810.05291, Thm 2). A deployed SuperNode never attacks, whatever the
run config says (:mod:`dpsign_fl.flower.client`).
"""

from __future__ import annotations

import numpy as np
import torch

from .packing import check_packed

BYZANTINE_ATTACKS = ("sign-flip", "random", "all-ones")


def is_byzantine(client: int, num_clients: int, fraction: float) -> bool:
    """Return True for the first ``floor(fraction * num_clients)`` clients (numbered from 0)."""
    return client < int(fraction * num_clients + 1e-9)


def byzantine_payload(
    packed: np.ndarray, num_coordinates: int, *, attack: str, generator: torch.Generator
) -> np.ndarray:
    """Return the packed signs an attacker sends instead of its honest ``packed``.

    - ``"sign-flip"``: the negation of its honest signs;
    - ``"random"``: uniformly random signs (from ``generator``);
    - ``"all-ones"``: +1 on every coordinate.

    The unused tail bits of the last byte stay zero, as the wire format requires.

    Raises:
        ValueError: on an unknown attack or a malformed payload.
    """
    packed = check_packed(packed, num_coordinates)
    if attack == "sign-flip":
        attacked = np.bitwise_not(packed)
    elif attack == "random":
        attacked = torch.randint(0, 256, packed.shape, generator=generator, dtype=torch.uint8).numpy()
    elif attack == "all-ones":
        attacked = np.full_like(packed, 0xFF)
    else:
        raise ValueError(f"byzantine_attack must be one of {BYZANTINE_ATTACKS}, got {attack!r}")
    return _clear_tail(attacked, num_coordinates)


def _clear_tail(packed: np.ndarray, num_coordinates: int) -> np.ndarray:
    packed = np.array(packed, dtype=np.uint8)
    unused = (-num_coordinates) % 8
    if unused:
        packed[-1] &= (0xFF << unused) & 0xFF
    return packed
