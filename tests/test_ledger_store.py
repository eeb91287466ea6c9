"""A client's privacy ledger in a file: durable, atomic, locked; and the ClientApp using it.

The first part tests dpsign_fl.privacy.ledger_store (core, no flwr). The second
part calls the ClientApp's train handler with node-config ``ledger-path`` and
``data-dir`` the way a SuperNode delivers them: a new ``Context`` stands for a
restarted SuperNode (its ``context.state`` is empty, its ledger file is not).
"""

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, RecordDict

from dpsign_fl.data import load_dataset
from dpsign_fl.flower.client import BUDGET_EXHAUSTED_CODE, clear_data_cache, client_data, handle_train
from dpsign_fl.flower.records import NODE_ERROR_CODE, NODE_ERROR_REASON
from dpsign_fl.flower.node import NodeConfig, parse_node_config
from dpsign_fl.settings import RunSettings, from_mapping
from dpsign_fl.flower.records import LEDGER_STATE_KEY, model_to_arrays
from dpsign_fl.models import build_model, default_model
from dpsign_fl.privacy import PrivacyLedger
from dpsign_fl.privacy.ledger_store import (
    LOCK_SUFFIX,
    LedgerFileError,
    lock_ledger_file,
    read_ledger_file,
    write_ledger_file,
)

from .e2e.harness import digits_as_mnist, write_idx_folder
from .flower.messages import instruction
from .test_settings import pyproject_defaults

DELTA = 1e-5


def ledger_of(*releases, accountant="pld"):
    ledger = PrivacyLedger(accountant=accountant)
    for sample_rate, noise_multiplier, count in releases:
        ledger.record(sample_rate=sample_rate, noise_multiplier=noise_multiplier, count=count)
    return ledger


# ---------------------------------------------------------------- ledger file


def test_a_missing_file_reads_as_an_empty_ledger(tmp_path):
    ledger = read_ledger_file(tmp_path / "ledger.json", accountant="pld")

    assert ledger.num_releases == 0 and ledger.epsilon(DELTA) == 0


def test_a_written_ledger_reads_back_with_the_same_releases_and_epsilon(tmp_path):
    path = tmp_path / "ledger.json"
    written = ledger_of((0.3, 1.2, 5), (0.1, 0.9, 2))

    write_ledger_file(path, written)
    read = read_ledger_file(path, accountant="pld")

    assert read.releases == written.releases
    assert read.epsilon(DELTA) == written.epsilon(DELTA)
    assert json.loads(path.read_text()) == written.to_dict()


def test_the_accountant_argument_chooses_the_accounting_not_the_releases(tmp_path):
    path = tmp_path / "ledger.json"
    write_ledger_file(path, ledger_of((0.3, 1.2, 5), accountant="pld"))

    as_rdp = read_ledger_file(path, accountant="rdp")

    assert as_rdp.accountant == "rdp" and as_rdp.releases == ledger_of((0.3, 1.2, 5)).releases
    assert as_rdp.epsilon(DELTA) == ledger_of((0.3, 1.2, 5), accountant="rdp").epsilon(DELTA)


def test_writing_replaces_the_file_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "ledger.json"
    write_ledger_file(path, ledger_of((0.3, 1.2, 1)))
    write_ledger_file(path, ledger_of((0.3, 1.2, 2)))

    assert read_ledger_file(path, accountant="pld").num_releases == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ledger.json"]


def test_a_failed_rename_keeps_the_previous_ledger_intact(tmp_path, monkeypatch):
    path = tmp_path / "ledger.json"
    write_ledger_file(path, ledger_of((0.3, 1.2, 1)))

    def crash(*args):
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk gone"):
        write_ledger_file(path, ledger_of((0.3, 1.2, 7)))
    monkeypatch.undo()

    assert read_ledger_file(path, accountant="pld").num_releases == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ledger.json"]


def test_writing_fsyncs_the_new_file_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    path = tmp_path / "ledger.json"
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def recording_fsync(descriptor):
        events.append("fsync folder" if stat.S_ISDIR(os.fstat(descriptor).st_mode) else "fsync file")
        real_fsync(descriptor)

    def recording_replace(source, destination):
        events.append("rename")
        real_replace(source, destination)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(os, "replace", recording_replace)
    write_ledger_file(path, ledger_of((0.3, 1.2, 1)))

    assert events == ["fsync file", "rename", "fsync folder"]


