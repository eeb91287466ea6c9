"""Tests of the command line ``python -m dpsign_fl.privacy epsilon|sigma``.

One test runs the real entry point in a subprocess; the others call ``main`` in
process (same parser and code path, without paying for a new interpreter).
"""

import runpy
import subprocess
import sys
from pathlib import Path

import pytest

from dpsign_fl.privacy import compute_epsilon
from dpsign_fl.privacy.__main__ import main

REPOSITORY = Path(__file__).resolve().parents[1]
EXAMPLE = ["--sample-rate", "0.02", "--steps", "150", "--delta", "1e-5"]


def run_module(*args):
    return subprocess.run(
        [sys.executable, "-m", "dpsign_fl.privacy", *args],
        cwd=REPOSITORY,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_module_prints_epsilon_as_the_last_line_and_exits_zero():
    # q = 0.02, sigma = 0.797, T = 150, delta = 1e-5: PLD epsilon 2.99437 (measured; dp-accounting 0.6 PLD at 1e-5: 2.99399).
    completed = run_module("epsilon", "--noise-multiplier", "0.797", *EXAMPLE)

    assert completed.returncode == 0, completed.stderr
    last_line = completed.stdout.strip().splitlines()[-1]
    assert float(last_line) == pytest.approx(3.0, abs=0.01)
    assert float(last_line) == pytest.approx(
        compute_epsilon(sample_rate=0.02, noise_multiplier=0.797, num_steps=150, target_delta=1e-5), rel=1e-5
    )


def test_module_entry_point_exits_nonzero_on_a_bad_sample_rate(monkeypatch, capsys):
    # runpy runs the module as ``__main__`` (its sys.exit(main()) line) without a new interpreter.
    argv = ["epsilon", "--noise-multiplier", "0.797", "--sample-rate", "1.3", "--steps", "150", "--delta", "1e-5"]
    monkeypatch.setattr(sys, "argv", ["python -m dpsign_fl.privacy", *argv])
    # This file imported the module as dpsign_fl.privacy.__main__; run a fresh copy (restored afterwards).
    monkeypatch.delitem(sys.modules, "dpsign_fl.privacy.__main__")

    with pytest.raises(SystemExit) as exited:
        runpy.run_module("dpsign_fl.privacy", run_name="__main__")

    assert exited.value.code != 0
    captured = capsys.readouterr()
    assert "--sample-rate must be in (0, 1], got 1.3" in captured.err  # named as the user typed it
    assert captured.out == ""


def test_sigma_prints_the_calibrated_noise_multiplier(capsys):
    exit_code = main(["sigma", "--epsilon", "3", *EXAMPLE])

    assert exit_code == 0
    last_line = capsys.readouterr().out.strip().splitlines()[-1]
    # Measured: 0.796454 (PLD); the epsilon test above runs the inverse question at sigma = 0.797.
    assert float(last_line) == pytest.approx(0.797, abs=0.002)
    assert float(last_line) == pytest.approx(0.796454, rel=1e-4)


def test_rdp_accountant_option_prints_the_rdp_epsilon(capsys):
    exit_code = main(["epsilon", "--noise-multiplier", "0.797", *EXAMPLE, "--accountant", "rdp"])

    assert exit_code == 0
    last_line = capsys.readouterr().out.strip().splitlines()[-1]
    expected = compute_epsilon(
        sample_rate=0.02, noise_multiplier=0.797, num_steps=150, target_delta=1e-5, accountant="rdp"
    )
    assert float(last_line) == pytest.approx(expected, rel=1e-5)


def test_zero_noise_prints_inf(capsys):
    assert main(["epsilon", "--noise-multiplier", "0", *EXAMPLE]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == "inf"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["epsilon", "--noise-multiplier", "-1", *EXAMPLE], "--noise-multiplier must be a finite number >= 0"),
        (
            ["epsilon", "--noise-multiplier", "1", "--sample-rate", "0.02", "--steps", "150", "--delta", "2"],
            "--delta must be in (0, 1)",
        ),
        (["sigma", "--epsilon", "0", *EXAMPLE], "--epsilon must be a finite number > 0"),
        (
            ["sigma", "--epsilon", "3", "--sample-rate", "0.02", "--steps", "0", "--delta", "1e-5"],
            "--steps must be an integer >= 1",
        ),
    ],
)
def test_bad_values_exit_nonzero_with_the_validation_message(argv, message, capsys):
    exit_code = main(argv)

    assert exit_code != 0
    captured = capsys.readouterr()
    assert message in captured.err
    assert captured.out == ""


@pytest.mark.parametrize(
    "argv",
    [
        ["epsilon", *EXAMPLE],  # missing --noise-multiplier
        ["epsilon", "--noise-multiplier", "abc", *EXAMPLE],
        ["epsilon", "--noise-multiplier", "1", *EXAMPLE, "--accountant", "moments"],
        ["budget", *EXAMPLE],
        [],
    ],
)
def test_malformed_command_lines_exit_nonzero_with_usage(argv, capsys):
    with pytest.raises(SystemExit) as exited:
        main(argv)

    assert exited.value.code != 0
    assert "usage:" in capsys.readouterr().err


def test_the_calculator_does_not_import_torch():
    # A privacy calculator needs dp-accounting only; importing torch cost ~30 s on a busy machine.
    code = (
        "import runpy, sys\n"
        "sys.argv = ['p', 'epsilon', '--noise-multiplier', '0.797', '--sample-rate', '0.02', '--steps', '150', '--delta', '1e-5']\n"
        "try:\n    runpy.run_module('dpsign_fl.privacy', run_name='__main__')\nexcept SystemExit:\n    pass\n"
        "print('torch' in sys.modules)\n"
    )
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert completed.stdout.strip().splitlines()[-1] == "False", completed.stderr


def test_every_option_has_help_text():
    from dpsign_fl.privacy.__main__ import build_parser

    commands = next(a for a in build_parser()._actions if a.dest == "command").choices
    for name, sub in commands.items():
        options = [a for a in sub._actions if a.option_strings and a.dest != "help"]
        assert options and all(a.help for a in options), name


def test_an_error_names_the_option_the_user_typed(capsys):
    assert main(["sigma", "--epsilon", "-1", "--sample-rate", "0.1", "--steps", "10", "--delta", "1e-5"]) == 2
    assert "--epsilon must be" in capsys.readouterr().err
