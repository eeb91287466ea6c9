"""Command line: ``python -m dpsign_fl.privacy epsilon|sigma ...``.

The last line of output is the plain number, so scripts can take it with ``tail -n 1``.
"""

from __future__ import annotations

import argparse
import sys

from .accounting import ACCOUNTANTS, calibrate_noise_multiplier, compute_epsilon


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of the privacy command line."""
    parser = argparse.ArgumentParser(
        prog="python -m dpsign_fl.privacy",
        description="Epsilon of, or noise multiplier for, T Poisson-subsampled Gaussian releases "
        "(add/remove-one neighbours).",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    eps = commands.add_parser("epsilon", help="print epsilon for a given noise multiplier")
    eps.add_argument("--noise-multiplier", type=float, required=True)
    sigma = commands.add_parser("sigma", help="print the smallest noise multiplier meeting epsilon")
    sigma.add_argument("--epsilon", type=float, required=True)
    for sub in (eps, sigma):
        sub.add_argument("--sample-rate", type=float, required=True)
        sub.add_argument("--steps", type=int, required=True)
        sub.add_argument("--delta", type=float, required=True)
        sub.add_argument("--accountant", choices=ACCOUNTANTS, default="pld")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "epsilon":
            value = compute_epsilon(
                sample_rate=args.sample_rate,
                noise_multiplier=args.noise_multiplier,
                num_steps=args.steps,
                target_delta=args.delta,
                accountant=args.accountant,
            )
            print(
                f"# epsilon of {args.steps} steps, q={args.sample_rate}, sigma={args.noise_multiplier}, "
                f"delta={args.delta}, accountant={args.accountant}"
            )
        else:
            value = calibrate_noise_multiplier(
                target_epsilon=args.epsilon,
                target_delta=args.delta,
                sample_rate=args.sample_rate,
                num_steps=args.steps,
                accountant=args.accountant,
            )
            print(
                f"# smallest noise multiplier for epsilon={args.epsilon}, delta={args.delta}, "
                f"q={args.sample_rate}, {args.steps} steps, accountant={args.accountant}"
            )
    except (ValueError, TypeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"{value:.6g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