@pytest.mark.parametrize(
    "content",
    ["", "{", "[]", '{"version": 99, "releases": []}', '{"version": 1, "releases": [{"count": 1}]}'],
    ids=["empty", "truncated", "not-a-dict", "other-version", "malformed-release"],
)
def test_an_unreadable_ledger_file_is_refused_never_reset(tmp_path, content):
    path = tmp_path / "ledger.json"
    path.write_text(content)

    with pytest.raises(LedgerFileError, match="ledger.json"):
        read_ledger_file(path, accountant="pld")
    assert path.read_text() == content


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("relative/ledger.json", "must be absolute"),
        ("", "must not be empty"),
        ("{tmp}/no-such-folder/ledger.json", "does not exist"),
        ("{tmp}", "must name a file"),
    ],
)
def test_a_ledger_path_that_would_silently_start_a_new_budget_is_refused(tmp_path, path, message):
    with pytest.raises(LedgerFileError, match=message):
        read_ledger_file(path.format(tmp=tmp_path), accountant="pld")


# Another process holding the lock the way lock_ledger_file takes it: flock on <ledger>.lock.
HOLD_LOCK = """
import fcntl, sys, time
with open(sys.argv[1], "a") as handle:
    fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
    print("locked", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def test_the_lock_keeps_a_second_process_out_until_the_first_releases_it(tmp_path):
    path = tmp_path / "ledger.json"
    lock_path = tmp_path / ("ledger.json" + LOCK_SUFFIX)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(lock_path), "2"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(TimeoutError, match="locked by another process"):
            with lock_ledger_file(path, timeout_seconds=0.3):
                pass
        with lock_ledger_file(path, timeout_seconds=60):  # negative control: free once released
            pass
        assert holder.wait(timeout=60) == 0
    finally:
        holder.kill()
        holder.wait()


HAMMER = """
import sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[3])
from dpsign_fl.privacy.ledger_store import lock_ledger_file
path, stop = Path(sys.argv[1]), Path(sys.argv[2])
deadline, turns = time.monotonic() + 120, 0
while not stop.exists() and time.monotonic() < deadline:
    with lock_ledger_file(path, timeout_seconds=120):
        turns += 1
        if turns == 1:
            print("holding", flush=True)
        time.sleep(0.02)
    # asks again at once: a lock that favours the last holder would starve everyone else
