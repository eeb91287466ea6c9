"""A Flower quickstart-shaped app converted to DP-SignSGD, and run with the real `flwr run`.

tests/quickstart_app holds the app (its own Net with BatchNorm, a DataLoader of
dict samples, FedAvg) before the conversion (original/) and after it
(quickstart/): SignMajorityVote on the server, dp_sign_train in @app.train().
"""

import difflib
import json
from pathlib import Path

import pytest

from .harness import flwr_run_simulation

APP = Path(__file__).resolve().parents[1] / "quickstart_app"
ROUNDS = 3
SUPERNODES = 3
TARGET_EPSILON = 4.0


def changed_lines(before: Path, after: Path) -> int:
    diff = difflib.unified_diff(before.read_text().splitlines(), after.read_text().splitlines(), lineterm="", n=0)
    return sum(1 for line in diff if line[:1] in "+-" and not line.startswith(("+++", "---")))


def test_the_conversion_changes_at_most_10_lines_of_the_clientapp_and_5_of_the_serverapp():
    assert changed_lines(APP / "original" / "client_app.py", APP / "quickstart" / "client_app.py") <= 10
    assert changed_lines(APP / "original" / "server_app.py", APP / "quickstart" / "server_app.py") <= 5


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory):
    results = tmp_path_factory.mktemp("quickstart-results")
    completed = flwr_run_simulation(
        tmp_path_factory.mktemp("flwr-home"), num_supernodes=SUPERNODES, app=APP,
        run_config=f"num-server-rounds={ROUNDS} target-epsilon={TARGET_EPSILON} results-dir='{results}'",
        done=lambda: (results / "train_metrics.json").exists(),
    )
    return completed, results


def test_the_converted_quickstart_trains_with_every_client_voting_every_round(quickstart_run):
    completed, results = quickstart_run
    assert (results / "train_metrics.json").exists(), completed.stdout[-4000:] + completed.stderr[-4000:]
    rounds = json.loads((results / "train_metrics.json").read_text())
    assert sorted(int(r) for r in rounds) == list(range(1, ROUNDS + 1))
    assert all(rounds[r]["voters"] == SUPERNODES and rounds[r]["dropped"] == 0 for r in rounds), rounds


def test_the_converted_quickstart_spends_epsilon_within_the_target(quickstart_run):
    _, results = quickstart_run
    rounds = json.loads((results / "train_metrics.json").read_text())
    epsilons = [rounds[str(r)]["epsilon"] for r in range(1, ROUNDS + 1)]
    assert all(b > a for a, b in zip(epsilons, epsilons[1:])) and 0 < epsilons[0] and epsilons[-1] <= TARGET_EPSILON
