"""The robust vote: the majority of the payloads that do not look like a coordinated attack.

Which rule a run uses (:data:`VOTE_RULES`, default :data:`DEFAULT_VOTE`) is
chosen here too. The filters read statistics of the packed payloads
(popcounts against the counter's bit-planes, hashes of short runs) through
:class:`~dpsign_fl.vote.counter.VoteCounter` and the compiled kernel of
:mod:`dpsign_fl.vote.kernel`; no payload is unpacked. What each filter
catches, and what it does not, is measured in docs/robustness.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .counter import VoteCounter
from .kernel import load_kernel
from .packing import check_packed, last_byte_mask, payload_bytes

VOTE_RULES = ("majority", "robust")
"""How the server turns the payloads of a round into a vote: :func:`majority_vote` or :func:`robust_vote`."""

DEFAULT_VOTE = "robust"
"""The default rule of the app, the loop and :class:`~dpsign_fl.flower.strategy.SignMajorityVote`:
measured at the accuracy of plain majority without attackers (docs/robustness.md)."""


def check_vote_rule(rule, setting: str = "vote") -> str:
    """Return ``rule`` if it names one of :data:`VOTE_RULES`, else raise ValueError naming ``setting``.

    Called where a rule enters: the run config and :class:`~dpsign_fl.flower.strategy.SignMajorityVote`.
    """
    if rule not in VOTE_RULES:
        raise ValueError(f"{setting} must be one of {VOTE_RULES}, got {rule!r}")
    return rule

ROBUST_SKETCH_BYTES = 512
"""Bytes (8 coordinates each) of every payload compared pairwise to find colluders: 4096 coordinates."""

COLLUSION_PARTNERS = 32
"""Each payload is compared with the payloads up to this many places before and after it on a cycle of the
payloads in random order: with at most ``2 * 32 + 1 = 65`` payloads, with every other one."""

INSPECTED_BYTES = 16 * 1024
"""The +1 rate, the agreement with the others' vote and the likeness are measured on at most this many bytes of
each payload (131,072 coordinates): the whole payload when it is no longer, else blocks of
:data:`INSPECTED_BLOCK_BYTES` drawn afresh every call."""

INSPECTED_BLOCK_BYTES = 512
"""Bytes (4,096 coordinates) of each block of a payload the filters read when they read only part of it, and
on which the likeness is measured."""

# Payloads inspected at once: their per-block counts (up to ~20 masks x 32 blocks x 8 bytes each) stay ~5 MiB.
_INSPECTION_CHUNK_ROWS = 1024

COPY_BYTES = 64
"""The copy statistic compares the payloads on runs of this many bytes (512 coordinates) at the same place."""

COPY_MARGIN = 2
"""A payload is dropped when it repeats another payload's bits exactly on more runs than the median payload
does plus this many (robust z-score floored at one run): 512 coordinates of DP-noisy signs do not repeat
by chance."""

RATE_THRESHOLD = 8.0
"""A payload is dropped when its +1 rate is more than this many robust standard deviations from the median."""

COLLUSION_MARGIN = 8.0
"""... when it agrees with another payload on the sketch more than this many standard errors above the median agreement."""

AGREEMENT_THRESHOLD = 4.0
"""... when its agreement with the tentative vote is this many robust standard deviations below the median."""

REPETITION_MARGIN = 8.0
"""A round counts as a repetition for a client when, on some memory block, its payload repeats its previous one
more than this many robust standard deviations (floored at the coin-flip standard error) above the median
self-agreement there, and its likeness there is above the median (:class:`VoteMemory`)."""

REPETITION_HORIZON = 16
"""Rounds (of those a client takes part in) over which :class:`VoteMemory` averages its repetitions: each new round
weighs 1/16 in the exponential average."""

REPETITION_SHARE = 0.5
"""... and a payload is dropped as ``"repetition"`` when its sender's average reaches this share: 2 or 4 attackers
of 10 or 20 that push a row all run (sending their honest sign on half of it) counted in ~90 % of their rounds and
crossed 1/2 after 16-25 rounds; honest non-IID clients, which repeat themselves on their own classes' rows while
the model learns them, stayed at or below 0.25 (measured on MNIST, docs/robustness.md)."""


@dataclass(frozen=True)
class RobustVote:
    """The outcome of :func:`robust_vote`.

    Attributes:
        vote: int8 ``[d]`` in {-1, 0, +1}, the majority of the kept payloads.
        kept: indices of the payloads that voted.
        dropped: payload index -> why it was left out (``"+1 rate"``, ``"collusion"``, ``"repetition"``,
            ``"disagreement"``).
    """

    vote: np.ndarray
    kept: tuple[int, ...]
    dropped: dict[int, str]


class VoteMemory:
    """What the robust vote remembers of each client across rounds: its last payload's bits on the memory blocks.

    The memory blocks are :data:`INSPECTED_BLOCK_BYTES`-sized blocks of the
    payload, at most :data:`INSPECTED_BYTES` in all (every whole block when the
    payload is no longer), drawn once per run from the memory's own generator
    at the first round. Each round :func:`robust_vote` measures, on each memory
    block, how many of a returning client's bits equal the bits it sent last
    time (its self-agreement): an honest client's DP noise is fresh every
    round, so its self-agreement sits with the others'; an attacker that pushes
    the same signs on a block every round, even on only part of it, repeats
    itself there far more (``targeted-push-adaptive``, docs/robustness.md).
    :meth:`repeating` says which senders to leave out. Not caught: a lone
    attacker (nobody shares its push), and a push on a block of a large model
    that the memory blocks miss.

    Privacy: post-processing of bits the clients released; the server keeps
    them, nothing more is asked of the clients and no privacy is spent.
    Memory: at most :data:`INSPECTED_BYTES` and one float per client identity
    seen (one table, grown by doubling: :attr:`nbytes`); time per round linear
    in the payloads. A driver keeps one for a run;
    a run resumed from a checkpoint starts it empty (nothing to compare with in
    its first round, and every average of repetitions back at 0).

    Args:
        generator: randomness of the memory blocks; None = fresh OS entropy
            (the clients cannot know which blocks are kept).
    """

    def __init__(self, generator: np.random.Generator | None = None) -> None:
        self._generator = generator if generator is not None else np.random.default_rng()
        self._num_coordinates: int | None = None
        self._blocks: np.ndarray | None = None
        self._row: dict = {}  # identity -> its row of _table
        self._table = np.zeros((0, 0), dtype=np.uint8)  # [rows, memory bytes]: the bits each identity sent last
        self._repetition: dict = {}

    def __len__(self) -> int:
        """How many client identities it holds bits of."""
        return len(self._row)

    @property
    def nbytes(self) -> int:
        """Bytes of bits it holds: :data:`INSPECTED_BYTES` at most per identity, in a table grown by doubling."""
        return self._table.nbytes

    def blocks(self, num_coordinates: int) -> np.ndarray:
        """The sorted indices of the memory blocks (drawn at the first call; every whole block when there are few)."""
        self._start(num_coordinates)
        return self._blocks

    def repeating(
        self, rows: Sequence[np.ndarray], identities: Sequence, num_coordinates: int, likeness: np.ndarray | None,
        measured: tuple[list[int], np.ndarray] | None = None,
    ) -> list[int]:
        """Positions of the payloads whose sender has repeated itself in too many of its recent rounds; remembers these payloads.

        Each returning sender's round counts as a repetition when, on some
        memory block, its self-agreement is far above the others'
        (:data:`REPETITION_MARGIN`; at least 3 returning senders) and its
        likeness there is above the median payload's: a pattern that the
        round's other payloads share more than usual (colluders pushing the
        same row). An honest non-IID client that repeats its gradient on its
        own classes' rows is pulled the other way by the clients without those
        classes, so its likeness there is mostly below the median (measured,
        docs/robustness.md). Its exponential average of repetitions
        (:data:`REPETITION_HORIZON`) is updated, and its payload is returned
        when the average reaches :data:`REPETITION_SHARE`. Then each sender's
        bits replace the ones kept.

        Args:
            rows: the round's validated packed payloads.
            identities: the sender of each (distinct).
            num_coordinates: d, the same every round.
            likeness: ``[payloads, memory blocks]``, each payload's mean
                agreement with every other payload on each memory block
                (:func:`robust_vote` computes it); None: no round counts.
            measured: ``(known, differences)`` where the caller has already
                compared the payloads with what their senders sent last time
                and kept them (:meth:`slots`; :func:`robust_vote` does it in its
                inspection pass): ``known``, the positions of the senders it
                held bits of before; ``differences[p, b]``, the bits in which
                payload p differs from them on memory block b. None: compared
                and kept here.

        Raises:
            ValueError: if ``num_coordinates`` differs from the first round's.
        """
        self._start(num_coordinates)
        if measured is None:
            kept = self._gathered(rows)
            positions, agreement = self._agreement(kept, identities)
        else:
            positions, differences = measured
            agreement = 1.0 - differences[positions] / (8 * INSPECTED_BLOCK_BYTES)
        flagged = set()
        if likeness is not None and len(positions) >= 3 and likeness.shape[1]:
            above = likeness > np.median(likeness, axis=0)
            flagged = set(_repeaters(agreement, above[positions]))
        weight = 1.0 / REPETITION_HORIZON
        found = []
        for r, p in enumerate(positions):
            identity = identities[p]
            share = (1.0 - weight) * self._repetition.get(identity, 0.0) + weight * (r in flagged)
            self._repetition[identity] = share
            if share >= REPETITION_SHARE:
                found.append(p)
        if measured is None:
            self._keep(kept, identities)
        return found

    def self_agreement(self, rows: Sequence[np.ndarray], identities: Sequence, num_coordinates: int) -> tuple[list[int], np.ndarray]:
        """``(positions, agreement)``: the payloads whose sender it remembers and, ``[len(positions), blocks]``, the
        share of each one's bits on each memory block equal to those its sender sent last time."""
        self._start(num_coordinates)
        return self._agreement(self._gathered(rows), identities)

    def remember(self, rows: Sequence[np.ndarray], identities: Sequence, num_coordinates: int) -> None:
        """Keep each sender's bits on the memory blocks (its latest payload), in place of what it sent before."""
        self._start(num_coordinates)
        self._keep(self._gathered(rows), identities)

    def slots(self, identities: Sequence, num_coordinates: int) -> tuple[list, list[np.ndarray]]:
        """``(before, after)`` for a caller that compares and keeps the payloads itself (``measured`` of :meth:`repeating`).

        For each identity, ``before``: its row of bits (None where it is new),
        and ``after``: the row the caller writes its new bits to (the same row;
        made for a new identity). Each row: the bytes of the memory blocks
        (:meth:`blocks`), one after the other. Valid until the next call.
        """
        self._start(num_coordinates)
        new = {identity for identity in identities if identity not in self._row}
        self._add_rows(identities)
        after = [self._table[self._row[identity]] for identity in identities]
        return [None if identity in new else row for identity, row in zip(identities, after)], after

    def _keep(self, gathered: np.ndarray, identities: Sequence) -> None:
        """Store each sender's bytes (a row of ``gathered``) in its row of the table, copied."""
        self._add_rows(identities)
        self._table[[self._row[identity] for identity in identities]] = gathered

    def _add_rows(self, identities: Sequence) -> None:
        """Give each new identity a row of the table."""
        for identity in identities:
            if identity not in self._row:
                self._row[identity] = len(self._row)
        if len(self._row) > self._table.shape[0]:  # grown by doubling: amortised O(1) per new identity
            table = np.zeros((max(len(self._row), 2 * self._table.shape[0]), INSPECTED_BLOCK_BYTES * len(self._blocks)), dtype=np.uint8)
            if self._table.shape[0]:
                table[: self._table.shape[0]] = self._table
            self._table = table

    def _gathered(self, rows: Sequence[np.ndarray]) -> np.ndarray:
        """``[payloads, memory bytes]``: each payload's bytes on the memory blocks, gathered once per round."""
        gathered = np.empty((len(rows), INSPECTED_BLOCK_BYTES * len(self._blocks)), dtype=np.uint8)
        if len(self._blocks):
            for row, out in zip(rows, gathered):
                out[:] = _gather(row, self._blocks)
        return gathered

    def _agreement(self, gathered: np.ndarray, identities: Sequence) -> tuple[list[int], np.ndarray]:
        positions = [p for p, identity in enumerate(identities) if identity in self._row]
        if not positions:
            return [], np.zeros((0, 0))
        before = self._table[[self._row[identities[p]] for p in positions]]
        blocks = before.shape[1] // INSPECTED_BLOCK_BYTES
        changed = gathered[positions].view(np.uint64) ^ before.view(np.uint64)  # blocks are whole words: 8x fewer popcounts
        differences = np.bitwise_count(changed).reshape(len(positions), blocks, INSPECTED_BLOCK_BYTES // 8)
        return positions, 1.0 - differences.sum(axis=2, dtype=np.int64) / (8 * INSPECTED_BLOCK_BYTES)

    def _start(self, num_coordinates: int) -> None:
        if self._num_coordinates is None:
            self._num_coordinates = num_coordinates
            whole_blocks = num_coordinates // (8 * INSPECTED_BLOCK_BYTES)  # never the last, partial byte
            wanted = INSPECTED_BYTES // INSPECTED_BLOCK_BYTES
            if whole_blocks > wanted:
                self._blocks = np.sort(self._generator.choice(whole_blocks, size=wanted, replace=False))
            else:
                self._blocks = np.arange(whole_blocks)
        elif num_coordinates != self._num_coordinates:
            raise ValueError(f"num_coordinates must be {self._num_coordinates} (the memory's), got {num_coordinates}")



def _repeaters(agreement: np.ndarray, shared: np.ndarray) -> list[int]:
    """Rows of ``agreement`` (:meth:`VoteMemory.self_agreement`) far above the median (:data:`REPETITION_MARGIN`) on some block where ``shared`` holds."""
    if agreement.shape[0] < 3 or agreement.shape[1] == 0:
        return []
    score = _robust_scores(agreement, floor=0.5 / np.sqrt(8 * INSPECTED_BLOCK_BYTES))
    return [int(r) for r in np.nonzero(((score > REPETITION_MARGIN) & shared).any(axis=1))[0]]


def robust_vote(
    payloads: Sequence[np.ndarray], num_coordinates: int, *, generator: np.random.Generator | None = None,
    memory: VoteMemory | None = None, identities: Sequence | None = None,
) -> RobustVote:
    """Majority vote of the payloads that do not look like a coordinated attack.

    Server-side post-processing of released bits: no privacy cost, nothing asked
    of the clients. Three filters, each on statistics of the packed payloads
    (popcounts; no payload is unpacked), then the plain majority of the rest:

    1. **+1 rate.** Under DP noise every honest payload's share of +1 bits sits
       close to the others' (measured 0.515-0.52 on MNIST); a payload whose
       rate is far from the median (robust z-score over the median absolute
       deviation, floored at the binomial standard deviation 0.5/sqrt(n) of
       the n coordinates inspected) pushes a constant direction (all-ones) and
       is dropped.
    2. **Collusion.** Honest noisy payloads agree with each other on about half
       of the coordinates; identical or correlated attackers agree on many more.
       Two statistics, each compared with the other payloads' (robust z-score,
       floored at its standard error were the bits coin flips), a payload far
       above (:data:`COLLUSION_MARGIN`) on either is dropped:

       - its agreement with the payload most like it, on a random sketch of
         coordinates (:data:`ROBUST_SKETCH_BYTES`, drawn afresh every call),
         among all the others, or with more than 65 payloads among
         ``2 * COLLUSION_PARTNERS`` drawn at random;
       - its likeness: its mean agreement with all the other payloads, on each
         block of :data:`INSPECTED_BLOCK_BYTES` inspected and on all of them,
         from popcounts against the count's bit-planes (no pair compared).
         Attackers who push one block (a class's row: ``targeted-push``) the
         same way are far more alike there than honest clients under DP noise.
         Pairs compared block by block would not tell them from honest clients
         that hold the same classes (non-IID), which the mean over all the
         others dilutes;
       - its copies: how many runs of :data:`COPY_BYTES` bytes of the inspected
         blocks it shares exactly with another payload at the same place
         (hashed in the same pass, no pair compared; :data:`COPY_MARGIN`). Under DP noise honest payloads never
         repeat 512 coordinates, even those of clients that hold the same
         data; two attackers who push a row with the same signs do.
       - with ``memory`` (:class:`VoteMemory`), its repetition: its
         self-agreement with the payload the same client (``identities``)
         sent last time, on each memory block. A round counts against the
         client when it is far above the others' (:data:`REPETITION_MARGIN`)
         on a block where the payload's likeness is above the median; a
         payload whose sender's recent rounds counted in half or more
         (:meth:`VoteMemory.repeating`) is dropped as ``"repetition"``. An
         attacker that pushes a row with the same signs every round repeats
         itself there however little of the row it pushes in one round;
         honest DP noise is fresh every round.
    3. **Disagreement.** Against the majority of the OTHER payloads left (its
       own vote would inflate its agreement: a tenth of the vote with 10
       voters), a payload that agrees far less than the rest is dropped
       (sign-flippers push against the others' direction).

    Filters 1 and 3 and the likeness read at most :data:`INSPECTED_BYTES` of
    each payload: all of it up to 131,072 coordinates, else random blocks drawn
    afresh every call, so that an attacker cannot know which of its coordinates
    are looked at.

    Cost: the payloads are counted once (:class:`VoteCounter`), and read once
    more on the inspected bytes (with the compiled kernel, one pass for all
    the statistics); they are counted and inspected again only when a payload
    is left out. Memory: O(d) for the counters, O(M K) for the sketches, O(M)
    per block for the statistics; time linear in M. The payloads themselves
    are read, never copied (the caller holds them: Flower's replies). With
    ``memory``: at most :data:`INSPECTED_BYTES` kept per client; the memory
    blocks are read in the same pass as the inspected ones (on a model larger
    than :data:`INSPECTED_BYTES`, up to as many bytes again), which also
    compares them with what each sender sent last time and keeps them.

    Args:
        payloads: validated packed payloads.
        num_coordinates: d.
        generator: randomness of the sketch, of the partners and of the inspected
            blocks; None = fresh OS entropy.
        memory: the run's :class:`VoteMemory`, read and then updated with
            these payloads; None (the default) = no repetition statistic.
        identities: with ``memory``, the sender of each payload (distinct
            hashable ids that stay the same across rounds: client numbers,
            node ids).

    Returns:
        :class:`RobustVote`. With fewer than 3 payloads, no filter runs.

    Raises:
        ValueError: if ``memory`` comes without ``identities``, or they are not
            one distinct identity per payload.
    """
    rows = [check_packed(p, num_coordinates) for p in payloads]
    if memory is not None:
        _check_identities(identities, len(rows))
    everyone = list(range(len(rows)))
    counter = _counter(rows, everyone, num_coordinates)
    if len(rows) < 3:
        if memory is not None:
            memory.repeating(rows, identities, num_coordinates, None)
        return RobustVote(counter.vote(), tuple(everyone), {})
    generator = generator if generator is not None else np.random.default_rng()
    blocks = _inspected_blocks(num_coordinates, generator)
    if memory is None:
        seen = _inspect(rows, everyone, counter, blocks)
        repeating = []
    else:  # the inspection pass also compares each payload with its sender's last one, and keeps it
        before, after = memory.slots(identities, num_coordinates)
        seen = _inspect(rows, everyone, counter, blocks, memory.blocks(num_coordinates), (before, after))
        known = [p for p, row in enumerate(before) if row is not None]
        repeating = memory.repeating(rows, identities, num_coordinates, seen.memory_likeness, (known, seen.memory_differences))
    dropped: dict[int, str] = {}
    for index in _far_from_median(seen.positives / seen.coordinates, floor=0.5 / np.sqrt(seen.coordinates), threshold=RATE_THRESHOLD, side="both"):
        dropped[index] = "+1 rate"
    kept = [i for i in everyone if i not in dropped]
    if dropped and len(kept) >= 3:  # the statistics below compare the payloads left with each other
        counter = _counter(rows, kept, num_coordinates)
        seen = _inspect(rows, kept, counter, blocks)
    colluders = _colluders(rows, kept, generator)
    if len(kept) >= 3:
        colluders |= {kept[p] for p in _too_alike(seen)}
        colluders |= {kept[p] for p in _far_from_median(_copied_runs(seen.run_hashes), floor=1.0, threshold=COPY_MARGIN, side="high")}
    for index in sorted(colluders):
        dropped[index] = "collusion"
    for index in repeating:
        dropped.setdefault(index, "repetition")
    kept = [i for i in everyone if i not in dropped]
    if colluders or repeating or len(kept) < 3:  # the count, and each payload's agreement with it, without the payloads left out
        counter = _counter(rows, kept, num_coordinates)
        if len(kept) >= 3:
            seen = _inspect(rows, kept, counter, blocks)
    if len(kept) >= 3:
        floor = 0.5 / np.sqrt(max(seen.decided.min(), 1))
        disagreeing = [kept[p] for p in _far_from_median(seen.agreement, floor=floor, threshold=AGREEMENT_THRESHOLD, side="low")]
        if disagreeing:
            dropped.update((index, "disagreement") for index in disagreeing)
            kept = [i for i in kept if i not in dropped]
            counter = _counter(rows, kept, num_coordinates)
    return RobustVote(counter.vote(), tuple(kept), dropped)


def _plane_weights_and_sums(plane_blocks: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """``(2^w per plane, the sum of the +1 counts c over each block)`` of the count's planes gathered on some blocks."""
    weights = np.array([1 << w for w in range(len(plane_blocks))], dtype=np.int64)
    sums = np.stack([np.bitwise_count(p.view(np.uint64).reshape(-1, INSPECTED_BLOCK_BYTES // 8)).sum(axis=1, dtype=np.int64) for p in plane_blocks])
    return weights, weights @ sums


def _block_products(counts: np.ndarray, weights: np.ndarray, count_sums: np.ndarray, voters: int) -> np.ndarray:
    """``[rows, blocks]``: each payload's x . (S - x) on each block, from ``counts[r, 0]`` (its +1 bits) and
    ``counts[r, 1 + w]`` (its +1 bits in plane w) of :func:`_block_and_counts` (module docstring of :func:`_inspect`)."""
    with_counts = np.einsum("w,rwb->rb", weights, counts[:, 1 : 1 + len(weights), :])  # over each block: bit * c
    size = 8 * INSPECTED_BLOCK_BYTES
    return 4 * with_counts - 2 * voters * counts[:, 0, :] - 2 * count_sums + voters * size - size


def _check_identities(identities, count: int) -> None:
    if identities is None:
        raise ValueError("identities must be given with memory, got None")
    identities = list(identities)
    if len(identities) != count:
        raise ValueError(f"identities must hold one per payload ({count}), got {len(identities)}")
    if len(set(identities)) != count:
        raise ValueError(f"identities must be distinct, got {identities}")


def _inspected_blocks(num_coordinates: int, generator: np.random.Generator) -> np.ndarray | None:
    """The sorted indices of the blocks of :data:`INSPECTED_BLOCK_BYTES` the filters read, or None for all the bytes."""
    wanted = INSPECTED_BYTES // INSPECTED_BLOCK_BYTES
    whole_blocks = num_coordinates // (8 * INSPECTED_BLOCK_BYTES)  # never the last, partial byte
    if whole_blocks <= wanted:
        return None
    return np.sort(generator.choice(whole_blocks, size=wanted, replace=False))


def _gather(array: np.ndarray, blocks: np.ndarray) -> np.ndarray:
    """The bytes of ``array`` in these blocks (indices, in the order given), one after the other."""
    return array[: (int(blocks.max()) + 1) * INSPECTED_BLOCK_BYTES].reshape(-1, INSPECTED_BLOCK_BYTES)[blocks].reshape(-1)


@dataclass(frozen=True)
class _Inspection:
    """Statistics of the payloads a counter holds, on the inspected bytes (:func:`_inspect`).

    Attributes:
        coordinates: how many coordinates were inspected.
        positives: each payload's +1 bits among them.
        agreement: the share of the coordinates decided without the payload on which it agrees with that vote.
        decided: how many coordinates were decided without the payload.
        likeness: ``[payloads, blocks + 1]``, each payload's mean agreement with every other payload on each
            whole inspected block of :data:`INSPECTED_BLOCK_BYTES`, and (last column) on all of them.
        likeness_floor: ``[blocks + 1]``, the standard error of ``likeness`` were the bits coin flips.
        run_hashes: uint64 ``[payloads, runs]``, a 64-bit hash of each run of :data:`COPY_BYTES` bytes of the whole
            inspected blocks.
        memory_likeness: with memory blocks (:func:`_inspect`), ``[payloads, memory blocks]``, the likeness on each
            of them; else None.
        memory_differences: with memory blocks, int64 ``[payloads, memory blocks]``, the bits in which each payload
            differs on them from what its sender sent before (0 for a sender new to the memory); else None.
    """

    coordinates: int
    positives: np.ndarray
    agreement: np.ndarray
    decided: np.ndarray
    likeness: np.ndarray
    likeness_floor: np.ndarray
    run_hashes: np.ndarray
    memory_likeness: np.ndarray | None = None
    memory_differences: np.ndarray | None = None


def _inspect(
    rows, indices: list[int], counter: VoteCounter, blocks: np.ndarray | None, memory_blocks: np.ndarray | None = None,
    memory_slots: tuple[list, list] | None = None,
) -> _Inspection:
    """Statistics of the payloads ``rows[i]`` (``i`` in ``indices``; ``counter`` holds exactly these).

    Agreement with the OTHERS' vote: with the +1 count c and n voters, the
    vote without a payload whose bit is +1 is sign(2c - n - 1) (threshold
    shift +1), and without one whose bit is -1 it is sign(2c - n + 1) (shift
    -1): two pairs of bitmaps serve every payload, so a payload's own vote does
    not inflate its agreement. Likeness: with x = +-1 a payload's signs and
    S = 2c - n their sum over the payloads, its summed agreement with each
    other payload on a block is (x . S - K) / 2 + K (n - 1) / 2 over the
    block's K coordinates, and x . S comes from the popcounts of the payload
    ANDed with each bit-plane of c (c = sum_w 2^w plane_w), so no pair is ever
    compared. Counted on the inspected bytes (``blocks``; None: all), with
    the compiled kernel in one pass per payload (two for a whole payload: the
    totals include the partial block at its end). With ``memory_blocks`` (a
    :class:`VoteMemory`'s: every whole block when ``blocks`` is None) and
    ``memory_slots`` (``before, after`` of :meth:`VoteMemory.slots`, one each
    per index), the same pass also measures the likeness on them
    (``memory_likeness``), compares each payload there with ``before``
    (``memory_differences``) and writes it to ``after``; they count in no
    other statistic.
    """
    planes = counter.flushed_planes()
    voters = counter.num_voters
    if blocks is None:
        bitmaps = [*counter.vote_bitmaps(shift=1), *counter.vote_bitmaps(shift=-1)]
        coordinates = counter.num_coordinates
        blocks = np.arange(coordinates // (8 * INSPECTED_BLOCK_BYTES))
        if memory_blocks is not None and not np.array_equal(memory_blocks, blocks):
            raise ValueError("memory_blocks must be every whole block when the whole payload is inspected")
        read = blocks
        plane_blocks = [plane[: len(read) * INSPECTED_BLOCK_BYTES] for plane in planes]
        whole = True
    else:
        read = blocks if memory_blocks is None else np.concatenate([blocks, memory_blocks])
        plane_blocks = [_gather(plane, read) for plane in planes]  # the blocks read need not be sorted
        inspected_bytes = INSPECTED_BLOCK_BYTES * len(read)
        bitmaps = [*counter.threshold_bitmaps(1, plane_blocks, inspected_bytes), *counter.threshold_bitmaps(-1, plane_blocks, inspected_bytes)]
        coordinates = 8 * INSPECTED_BLOCK_BYTES * len(blocks)
        whole = False
    copied = 0 if memory_blocks is None else len(memory_blocks)
    # Sum over each block of c; then, chunk by chunk of payloads (bounded scratch whatever M), the totals and x . (S - x).
    weights, count_sums = _plane_weights_and_sums(plane_blocks) if len(read) else (np.array([1 << w for w in range(len(planes))], dtype=np.int64), 0)
    differences = np.zeros((len(indices), copied), dtype=np.int64)
    totals, products, hashes = [], [], []
    for start in range(0, len(indices), _INSPECTION_CHUNK_ROWS):
        chunk = slice(start, start + _INSPECTION_CHUNK_ROWS)
        selected = [rows[i] for i in indices[chunk]]
        keep = None if memory_slots is None or copied == 0 else (memory_slots[0][chunk], memory_slots[1][chunk], differences[chunk])
        if whole:
            totals.append(_and_counts(selected, [None] + bitmaps, coordinates))
            counts, hashed = _block_and_counts(selected, [None] + plane_blocks, read, keep=keep) if len(read) else (None, None)
        else:
            counts, hashed = _block_and_counts(selected, [None] + bitmaps + plane_blocks, read, hashed_blocks=len(blocks), keep=keep)
            totals.append(counts[:, :5, : len(blocks)].sum(axis=2))
            counts = counts[:, [0, *range(5, counts.shape[1])]]
        hashes.append(np.zeros((len(selected), 0), dtype=np.uint64) if hashed is None else hashed)
        if counts is not None:
            products.append(_block_products(counts, weights, count_sums, voters))
    totals = np.concatenate(totals)
    # The bitmaps' tail bits are zero, so a payload's -1 coordinates among a
    # bitmap's are the bitmap's bits minus the payload's +1 ones (over the inspected blocks, not the memory's).
    inspected = slice(None) if whole else slice(0, INSPECTED_BLOCK_BYTES * len(blocks))
    minus_positive_bits, minus_negative_bits = _count_bits(bitmaps[2][inspected]), _count_bits(bitmaps[3][inspected])
    agree = totals[:, 1] + (minus_negative_bits - totals[:, 4])
    decided = agree + totals[:, 2] + (minus_positive_bits - totals[:, 3])
    products = np.concatenate(products) if products else None
    memory_likeness = None
    if memory_blocks is not None:
        memory_likeness = np.zeros((len(indices), 0)) if products is None else _likeness(products[:, len(read) - copied :], len(indices), voters)[0][:, :-1]
    if products is not None and not whole:
        products = products[:, : len(blocks)]
    likeness, floor = _likeness(products, len(indices), voters)
    return _Inspection(
        coordinates, totals[:, 0], agree / np.maximum(decided, 1), decided, likeness, floor, np.concatenate(hashes),
        memory_likeness, None if memory_blocks is None else differences,
    )


def _likeness(products: np.ndarray | None, count: int, voters: int) -> tuple[np.ndarray, np.ndarray]:
    """``(likeness, floor)`` of :class:`_Inspection` from ``products[r, b]``, payload r's x . (S - x) on block b."""
    if products is None or voters < 2:
        return np.zeros((count, 0)), np.zeros(0)
    size = 8 * INSPECTED_BLOCK_BYTES
    products = np.concatenate([products, products.sum(axis=1, keepdims=True)], axis=1)
    sizes = np.append(np.full(products.shape[1] - 1, size), size * (products.shape[1] - 1))
    pairs = sizes * (voters - 1)
    return 0.5 + products / (2 * pairs), 0.5 / np.sqrt(pairs)


def _copied_runs(run_hashes: np.ndarray) -> np.ndarray:
    """How many runs each payload shares exactly with another payload at the same place, from ``run_hashes[payload, run]``.

    Equal hashes at a place are found by sorting, 32 places at a time
    (scratch: about 17 bytes per payload and place).
    """
    copies = np.zeros(run_hashes.shape[0], dtype=np.int64)
    for start in range(0, run_hashes.shape[1], 32):
        part = run_hashes[:, start : start + 32]
        order = np.argsort(part, axis=0)
        ordered = np.take_along_axis(part, order, axis=0)
        places, columns = np.nonzero(ordered[1:] == ordered[:-1])  # the payloads at sorted places p and p + 1 repeat a run
        shared = np.zeros(part.shape, dtype=bool)
        shared[order[places, columns], columns] = True
        shared[order[places + 1, columns], columns] = True
        copies += shared.sum(axis=1)
    return copies


def _hash_runs(row: np.ndarray, offsets: np.ndarray, block_bytes: int) -> np.ndarray:
    """The compiled kernel's hashes of the runs of :data:`COPY_BYTES` of one row's blocks, in numpy (the same hashes)."""
    words = np.stack([row[offset : offset + block_bytes] for offset in offsets]).reshape(-1, COPY_BYTES // 8, 8)
    words = np.ascontiguousarray(words).view(np.uint64)[..., 0]  # [runs, words per run], little-endian like the C loads
    hashed = np.full(words.shape[0], 0x9E3779B97F4A7C15, dtype=np.uint64)
    for w in range(words.shape[1]):
        hashed = (hashed ^ words[:, w]) * np.uint64(0xFF51AFD7ED558CCD)
        hashed ^= hashed >> np.uint64(33)
    return hashed


def _too_alike(seen: _Inspection) -> set[int]:
    """Positions of the payloads whose likeness on some block (or on all) is far above the others' there."""
    if seen.likeness.shape[1] == 0:
        return set()
    return set(_far_from_median(seen.likeness, floor=seen.likeness_floor, threshold=COLLUSION_MARGIN, side="high"))


def _block_and_counts(
    rows, masks: list[np.ndarray | None], blocks: np.ndarray, *, hashes: bool = True, hashed_blocks: int | None = None,
    keep: tuple[list, list, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """``(counts, hashes)``: ``counts[r, j, b]``, the +1 coordinates of block ``blocks[b]`` of ``rows[r]`` set in block ``b`` of ``masks[j]``; ``hashes[r]``, the hashes of the runs of :data:`COPY_BYTES` of the first ``hashed_blocks`` (None: all) of those blocks.

    Blocks of :data:`INSPECTED_BLOCK_BYTES`; the masks hold theirs one after
    the other (None: all ones). ``keep = (before, after, differences)``: each
    row's last ``k`` blocks are compared with ``before[r]`` (None: not) into
    ``differences[r]`` and then written to ``after[r]``
    (:meth:`CompiledVoteKernel.block_and_counts`). The compiled kernel reads
    the rows where they are, once for all of it; numpy gathers each row's blocks.
    """
    offsets = blocks * INSPECTED_BLOCK_BYTES
    kernel = load_kernel()
    if kernel is not None:
        rows = [np.ascontiguousarray(row) for row in rows]
        return kernel.block_and_counts(rows, masks, offsets, INSPECTED_BLOCK_BYTES, COPY_BYTES if hashes else 0, hashed_blocks=hashed_blocks, keep=keep)
    hashed_blocks = len(blocks) if hashed_blocks is None else hashed_blocks
    counts = np.empty((len(rows), len(masks), len(blocks)), dtype=np.int64)
    shape = (len(blocks), INSPECTED_BLOCK_BYTES)
    for r, row in enumerate(rows):
        gathered = np.stack([row[o : o + INSPECTED_BLOCK_BYTES] for o in offsets]) if len(blocks) else np.zeros(shape, dtype=np.uint8)
        for j, mask in enumerate(masks):
            bits = gathered if mask is None else gathered & mask.reshape(shape)
            counts[r, j] = np.bitwise_count(bits).sum(axis=1, dtype=np.int64)
        if keep is not None and keep[2].shape[1]:
            before, after, differences = keep[0][r], keep[1][r], keep[2]
            new = gathered[len(blocks) - differences.shape[1] :]
            differences[r] = 0 if before is None else np.bitwise_count(new ^ before.reshape(new.shape)).sum(axis=1, dtype=np.int64)
            after[:] = new.reshape(-1)
    if not hashes:
        return counts, None
    return counts, np.stack([_hash_runs(row, offsets[:hashed_blocks], INSPECTED_BLOCK_BYTES) for row in rows])


def _and_counts(rows, masks: list[np.ndarray | None], num_coordinates: int) -> np.ndarray:
    """``counts[r, j]``: the +1 coordinates of ``rows[r]`` set in bitmap ``masks[j]`` (None: all of them), int64.

    Tail bits of the rows never count; the masks' tail bits must be zero. With
    the compiled kernel each row is read once for all the masks.
    """
    kernel = load_kernel()
    if kernel is not None:
        rows = [np.ascontiguousarray(row) for row in rows]
        return kernel.and_counts(rows, masks, payload_bytes(num_coordinates), last_byte_mask(num_coordinates))
    counts = np.empty((len(rows), len(masks)), dtype=np.int64)
    for r, row in enumerate(rows):
        for j, mask in enumerate(masks):
            counts[r, j] = _positives(row, num_coordinates) if mask is None else _count_bits(row & mask)
    return counts


def _counter(rows, indices, num_coordinates: int) -> VoteCounter:
    counter = VoteCounter(num_coordinates)
    for i in indices:
        counter.add(rows[i])
    return counter


def _count_bits(bytes_: np.ndarray) -> int:
    """Set bits of a uint8 array of any length."""
    return int(np.bitwise_count(bytes_).sum(dtype=np.int64))


def _positives(row: np.ndarray, num_coordinates: int) -> int:
    full = num_coordinates // 8
    count = _count_bits(row[:full])
    if num_coordinates % 8:
        count += int(np.bitwise_count(row[full] & np.uint8(last_byte_mask(num_coordinates))))
    return count


def _robust_scores(values: np.ndarray, *, floor) -> np.ndarray:
    """``(values - median) / spread`` per column, the spread being 1.4826 median absolute deviations floored at ``floor``."""
    median = np.median(values, axis=0)
    spread = np.maximum(1.4826 * np.median(np.abs(values - median), axis=0), floor)
    return (values - median) / spread


def _far_from_median(values: np.ndarray, *, floor, threshold: float, side: str) -> list[int]:
    """Indices whose value is more than ``threshold`` robust standard deviations from the median.

    ``values`` ``[n]``, or ``[n, columns]`` with a ``floor`` per column: then
    each column is scored apart, and an index far in any column is returned.
    """
    score = _robust_scores(values, floor=floor)
    far = {"low": score < -threshold, "high": score > threshold, "both": np.abs(score) > threshold}[side]
    if far.ndim == 2:
        far = far.any(axis=1)
    return [int(i) for i in np.nonzero(far)[0]]


def _colluders(rows, candidates: list[int], generator) -> set[int]:
    """Payloads that agree with another far more than the pairs of payloads usually do, on a random sketch.

    Each payload is compared with its partners on a cycle (:func:`_fewest_differences`).
    """
    full_bytes = min(row.shape[0] for row in rows)
    full_bytes -= 1  # the last byte may hold unused tail bits
    if len(candidates) < 3 or full_bytes < 1:
        return set()
    positions = generator.choice(full_bytes, size=min(ROBUST_SKETCH_BYTES, full_bytes), replace=False)
    sketch = np.zeros((len(candidates), 1, -(-positions.shape[0] // 8) * 8), dtype=np.uint8)  # whole words
    for row, i in zip(sketch, candidates):
        row[0, : positions.shape[0]] = rows[i][positions]
    bits = 8 * positions.shape[0]
    # each payload's agreement with the one most like it
    closest = 1.0 - _fewest_differences(sketch.view(np.uint64), generator)[:, -1] / bits
    far = _far_from_median(closest, floor=0.5 / np.sqrt(bits), threshold=COLLUSION_MARGIN, side="high")
    return {candidates[i] for i in far}


def _fewest_differences(sketch: np.ndarray, generator) -> np.ndarray:
    """For each row of ``sketch`` (uint64 ``[n, blocks, words]``), the fewest bits in which it differs from a row it is compared with.

    Per block, and over the whole row (the last column): int64 ``[n, blocks + 1]``.
    The rows sit on a cycle, in random order when there are more than
    ``2 * COLLUSION_PARTNERS + 1`` (else in their own order, and every pair is
    compared); each is compared with the rows up to :data:`COLLUSION_PARTNERS`
    places ahead and behind. Time O(n K COLLUSION_PARTNERS), memory O(n K): no
    n x n matrix.
    """
    count = sketch.shape[0]
    order = np.arange(count) if count <= 2 * COLLUSION_PARTNERS + 1 else generator.permutation(count)
    reach = min(COLLUSION_PARTNERS, count // 2)
    cycle = sketch if count <= 2 * COLLUSION_PARTNERS + 1 else sketch[order]
    kernel = load_kernel()
    if kernel is not None:
        fewest = kernel.cycle_fewest_differences(cycle, reach)
    else:
        fewest = np.full((count, sketch.shape[1] + 1), np.iinfo(np.int64).max)
        for offset in range(1, reach + 1):
            # differences[p]: between the rows at places p and p + offset (mod count); each pair counts for both rows.
            per_block = np.empty((count, sketch.shape[1]), dtype=np.int64)
            for start in range(0, count, 256):  # bounded scratch whatever the count
                stop = min(start + 256, count)
                partners = np.take(cycle, np.arange(start + offset, stop + offset) % count, axis=0)
                per_block[start:stop] = np.bitwise_count(cycle[start:stop] ^ partners).sum(axis=2, dtype=np.int64)
            differences = np.concatenate([per_block, per_block.sum(axis=1, keepdims=True)], axis=1)
            np.minimum(fewest, differences, out=fewest)
            np.minimum(fewest[offset:], differences[: count - offset], out=fewest[offset:])
            np.minimum(fewest[:offset], differences[count - offset :], out=fewest[:offset])
    result = np.empty_like(fewest)
    result[order] = fewest
    return result
