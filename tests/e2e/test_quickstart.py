"""Flower's quickstart-pytorch, converted to DP-SignSGD, run with the real `flwr run`.

tests/quickstart_app holds the app converted (quickstart/; offline digits in
task.py) and the conversion as a unified diff against the app as Flower ships
it (conversion.diff: the server line ``FedAvg(fraction_evaluate=fraction_evaluate)``,
run config ``fraction-evaluate = 0.5``, an ``@app.evaluate()`` handler): the
strategy class and the train handler's body changed, nothing else, not even
the run config. The original files are rebuilt from the two, every context
line checked. The app writes no file, so the assertions read the run's own log.
"""

import difflib
import hashlib
import re
from pathlib import Path

import pytest

from .harness import flwr_run_simulation

APP = Path(__file__).resolve().parents[1] / "quickstart_app"
ROUNDS = 3
SUPERNODES = 3
TARGET_EPSILON = 4.0  # as the converted train handler passes it to dp_sign_train
EVALUATORS = 2  # FedAvg's sampling: max(int(3 * 0.5), min_evaluate_nodes=2)
PRIVACY_WARNING = "NOT covered by the differential-privacy guarantee"


def hunks(name: str) -> list[tuple[int, list[str]]]:
    """conversion.diff's hunks for quickstart/<name>: (first line in the converted file, 0-based; marked lines)."""
    lines = (APP / "conversion.diff").read_text().splitlines()
    found, current, i = [], False, 0
    while i < len(lines):
        line, i = lines[i], i + 1
        if line.startswith("+++ "):
            current = line == f"+++ b/quickstart/{name}"
        elif line.startswith("@@"):
            old_count, new_start, new_count = re.match(r"@@ -\d+(?:,(\d+))? \+(\d+)(?:,(\d+))? @@", line).groups()
            # A hunk's lines: its old and new counts tell where it ends (a removed line may begin "--").
            remaining_old, remaining_new, body = int(old_count or 1), int(new_count or 1), []
            while remaining_old or remaining_new:
                marked, i = lines[i] or " ", i + 1
                remaining_old -= marked[0] in " -"
                remaining_new -= marked[0] in " +"
                body.append(marked)
            if current:
                found.append((int(new_start) - 1, body))
    return found


def original(name: str, after: list[str]) -> list[str]:
    """The file as Flower ships it: the converted lines with conversion.diff undone, every context line checked."""
    before, position = [], 0
    for start, lines in hunks(name):
        before += after[position:start]
        position = start
        for line in lines:
            mark, text = line[0], line[1:]
            if mark in " +":
                assert after[position] == text, f"conversion.diff does not match quickstart/{name} at line {position + 1}"
                position += 1
            if mark in " -":
                before.append(text)
    return before + after[position:]


# sha256 of the files as Flower ships them (and as they stood in tests/quickstart_app/original/ before the diff
# replaced them): an edit to quickstart/ outside the diff's hunks would change the rebuilt original.
ORIGINAL_SHA256 = {
    "client_app.py": "5c187b786d7f54b7120f906be1c7d3a65fa4f0b24815d3f6f04d9cfc7517d86b",
    "server_app.py": "bdb76727b9a7ae055bfaddce2f90f04f7e98399d90eaad29b7a329d787cb6dbf",
}


def changes(name: str) -> tuple[list[str], list[str], list[tuple[str, int, int, int, int]]]:
    """The lines of the original and of quickstart/<name>, and the differing blocks between them."""
    after = (APP / "quickstart" / name).read_text().splitlines()
    before = original(name, after)
    rebuilt = hashlib.sha256(("\n".join(before) + "\n").encode()).hexdigest()
    assert rebuilt == ORIGINAL_SHA256[name], f"quickstart/{name} with conversion.diff undone is not the file Flower ships"
    blocks = [op for op in difflib.SequenceMatcher(a=before, b=after, autojunk=False).get_opcodes() if op[0] != "equal"]
    return before, after, blocks


def train_body(lines: list[str]) -> range:
    """Line indices of the train handler's body: after ``def train(`` up to the next ``@app.`` decorator."""
    start = next(i for i, line in enumerate(lines) if line.startswith("def train(")) + 1
    end = next(i for i, line in enumerate(lines) if i > start and line.startswith("@app."))
    return range(start, end)


def test_the_server_conversion_changes_only_the_strategy_class():
    before, after, blocks = changes("server_app.py")

    removed = [line for _, i1, i2, _, _ in blocks for line in before[i1:i2]]
    added = [line for _, _, _, j1, j2 in blocks for line in after[j1:j2]]
    assert removed == ["from flwr.serverapp.strategy import FedAvg", "    strategy = FedAvg(fraction_evaluate=fraction_evaluate)"]
    assert added == ["from dpsign_fl import SignMajorityVote", "    strategy = SignMajorityVote(fraction_evaluate=fraction_evaluate)"]


def test_the_client_conversion_changes_only_the_train_handlers_body_and_adds_one_import():
    before, after, blocks = changes("client_app.py")
    body_before, body_after = train_body(before), train_body(after)

    in_body = [op for op in blocks if within(op[1], op[2], body_before) and within(op[3], op[4], body_after)]
    elsewhere = [(tag, after[j1:j2]) for tag, i1, i2, j1, j2 in blocks if (tag, i1, i2, j1, j2) not in in_body]
    assert elsewhere == [("insert", ["from dpsign_fl.flower import dp_sign_train"])]
    assert in_body  # the train body did change
    assert "@app.evaluate()" in after  # the evaluate handler stays, unchanged


def within(start: int, stop: int, body: range) -> bool:
    """Whether lines [start, stop) lie in ``body`` (an empty range: whether its position does)."""
    return body.start <= start and stop <= body.stop


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory):
    completed = flwr_run_simulation(
        tmp_path_factory.mktemp("flwr-home"), num_supernodes=SUPERNODES, app=APP, run_config=f"num-server-rounds={ROUNDS}",
    )
    return completed.stdout + completed.stderr


def test_the_converted_quickstart_trains_with_every_client_voting_every_round_within_the_target(quickstart_run):
    rounds = re.findall(r"round (\d+): voters (\d+), dropped (\d+), missing (\d+), epsilon ([0-9.]+)", quickstart_run)

    assert [int(r[0]) for r in rounds] == list(range(1, ROUNDS + 1)), quickstart_run[-6000:]
    assert all((int(v), int(d), int(m)) == (SUPERNODES, 0, 0) for _, v, d, m, _ in rounds), rounds
    epsilons = [float(r[4]) for r in rounds]
    assert all(b > a for a, b in zip(epsilons, epsilons[1:])) and 0 < epsilons[0] and epsilons[-1] <= TARGET_EPSILON


def test_the_quickstarts_evaluate_handler_answers_every_round_and_the_privacy_warning_is_logged_once(quickstart_run):
    evaluations = re.findall(r"round (\d+): client-side evaluation, (\d+) of (\d+) nodes \(outside the DP guarantee\): "
                             r"(.*)", quickstart_run)

    assert [int(e[0]) for e in evaluations] == list(range(1, ROUNDS + 1)), quickstart_run[-6000:]
    assert all((int(got), int(asked)) == (EVALUATORS, EVALUATORS) for _, got, asked, _ in evaluations), evaluations
    assert all(re.match(r"eval_loss [0-9.]+, eval_acc [0-9.]+", metrics) for *_, metrics in evaluations), evaluations
    assert quickstart_run.count(PRIVACY_WARNING) == 1
