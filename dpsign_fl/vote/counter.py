"""The vote counter: coordinate-wise majority over bit-packed sign updates.

:class:`VoteCounter` counts the +1 votes per coordinate without unpacking the
payloads and without stacking them: the counts live in bit-planes (plane ``k``
holds bit ``k`` of every coordinate's count, packed in the wire bit order of
:mod:`dpsign_fl.vote.packing`), rows are added with bit-parallel full adders and the
vote is a bit-sliced comparison of the planes with a threshold. Memory is
``O(d)`` whatever the number of voters: ``ceil(log2(M + 1))`` planes of
``ceil(d/8)`` bytes, plus fixed-size scratch.

The adders run in a small C loop compiled on first use
(:mod:`dpsign_fl.vote.kernel`, faster than copying the payloads) or, without
a C compiler, as numpy calls (about 0.3x copy speed); the counts are the same.
"""

from __future__ import annotations

import numpy as np

from .packing import BIT_ORDER, check_packed, last_byte_mask, payload_bytes
from .kernel import load_kernel

# Rows wait until 32 are pending, then are summed together before the sums
# reach the higher planes. The compiled kernel keeps a block of the planes in
# L1 cache across the batch, so a larger batch reads and writes the planes
# fewer times: 1.16x copy speed with 32 rows vs 0.97x with 16 at d = 1e7,
# M = 100 (64 and 112: 1.17x, 1.18x). In numpy the carry-save tree costs
# 5 calls per row whatever the batch (a full adder takes 5 two-input
# operations; 16 rows plus plane 0 are exactly 8 full adders at weight 0):
# 32 rows measured 0.317-0.328x vs 0.318x with 16. So at most 31 rows wait.
_BATCH_ROWS = 32

# The tree runs over slices of this many bytes, so that one slice of each of
# the ~15 live registers (planes, scratch, the two rows being read) stays
# about in L2 cache (2 MiB per core on the machine measured). Smaller slices
# pay more per-call numpy overhead (~0.5-1 us a call); measured with
# dpsign_fl/bench/vote.py at M = 100, 64 KiB and 128 KiB tie at d = 1e7 and
# 128 KiB is ~10% faster at d = 1e8; 1 MiB is ~2x slower (L3 bound).
_BLOCK_BYTES = 128 * 1024

# Opcodes of a compiled adder schedule: (opcode, left, right, out) register indices.
_XOR, _AND = 0, 1
_UFUNCS = (np.bitwise_xor, np.bitwise_and)


