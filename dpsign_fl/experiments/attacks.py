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

Targeted attacks need no honest payload, only the model and public data
(:func:`targeted_push`): the research loop runs them.

- ``"targeted-push"``: every attacker sends its honest signs except on one
  class's row of the last linear layer and its bias (10 % of the coordinates
  of a linear head on 10 classes), where all send the sign of another class's
  mean input to that layer (and +1 on the bias): that class's scores fall
  for every input, so the class is no longer predicted.
- ``"targeted-push-adaptive"``: the same push, except that on a share of the
  pushed coordinates (``byzantine-random-share``, drawn afresh per attacker,
  coordinate and round) the attacker sends its honest sign, so that its
  pushed block looks more like honest noise (and pushes less).

Majority vote tolerates a minority of blind attackers of the sign-flip and
random kind (Bernstein et al. 2019, arXiv:1810.05291, Thm 2); docs/robustness.md
has what the others do and what the robust vote does about them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..vote.packing import BIT_ORDER, check_packed, last_byte_mask, pack_signs
from ..parameters import trainable_parameters

BLIND_ATTACKS = ("sign-flip", "random", "all-ones")
COORDINATED_ATTACKS = ("inverse-majority", "stealthy", "mimic")
TARGETED_ATTACKS = ("targeted-push", "targeted-push-adaptive")
BYZANTINE_ATTACKS = BLIND_ATTACKS + COORDINATED_ATTACKS + TARGETED_ATTACKS
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


@dataclass(frozen=True)
class TargetedPush:
    """What the targeted attackers send on the coordinates they push (:func:`targeted_push`).

    Attributes:
        coordinates: sorted int64 indices of the pushed coordinates in the flat model.
        signs: int8 +-1, the sign every attacker sends on each of them.
        random_share: on this share of them (drawn per attacker, coordinate and
            round) an attacker sends its honest sign instead (0: the plain push).
    """

    coordinates: np.ndarray
    signs: np.ndarray
    random_share: float = 0.0


def targeted_push(
    model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, *, target_class: int, pushed_class: int,
    random_share: float = 0.0, max_examples: int = 1024,
) -> TargetedPush:
    """The push on ``target_class``'s row (and bias) of the model's last linear layer, towards ``pushed_class``.

    The pushed signs are those of the mean input of that layer over (up to
    ``max_examples``) examples of ``pushed_class`` at the current model, and
    +1 on the bias: as the "gradient" of that row they lower the target
    class's score on every input that looks like the pushed class's mean.
    Public knowledge only (the model every client receives, data of the
    attackers' own); no honest payload.

    Args:
        model: the global model of the round.
        inputs, targets: data the attackers hold.
        target_class: the class whose row is pushed.
        pushed_class: the class whose mean input gives the signs.
        random_share: see :class:`TargetedPush`.
        max_examples: cap on the examples averaged.

    Raises:
        ValueError: if the model has no linear layer, a class is out of its
            range, the data hold no example of ``pushed_class``, or
            ``random_share`` is not in [0, 1].
    """
    layer = next((m for m in reversed(list(model.modules())) if isinstance(m, nn.Linear)), None)
    if layer is None:
        raise ValueError("targeted-push needs a model with a linear last layer, got none")
    for name, value in (("target_class", target_class), ("pushed_class", pushed_class)):
        if not 0 <= value < layer.out_features:
            raise ValueError(f"{name} must be in [0, {layer.out_features}), got {value}")
    if not 0.0 <= random_share <= 1.0:
        raise ValueError(f"random_share must be in [0, 1], got {random_share}")
    chosen = inputs[targets == pushed_class][:max_examples]
    if chosen.shape[0] == 0:
        raise ValueError(f"targeted-push needs examples of pushed_class {pushed_class}, got none")
    captured = []
    hook = layer.register_forward_pre_hook(lambda module, args: captured.append(args[0].detach()))
    try:
        with torch.no_grad():
            model(chosen)
    finally:
        hook.remove()
    mean_input = captured[0].mean(dim=0).cpu().numpy()
    offsets, offset = {}, 0
    for _, parameter in trainable_parameters(model):
        offsets[id(parameter)] = offset
        offset += parameter.numel()
    row = offsets[id(layer.weight)] + target_class * layer.in_features + np.arange(layer.in_features)
    signs = np.where(mean_input >= 0, 1, -1).astype(np.int8)
    if layer.bias is not None:
        row = np.append(row, offsets[id(layer.bias)] + target_class)
        signs = np.append(signs, np.int8(1))
    order = np.argsort(row)
    return TargetedPush(row[order].astype(np.int64), signs[order], float(random_share))


def attack_round(
    payloads: list[np.ndarray], attackers: list[int], num_coordinates: int, *, attack: str, generator: torch.Generator,
    push: TargetedPush | None = None,
) -> list[np.ndarray]:
    """Replace the attackers' payloads in one round's list (the research loop's view of a round).

    Args:
        payloads: every client's honest packed signs, by client number.
        attackers: the client numbers that attack.
        num_coordinates: d.
        attack: one of :data:`BYZANTINE_ATTACKS`.
        generator: randomness of the random attacks.
        push: for :data:`TARGETED_ATTACKS`, what to push (:func:`targeted_push`).

    Returns:
        A new list; honest payloads are the same objects.

    Raises:
        ValueError: for an unknown attack, or a targeted one without ``push``.
    """
    if attack in TARGETED_ATTACKS:
        if push is None:
            raise ValueError(f"byzantine_attack {attack!r} needs the push (targeted_push), got None")
        share = push.random_share if attack == "targeted-push-adaptive" else 0.0
        attacked = list(payloads)
        for i in attackers:
            signs = np.unpackbits(payloads[i], count=num_coordinates, bitorder=BIT_ORDER).astype(np.int8) * 2 - 1
            sent = torch.rand(push.coordinates.shape[0], generator=generator, dtype=torch.float64).numpy() >= share
            signs[push.coordinates[sent]] = push.signs[sent]
            attacked[i] = pack_signs(signs)
        return attacked
    if attack in BLIND_ATTACKS:
        return [
            byzantine_payload(p, num_coordinates, attack=attack, generator=generator) if i in attackers else p
            for i, p in enumerate(payloads)
        ]
    if attack not in COORDINATED_ATTACKS:
        raise ValueError(f"byzantine_attack must be one of {BYZANTINE_ATTACKS}, got {attack!r}")
    attacked = list(payloads)
    if attack == "inverse-majority":
        from ..vote import majority_vote  # the attackers compute the honest vote, as the server will

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
