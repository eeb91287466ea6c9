"""Byzantine clients, for robustness experiments only (simulation and the research loop).

An attacker replaces the packed signs it would honestly send. A deployed
SuperNode never attacks, whatever the run config says (:mod:`dpsign_fl.flower.client`).

Blind attacks (:data:`BLIND_ATTACKS`) see only the attacker's own release; the
Flower simulation and the loop both run them:

- ``"sign-flip"``: the negation of its honest signs;
- ``"random"``: uniformly random signs;
- ``"all-ones"``: +1 on every coordinate.

Coordinated attacks see every honest payload of the round (the research loop
only: simulated ClientApps cannot see each other):

- ``"inverse-majority"``: every attacker sends the negation of the honest
  clients' majority (omniscient and colluding; ties broken at random). No
  vote survives an omniscient majority of attackers; this measures how far
  below that the defence holds.
- ``"stealthy"``: every attacker sends its own honest signs except on a fixed
  subset of the coordinates (:data:`STEALTH_FRACTION`), where all send the same
  fixed, balanced pattern: a constant push on a part of the model, with a +1
  rate like an honest client's.
- ``"mimic"``: the stealthy push adapted to :func:`dpsign_fl.vote.robust_vote`:
  on the subset each attacker sends the pattern only with probability
  :data:`MIMIC_PUSH` (independently per attacker, coordinate and round) and its
  honest sign otherwise, so that its +1 rate, its agreement with the others
  and its agreement with any other payload stay close to an honest client's.

Majority vote tolerates a minority of blind attackers of the sign-flip and
random kind (Bernstein et al. 2019, arXiv:1810.05291, Thm 2); docs/robustness.md
has what the others do and what the robust vote does about them.
"""

from __future__ import annotations

import numpy as np
import torch

from ..packing import BIT_ORDER, check_packed, last_byte_mask, pack_signs

BLIND_ATTACKS = ("sign-flip", "random", "all-ones")
COORDINATED_ATTACKS = ("inverse-majority", "stealthy", "mimic")
BYZANTINE_ATTACKS = BLIND_ATTACKS + COORDINATED_ATTACKS
STEALTH_FRACTION = 0.25
"""Fraction of the coordinates the stealthy and mimic attackers push."""
MIMIC_PUSH = 0.5
"""Probability that a mimic attacker sends the pattern on a pushed coordinate."""
PATTERN_SEED = 20_240_611
"""Seed of the stealthy attackers' fixed subset and pattern (the same every round: a constant push)."""


def is_byzantine(client: int, num_clients: int, fraction: float) -> bool:
    """Return True for the first ``floor(fraction * num_clients)`` clients (numbered from 0)."""
    return client < int(fraction * num_clients + 1e-9)


def byzantine_payload(
    packed: np.ndarray, num_coordinates: int, *, attack: str, generator: torch.Generator
) -> np.ndarray:
    """Return the packed signs a blind attacker sends instead of its honest ``packed``.

    The unused tail bits of the last byte stay zero, as the wire format requires.

    Raises:
        ValueError: on an attack that is not blind, or a malformed payload.
    """
    packed = check_packed(packed, num_coordinates)
    if attack == "sign-flip":
        attacked = np.bitwise_not(packed)
    elif attack == "random":
        attacked = torch.randint(0, 256, packed.shape, generator=generator, dtype=torch.uint8).numpy()
    elif attack == "all-ones":
        attacked = np.full_like(packed, 0xFF)
    else:
        raise ValueError(f"a blind byzantine_attack must be one of {BLIND_ATTACKS}, got {attack!r}")
    return _clear_tail(attacked, num_coordinates)


def attack_round(
    payloads: list[np.ndarray], attackers: list[int], num_coordinates: int, *, attack: str, generator: torch.Generator
) -> list[np.ndarray]:
    """Replace the attackers' payloads in one round's list (the research loop's view of a round).

    Args:
        payloads: every client's honest packed signs, by client number.
        attackers: the client numbers that attack.
        num_coordinates: d.
        attack: one of :data:`BYZANTINE_ATTACKS`.
        generator: randomness of the random attacks.

    Returns:
        A new list; honest payloads are the same objects.
    """
    if attack in BLIND_ATTACKS:
        return [
            byzantine_payload(p, num_coordinates, attack=attack, generator=generator) if i in attackers else p
            for i, p in enumerate(payloads)
        ]
    if attack not in COORDINATED_ATTACKS:
        raise ValueError(f"byzantine_attack must be one of {BYZANTINE_ATTACKS}, got {attack!r}")
    attacked = list(payloads)
    if attack == "inverse-majority":
        from .vote import majority_vote  # the attackers compute the honest vote, as the server will

        honest = [p for i, p in enumerate(payloads) if i not in attackers]
        vote = majority_vote(honest, num_coordinates) if honest else np.zeros(num_coordinates, np.int8)
        coin = torch.randint(0, 2, (num_coordinates,), generator=generator).numpy().astype(bool)
        forged = pack_signs(np.where((vote < 0) | ((vote == 0) & coin), 1, -1).astype(np.int8))
        for i in attackers:
            attacked[i] = forged
        return attacked
    subset, pattern = _push_pattern(num_coordinates)
    for i in attackers:
        signs = np.unpackbits(payloads[i], count=num_coordinates, bitorder=BIT_ORDER).astype(np.int8) * 2 - 1
        push = subset
        if attack == "mimic":
            draw = torch.rand(subset.shape[0], generator=generator, dtype=torch.float64).numpy()
            push = subset[draw < MIMIC_PUSH]
        signs[push] = pattern[np.searchsorted(subset, push)]
        attacked[i] = pack_signs(signs)
    return attacked


def _push_pattern(num_coordinates: int) -> tuple[np.ndarray, np.ndarray]:
    """The fixed subset of coordinates (sorted) the stealthy attackers push, and the balanced pattern."""
    rng = np.random.default_rng(PATTERN_SEED)
    count = max(1, int(STEALTH_FRACTION * num_coordinates))
    subset = np.sort(rng.choice(num_coordinates, size=count, replace=False))
    pattern = np.where(rng.permutation(count) % 2 == 0, 1, -1).astype(np.int8)
    return subset, pattern


def _clear_tail(packed: np.ndarray, num_coordinates: int) -> np.ndarray:
    packed = np.array(packed, dtype=np.uint8)
    packed[-1] &= last_byte_mask(num_coordinates)
    return packed
