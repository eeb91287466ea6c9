"""Privacy accounting for DP-SIGN releases, on Google's ``dp-accounting``.

Mechanism: each release is the Sampled Gaussian Mechanism SGM(q, sigma) --
Poisson subsampling with rate q, then the Gaussian mechanism with noise
multiplier sigma on a sum of sensitivity C (Mironov, Talwar, Zhang 2019,
arXiv:1908.10530, Def. 4). Neighbouring relation: add/remove one example.
Releases compose over the rounds in which a client released bits.

Accountants (``accountant=``):

- ``"pld"``: privacy-loss distributions (``dp_accounting.pld.PLDAccountant``,
  pessimistic discretisation, so epsilon is an upper bound). Tightest; default.
- ``"rdp"``: Renyi DP (``dp_accounting.rdp.RdpAccountant``), the source paper's
  method. RDP -> (epsilon, delta) conversion: Balle et al. 2020,
  arXiv:1905.09982, Thm 21 (as implemented by dp-accounting). At fractional
  orders dp-accounting's RDP of the SGM is a conservative upper bound; at
  integer orders it is exact (Mironov et al. 2019, Sec. 3.3).

The mechanism is described by immutable ``dp_accounting`` event objects; how it
is accounted is chosen separately, as dp-accounting does.
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Iterable, Sequence

import dp_accounting
from dp_accounting import pld, rdp



class _QuietFractionalOrders(logging.Filter):
    """Drop dp-accounting's per-order warning when a fractional RDP order fails.

    dp-accounting then excludes that order, which can only make epsilon larger
    (conservative); the warning is repeated for every call and drowns logs.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "_compute_log_a_frac failed to converge" not in record.getMessage()


logging.getLogger("absl").addFilter(_QuietFractionalOrders())

ACCOUNTANTS = ("pld", "rdp")
PLD_DISCRETIZATION = 1e-3
"""Value discretisation interval of the PLD accountant.

dp-accounting's default is 1e-4. With the pessimistic estimate every interval
gives an upper bound on epsilon; 1e-3 is ~10x faster and was measured within
1e-4 relative of 1e-4 for q in [0.02, 0.1], sigma in [0.7, 1.5], T up to 1000.
"""

DEFAULT_ORDERS: tuple[float, ...] = tuple(
    [1 + x / 10.0 for x in range(1, 100)] + list(range(11, 64)) + [128, 256, 512, 1024]
)
"""Renyi orders alpha for the RDP accountant (dp-accounting's default grid)."""

CALIBRATION_RELATIVE_TOLERANCE = 1e-4
_MAX_BRACKET_STEPS = 60
_MAX_BISECTION_STEPS = 200
MAX_NOISE_MULTIPLIER = 1e6


def sgm_event(*, sample_rate: float, noise_multiplier: float, num_steps: int = 1) -> dp_accounting.DpEvent:
    """Return the dp-accounting event of ``num_steps`` SGM(q, sigma) releases.

    Raises:
        ValueError: on a bad argument (named in the message).
    """
    check_sample_rate(sample_rate)
    check_noise_multiplier(noise_multiplier)
    check_num_steps(num_steps)
    gaussian = dp_accounting.GaussianDpEvent(noise_multiplier=noise_multiplier)
    # q = 1 is the plain Gaussian mechanism; saying so avoids a sampling step.
    event = gaussian if sample_rate == 1 else dp_accounting.PoissonSampledDpEvent(
        sampling_probability=sample_rate, event=gaussian
    )
    # dp-accounting insists on a built-in int count (numpy integers and integral
    # floats such as 3.0, which check_num_steps accepts, raise TypeError there).
    return dp_accounting.SelfComposedDpEvent(event=event, count=int(num_steps))


