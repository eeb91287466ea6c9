"""End to end: what the device owner's own SuperNode settings do on a real deployment.

One `flower-superlink` and four `flower-supernode`s on 127.0.0.1, one 2-round run
(`flwr run . <connection>`, the app bundle built from this repository):

- ``node0``-``node2`` share one FLWR_HOME (as Flower's guides start several
  SuperNodes on one machine), partitions 0-2 of 3, no ``ledger-path``: each keeps
  its default ledger, one file per data set, in ``$FLWR_HOME/dpsign-fl``.
  ``node0`` logs at DEBUG, where the SuperNode names the hash of the bundle it runs.
- ``pinned`` has its own FLWR_HOME and ``--trusted-entities`` (a YAML file with an
  Ed25519 public key made here): the open-source SuperLink sends no signature for
  a bundle of `flwr run .`, so this node must refuse the bundle every time.

The bundle is installed into the shared FLWR_HOME before the run, as docs/deployment.md
tells users who share one: Flower 1.42 installs a new bundle when a node first needs it
and treats the folder as installed as soon as it exists, so three nodes that get their
first message at once can race (a CI run lost one node's round-1 reply to "An exception
was raised when attempting to load `ClientApp`").
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from flwr.cli.build import build_fab_from_disk
from flwr.cli.install import install_from_fab
from flwr.common.constant import ErrorCode

from dpsign_fl.privacy.ledger_store import read_ledger_file

from .harness import REPO, Deployment, RunOutcome, make_trusted_entities

SHARED = 3
ROUNDS = 2
DELTA = 1e-5


@dataclass
class Run:
    deployment: Deployment
    outcome: RunOutcome
    results: Path
    shared_home: Path
    pinned_node_id: int
    fab_hash: str


def diagnostics(run: Run) -> str:
    names = ["superlink", *run.deployment.supernodes]
    logs = [f"--- {name}\n{run.deployment.log_text(name)[-3000:]}" for name in names]
    return "\n".join([f"--- run {run.outcome.run_id}: {run.outcome.status}\n{run.outcome.log[-4000:]}", *logs])


@pytest.fixture(scope="module")
def shared_home_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("device-settings")
    shared_home = root / "shared-home"
    shared_home.mkdir()
    trusted = make_trusted_entities(root / "trust", "fpk_dpsign_test")
    started = time.monotonic()
    with Deployment(root) as deployment:
        deployment.start_superlink()
        deployment.start_supernode("pinned", {"partition-id": 0, "num-partitions": SHARED}, trusted_entities=trusted)
        [pinned_node_id] = deployment.wait_for_online_nodes(1)
        for i in range(SHARED):
            deployment.start_supernode(
                f"node{i}", {"partition-id": i, "num-partitions": SHARED}, home=shared_home,
                env={"FLWR_LOG_LEVEL": "DEBUG"} if i == 0 else None,
            )
        deployment.wait_for_online_nodes(SHARED + 1)
        ready = time.monotonic()
        fab = build_fab_from_disk(REPO)  # what `flwr run .` sends
        fab_hash = hashlib.sha256(fab).hexdigest()
        install_from_fab(fab, install_dir=shared_home, skip_prompt=True)  # `FLWR_HOME=<shared> flwr install <bundle>.fab`
        results = root / "results"
        outcome = deployment.run(
            f"num-server-rounds={ROUNDS} min-available-nodes={SHARED + 1} min-train-nodes={SHARED} "
            f"target-epsilon=2.0 target-delta={DELTA} learning-rate=0.03 model-seed=11 round-timeout=240.0 "
            f"results-dir='{results}'"
        )
        yield Run(deployment, outcome, results, shared_home, pinned_node_id, fab_hash)
        print(f"\ndevice-settings deployment: start {ready - started:.0f} s, run {outcome.wall_seconds:.0f} s")


def rows(run: Run) -> list[dict]:
    return json.loads((run.results / "metrics.json").read_text())


# ---------------------------------------- B: SuperNodes sharing one FLWR_HOME


def test_supernodes_sharing_a_flwr_home_keep_apart_ledgers_and_all_vote_in_every_round(shared_home_run):
    assert shared_home_run.outcome.status == "finished:completed", diagnostics(shared_home_run)
    voters = [row["voters"] for row in rows(shared_home_run)]
    assert voters == [SHARED] * ROUNDS, diagnostics(shared_home_run)


def test_the_shared_folder_holds_one_ledger_per_partition_with_each_nodes_releases(shared_home_run):
    ledgers = sorted((shared_home_run.shared_home / "dpsign-fl").glob("ledger-*.json"))
    assert len(ledgers) == SHARED, ledgers
    assert [read_ledger_file(path, accountant="pld").num_releases for path in ledgers] == [ROUNDS] * SHARED
    assert not (shared_home_run.shared_home / "dpsign-fl" / "ledger.json").exists()


# ------------------------------- A: a SuperNode that trusts only signed bundles


def test_a_node_with_trusted_entities_refuses_the_unsigned_bundle_of_flwr_run(shared_home_run):
    run = shared_home_run
    assert [row["round"] for row in rows(run)] == list(range(1, ROUNDS + 1)), diagnostics(run)
    for server_round in range(1, ROUNDS + 1):
        refused = f"round {server_round}: dropped reply of node {run.pinned_node_id}: error {ErrorCode.INVALID_FAB}: The FAB could not be verified."
        assert refused in run.outcome.log, diagnostics(run)
    assert "App verification is not supported by the connected SuperLink" in run.deployment.log_text("pinned")


def test_the_refused_bundle_never_ran_on_the_pinned_node(shared_home_run):
    home = shared_home_run.deployment.home("pinned")
    assert not (home / "apps").exists()  # Flower installs a bundle there before it runs it
    assert not (home / "dpsign-fl").exists()  # no ledger, no model replica
    assert "planned noise multiplier" not in shared_home_run.deployment.log_text("pinned")


def test_a_supernode_at_debug_level_logs_the_hash_of_the_bundle_it_runs(shared_home_run):
    run = shared_home_run
    assert f"Retrieved FAB: hash={run.fab_hash}" in run.deployment.log_text("node0")
    assert len(list((run.shared_home / "apps").glob(f"*.{run.fab_hash[:8]}"))) == 1
