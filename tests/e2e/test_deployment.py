"""End to end on a real deployment: `flower-superlink`, 3 `flower-supernode`s, `flwr run . <connection>`.

Everything runs on 127.0.0.1 with free ports and private FLWR_HOMEs, and every
process a test starts is stopped by PID, also when the test fails. Idle
SuperNodes poll every 3 s and the ClientApp runs in a fresh process per
message, so a round takes 15-40 s here; the runs are 2 rounds on digits.

- ``insecure``: a SuperLink and 3 SuperNodes (``partition-id``/``num-partitions``
  and ``ledger-path``), one 2-round run; its metrics.json and ledger files.
- ``restarted``: the same SuperNodes stopped and started again (new processes,
  same ledger files), then a new run: every client refuses, the model stays.
- ``capped``: the same SuperNodes with node-config ``max-epsilon=1`` and fresh
  ledger files; a run asking for epsilon 8, then one asking for delta 0.5.
- ``secured``: TLS with a throwaway CA, SuperNode authentication with 3
  registered keys (nodes with their own ``data-dir``) and one unregistered key.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch

from dpsign_fl.models import build_model, default_model
from dpsign_fl.privacy.ledger_store import read_ledger_file

from .harness import (
    Deployment,
    RunOutcome,
    descendant_pids,
    digits_as_mnist,
    is_alive,
    make_supernode_key,
    make_tls_files,
    write_idx_folder,
)

NODES = 3
ROUNDS = 2
TARGET_EPSILON = 2.0
DELTA = 1e-5
SEED = 11


def run_config(
    results: Path, *, rounds: int = ROUNDS, extra: str = "", epsilon: float = TARGET_EPSILON, delta: float = DELTA,
    min_train_nodes: int = NODES,
) -> str:
    return (
        f"num-server-rounds={rounds} min-available-nodes={NODES} min-train-nodes={min_train_nodes} "
        f"target-epsilon={epsilon} target-delta={delta} learning-rate=0.03 model-seed={SEED} "
        f"round-timeout=240.0 results-dir='{results}' {extra}"
    ).strip()


def metrics(results: Path) -> list[dict]:
    return json.loads((results / "metrics.json").read_text())


def diagnostics(deployment: Deployment, outcome: RunOutcome | None = None) -> str:
    """Logs to show when an assertion fails."""
    parts = [f"--- {name}\n{deployment.log_text(name)[-3000:]}" for name in ["superlink", *deployment.supernodes]]
    if outcome is not None:
        parts.insert(0, f"--- run {outcome.run_id}: {outcome.status}\n{outcome.log[-4000:]}")
    return "\n".join(parts)


@dataclass
class Phase:
    """What a fixture saw, kept for the tests (the files may change later)."""

    deployment: Deployment
    root: Path
    outcome: RunOutcome
    results: Path
    node_configs: dict[str, dict] = field(default_factory=dict)
    ledger_paths: dict[str, Path] = field(default_factory=dict)
    ledgers: dict[str, dict] = field(default_factory=dict)  # file contents right after the run
    seconds: dict[str, float] = field(default_factory=dict)
    pids: dict[str, int] = field(default_factory=dict)  # SuperNode PIDs during the run
    registered: dict[str, int] = field(default_factory=dict)  # key name -> node ID
    online: list[int] = field(default_factory=list)
    rogue_exit: int | None = None


def ledger_snapshot(paths: dict[str, Path]) -> dict[str, dict]:
    return {name: json.loads(path.read_text()) if path.exists() else None for name, path in paths.items()}


# ----------------------------------------------------------- insecure, 3 nodes


@pytest.fixture(scope="module")
def insecure(tmp_path_factory):
    root = tmp_path_factory.mktemp("deployment")
    (root / "ledgers").mkdir()
    ledger_paths = {f"node{i}": root / "ledgers" / f"node{i}.json" for i in range(NODES)}
    node_configs = {
        name: {"partition-id": i, "num-partitions": NODES, "ledger-path": str(path)}
        for i, (name, path) in enumerate(ledger_paths.items())
    }
    started = time.monotonic()
    with Deployment(root) as deployment:
        deployment.start_superlink()
        for name, node_config in node_configs.items():
            deployment.start_supernode(name, node_config)
        deployment.wait_for_online_nodes(NODES)
        ready = time.monotonic()
        outcome = deployment.run(run_config(root / "results-1"))
        phase = Phase(
            deployment, root, outcome, root / "results-1", node_configs, ledger_paths, ledger_snapshot(ledger_paths),
            seconds={"start": ready - started, "run": outcome.wall_seconds},
            pids={name: p.pid for name, p in deployment.supernodes.items()},
        )
        yield phase
        stopping = time.monotonic()
    print(f"\ninsecure deployment: {phase.seconds}, stop {time.monotonic() - stopping:.1f} s")


def test_a_run_on_three_supernodes_completes_and_writes_a_row_per_round(insecure):
    assert insecure.outcome.status == "finished:completed", diagnostics(insecure.deployment, insecure.outcome)
    rows = metrics(insecure.results)
    assert [row["round"] for row in rows] == list(range(1, ROUNDS + 1))
    assert all(row["voters"] == NODES and row["dropped"] == 0 for row in rows), rows


def test_epsilon_grows_each_round_and_stays_within_the_target(insecure):
    epsilons = [row["epsilon"] for row in metrics(insecure.results)]
    assert all(b > a for a, b in zip(epsilons, epsilons[1:]))
    assert 0 < epsilons[0] and epsilons[-1] <= TARGET_EPSILON


def test_the_model_learns_something_in_two_rounds(insecure):
    rows = metrics(insecure.results)
    assert rows[-1]["accuracy"] > 0.2, rows  # 10 classes: chance is 0.1


def test_each_supernode_wrote_its_releases_to_its_ledger_file(insecure):
    for name, stored in insecure.ledgers.items():
        assert stored is not None, f"{name} wrote no ledger file"
        ledger = read_ledger_file(insecure.ledger_paths[name], accountant="pld")
        assert ledger.num_releases == ROUNDS
        assert 0 < ledger.epsilon(DELTA) <= TARGET_EPSILON


def test_the_clientapp_logs_go_to_the_supernodes_and_name_no_error(insecure):
    for name in insecure.node_configs:
        log = insecure.deployment.log_text(name)
        assert "SuperNode ID" in log
        assert "Traceback" not in log, log[-3000:]


# ------------------------------------------------- restart with the same ledgers


@pytest.fixture(scope="module")
def restarted(insecure):
    deployment = insecure.deployment
    started = time.monotonic()
    old_pids = {name: deployment.stop_supernode(name) for name in insecure.node_configs}
    assert not any(is_alive(pid) for pid in old_pids.values())
    for name, node_config in insecure.node_configs.items():
        deployment.start_supernode(name, node_config)
    deployment.wait_for_online_nodes(NODES)
    ready = time.monotonic()
    # One round is enough: with an empty ledger the noise calibrated for a
    # 1-round run would allow that release; only the stored releases forbid it.
    outcome = deployment.run(run_config(insecure.root / "results-2", rounds=1))
    phase = Phase(
        deployment, insecure.root, outcome, insecure.root / "results-2", insecure.node_configs, insecure.ledger_paths,
        ledger_snapshot(insecure.ledger_paths),
        seconds={"restart": ready - started, "run": outcome.wall_seconds},
        pids={name: p.pid for name, p in deployment.supernodes.items()},
    )
    print(f"\nrestarted deployment: {phase.seconds}")
    return phase


def test_restarted_supernodes_are_new_processes_using_the_same_ledger_files(insecure, restarted):
    assert set(restarted.pids.values()).isdisjoint(insecure.pids.values())
    assert restarted.ledgers == insecure.ledgers  # refusals write nothing


def test_after_a_restart_every_client_refuses_once_its_budget_is_spent(restarted):
    assert restarted.outcome.status == "finished:completed", diagnostics(restarted.deployment, restarted.outcome)
    rows = metrics(restarted.results)
    assert [(row["voters"], row["dropped"]) for row in rows] == [(0, NODES)], rows
    for name in restarted.pids:
        assert "privacy budget exhausted" in restarted.deployment.log_text(name)


def test_a_run_where_every_client_refused_leaves_the_model_unchanged(restarted):
    initial = build_model(default_model("digits"), input_shape=(1, 8, 8), num_classes=10, seed=SEED)
    final = torch.load(restarted.results / "model.pt")
    for name, value in initial.state_dict().items():
        torch.testing.assert_close(final[name], value, rtol=0, atol=0)


# ------------------------------------------- the device owner's cap, over two runs

NODE_CAP = 1.0


@pytest.fixture(scope="module")
def capped(insecure, restarted):
    """The same SuperNodes restarted with max-epsilon=1 (fresh ledgers); then two greedy runs."""
    deployment = insecure.deployment
    ledger_paths = {name: insecure.root / "ledgers" / f"capped-{name}.json" for name in insecure.node_configs}
    node_configs = {
        name: {**config, "ledger-path": str(ledger_paths[name]), "max-epsilon": NODE_CAP, "delta": DELTA}
        for name, config in insecure.node_configs.items()
    }
    for name, node_config in node_configs.items():
        deployment.stop_supernode(name)
        deployment.start_supernode(name, node_config)
    deployment.wait_for_online_nodes(NODES)
    outcomes, results = [], []
    for label, asked in (("epsilon-8", dict(epsilon=8.0)), ("delta-0.5", dict(delta=0.5))):
        folder = insecure.root / f"results-capped-{label}"
        # One round each: a run asking for epsilon 8 over one round is the greediest kind.
        outcomes.append(deployment.run(run_config(folder, rounds=1, min_train_nodes=1, **asked)))
        results.append(folder)
    return Phase(deployment, insecure.root, outcomes[-1], results[-1], node_configs, ledger_paths,
                 ledger_snapshot(ledger_paths)), outcomes, results


def test_runs_that_ask_for_more_than_the_nodes_cap_still_complete(capped):
    phase, outcomes, results = capped
    for outcome, folder in zip(outcomes, results):
        assert outcome.status == "finished:completed", diagnostics(phase.deployment, outcome)
        assert [row["round"] for row in metrics(folder)] == [1]


def test_every_ledger_stays_within_the_nodes_cap_at_the_nodes_delta_over_both_runs(capped):
    phase, _, _ = capped
    for name, path in phase.ledger_paths.items():
        ledger = read_ledger_file(path, accountant="pld")
        assert ledger.num_releases >= 1, name
        assert ledger.epsilon(DELTA) <= NODE_CAP, (name, ledger.epsilon(DELTA))
        assert "planning for the cap" in phase.deployment.log_text(name)


# Placed after every test that uses `insecure`, so that it runs last in this module.
def test_stopping_the_deployment_ends_every_process_it_started(insecure):
    deployment = insecure.deployment
    roots = [deployment.superlink, *deployment.supernodes.values()]
    family = [p.pid for p in roots] + [pid for p in roots for pid in descendant_pids(p.pid)]
    assert len(family) > len(roots)  # each started its flower-superexec

    deployment.stop()

    assert [pid for pid in family if is_alive(pid)] == []
    assert deployment.started_pids_alive() == []


# ------------------------------------------------------- TLS + SuperNode auth


def device_data(root: Path) -> tuple[dict[str, Path], Path]:
    """Each device's own MNIST-format folder (disjoint digits), and the server's test set."""
    folders = {}
    for i, (start, stop) in enumerate([(0, 150), (150, 300), (300, 600)]):
        folders[f"node{i}"] = write_idx_folder(
            root / f"device{i}", *digits_as_mnist(np.arange(start, stop)), *digits_as_mnist(np.arange(0, 20))
        )
    server = write_idx_folder(
        root / "server-data", *digits_as_mnist(np.arange(0, 20)), *digits_as_mnist(np.arange(1400, 1797))
    )
    return folders, server


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    root = tmp_path_factory.mktemp("tls-deployment")
    tls = make_tls_files(root / "tls")
    keys = {name: make_supernode_key(root / "keys", name) for name in ("node0", "node1", "node2", "rogue")}
    folders, server_data = device_data(root)
    (root / "ledgers").mkdir()
    node_configs = {
        # two devices use the whole dataset in their own folder ...
        "node0": {"data-dir": str(folders["node0"]), "ledger-path": str(root / "ledgers" / "node0.json")},
        "node1": {"data-dir": str(folders["node1"]), "ledger-path": str(root / "ledgers" / "node1.json")},
        # ... and one holds its partition of a larger folder.
        "node2": {
            "data-dir": str(folders["node2"]), "partition-id": 1, "num-partitions": 2,
            "ledger-path": str(root / "ledgers" / "node2.json"),
        },
    }
    started = time.monotonic()
    with Deployment(root, tls=tls, supernode_auth=True) as deployment:
        deployment.start_superlink()
        registered = {name: deployment.register(keys[name][1]) for name in node_configs}
        deployment.start_supernode("rogue", {"partition-id": 0, "num-partitions": 3}, auth_key=keys["rogue"][0])
        for name, node_config in node_configs.items():
            deployment.start_supernode(name, node_config, auth_key=keys[name][0])
        rogue_exit = deployment.wait_for_exit("rogue", timeout=120)
        online = deployment.wait_for_online_nodes(NODES)
        ready = time.monotonic()
        results = root / "results"
        outcome = deployment.run(
            run_config(results, extra=f"dataset='mnist' model='logreg' data-dir='{server_data}'")
        )
        phase = Phase(
            deployment, root, outcome, results, node_configs,
            ledger_paths={name: Path(c["ledger-path"]) for name, c in node_configs.items()},
            seconds={"start": ready - started, "run": outcome.wall_seconds},
            registered=registered, online=online, rogue_exit=rogue_exit,
        )
        yield phase
        stopping = time.monotonic()
    assert deployment.started_pids_alive() == []
    print(f"\nTLS deployment: {phase.seconds}, stop {time.monotonic() - stopping:.1f} s")


def test_registered_supernodes_train_over_tls(secured):
    assert secured.outcome.status == "finished:completed", diagnostics(secured.deployment, secured.outcome)
    rows = metrics(secured.results)
    assert [row["round"] for row in rows] == list(range(1, ROUNDS + 1))
    assert all(row["voters"] == NODES and row["dropped"] == 0 for row in rows), rows
    assert sorted(secured.online) == sorted(secured.registered.values())


def test_an_unregistered_supernode_is_refused(secured):
    assert secured.rogue_exit != 0
    assert "Failed to activate SuperNode" in secured.deployment.log_text("rogue")


def test_nodes_with_their_own_data_dir_spend_their_own_ledgers(secured):
    for name, path in secured.ledger_paths.items():
        assert read_ledger_file(path, accountant="pld").num_releases == ROUNDS, name


def test_the_superlink_refuses_plain_http_clients(secured):
    import urllib.error
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        opener.open(f"http://{secured.deployment.address}/health", timeout=5)