def epsilon_of_events(
    releases: Iterable[tuple[float, float, int]],
    *,
    target_delta: float,
    accountant: str = "pld",
    orders: Sequence[float] | None = None,
) -> float:
    """Return epsilon at ``target_delta`` of a composition of SGM releases.

    Args:
        releases: ``(sample_rate, noise_multiplier, count)`` triples.
        target_delta: delta in (0, 1).
        accountant: ``"pld"`` or ``"rdp"``.
        orders: Renyi orders for ``"rdp"`` (default :data:`DEFAULT_ORDERS`).

    Returns:
        Epsilon (0 for no releases; ``inf`` when any release has
        ``noise_multiplier = 0``).

    Raises:
        ValueError: on bad arguments.
    """
    check_delta(target_delta, name="target_delta")
    check_accountant(accountant)
    events = []
    for sample_rate, noise_multiplier, count in releases:
        event = sgm_event(sample_rate=sample_rate, noise_multiplier=noise_multiplier, num_steps=count)
        if count == 0:
            continue
        if noise_multiplier == 0:
            return math.inf
        events.append(event)
    if not events:
        return 0.0
    composed = events[0] if len(events) == 1 else dp_accounting.ComposedDpEvent(events)
    engine = _make_accountant(accountant, orders)
    engine.compose(composed)
    epsilon = float(engine.get_epsilon(target_delta))
    if math.isnan(epsilon):
        return math.inf
    return max(epsilon, 0.0)


def compute_epsilon(
    *,
    sample_rate: float,
    noise_multiplier: float,
    num_steps: int,
    target_delta: float,
    accountant: str = "pld",
    orders: Sequence[float] | None = None,
) -> float:
    """Return epsilon of ``num_steps`` composed SGM(q, sigma) releases at ``target_delta``.

    Neighbours: add/remove one example. ``noise_multiplier = 0`` gives ``inf``
    (not private: a result, not an error).

    Args:
        sample_rate: q in (0, 1], the Poisson sampling probability.
        noise_multiplier: sigma >= 0 (noise std = sigma * clip_norm).
        num_steps: T >= 0, number of releases.
        target_delta: delta in (0, 1).
        accountant: ``"pld"`` (default) or ``"rdp"``.
        orders: Renyi orders for ``"rdp"``.

    Returns:
        Epsilon as a float (an upper bound for both accountants).

    Raises:
        ValueError: naming the bad argument.
    """
    return epsilon_of_events(
        [(sample_rate, noise_multiplier, num_steps)],
        target_delta=target_delta,
        accountant=accountant,
        orders=orders,
    )


def calibrate_noise_multiplier(
    *,
    target_epsilon: float,
    target_delta: float,
    sample_rate: float,
    num_steps: int,
    accountant: str = "pld",
    orders: Sequence[float] | None = None,
) -> float:
    """Return the smallest sigma whose composed epsilon is <= ``target_epsilon``.

    Brackets sigma by doubling/halving, then bisects until the bracket is within
    :data:`CALIBRATION_RELATIVE_TOLERANCE` (relative). The returned value is the
    upper end of the bracket, whose epsilon was computed and is <= the target:
    calibration never overshoots the target epsilon.

    Args:
        target_epsilon: epsilon > 0.
        target_delta: delta in (0, 1).
        sample_rate: q in (0, 1].
        num_steps: T >= 1.
        accountant: ``"pld"`` or ``"rdp"``.
        orders: Renyi orders for ``"rdp"``.

    Returns:
        sigma > 0.

    Raises:
        ValueError: on bad arguments, or if no sigma up to
            :data:`MAX_NOISE_MULTIPLIER` meets the target.
    """
    check_epsilon(target_epsilon, name="target_epsilon")
    check_delta(target_delta, name="target_delta")
    check_sample_rate(sample_rate)
    check_num_steps(num_steps, minimum=1)
    check_accountant(accountant)
    return _calibrate(
        float(target_epsilon),
        float(target_delta),
        float(sample_rate),
        int(num_steps),
        accountant,
        None if orders is None else tuple(orders),
    )


