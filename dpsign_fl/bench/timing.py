"""Wall-clock timing shared by the benchmarks (no torch: the vote bench imports it too)."""

from __future__ import annotations

import statistics
import time
from typing import Callable


def time_call(work: Callable[[], object]) -> float:
    """Wall-clock seconds (``time.perf_counter``) of one call of ``work``."""
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def interleaved_seconds(steps: list[str], seconds_of: Callable[[str], float], repeats: int) -> dict[str, tuple[float, float]]:
    """``(min, median)`` of ``seconds_of(step)`` per step over ``repeats`` rounds that take the steps in turn,
    after one warm-up round (not counted)."""
    times: dict[str, list[float]] = {step: [] for step in steps}
    for repeat in range(repeats + 1):
        for step in steps:
            elapsed = seconds_of(step)
            if repeat:
                times[step].append(elapsed)
    return {step: (min(t), statistics.median(t)) for step, t in times.items()}