class VoteCounter:
    """Streaming, bit-sliced count of the +1 votes per coordinate.

    Add payloads one at a time with :meth:`add`; read the vote with
    :meth:`vote_bitmaps` (packed) or :meth:`vote` (int8). Payloads are never
    unpacked or stacked. Set bits in the unused tail of a payload's last byte
    are masked, so they never count.

    Args:
        num_coordinates: d, the number of coordinates of every payload.
        kernel: ``"compiled"``, ``"numpy"`` or ``"auto"`` (compiled when a C
            compiler works); None = ``$DPSIGN_FL_VOTE_KERNEL``, else auto
            (:mod:`dpsign_fl.vote.kernel`).

    Raises:
        TypeError: if ``num_coordinates`` is not an int.
        ValueError: if ``num_coordinates < 1``, or for an unknown kernel.
        RuntimeError: for ``kernel="compiled"`` when it cannot be built.
    """

    def __init__(self, num_coordinates: int, *, kernel: str | None = None):
        self._num_bytes = payload_bytes(num_coordinates)
        self._kernel = load_kernel(kernel)
        self._num_coordinates = int(num_coordinates)
        # Bytes whose 8 bits are all coordinates. A partial last byte is summed
        # apart from them, from masked copies, so no row is ever copied whole.
        self._full_bytes = self._num_coordinates // 8
        self._tail_mask = np.uint8(last_byte_mask(self._num_coordinates)) if self._num_coordinates % 8 else None
        self._block_bytes = min(_BLOCK_BYTES, max(self._full_bytes, 1))
        # Planes are padded with zeros to whole uint64 words so that popcounts
        # can run on a uint64 view; the adders touch only the first num_bytes.
        self._padded_bytes = -(-self._num_bytes // 8) * 8
        self._planes: list[np.ndarray] = []
        self._scratch: list[np.ndarray] = []
        self._schedules: dict[tuple[int, int], tuple[list[tuple[int, int, int, int]], int]] = {}
        self._pending: list[np.ndarray] = []
        self._summed_voters = 0

    @property
    def num_coordinates(self) -> int:
        """d, the number of coordinates counted."""
        return self._num_coordinates

    @property
    def kernel(self) -> str:
        """``"compiled"`` or ``"numpy"``: which adders this counter runs."""
        return "numpy" if self._kernel is None else "compiled"

    @property
    def num_voters(self) -> int:
        """n, the number of payloads added so far."""
        return self._summed_voters + len(self._pending)

    def add(self, packed) -> None:
        """Add one voter's packed signs.

        The counter keeps a reference to (not a copy of) each payload until it
        sums a group of 32, or until a result is read: copying every payload
        would cost about as much as the compiled adders. So at most 31
        payloads are held, and a payload must not be modified after it is added.

        Args:
            packed: 1-D uint8 array of ``ceil(d / 8)`` bytes, as
                :func:`dpsign_fl.vote.packing.pack_signs` returns.

        Raises:
            ValueError: if ``packed`` has the wrong dtype, shape or length.
        """
        row = check_packed(packed, self._num_coordinates)
        if self._kernel is not None:
            row = np.ascontiguousarray(row)  # the C loop reads raw memory; a copy only for a strided view
        self._pending.append(row)
        if len(self._pending) == _BATCH_ROWS:
            self._flush()

    def total_positives(self) -> int:
        """Return the number of +1 votes summed over all coordinates and voters."""
        self._flush()
        return sum(_popcount(plane) << weight for weight, plane in enumerate(self._planes))

    def positive_counts(self) -> np.ndarray:
        """Return the number of +1 votes per coordinate, int64 ``[d]``.

        For diagnostics and tests: this unpacks every plane once and needs
        ``9 d`` bytes; the vote itself never unpacks.
        """
        self._flush()
        counts = np.zeros(self._num_coordinates, dtype=np.int64)
        for plane in reversed(self._planes):  # Horner, most significant plane first
            counts <<= 1
            counts += np.unpackbits(
                plane[: self._num_bytes], count=self._num_coordinates, bitorder=BIT_ORDER
            )
        return counts

    def vote_bitmaps(self, shift: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Return the packed bitmaps of the coordinates voted +1 and voted -1.

        ``vote_j = sign(2 c_j - n - shift)``, with ``c_j`` the +1 count of
        coordinate ``j`` and ``n`` the number of voters. ``shift = 0`` is the
        plain majority. A tie (``2 c_j = n + shift``, only for even
        ``n + shift``) votes 0, so the server leaves that coordinate unchanged
        rather than favouring a sign. With no voters every coordinate votes
        ``sign(-shift)``.

        Args:
            shift: integer offset of the threshold, in votes.

        Returns:
            ``(positive, negative)``: two disjoint uint8 arrays of ``ceil(d/8)``
            bytes in the wire bit order, set where the vote is +1 (resp. -1);
            the unused tail bits are zero.

        Raises:
            TypeError: if ``shift`` is not an int.
        """
        positive, negative = self.threshold_bitmaps(shift, self.flushed_planes(), self._num_bytes)
        if self._tail_mask is not None:
            positive[-1] &= self._tail_mask
            negative[-1] &= self._tail_mask
        return positive, negative

    def flushed_planes(self) -> list[np.ndarray]:
        """The bit-planes of the counts after every pending row is added (plane ``k``: bit ``k`` of each count); not copies."""
        self._flush()
        return self._planes

    def _bounds(self, shift) -> tuple[int, int]:
        """``(b+, b-)``: the vote is +1 where the +1 count c >= b+ and -1 where c < b- (either may be <= 0); after a flush."""
        if isinstance(shift, bool) or not isinstance(shift, (int, np.integer)):
            raise TypeError(f"shift must be an int, got {type(shift).__name__}")
        threshold = self._summed_voters + int(shift)
        # 2c > T  <=>  c >= floor(T/2) + 1;   2c < T  <=>  not c >= ceil(T/2).
        return threshold // 2 + 1, -(-threshold // 2)

    def threshold_bitmaps(self, shift, planes: list[np.ndarray], num_bytes: int) -> tuple[np.ndarray, np.ndarray]:
        """The packed ``2c > n + shift`` and ``2c < n + shift`` bitmaps of the first ``num_bytes`` of ``planes`` (flushed)."""
        positive_bound, negative_bound = self._bounds(shift)
        positive = np.empty(num_bytes, dtype=np.uint8)
        negative = np.empty(num_bytes, dtype=np.uint8)
        for start in range(0, num_bytes, self._block_bytes):
            stop = min(start + self._block_bytes, num_bytes)
            block = [plane[start:stop] for plane in planes]
            _write_at_least(block, positive_bound, positive[start:stop])
            _write_at_least(block, negative_bound, negative[start:stop])
        np.invert(negative, out=negative)
        return positive, negative

    def vote(self, shift: int = 0) -> np.ndarray:
        """Return the vote as int8 ``[d]`` in {-1, 0, +1}; see :meth:`vote_bitmaps`.

        Raises:
            TypeError: if ``shift`` is not an int.
        """
        if self._kernel is not None:  # one C pass from the planes to the int8 vote, no bitmaps
            planes = self.flushed_planes()
            positive_bound, negative_bound = self._bounds(shift)
            return self._kernel.vote_from_planes(planes, max(positive_bound, 0), max(negative_bound, 0), self._num_coordinates)
        positive, negative = self.vote_bitmaps(shift)
        count = self._num_coordinates
        vote = np.unpackbits(positive, count=count, bitorder=BIT_ORDER).view(np.int8)
        vote -= np.unpackbits(negative, count=count, bitorder=BIT_ORDER).view(np.int8)
        return vote

    def _flush(self) -> None:
        """Sum the pending rows into the planes."""
        rows = self._pending
        if not rows:
            return
        num_voters = self._summed_voters + len(rows)
        # Counts reach num_voters, so bit_length(num_voters) planes hold them
        # and the top plane never carries out.
        while len(self._planes) < num_voters.bit_length():
            # Allocated as words: the compiled kernel reads and writes them as aligned uint64.
            self._planes.append(np.zeros(self._padded_bytes // 8, dtype=np.uint64).view(np.uint8))
        if self._kernel is not None:
            self._kernel.add(rows, self._planes, self._num_bytes, last_byte_mask(self._num_coordinates))
        else:
            self._add_in_numpy(rows)
        self._summed_voters = num_voters
        self._pending = []

    def _add_in_numpy(self, rows: list[np.ndarray]) -> None:
        """Sum ``rows`` into the planes with an adder schedule of numpy calls (the kernel without a C compiler)."""
        key = (len(rows), len(self._planes))
        if key not in self._schedules:
            self._schedules[key] = _compile_adder_tree(*key)
        schedule, num_scratch = self._schedules[key]
        while len(self._scratch) < num_scratch:
            self._scratch.append(np.empty(self._block_bytes, dtype=np.uint8))
        for start in range(0, self._full_bytes, self._block_bytes):
            stop = min(start + self._block_bytes, self._full_bytes)
            self._run(schedule, start, stop, [row[start:stop] for row in rows])
        if self._tail_mask is not None:
            last = self._num_bytes - 1
            tails = np.fromiter((row[last] for row in rows), dtype=np.uint8, count=len(rows))
            tails &= self._tail_mask
            self._run(schedule, last, last + 1, [tails[i : i + 1] for i in range(len(rows))])

    def _run(self, schedule, start: int, stop: int, row_slices: list[np.ndarray]) -> None:
        """Execute a compiled schedule on bytes ``[start, stop)`` of the planes."""
        registers = [plane[start:stop] for plane in self._planes]
        registers += row_slices
        registers += [scratch[: stop - start] for scratch in self._scratch]
        for opcode, left, right, out in schedule:
            _UFUNCS[opcode](registers[left], registers[right], registers[out])


def _compile_adder_tree(
    num_rows: int, num_planes: int
) -> tuple[list[tuple[int, int, int, int]], int]:
    """Return the schedule adding ``num_rows`` one-bit rows into ``num_planes`` planes.

    Registers: planes ``0..K-1``, then rows ``K..K+n-1``, then scratch. At each
    weight the plane is the accumulator of a chain of full adders, as in the
    Harley-Seal popcount (Mula, Kurz and Lemire 2018, arXiv:1611.07612, Sec. 4):
    ``P_w, carry <- FA(P_w, x, y)`` absorbs two bits of weight ``w`` and makes
    one of weight ``w + 1``, which is passed on at once (depth first), so at
    most one bit per weight waits in scratch and a block's registers stay in
    L2 cache. A bit left over at the end takes a half adder. The top plane
    drops its carry, which is zero because counts stay below ``2**K``.

    Returns:
        ``(schedule, number of scratch registers)``.
    """
    schedule: list[tuple[int, int, int, int]] = []
    first_scratch = num_planes + num_rows
    temp = first_scratch  # scratch 0: the full adder's P ^ x
    free: list[int] = []
    used = 1
    waiting: list[int | None] = [None] * num_planes

    def allocate() -> int:
        nonlocal used
        if free:
            return free.pop()
        used += 1
        return first_scratch + used - 1

    def release(register: int) -> None:
        if register >= first_scratch:
            free.append(register)

    def push(weight: int, x: int) -> None:
        y = waiting[weight]
        if y is None:
            waiting[weight] = x
            return
        waiting[weight] = None
        plane = weight
        if weight == num_planes - 1:
            schedule.extend([(_XOR, plane, x, plane), (_XOR, plane, y, plane)])
        else:
            carry = allocate()
            # carry = majority(P, x, y) = P ^ ((P ^ x) & (P ^ y)); sum = P ^ x ^ y.
            schedule.extend(
                [
                    (_XOR, plane, x, temp),
                    (_XOR, plane, y, carry),
                    (_AND, carry, temp, carry),
                    (_XOR, carry, plane, carry),
                    (_XOR, temp, y, plane),
                ]
            )
        release(x)
        release(y)
        if weight < num_planes - 1:
            push(weight + 1, carry)

    for row in range(num_rows):
        push(0, num_planes + row)
    for weight in range(num_planes):
        x = waiting[weight]
        if x is None:
            continue
        waiting[weight] = None
        if weight < num_planes - 1:
            carry = allocate()
            schedule.append((_AND, weight, x, carry))
        schedule.append((_XOR, weight, x, weight))
        release(x)
        if weight < num_planes - 1:
            push(weight + 1, carry)
    return schedule, used


def _write_at_least(planes: list[np.ndarray], bound: int, out: np.ndarray) -> None:
    """Write into ``out`` the packed bitmap of ``count >= bound`` for bit-sliced counts.

    From the least significant plane up, with ``ge`` the comparison restricted
    to the planes below ``k``: on the planes up to ``k`` it is ``P_k & ge``
    where the bound has bit ``k`` set and ``P_k | ge`` where it has not (the
    comparison starts as all ones: equal numbers compare ``>=``). One numpy
    call per plane.
    """
    if bound <= 0:
        out.fill(0xFF)
        return
    if bound >= 1 << len(planes):
        out.fill(0)
        return
    started = False  # until the bound's lowest set bit, ge is all ones
    for weight, plane in enumerate(planes):
        if (bound >> weight) & 1:
            if started:
                np.bitwise_and(out, plane, out)
            else:
                np.copyto(out, plane)
                started = True
        elif started:
            np.bitwise_or(out, plane, out)


def _popcount(plane: np.ndarray) -> int:
    """Return the number of set bits of a zero-padded plane (a whole number of uint64 words)."""
    return int(np.bitwise_count(plane.view(np.uint64)).sum(dtype=np.int64))


def majority_vote(packed, num_coordinates: int) -> np.ndarray:
    """Return the coordinate-wise majority of the clients' signs.

    Tie rule: a coordinate with as many +1 as -1 votes (only possible for an even
    number of voters) gets 0, so the server leaves it unchanged this round
    rather than favouring one direction.

    Args:
        packed: a sequence of packed updates (each as :func:`pack_signs` returns)
            or a 2-D uint8 array ``[M, ceil(d/8)]``.
        num_coordinates: d.

    Returns:
        int8 array ``[d]`` with values in {-1, 0, +1}; all zeros when ``M = 0``.

    Raises:
        ValueError: if any payload has the wrong dtype or length.
    """
    return _count(packed, num_coordinates).vote()


def vote_counts(packed, num_coordinates: int) -> np.ndarray:
    """Return the sum of the clients' +-1 signs per coordinate (int64 ``[d]``).

    Raises:
        ValueError: if any payload has the wrong dtype or length.
    """
    counter = _count(packed, num_coordinates)
    # Sum of +-1 votes = positives - negatives = 2 * positives - M.
    return 2 * counter.positive_counts() - counter.num_voters


def _count(packed, num_coordinates: int) -> VoteCounter:
    """Feed a sequence of payloads or a 2-D ``[M, ceil(d/8)]`` array to a new counter."""
    counter = VoteCounter(num_coordinates)
    if isinstance(packed, np.ndarray) and packed.ndim == 2:
        expected = payload_bytes(num_coordinates)
        if packed.dtype != np.uint8:
            raise ValueError(f"packed signs must have dtype uint8, got {packed.dtype}")
        if packed.shape[1] != expected:
            raise ValueError(
                f"packed signs must have {expected} bytes per row, got shape {packed.shape}"
            )
    for row in packed:
        counter.add(row)
    return counter