@functools.lru_cache(maxsize=256)
def _calibrate(target_epsilon, target_delta, sample_rate, num_steps, accountant, orders) -> float:
    # Pure and deterministic, and it costs ~1 s: cached per process (every
    # simulated client of a run asks the same question). cache_clear() resets.
    def epsilon_at(sigma: float) -> float:
        return compute_epsilon(
            sample_rate=sample_rate,
            noise_multiplier=sigma,
            num_steps=num_steps,
            target_delta=target_delta,
            accountant=accountant,
            orders=orders,
        )

    # RDP upper-bounds the PLD epsilon, so the RDP-calibrated sigma (cheap) is a
    # valid upper end of the bracket for the PLD accountant.
    high = 1.0
    if accountant == "pld":
        high = _calibrate(target_epsilon, target_delta, sample_rate, num_steps, "rdp", None)
    high_excess = epsilon_at(high) - target_epsilon
    for _ in range(_MAX_BRACKET_STEPS):
        if high_excess <= 0:
            break
        high *= 2.0
        if high > MAX_NOISE_MULTIPLIER:
            raise ValueError(
                f"no noise_multiplier <= {MAX_NOISE_MULTIPLIER:g} reaches target_epsilon={target_epsilon} "
                f"at target_delta={target_delta}, sample_rate={sample_rate}, num_steps={num_steps}"
            )
        high_excess = epsilon_at(high) - target_epsilon
    low = high / 1.5
    low_excess = epsilon_at(low) - target_epsilon
    for _ in range(_MAX_BRACKET_STEPS):
        if low_excess > 0:
            break
        high, high_excess = low, low_excess
        low /= 1.5
        low_excess = epsilon_at(low) - target_epsilon
    # Invariant: epsilon_at(low) > target >= epsilon_at(high). Illinois variant
    # of regula falsi: bracketed like bisection, converges superlinearly.
    side = 0
    for _ in range(_MAX_BISECTION_STEPS):
        if high - low <= CALIBRATION_RELATIVE_TOLERANCE * high:
            break
        middle = high - high_excess * (high - low) / (high_excess - low_excess)
        if not low < middle < high:
            middle = 0.5 * (low + high)
        excess = epsilon_at(middle) - target_epsilon
        if excess <= 0:
            high, high_excess = middle, excess
            if side == 1:
                low_excess /= 2.0
            side = 1
        else:
            low, low_excess = middle, excess
            if side == -1:
                high_excess /= 2.0
            side = -1
    return high


def _make_accountant(accountant: str, orders: Sequence[float] | None):
    relation = dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
    if accountant == "pld":
        return pld.PLDAccountant(neighboring_relation=relation, value_discretization_interval=PLD_DISCRETIZATION)
    return rdp.RdpAccountant(orders=list(orders or DEFAULT_ORDERS), neighboring_relation=relation)


def check_sample_rate(sample_rate: float) -> None:
    """Raise ValueError unless ``sample_rate`` is in (0, 1]."""
    _check_real(sample_rate, "sample_rate")
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")


def check_noise_multiplier(noise_multiplier: float) -> None:
    """Raise ValueError unless ``noise_multiplier`` is finite and >= 0."""
    _check_real(noise_multiplier, "noise_multiplier")
    if not (noise_multiplier >= 0 and math.isfinite(noise_multiplier)):
        raise ValueError(f"noise_multiplier must be a finite number >= 0, got {noise_multiplier}")


def check_num_steps(num_steps: int, *, minimum: int = 0) -> None:
    """Raise unless ``num_steps`` is an int >= ``minimum``."""
    if isinstance(num_steps, (bool, str)) or not hasattr(num_steps, "__int__"):
        raise TypeError(f"num_steps must be an integer, got {type(num_steps).__name__}")
    if int(num_steps) != num_steps:
        raise ValueError(f"num_steps must be an integer >= {minimum}, got {num_steps}")
    if num_steps < minimum:
        raise ValueError(f"num_steps must be an integer >= {minimum}, got {num_steps}")


def check_delta(delta: float, *, name: str = "delta") -> None:
    """Raise ValueError unless ``delta`` is in (0, 1)."""
    _check_real(delta, name)
    if not 0 < delta < 1:
        raise ValueError(f"{name} must be in (0, 1), got {delta}")


def check_epsilon(epsilon: float, *, name: str = "epsilon") -> None:
    """Raise ValueError unless ``epsilon`` is finite and > 0."""
    _check_real(epsilon, name)
    if not (epsilon > 0 and math.isfinite(epsilon)):
        raise ValueError(f"{name} must be a finite number > 0, got {epsilon}")


def check_accountant(accountant: str) -> None:
    """Raise ValueError unless ``accountant`` is a known accountant name."""
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")


def _check_real(value, name: str) -> None:
    if isinstance(value, (bool, str)) or not hasattr(value, "__float__"):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