print(turns, flush=True)
"""


def test_the_lock_is_fair_a_waiter_gets_it_while_another_process_keeps_asking_for_it(tmp_path):
    # The earlier lock (poll every 50 ms, no turnstile) let one process re-acquire it every
    # time: a second process then waited until its timeout.
    path, stop = tmp_path / "ledger.json", tmp_path / "stop"
    repository = str(Path(__file__).resolve().parents[1])
    hammer = subprocess.Popen([sys.executable, "-c", HAMMER, str(path), str(stop), repository], stdout=subprocess.PIPE, text=True)
    try:
        assert hammer.stdout.readline().strip() == "holding"
        started = time.monotonic()
        for _ in range(3):  # three turns in a row, while the other process keeps asking
            with lock_ledger_file(path, timeout_seconds=60):
                pass
        waited = time.monotonic() - started
    finally:
        stop.touch()
        turns = int(hammer.stdout.readline() or 0)
        hammer.wait(timeout=60)
    assert waited < 60 and turns >= 1


def test_a_symbolic_link_is_followed_and_the_real_file_is_written_and_locked(tmp_path):
    real = tmp_path / "store" / "ledger.json"
    real.parent.mkdir()
    write_ledger_file(real, ledger_of((0.1, 1.0, 2)))
    link = tmp_path / "ledger-link.json"
    link.symlink_to(real)

    write_ledger_file(link, ledger_of((0.1, 1.0, 3)))
    with lock_ledger_file(link):
        pass

    assert link.is_symlink() and read_ledger_file(real, accountant="pld").num_releases == 3
    assert (real.parent / ("ledger.json" + LOCK_SUFFIX)).exists()
    assert not (tmp_path / ("ledger-link.json" + LOCK_SUFFIX)).exists()


def test_a_dangling_symbolic_link_is_refused_not_read_as_an_empty_ledger(tmp_path):
    link = tmp_path / "ledger.json"
    link.symlink_to(tmp_path / "gone.json")

    with pytest.raises(LedgerFileError, match="does not exist"):
        read_ledger_file(link, accountant="pld")


def test_a_ledger_file_with_another_hard_link_is_refused(tmp_path):
    path = tmp_path / "ledger.json"
    write_ledger_file(path, ledger_of((0.1, 1.0, 3)))
    os.link(path, tmp_path / "copy.json")

    with pytest.raises(LedgerFileError, match="2 hard links"):
        write_ledger_file(path, ledger_of((0.1, 1.0, 4)))
    with pytest.raises(LedgerFileError, match="2 hard links"):
        read_ledger_file(tmp_path / "copy.json", accountant="pld")


@pytest.mark.parametrize(
    ("count", "message"),
    [(2.9, "count must be an integer"), ("7", "count must be an integer"), (True, "count must be an integer"), (0, "count must be an integer >= 1")],
)
def test_a_ledger_with_a_count_of_the_wrong_type_is_refused(tmp_path, count, message):
    path = tmp_path / "ledger.json"
    data = ledger_of((0.1, 1.0, 3)).to_dict()
    data["releases"][0]["count"] = count
    path.write_text(json.dumps(data))

    with pytest.raises(LedgerFileError, match=message):
        read_ledger_file(path, accountant="pld")


def test_temporary_files_of_a_killed_writer_are_removed_under_the_lock(tmp_path):
    path = tmp_path / "ledger.json"
    write_ledger_file(path, ledger_of((0.1, 1.0, 3)))
    leftovers = [tmp_path / f".ledger.json.{tag}.tmp" for tag in ("abc", "def")]
    for leftover in leftovers:
        leftover.write_text("{")

    with lock_ledger_file(path):
        pass

    assert not any(leftover.exists() for leftover in leftovers)
    assert read_ledger_file(path, accountant="pld").num_releases == 3


def test_the_lock_timeout_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="timeout_seconds"):
        with lock_ledger_file(tmp_path / "ledger.json", timeout_seconds=0):
            pass


# ------------------------------------------------- the ClientApp with a ledger file

ROUNDS = 2


def run_config(**overrides):
    config = dict(pyproject_defaults())
    config.update({"num-server-rounds": ROUNDS, "target-epsilon": 2.0, "model-seed": 3, "reproducible-noise": True, "noise-seed": 3})
    config.update(overrides)
    return config


def supernode_context(node_config, **overrides):
    """A fresh Context: what a (re)started SuperNode gives its ClientApp."""
    return Context(run_id=1, node_id=5, node_config=node_config, state=RecordDict(), run_config=run_config(**overrides))


def train_message(server_round, dataset="digits", model_name=None):
    data = load_dataset(dataset) if dataset == "digits" else None
    input_shape = data.input_shape if data is not None else (1, 28, 28)
    model = build_model(model_name or default_model(dataset), input_shape=input_shape, num_classes=10, seed=0)
    content = RecordDict({"arrays": model_to_arrays(model), "config": ConfigRecord({"server-round": server_round})})
    return instruction(content, dst_node_id=5)


def test_a_restarted_supernode_plans_within_the_budget_its_ledger_file_has_left(tmp_path):
    ledger_path = tmp_path / "node.json"
    node_config = {"partition-id": 1, "num-partitions": 5, "ledger-path": str(ledger_path)}

    first = handle_train(train_message(1), supernode_context(node_config))
    restarted = supernode_context(node_config)  # empty context.state, same file
    replies = [handle_train(train_message(t), restarted) for t in (2, 3, 4)]

    ledger = read_ledger_file(ledger_path, accountant="pld")
    assert not first.has_error() and [r.has_error() for r in replies] == [False, False, True]
    assert replies[-1].error.code == BUDGET_EXHAUSTED_CODE and "3 releases" in replies[-1].error.reason
    assert ledger.num_releases == 3 and ledger.epsilon(DELTA) <= 2.0
    # The restart planned its releases after the first one: more noise, never a fresh budget.
    assert ledger.releases[1].noise_multiplier > ledger.releases[0].noise_multiplier
    assert LEDGER_STATE_KEY not in restarted.state  # the file is the only copy


def test_a_node_that_opts_into_a_per_run_budget_starts_afresh_every_run_negative_control():
    # What the durable ledger prevents: context.state alone does not survive a new run.
    node_config = {"partition-id": 1, "num-partitions": 5, "per-run-budget": True}
    for server_round in (1, 2):
        handle_train(train_message(server_round), supernode_context(node_config))

    reply = handle_train(train_message(3), supernode_context(node_config))

    assert not reply.has_error()


def test_a_deployed_node_without_a_ledger_path_keeps_a_durable_ledger_in_its_own_folder(tmp_path, monkeypatch):
    # The red team's case: three runs on a node without ledger-path each spent most of a budget of 1.
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "home"))
    node_config = {"partition-id": 0, "num-partitions": 5}
    for run in range(3):
        context = supernode_context(node_config, **{"target-epsilon": 1.0})  # a new run: empty context.state
        for server_round in (1, 2):
            handle_train(train_message(server_round), context)

    (ledger_file,) = (tmp_path / "home" / "dpsign-fl").glob("ledger-*.json")  # one file: one data set
    ledger = read_ledger_file(ledger_file, accountant="pld")
    assert ledger.num_releases >= 2 and ledger.epsilon(DELTA) <= 1.0


def test_the_ledger_file_holds_the_release_when_the_reply_leaves(tmp_path):
    ledger_path = tmp_path / "node.json"
    context = supernode_context({"partition-id": 0, "num-partitions": 5, "ledger-path": str(ledger_path)})

    reply = handle_train(train_message(1), context)

    ledger = read_ledger_file(ledger_path, accountant="pld")
    assert ledger.num_releases == 1
    assert reply.content["metrics"]["epsilon"] == pytest.approx(ledger.epsilon(DELTA))


def test_the_ledger_file_counts_releases_from_every_run_on_the_same_data(tmp_path):
    ledger_path = tmp_path / "node.json"
    node_config = {"partition-id": 0, "num-partitions": 5, "ledger-path": str(ledger_path)}
    earlier_run = ledger_of((0.3, 4.0, 1))  # another run, other settings, same data
    write_ledger_file(ledger_path, earlier_run)

    reply = handle_train(train_message(1), supernode_context(node_config))

    ledger = read_ledger_file(ledger_path, accountant="pld")
    assert not reply.has_error()
    assert ledger.releases[0] == earlier_run.releases[0] and ledger.num_releases == 2
    this_run_alone = ledger_of((ledger.releases[1].sample_rate, ledger.releases[1].noise_multiplier, 1))
    assert reply.content["metrics"]["epsilon"] > this_run_alone.epsilon(DELTA)


def test_a_refusal_leaves_the_ledger_file_unchanged(tmp_path):
    ledger_path = tmp_path / "node.json"
    write_ledger_file(ledger_path, ledger_of((0.3, 0.5, 40)))
    before = ledger_path.read_bytes()

    reply = handle_train(
        train_message(1), supernode_context({"partition-id": 0, "num-partitions": 5, "ledger-path": str(ledger_path)})
    )

    assert reply.has_error() and reply.error.code == BUDGET_EXHAUSTED_CODE
    assert ledger_path.read_bytes() == before


def test_a_corrupt_ledger_file_stops_the_client_before_any_release(tmp_path, caplog):
    ledger_path = tmp_path / "node.json"
    ledger_path.write_text("{")
    context = supernode_context({"partition-id": 0, "num-partitions": 5, "ledger-path": str(ledger_path)})

    reply = handle_train(train_message(1), context)

    assert reply.has_error() and (reply.error.code, reply.error.reason) == (NODE_ERROR_CODE, NODE_ERROR_REASON)
    assert LedgerFileError.__name__ in caplog.text and "not a privacy ledger" in caplog.text  # the node's own log
    assert ledger_path.read_text() == "{"


# ------------------------------------------------------------- node config


def test_partition_keys_give_a_partition_and_no_ledger_file():
    assert parse_node_config({"partition-id": 2, "num-partitions": 3}) == NodeConfig(2, 3, None, None)


def test_data_dir_alone_means_the_whole_dataset_found_there():
    node = parse_node_config({"data-dir": "/data/mnist", "ledger-path": "/var/lib/node/ledger.json"})

    assert node == NodeConfig(None, None, "/data/mnist", "/var/lib/node/ledger.json")


@pytest.mark.parametrize(
    ("node_config", "error", "key"),
    [
        ({}, ValueError, "partition-id"),
        ({"ledger-path": "/l.json"}, ValueError, "data-dir"),
        ({"partition-id": 0}, ValueError, "num-partitions"),
        ({"num-partitions": 3, "data-dir": "/d"}, ValueError, "partition-id"),
        ({"partition-id": 3, "num-partitions": 3}, ValueError, "partition-id"),
        ({"partition-id": 0, "num-partitions": 0}, ValueError, "num-partitions"),
        ({"partition-id": True, "num-partitions": 3}, TypeError, "partition-id"),
        ({"partition-id": 0.5, "num-partitions": 3}, TypeError, "partition-id"),
        ({"data-dir": 7}, TypeError, "data-dir"),
        ({"data-dir": ""}, ValueError, "data-dir"),
        ({"data-dir": "/d", "ledger_path": "/l.json"}, ValueError, "ledger_path"),
    ],
    ids=[
        "empty", "ledger-only", "no-num-partitions", "no-partition-id", "partition-too-large",
        "zero-partitions", "bool-partition", "float-partition", "data-dir-not-a-string",
        "empty-data-dir", "misspelt-ledger-path",
    ],
)
def test_a_bad_node_config_is_refused_with_a_message_naming_the_key(node_config, error, key):
    with pytest.raises(error, match=key):
        parse_node_config(node_config)


@pytest.fixture
def device_folder(tmp_path):
    """A device's own data: 90 training images in MNIST's file format."""
    train = digits_as_mnist(np.arange(0, 90))
    test = digits_as_mnist(np.arange(90, 110))
    clear_data_cache()
    yield write_idx_folder(tmp_path / "mnist", *train, *test)
    clear_data_cache()


def test_a_node_with_data_dir_and_no_partition_trains_on_the_whole_dataset_there(device_folder):
    config = from_mapping(RunSettings, run_config(dataset="mnist", **{"data-dir": "/elsewhere"}))

    inputs, targets, classes = client_data(config, parse_node_config({"data-dir": str(device_folder)}))

    assert inputs.shape == (90, 1, 28, 28) and classes == 10
    np.testing.assert_array_equal(targets.numpy(), digits_as_mnist(np.arange(0, 90))[1])


def test_a_node_with_data_dir_and_a_partition_trains_on_its_partition_of_that_dataset(device_folder):
    config = from_mapping(RunSettings, run_config(dataset="mnist"))

    parts = [
        client_data(config, parse_node_config({"data-dir": str(device_folder), "partition-id": i, "num-partitions": 3}))
        for i in range(3)
    ]

    assert [p[0].shape[0] for p in parts] == [30, 30, 30]
    assert not np.array_equal(parts[0][1].numpy(), parts[1][1].numpy())


def test_a_data_dir_for_digits_is_refused_because_digits_reads_no_folder(tmp_path):
    config = from_mapping(RunSettings, run_config())

    with pytest.raises(ValueError, match="data-dir"):
        client_data(config, parse_node_config({"data-dir": str(tmp_path)}))


def test_a_node_with_its_own_data_dir_and_ledger_file_replies_with_its_bits(device_folder, tmp_path):
    node_config = {"data-dir": str(device_folder), "ledger-path": str(tmp_path / "ledger.json")}
    context = supernode_context(node_config, dataset="mnist", model="logreg")

    reply = handle_train(train_message(1, dataset="mnist", model_name="logreg"), context)

    assert not reply.has_error()
    assert set(reply.content["metrics"].keys()) == {"epsilon"}
    assert read_ledger_file(tmp_path / "ledger.json", accountant="pld").num_releases == 1
