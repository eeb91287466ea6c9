"""Speed and memory of the streaming vote, against copying the payloads.

The reference is what any server must do at least once per payload: touch
its bytes. ``np.copy`` of each of the ``M`` payloads, one call per payload,
is that reference; the streaming vote adds the same ``M`` payloads one at a
time to a :class:`~dpsign_fl.vote.VoteCounter` and computes the packed vote
bitmaps, with the kernel the server would use (compiled when a C compiler
works, :mod:`dpsign_fl.vote.kernel`) and with the numpy kernel. All run in the
same process, alternately, on the same payloads.

Run ``python -m dpsign_fl.bench.vote`` for a small table.
"""

from __future__ import annotations

import statistics
import tracemalloc

import numpy as np

from ..vote.packing import BIT_ORDER, payload_bytes
from ..vote import VoteCounter, VoteMemory, robust_vote
from .timing import time_call

# Above this many bits (M d) the old path (stack + unpack + sum) needs
# M * d bytes for the unpacked bits alone (2 GB), so it is skipped.
OLD_PATH_MAX_BITS = 2_000_000_000


def measure_vote(num_coordinates: int, num_voters: int, repeats: int = 5, *, numpy_kernel: bool = True) -> dict:
    """Time the streaming vote against copying the payloads, and measure its memory.

    Args:
        num_coordinates: d.
        num_voters: M, the number of random payloads voted on.
        repeats: timed repetitions of each path (median and min reported).
        numpy_kernel: also time the numpy kernel (besides the default one).

    Returns:
        dict with ``num_coordinates``, ``num_voters``, ``repeats``;
        ``copy_seconds_min`` / ``copy_seconds_median`` (a loop of ``M``
        ``np.copy`` calls); ``vote_seconds_min`` / ``vote_seconds_median``
        (``M`` ``VoteCounter.add`` calls and ``vote_bitmaps``);
        ``copy_to_vote_ratio`` (median copy seconds / median vote seconds: the
        vote's speed as a fraction of copying); ``kernel`` (``"compiled"`` or
        ``"numpy"``: the default kernel, the one timed above);
        ``numpy_seconds_median`` and ``numpy_copy_to_vote_ratio`` (the numpy
        kernel, timed alongside; the same as above when it is the default);
        ``robust_seconds_median`` and ``copy_to_robust_ratio`` (the robust
        vote as the app runs it, the default rule: with a
        :class:`~dpsign_fl.vote.VoteMemory` that holds the same clients'
        previous round, with the default kernel, to the int8 vote; on these
        random payloads it leaves none out);
        ``stateless_robust_seconds_median`` and
        ``copy_to_stateless_robust_ratio`` (the same without a memory);
        ``peak_bytes_per_coordinate``
        (tracemalloc peak of one vote, beyond the payloads, divided by d);
        ``robust_peak_bytes`` and ``robust_peak_bytes_per_coordinate`` (the
        same for one robust vote with its memory, the int8 vote it returns
        included); ``robust_memory_bytes`` (what the memory holds across
        rounds: at most 16 KiB per client);
        ``old_seconds_min`` / ``old_seconds_median`` for ``np.stack`` +
        ``np.unpackbits`` + sum, or None above :data:`OLD_PATH_MAX_BITS`;
        numpy entries are None without ``numpy_kernel``.

    Raises:
        ValueError: if ``num_voters < 1`` or ``repeats < 1``.
    """
    if num_voters < 1:
        raise ValueError(f"num_voters must be >= 1, got {num_voters}")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    rng = np.random.default_rng(0)
    num_bytes = payload_bytes(num_coordinates)
    payloads = [rng.integers(0, 256, num_bytes, dtype=np.uint8) for _ in range(num_voters)]

    def copy_all() -> None:
        for payload in payloads:
            np.copy(payload)

    kernel = VoteCounter(1).kernel

    def stream_vote(which: str | None = None) -> None:
        counter = VoteCounter(num_coordinates, kernel=which)
        for payload in payloads:
            counter.add(payload)
        counter.vote_bitmaps()

    def old_vote() -> None:
        bits = np.unpackbits(
            np.stack(payloads), axis=1, count=num_coordinates, bitorder=BIT_ORDER
        )
        np.sign(2 * bits.sum(axis=0, dtype=np.int64) - num_voters).astype(np.int8)

    identities = list(range(num_voters))
    memory = VoteMemory(np.random.default_rng(0))
    memory.remember(payloads, identities, num_coordinates)  # a previous round, as a run's memory holds from round 2 on

    def robust_with_memory() -> None:
        robust_vote(payloads, num_coordinates, generator=np.random.default_rng(0), memory=memory, identities=identities)

    copy_seconds, vote_seconds, numpy_seconds, robust_seconds, stateless_seconds = [], [], [], [], []
    for _ in range(repeats):
        copy_seconds.append(time_call(copy_all))
        vote_seconds.append(time_call(stream_vote))
        if kernel != "numpy" and numpy_kernel:
            numpy_seconds.append(time_call(lambda: stream_vote("numpy")))
        robust_seconds.append(time_call(robust_with_memory))
        stateless_seconds.append(time_call(lambda: robust_vote(payloads, num_coordinates, generator=np.random.default_rng(0))))
    if kernel == "numpy":
        numpy_seconds = vote_seconds
    old_seconds = None
    if num_coordinates * num_voters <= OLD_PATH_MAX_BITS:
        old_seconds = [time_call(old_vote) for _ in range(repeats)]

    peak = _peak_bytes(stream_vote)
    robust_peak = _peak_bytes(robust_with_memory)

    return {
        "num_coordinates": num_coordinates,
        "num_voters": num_voters,
        "repeats": repeats,
        "copy_seconds_min": min(copy_seconds),
        "copy_seconds_median": statistics.median(copy_seconds),
        "vote_seconds_min": min(vote_seconds),
        "vote_seconds_median": statistics.median(vote_seconds),
        "copy_to_vote_ratio": statistics.median(copy_seconds) / statistics.median(vote_seconds),
        "kernel": kernel,
        "numpy_seconds_median": statistics.median(numpy_seconds) if numpy_seconds else None,
        "numpy_copy_to_vote_ratio": statistics.median(copy_seconds) / statistics.median(numpy_seconds) if numpy_seconds else None,
        "robust_seconds_median": statistics.median(robust_seconds),
        "copy_to_robust_ratio": statistics.median(copy_seconds) / statistics.median(robust_seconds),
        "stateless_robust_seconds_median": statistics.median(stateless_seconds),
        "copy_to_stateless_robust_ratio": statistics.median(copy_seconds) / statistics.median(stateless_seconds),
        "robust_memory_bytes": memory.nbytes,
        "peak_bytes_per_coordinate": peak / num_coordinates,
        "robust_peak_bytes": robust_peak,
        "robust_peak_bytes_per_coordinate": robust_peak / num_coordinates,
        "old_seconds_min": min(old_seconds) if old_seconds else None,
        "old_seconds_median": statistics.median(old_seconds) if old_seconds else None,
    }


def _peak_bytes(function) -> int:
    """Peak bytes numpy and Python allocate while ``function`` runs, beyond what was allocated before (tracemalloc)."""
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        function()
        return tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()


def _main() -> None:
    header = ("d", "M", "kernel", "copy s", "vote s", "ratio", "numpy", "B/coord", "old s")
    print("{:>12} {:>4} {:>8} {:>9} {:>9} {:>6} {:>6} {:>8} {:>8}".format(*header))
    for num_coordinates in (1_000_000, 10_000_000):
        row = measure_vote(num_coordinates, 100)
        old = row["old_seconds_median"]
        print(
            f"{num_coordinates:>12} {row['num_voters']:>4} {row['kernel']:>8} {row['copy_seconds_median']:>9.4f} "
            f"{row['vote_seconds_median']:>9.4f} {row['copy_to_vote_ratio']:>6.2f} "
            f"{row['numpy_copy_to_vote_ratio'] or 0:>6.2f} "
            f"{row['peak_bytes_per_coordinate']:>8.3f} {'-' if old is None else f'{old:.3f}':>8}"
        )


if __name__ == "__main__":
    _main()
