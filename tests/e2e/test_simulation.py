"""End to end: a real `flwr run . --stream` simulation, asserting on what it writes."""

import json
import math
import os

import pytest

from dpsign_fl.vote.packing import payload_bytes

from .harness import simulation_with_results, superlink_pids

SUPERNODES = 3
ROUNDS = 3
TARGET_EPSILON = 4.0


@pytest.fixture(scope="module")
def simulation(tmp_path_factory):
    return simulation_with_results(
        tmp_path_factory,
        num_supernodes=SUPERNODES,
        run_config=(
            f"num-server-rounds={ROUNDS} target-epsilon={TARGET_EPSILON} learning-rate=0.03 "
            "model-seed=11 reproducible-noise=true noise-seed=11"
        ),
    )


def test_run_writes_a_metrics_row_for_every_round(simulation):
    completed, results, _ = simulation
    metrics_file = results / "metrics.json"
    assert metrics_file.exists(), completed.stdout[-4000:] + completed.stderr[-4000:]
    rows = json.loads(metrics_file.read_text())
    assert [row["round"] for row in rows] == list(range(1, ROUNDS + 1))
    assert all(row["voters"] == SUPERNODES and row["dropped"] == 0 for row in rows)


def test_epsilon_increases_and_never_exceeds_the_target(simulation):
    _, results, _ = simulation
    epsilons = [row["epsilon"] for row in json.loads((results / "metrics.json").read_text())]
    assert all(b > a for a, b in zip(epsilons, epsilons[1:]))
    assert 0 < epsilons[0] and epsilons[-1] <= TARGET_EPSILON


def test_uplink_is_ceil_d_over_8_bytes_per_client(simulation):
    _, results, _ = simulation
    rows = json.loads((results / "metrics.json").read_text())
    import torch

    state = torch.load(results / "model.pt")
    d = sum(t.numel() for t in state.values())
    for row in rows:
        assert row["payload-bytes"] == payload_bytes(d) == math.ceil(d / 8)
        assert row["uplink-bytes"] == SUPERNODES * payload_bytes(d)


def test_final_accuracy_is_well_above_chance(simulation):
    _, results, _ = simulation
    rows = json.loads((results / "metrics.json").read_text())
    assert rows[-1]["accuracy"] > 0.3  # 10 classes: chance is 0.1
    assert (results / "accuracy_and_epsilon_by_round.png").stat().st_size > 1000


def test_the_serverapp_in_the_app_bundle_counts_votes_with_the_compiled_kernel(simulation):
    # flwr run imports dpsign_fl from the bundle it makes of the folder (.py files only):
    # the kernel's C source lives in a .py file so that it is there too.
    from dpsign_fl.vote.kernel import find_compiler

    if find_compiler() is None:
        pytest.skip("no C compiler on this machine")
    completed, _, _ = simulation
    assert "votes are counted by the compiled kernel" in completed.stdout + completed.stderr


def test_the_superlink_started_by_the_test_is_stopped(simulation):
    _, _, home = simulation
    assert superlink_pids(home) == []


def test_the_local_superlink_starts_from_the_venvs_python_without_the_venv_on_path(tmp_path):
    # flower-superlink starts flower-superexec from PATH; `.venv/bin/python -m dpsign_fl.bench`
    # (no activated venv) once failed with "No such file or directory: 'flower-superexec'".
    from dpsign_fl.flower.local_superlink import LocalSuperLink, healthy

    from .harness import offline_env

    env = offline_env(tmp_path / "home", PATH=os.pathsep.join(["/usr/bin", "/bin"]))
    with LocalSuperLink(env) as superlink:
        assert healthy(superlink.port)
    assert not healthy(superlink.port)
