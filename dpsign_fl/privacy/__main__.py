"""Command line: ``python -m dpsign_fl.privacy epsilon|sigma ...``, a privacy calculator.

The last line of output is the plain number, so scripts can take it with
``tail -n 1``. It loads dp-accounting only (no torch), so it answers in about a
second.
"""

from __future__ import annotations

import argparse
import sys

from .accounting import ACCOUNTANTS, calibrate_noise_multiplier, compute_epsilon

OPTIONS = {
    "sample_rate": "--sample-rate",
    "noise_multiplier": "--noise-multiplier",
    "num_steps": "--steps",
    "target_delta": "--delta",
    "target_epsilon": "--epsilon",
    "accountant": "--accountant",
}
"""Python argument -> command-line option, so that errors name what the user typed."""


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of the privacy command line."""
    parser = argparse.ArgumentParser(
        prog="python -m dpsign_fl.privacy",
        description="Epsilon of, or the noise multiplier for, T releases of the Poisson-subsampled "
        "Gaussian mechanism (DP-SIGN's release), under add/remove-one neighbours. The last line "
        "printed is the number.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="{epsilon,sigma}")
    eps = commands.add_parser("epsilon", help="epsilon spent by T releases at a given noise multiplier")
    eps.add_argument("--noise-multiplier", type=float, required=True, metavar="SIGMA",
                     help="sigma: the noise standard deviation is sigma * clip norm (0 = no noise)")
    sigma = commands.add_parser("sigma", help="smallest noise multiplier whose T releases meet a target epsilon")
    sigma.add_argument("--epsilon", type=float, required=True, help="target epsilon, > 0")
    for sub in (eps, sigma):
        sub.add_argument("--sample-rate", type=float, required=True, metavar="Q",
                         help="q in (0, 1]: each example's Poisson sampling probability per release")
        sub.add_argument("--steps", type=int, required=True, metavar="T", help="number of releases, T >= 1")
        sub.add_argument("--delta", type=float, required=True, help="delta in (0, 1), e.g. 1e-5")
        sub.add_argument("--accountant", choices=ACCOUNTANTS, default="pld",
                         help="pld (tightest, default) or rdp (Renyi DP, the source paper's)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    args = build_parser().parse_args(argv)
    try:
        common = dict(sample_rate=args.sample_rate, num_steps=args.steps, target_delta=args.delta, accountant=args.accountant)
        if args.command == "epsilon":
            value = compute_epsilon(noise_multiplier=args.noise_multiplier, **common)
            print(
                f"# epsilon of {args.steps} steps, q={args.sample_rate}, sigma={args.noise_multiplier}, "
                f"delta={args.delta}, accountant={args.accountant}"
            )
        else:
            value = calibrate_noise_multiplier(target_epsilon=args.epsilon, **common)
            print(
                f"# smallest noise multiplier for epsilon={args.epsilon}, delta={args.delta}, "
                f"q={args.sample_rate}, {args.steps} steps, accountant={args.accountant}"
            )
    except (ValueError, TypeError) as error:
        print(f"error: {_as_options(str(error))}", file=sys.stderr)
        return 2
    print(f"{value:.6g}")
    return 0


def _as_options(message: str) -> str:
    for name, option in OPTIONS.items():
        if message.startswith(name + " "):
            return option + message[len(name):]
    return message


if __name__ == "__main__":
    sys.exit(main())
