"""A client's ledger of its own DP-SIGN releases, and its budget check.

Each client composes only the releases IT made (docs/privacy.md): the
ledger holds one ``(sample_rate, noise_multiplier, count)`` entry per run of
identical releases, so a long training is a handful of self-composed events.
It serialises to a JSON-safe dict for Flower's ``context.state`` or a file.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from .accounting import (
    check_accountant,
    check_delta,
    check_epsilon,
    check_noise_multiplier,
    check_sample_rate,
    epsilon_of_events,
)

LEDGER_FORMAT_VERSION = 1


def exceeds_budget(epsilon_after: float, target_epsilon: float) -> bool:
    """The one budget rule: a release is refused when the epsilon after it is above the target (or NaN)."""
    return not epsilon_after <= target_epsilon


@dataclass(frozen=True)
class Release:
    """``count`` consecutive SGM(sample_rate, noise_multiplier) releases."""

    sample_rate: float
    noise_multiplier: float
    count: int


class PrivacyLedger:
    """Record of one client's releases; computes the epsilon it has spent.

    Args:
        releases: initial history (e.g. from :meth:`from_dict`); None = empty.
        accountant: ``"pld"`` (default) or ``"rdp"``.
    """

    def __init__(self, releases: Sequence[Release] = (), *, accountant: str = "pld") -> None:
        check_accountant(accountant)
        self._accountant = accountant
        self._releases: tuple[Release, ...] = ()
        for release in releases:
            self.record(
                sample_rate=release.sample_rate, noise_multiplier=release.noise_multiplier, count=release.count
            )

    @property
    def accountant(self) -> str:
        """The accountant name used by :meth:`epsilon`."""
        return self._accountant

    @property
    def releases(self) -> tuple[Release, ...]:
        """The history, run-length encoded (an immutable tuple)."""
        return self._releases

    @property
    def num_releases(self) -> int:
        """Total number of releases recorded."""
        return sum(release.count for release in self._releases)

    def record(self, *, sample_rate: float, noise_multiplier: float, count: int = 1) -> None:
        """Record ``count`` releases of SGM(sample_rate, noise_multiplier).

        Raises:
            ValueError: on bad arguments; the ledger is then unchanged.
        """
        check_sample_rate(sample_rate)
        check_noise_multiplier(noise_multiplier)
        if isinstance(count, bool) or int(count) != count or count < 1:
            raise ValueError(f"count must be an integer >= 1, got {count}")
        sample_rate, noise_multiplier, count = float(sample_rate), float(noise_multiplier), int(count)
        last = self._releases[-1] if self._releases else None
        if last is not None and (last.sample_rate, last.noise_multiplier) == (sample_rate, noise_multiplier):
            merged = Release(sample_rate, noise_multiplier, last.count + count)
            self._releases = self._releases[:-1] + (merged,)
        else:
            self._releases = self._releases + (Release(sample_rate, noise_multiplier, count),)

    def epsilon(self, target_delta: float) -> float:
        """Return the epsilon spent so far at ``target_delta`` (0 if no release)."""
        return epsilon_of_events(
            [(r.sample_rate, r.noise_multiplier, r.count) for r in self._releases],
            target_delta=target_delta,
            accountant=self._accountant,
        )

    def epsilon_after(self, *, target_delta: float, sample_rate: float, noise_multiplier: float) -> float:
        """Return the epsilon the ledger would show after one more such release."""
        trial = PrivacyLedger(self._releases, accountant=self._accountant)
        trial.record(sample_rate=sample_rate, noise_multiplier=noise_multiplier)
        return trial.epsilon(target_delta)

    def would_exceed(
        self, target_epsilon: float, target_delta: float, sample_rate: float, noise_multiplier: float
    ) -> bool:
        """Return True if one more SGM(q, sigma) release would push epsilon above the budget.

        Raises:
            ValueError: on bad arguments.
        """
        check_epsilon(target_epsilon, name="target_epsilon")
        check_delta(target_delta, name="target_delta")
        after = self.epsilon_after(
            target_delta=target_delta, sample_rate=sample_rate, noise_multiplier=noise_multiplier
        )
        return exceeds_budget(after, target_epsilon)

    def to_dict(self) -> dict:
        """Return a JSON-safe representation (see :meth:`from_dict`)."""
        return {
            "version": LEDGER_FORMAT_VERSION,
            "accountant": self._accountant,
            "releases": [
                {"sample-rate": r.sample_rate, "noise-multiplier": r.noise_multiplier, "count": r.count}
                for r in self._releases
            ],
        }

    @classmethod
    def from_dict(cls, data: dict) -> "PrivacyLedger":
        """Rebuild a ledger from :meth:`to_dict` output, strictly.

        Every field must have exactly the type :meth:`to_dict` writes: a count
        of 2.9 or "7" is not a count, and a ledger that is not exactly right is
        refused rather than read as something that spends less.

        Raises:
            ValueError: if ``data`` is not a ledger of a known version, or any
                field is missing, extra, of the wrong type or out of range.
        """
        if not isinstance(data, dict) or set(data) != {"version", "accountant", "releases"}:
            raise ValueError(f"not a privacy ledger: expected keys version, accountant, releases, got {data!r:.200}")
        if type(data["version"]) is not int or data["version"] != LEDGER_FORMAT_VERSION:
            raise ValueError(f"not a privacy ledger of version {LEDGER_FORMAT_VERSION}: version {data['version']!r}")
        if not isinstance(data["accountant"], str):
            raise ValueError(f"malformed privacy ledger: accountant must be a string, got {data['accountant']!r}")
        check_accountant(data["accountant"])
        if not isinstance(data["releases"], list):
            raise ValueError(f"malformed privacy ledger: releases must be a list, got {data['releases']!r:.100}")
        releases = [_release_from_dict(entry, index) for index, entry in enumerate(data["releases"])]
        return cls(releases, accountant=data["accountant"])

    def __repr__(self) -> str:
        return f"PrivacyLedger(releases={self.num_releases}, accountant={self._accountant!r})"


def _release_from_dict(entry, index: int) -> Release:
    where = f"malformed privacy ledger: release {index}"
    if not isinstance(entry, dict) or set(entry) != {"sample-rate", "noise-multiplier", "count"}:
        raise ValueError(f"{where} must hold exactly sample-rate, noise-multiplier and count, got {entry!r:.200}")
    for key in ("sample-rate", "noise-multiplier"):
        if type(entry[key]) not in (int, float):
            raise ValueError(f"{where}: {key} must be a number, got {entry[key]!r}")
    if type(entry["count"]) is not int or entry["count"] < 1:
        raise ValueError(f"{where}: count must be an integer >= 1, got {entry['count']!r}")
    try:
        check_sample_rate(entry["sample-rate"])
        check_noise_multiplier(entry["noise-multiplier"])
    except (TypeError, ValueError) as error:
        raise ValueError(f"{where}: {error}") from None
    return Release(float(entry["sample-rate"]), float(entry["noise-multiplier"]), entry["count"])
