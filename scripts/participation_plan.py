"""Print what planning for partial participation buys (sigma) and costs (clients that run out).

Usage: python scripts/participation_plan.py [--clients N] [--per-round K] [--runs R]

Two Markdown tables for docs/privacy.md ("Planning for partial participation"):

1. sigma (PLD, delta 1e-5) planned by :func:`dpsign_fl.rounds.plan_release`
   for participation 1 (T releases) and p = K/N (the margin of
   :data:`dpsign_fl.settings.PARTICIPATION_MARGIN`), beside sigma for exactly
   ceil(T p) releases (no margin) and for z = 4, from
   :func:`dpsign_fl.privacy.calibrate_noise_multiplier`.
2. For margins z = 0, 2, 3, 4: how many of N clients are sampled more often
   than planned when each of T rounds samples K of N at random. A client's
   count of rounds is then Binomial(T, K/N) (exact, scipy.stats.binom); a
   Monte Carlo run of R simulated trainings (K of N without replacement per
   round, seed 0) checks it.

It prints, it never edits docs.
"""

from __future__ import annotations

import argparse

import numpy as np
from scipy.stats import binom

from dpsign_fl.privacy import calibrate_noise_multiplier
from dpsign_fl.rounds import plan_release, planned_releases
from dpsign_fl.settings import PARTICIPATION_MARGIN, RunSettings

DELTA = 1e-5


def count_with_margin(num_rounds: int, participation: float, z: float) -> int:
    """The planner's count (:func:`dpsign_fl.rounds.planned_releases`) at margin z."""
    return planned_releases(RunSettings(num_rounds=num_rounds, participation=participation, participation_margin=z))


def sigma_cell(count: int, *, num_rounds: int, sample_rate: float, target_epsilon: float, target_delta: float) -> str:
    """sigma for ``count`` releases (the calibration plan_release calls), and the count."""
    sigma = calibrate_noise_multiplier(
        target_epsilon=target_epsilon, target_delta=target_delta, sample_rate=sample_rate, num_steps=count
    )
    return f"{sigma:.3f} ({count})"


def sigma_table(participation: float, label: str) -> None:
    print(f"| T | q | epsilon | p = 1 (T releases) | ceil(T p), no margin | "
          f"p = {label}, z = {PARTICIPATION_MARGIN:g} (the plan) | z = 4 |")
    print("|---|---|---|---|---|---|---|")
    for num_rounds in (1000, 200):
        for sample_rate in (0.05, 0.1):
            for epsilon in (8.0, 3.0):
                run = dict(num_rounds=num_rounds, sample_rate=sample_rate, target_epsilon=epsilon, target_delta=DELTA)
                full = plan_release(RunSettings(**run))
                plan = plan_release(RunSettings(**run, participation=participation))
                no_margin, wider = (count_with_margin(num_rounds, participation, z) for z in (0.0, 4.0))
                cells = [f"{full.release.noise_multiplier:.3f} ({full.num_releases})", sigma_cell(no_margin, **run),
                         f"{plan.release.noise_multiplier:.3f} ({plan.num_releases})", sigma_cell(wider, **run)]
                print(f"| {num_rounds} | {sample_rate:g} | {epsilon:g} | " + " | ".join(cells) + " |")


def simulated_counts(num_rounds: int, clients: int, per_round: int, runs: int) -> np.ndarray:
    """(runs, clients): rounds each client took part in, K of N sampled without replacement per round."""
    rng = np.random.default_rng(0)
    counts = np.zeros((runs, clients), dtype=np.int64)
    rows = np.arange(runs)[:, None]
    for _ in range(num_rounds):
        chosen = rng.random((runs, clients)).argpartition(per_round, axis=1)[:, :per_round]
        counts[rows, chosen] += 1
    return counts


def run_out_table(clients: int, per_round: int, runs: int) -> None:
    participation = per_round / clients
    print(f"| T | z | planned | P(a client is sampled more often) | clients of {clients} that run out (expected) "
          f"| P(any of {clients} runs out) | refused samplings per client (mean) | simulated: clients that ran out "
          f"per training |")
    print("|---|---|---|---|---|---|---|---|")
    for num_rounds in (1000, 200):
        counts = simulated_counts(num_rounds, clients, per_round, runs)
        for z in (0.0, 2.0, 3.0, 4.0):
            planned = count_with_margin(num_rounds, participation, z)
            tail = float(binom.sf(planned, num_rounds, participation))
            excess = np.arange(planned + 1, num_rounds + 1)
            refused = float(np.sum((excess - planned) * binom.pmf(excess, num_rounds, participation)))
            simulated = float(np.mean(np.sum(counts > planned, axis=1)))
            print(f"| {num_rounds} | {z:g} | {planned} | {tail:.2e} | {clients * tail:.3f} | "
                  f"{1 - (1 - tail) ** clients:.3f} | {refused:.2e} | {simulated:.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=42, help="N, the clients of the run")
    parser.add_argument("--per-round", type=int, default=10, help="K, the clients each round samples")
    parser.add_argument("--runs", type=int, default=2000, help="simulated trainings for the Monte Carlo check")
    args = parser.parse_args()
    sigma_table(args.per_round / args.clients, f"{args.per_round}/{args.clients}")
    print()
    run_out_table(args.clients, args.per_round, args.runs)


if __name__ == "__main__":
    main()
