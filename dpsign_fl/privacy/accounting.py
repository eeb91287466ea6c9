"""Privacy accounting for DP-SIGN releases, on Google's ``dp-accounting``.

Mechanism: each release is the Sampled Gaussian Mechanism SGM(q, sigma) --
Poisson subsampling with rate q, then the Gaussian mechanism with noise
multiplier sigma on a sum of sensitivity C (Mironov, Talwar, Zhang 2019,
arXiv:1908.10530, Def. 4). Neighbouring relation: add/remove one example.
Releases compose over the rounds in which a client released bits.

Accountants (``accountant=``):

- ``"pld"``: privacy-loss distributions (``dp_accounting.pld.PLDAccountant``,
  pessimistic discretisation, so epsilon is an upper bound). Tightest; default.
  The value discretisation interval is chosen per computation
  (:func:`pld_interval`): an integer multiple of 1e-5 that grows with epsilon
  and shrinks with the number of releases, so that the result is within 1e-3
  (relative) of dp-accounting's PLD at interval 1e-5 and never below it (its
  grid contains ours). Tested in tests/test_accounting.py.
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
import time
from typing import Iterable, Sequence

import dp_accounting
from dp_accounting import pld, rdp
from dp_accounting.rdp import rdp_privacy_accountant

from .limits import TARGET_EPSILON_RANGE


class _QuietAbslLogging:
    """Stands in for ``absl.logging`` inside dp-accounting's RDP module.

    When a fractional Renyi order fails to converge, dp-accounting excludes that
    order (which can only make epsilon larger: conservative) and warns through
    ``absl.logging``, which, before absl is initialised, calls
    ``logging.basicConfig()``: a root handler appears and every log line of the
    process (Flower's included) is printed twice. The warning goes to the
    standard logger ``dp_accounting`` at DEBUG level instead.
    """

    _logger = logging.getLogger("dp_accounting")

    def warning(self, message, *args, **kwargs):
        self._logger.debug(message, *args, **kwargs)

    def __getattr__(self, name):
        import absl.logging

        return getattr(absl.logging, name)


rdp_privacy_accountant.logging = _QuietAbslLogging()

ACCOUNTANTS = ("pld", "rdp")
PLD_REFERENCE_INTERVAL = 1e-5
"""The PLD value discretisation every interval here is an integer multiple of."""

PLD_INTERVAL_SCALE = 1400.0
"""k = PLD_INTERVAL_SCALE * epsilon / sqrt(T), rounded down to a power of two.

dp-accounting's pessimistic PLD epsilon exceeds its value at interval 1e-5 by
a relative amount close to quadratic in the multiple k; measured over q in
[0.001, 0.3], sigma in [0.6, 1.1], T in [60, 2000] (epsilon 0.2 to 17), the
excess reaches 1e-3 at k ~ 2800-3400 * epsilon / sqrt(T). 1400 keeps a margin of
4x or more in the excess; tests/test_accounting.py checks the bound.
"""

PLD_MAX_MULTIPLE = 4096
PLD_FIRST_MULTIPLE = 1024
PLD_SMALLEST_EPSILON = TARGET_EPSILON_RANGE[0]
"""The relative bound holds from this epsilon up (the smallest budget anyone may ask
for); below it the interval stays that of this epsilon (finer grids only cost time: at
sigma near the floor one would need gigabytes)."""

CALIBRATION_TIMEOUT_SECONDS = 300.0
"""Calibration gives up (CalibrationTimeout) rather than run longer than this."""

BRACKET_ORDERS: tuple[float, ...] = tuple(range(2, 65)) + (128, 256, 512, 1024)
"""Integer Renyi orders of the RDP bound that starts the PLD calibration's bracket.

At integer orders dp-accounting's RDP of the SGM is a closed-form sum (0.37 s vs
2.37 s for the default grid with its fractional orders, measured on the default
run); the sigma it gives is a valid upper end for the PLD sigma either way
(1.748 vs 1.730 there; PLD's answer 1.620).
"""

DEFAULT_ORDERS: tuple[float, ...] = tuple(
    [1 + x / 10.0 for x in range(1, 100)] + list(range(11, 64)) + [128, 256, 512, 1024]
)
"""Renyi orders alpha for the RDP accountant (dp-accounting's default grid)."""

CALIBRATION_RELATIVE_TOLERANCE = 1e-4
_MAX_BRACKET_STEPS = 60
_MAX_BISECTION_STEPS = 200
MAX_NOISE_MULTIPLIER = 1e6
MIN_NOISE_MULTIPLIER = 0.1
"""Calibration never returns a smaller sigma: below it the privacy-loss distribution of
one release is too wide to compute in bounded time, and a target that such a sigma
meets is so loose that the releases are barely private. When sigma = 0.1 already
meets the target, calibration returns 0.1 (more noise than needed, never less)."""


class BudgetExhausted(ValueError):
    """The prior releases leave no room for the planned releases at any noise multiplier."""


class CalibrationTimeout(ValueError):
    """Calibration did not finish within its time bound; the message says for which values."""


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
    history = []
    for sample_rate, noise_multiplier, count in releases:
        sgm_event(sample_rate=sample_rate, noise_multiplier=noise_multiplier, num_steps=count)  # validates
        if count == 0:
            continue
        if noise_multiplier == 0:
            return math.inf
        history.append((float(sample_rate), float(noise_multiplier), int(count)))
    if not history:
        return 0.0
    return _epsilon(tuple(history), float(target_delta), accountant, None if orders is None else tuple(orders))


@functools.lru_cache(maxsize=4096)
def _epsilon(history: tuple, target_delta: float, accountant: str, orders: tuple | None) -> float:
    # Pure and deterministic: every simulated client in one process at the same
    # point of a run asks the same question (the ledger check and the reply's
    # epsilon). cache_clear() resets.
    if accountant == "rdp":
        events = [sgm_event(sample_rate=q, noise_multiplier=s, num_steps=c) for q, s, c in history]
        composed = events[0] if len(events) == 1 else dp_accounting.ComposedDpEvent(events)
        engine = rdp.RdpAccountant(orders=list(orders or DEFAULT_ORDERS), neighboring_relation=_RELATION)
        engine.compose(composed)
        return _finite_or_inf(engine.get_epsilon(target_delta))
    total_steps = sum(count for _, _, count in history)
    multiple = PLD_FIRST_MULTIPLE
    epsilon = _pld_epsilon(history, target_delta, multiple)
    while math.isfinite(epsilon):
        finer = pld_interval_multiple(epsilon, total_steps)
        if finer >= multiple:
            break
        multiple = finer
        epsilon = _pld_epsilon(history, target_delta, multiple)
    return epsilon


def clear_accounting_cache() -> None:
    """Forget every epsilon and calibration computed in this process (results are pure; this only costs time).

    For benchmarks that compare runs as fresh processes would make them; the
    caches otherwise live as long as the process.
    """
    _epsilon.cache_clear()
    _one_release_pld.cache_clear()
    _calibrate.cache_clear()


def pld_interval_multiple(epsilon: float, total_steps: int) -> int:
    """The PLD interval, as a multiple of :data:`PLD_REFERENCE_INTERVAL`, for an epsilon of T releases.

    A power of two in [1, :data:`PLD_MAX_MULTIPLE`] (see :data:`PLD_INTERVAL_SCALE`).
    """
    target = PLD_INTERVAL_SCALE * max(epsilon, PLD_SMALLEST_EPSILON) / math.sqrt(max(total_steps, 1))
    if not target >= 2:
        return 1
    return min(2 ** int(math.floor(math.log2(target))), PLD_MAX_MULTIPLE)


def pld_interval(epsilon: float, total_steps: int) -> float:
    """The PLD value discretisation interval used for an epsilon of ``total_steps`` releases."""
    return PLD_REFERENCE_INTERVAL * pld_interval_multiple(epsilon, total_steps)


def _pld_epsilon(history: tuple, target_delta: float, multiple: int) -> float:
    """Epsilon of ``history`` as ``pld.PLDAccountant`` composes it, at interval ``multiple`` * 1e-5.

    The same operations in the same order as the accountant (each SGM's PLD
    self-composed ``count`` times, composed onto the identity), except that the
    one-release PLD comes from :func:`_one_release_pld`'s cache: a client asks
    for its epsilon after every round, and the cache cut the time of those
    answers by about 45% (docs/performance.md). Tested equal to the
    accountant's result, bit for bit.
    """
    interval = PLD_REFERENCE_INTERVAL * multiple
    composed = pld.privacy_loss_distribution.identity(value_discretization_interval=interval)
    for sample_rate, noise_multiplier, count in history:
        if sample_rate == 1:  # the plain Gaussian mechanism: the accountant scales sigma instead
            one = pld.privacy_loss_distribution.from_gaussian_mechanism(
                standard_deviation=noise_multiplier / math.sqrt(count),
                value_discretization_interval=interval,
                neighboring_relation=_RELATION,
            )
            composed = composed.compose(one)
        else:
            composed = composed.compose(_one_release_pld(sample_rate, noise_multiplier, interval).self_compose(count))
    return _finite_or_inf(composed.get_epsilon_for_delta(target_delta))


@functools.lru_cache(maxsize=4)
def _one_release_pld(sample_rate: float, noise_multiplier: float, interval: float):
    """The PLD of one SGM(q, sigma) release at this discretisation interval (immutable; cached).

    A run's clients need two (the coarse and the fine interval of one sigma); at the finest
    interval one holds 14-17 MB (measured, q 0.01-0.3), so the cache is kept small.
    """
    return pld.privacy_loss_distribution.from_gaussian_mechanism(
        standard_deviation=noise_multiplier,
        value_discretization_interval=interval,
        sampling_prob=sample_rate,
        neighboring_relation=_RELATION,
    )


def _finite_or_inf(epsilon: float) -> float:
    epsilon = float(epsilon)
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
    prior: Sequence[tuple[float, float, int]] = (),
    timeout_seconds: float = CALIBRATION_TIMEOUT_SECONDS,
) -> float:
    """Return the smallest sigma whose composed epsilon is <= ``target_epsilon``.

    The composition is ``prior`` (releases already made, e.g. a ledger's
    history) followed by ``num_steps`` releases of SGM(sample_rate, sigma).
    Brackets sigma (starting from the cheap RDP calibration, an upper bound for
    PLD), then narrows the bracket by a bracketed regula falsi until it is within
    :data:`CALIBRATION_RELATIVE_TOLERANCE` (relative). The returned value is the
    upper end of the bracket, whose epsilon was computed with the same function
    a ledger uses and is <= the target: calibration never overshoots.

    Args:
        target_epsilon: epsilon > 0.
        target_delta: delta in (0, 1).
        sample_rate: q in (0, 1].
        num_steps: T >= 1.
        accountant: ``"pld"`` or ``"rdp"``.
        orders: Renyi orders for ``"rdp"``.
        prior: ``(sample_rate, noise_multiplier, count)`` releases made before.
        timeout_seconds: give up after this long.

    Returns:
        sigma >= :data:`MIN_NOISE_MULTIPLIER`.

    Raises:
        ValueError: on bad arguments, or if no sigma up to
            :data:`MAX_NOISE_MULTIPLIER` meets the target.
        BudgetExhausted: if ``prior`` leaves no room for ``num_steps`` more releases.
        CalibrationTimeout: after ``timeout_seconds``.
    """
    check_epsilon(target_epsilon, name="target_epsilon")
    check_delta(target_delta, name="target_delta")
    check_sample_rate(sample_rate)
    check_num_steps(num_steps, minimum=1)
    check_accountant(accountant)
    history = tuple((float(q), float(s), int(c)) for q, s, c in prior if c)
    for q, s, c in history:
        sgm_event(sample_rate=q, noise_multiplier=s, num_steps=c)  # validates
    if not timeout_seconds > 0:
        raise ValueError(f"timeout_seconds must be > 0, got {timeout_seconds!r}")
    if history and not epsilon_of_events(history, target_delta=target_delta, accountant=accountant, orders=orders) < target_epsilon:
        raise BudgetExhausted(
            f"the prior releases alone spend epsilon >= target_epsilon={target_epsilon} at "
            f"target_delta={target_delta}: no further release fits"
        )
    return _calibrate(
        float(target_epsilon), float(target_delta), float(sample_rate), int(num_steps), accountant,
        None if orders is None else tuple(orders), history, float(timeout_seconds),
    )


@functools.lru_cache(maxsize=256)
def _calibrate(target_epsilon, target_delta, sample_rate, num_steps, accountant, orders, history, timeout) -> float:
    # Pure and deterministic, and it costs seconds: cached per process (every
    # simulated client of a run asks the same question). cache_clear() resets.
    deadline = time.monotonic() + timeout

    def excess(sigma: float) -> float:
        if time.monotonic() > deadline:
            raise CalibrationTimeout(
                f"calibrating the noise multiplier took more than {timeout:g} s (target_epsilon={target_epsilon}, "
                f"target_delta={target_delta}, sample_rate={sample_rate}, num_steps={num_steps}, "
                f"accountant={accountant}): choose a larger sample_rate or target, or fewer steps"
            )
        releases = history + ((sample_rate, sigma, num_steps),)
        return epsilon_of_events(releases, target_delta=target_delta, accountant=accountant, orders=orders) - target_epsilon

    # RDP upper-bounds the PLD epsilon, so the RDP-calibrated sigma (cheap) is a
    # valid upper end of the bracket for the PLD accountant, and PLD is never
    # evaluated far below the answer (where one evaluation can need gigabytes).
    high = 1.0
    if accountant == "pld":
        high = _calibrate(target_epsilon, target_delta, sample_rate, num_steps, "rdp", BRACKET_ORDERS, history, timeout)
    if high <= MIN_NOISE_MULTIPLIER or accountant == "rdp":
        if excess(MIN_NOISE_MULTIPLIER) <= 0:
            return MIN_NOISE_MULTIPLIER
        high = max(high, MIN_NOISE_MULTIPLIER)
    high_excess = excess(high)
    for _ in range(_MAX_BRACKET_STEPS):
        if high_excess <= 0:
            break
        high *= 2.0
        if high > MAX_NOISE_MULTIPLIER:
            kind = BudgetExhausted if history else ValueError
            raise kind(
                f"no noise_multiplier <= {MAX_NOISE_MULTIPLIER:g} reaches target_epsilon={target_epsilon} "
                f"at target_delta={target_delta}, sample_rate={sample_rate}, num_steps={num_steps}"
                + (f" after {sum(c for _, _, c in history)} earlier releases" if history else "")
            )
        high_excess = excess(high)
    low = high / 1.5
    low_excess = excess(low)
    for _ in range(_MAX_BRACKET_STEPS):
        if low_excess > 0:
            break
        high, high_excess = low, low_excess
        low = max(low / 1.5, MIN_NOISE_MULTIPLIER)  # excess(MIN) > 0 was checked above
        low_excess = excess(low)
    # Invariant: excess(low) > 0 >= excess(high). Illinois variant of regula
    # falsi: bracketed like bisection, converges superlinearly.
    side = 0
    for _ in range(_MAX_BISECTION_STEPS):
        if high - low <= CALIBRATION_RELATIVE_TOLERANCE * high:
            break
        middle = high - high_excess * (high - low) / (high_excess - low_excess)
        if not low < middle < high:
            middle = 0.5 * (low + high)
        middle_excess = excess(middle)
        if middle_excess <= 0:
            high, high_excess = middle, middle_excess
            if side == 1:
                low_excess /= 2.0
            side = 1
        else:
            low, low_excess = middle, middle_excess
            if side == -1:
                high_excess /= 2.0
            side = -1
    return high


_RELATION = dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE


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
