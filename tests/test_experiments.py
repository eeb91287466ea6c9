"""Tests of the in-process research loop and the experiment recipes.

The CNN and CIFAR-10 recipe runs are marked slow (30-60 s each on 2 shared
cores); run them with ``pytest -m slow tests/test_experiments.py``.

Offline: the recipes run on tiny generated files in the real on-disk formats
(mushroom.csv, MNIST IDX, cifar-10-batches-py) or on scikit-learn's digits.
"""

from __future__ import annotations

import csv
import gzip
import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from dpsign_fl import rounds
from dpsign_fl.data import load_dataset, partition_indices
from dpsign_fl.experiments import Experiment, run_experiment
from dpsign_fl.experiments import __main__ as experiments_main
from dpsign_fl.experiments.__main__ import main
from dpsign_fl.experiments.recipes import RECIPES, SHAKESPEARE_LEARNING_RATE, SHAKESPEARE_ROLE_PRIVATE_LEARNING_RATE
from dpsign_fl.models import build_model
from dpsign_fl.vote.packing import pack_signs
from dpsign_fl.parameters import model_vector
from dpsign_fl.privacy import compute_epsilon
from dpsign_fl.release import ReleaseSettings, client_release, seeded_generator
from dpsign_fl.vote.server_update import VoteUpdater
from dpsign_fl.settings import ConfigError
from dpsign_fl.vote import majority_vote

REQUIRED_FIELDS = ("method", "noise", "dataset", "target_epsilon", "epsilon", "test_accuracy", "rounds", "wall_seconds")


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def _small(**changes) -> Experiment:
    # A fixed sigma skips calibration (seconds each); epsilon still comes from the ledgers.
    base = dict(
        dataset="digits", num_clients=3, sample_rate=0.2, num_rounds=3, target_epsilon=8.0, eval_every=3,
        noise_multiplier=1.0, reproducible_noise=True,
    )
    base.update(changes)
    return Experiment.create(**base)


# --- the loop runs the Flower client's own functions ------------------------------------


def test_private_loop_makes_every_release_through_the_one_client_round(digits, monkeypatch):
    calls = []
    original = rounds.client_release

    def spy(*args, **kwargs):
        calls.append(args[3])
        return original(*args, **kwargs)

    monkeypatch.setattr(rounds, "client_release", spy)
    record = run_experiment(_small(), dataset=digits, progress=False)

    assert len(calls) == 3 * 3  # rounds x clients
    assert all(settings.noise_multiplier == record["noise_multiplier"] for settings in calls)


def test_one_round_equals_client_release_pack_vote_and_update_by_hand(digits):
    experiment = _small(num_rounds=1, data_seed=7, model_seed=7, noise_seed=7, learning_rate=0.05)
    seen = {}
    record = run_experiment(experiment, dataset=digits, progress=False, on_round=lambda t, w: seen.setdefault(t, w.copy()))

    model = build_model("mlp", input_shape=(1, 8, 8), num_classes=10, seed=7)
    weights = model_vector(model)
    shares = partition_indices(digits.train_targets, num_partitions=3, partitioner="iid", seed=7)
    release = ReleaseSettings(sample_rate=0.2, clip_norm=1.0, noise_multiplier=record["noise_multiplier"])
    payloads = []
    for m, indices in enumerate(shares):
        index = torch.from_numpy(indices)
        generator = seeded_generator(7, client=m, stream=1)
        signs = client_release(model, digits.train_inputs[index], digits.train_targets[index], release, generator=generator)
        payloads.append(pack_signs(signs))
    vote = majority_vote(np.stack(payloads), weights.shape[0])
    expected = VoteUpdater(learning_rate=0.05).step(weights, vote, 1, 1)

    np.testing.assert_array_equal(seen[1], expected)


# --- privacy: epsilon comes from the releases actually made -------------------------------


def test_reported_epsilon_is_the_ledger_epsilon_and_never_above_target(digits):
    record = run_experiment(_small(num_rounds=4, eval_every=2, noise_multiplier=None), dataset=digits, progress=False)

    recomputed = compute_epsilon(
        sample_rate=0.2, noise_multiplier=record["noise_multiplier"], num_steps=4, target_delta=record["target_delta"]
    )
    assert record["epsilon"] == pytest.approx(recomputed, rel=1e-9)
    assert 0.95 * 8.0 < record["epsilon"] <= 8.0
    epsilons = [h["epsilon"] for h in record["history"]]
    assert epsilons == sorted(epsilons) and epsilons[0] == 0.0  # grows with the releases made


def test_non_private_methods_report_infinite_epsilon(digits):
    for method in ("signsgd", "sgd", "sto-sign"):
        record = run_experiment(_small(method=method, num_rounds=1, eval_every=1, learning_rate=0.01), dataset=digits, progress=False)
        assert record["epsilon"] == float("inf") and record["noise_multiplier"] == 0.0


def test_fixed_noise_multiplier_reports_the_epsilon_it_spends_not_the_target(digits):
    record = run_experiment(_small(num_rounds=2, eval_every=2, noise_multiplier=0.5), dataset=digits, progress=False)

    assert record["noise_multiplier"] == 0.5
    assert record["epsilon"] == pytest.approx(
        compute_epsilon(sample_rate=0.2, noise_multiplier=0.5, num_steps=2, target_delta=1e-5), rel=1e-9
    )
    assert record["epsilon"] > record["target_epsilon"]  # sigma 0.5 overspends: reported, not hidden


def test_default_delta_is_one_over_largest_client_size_to_the_1_1(digits):
    record = run_experiment(_small(num_rounds=1, delta_from_data=True), dataset=digits, progress=False)

    assert record["target_delta"] == pytest.approx(1.0 / max(record["client_sizes"]) ** 1.1)


# --- learning: the runs must be able to fail -----------------------------------------------


def test_dp_signsgd_learns_digits_well_above_chance(digits):
    settings = _small(
        num_clients=5, sample_rate=0.5, num_rounds=20, learning_rate=0.02, eval_every=20, noise_multiplier=None
    )

    record = run_experiment(settings, dataset=digits, progress=False)

    assert record["test_accuracy"] > 0.6  # chance is 0.1
    assert record["epsilon"] <= 8.0


def test_all_ones_byzantine_majority_moves_every_coordinate_down(digits):
    # 6 of 10 clients send all +1: the vote is +1 everywhere, so w1 = w0 - lr.
    settings = _small(num_clients=10, num_rounds=1, byzantine_fraction=0.6, byzantine_attack="all-ones", learning_rate=0.1)
    seen = {}
    model = build_model("mlp", input_shape=(1, 8, 8), num_classes=10, seed=0)

    run_experiment(settings, dataset=digits, progress=False, on_round=lambda t, w: seen.setdefault(t, w.copy()))

    np.testing.assert_allclose(seen[1], model_vector(model) - 0.1, rtol=0, atol=1e-6)


def test_byzantine_sign_flip_minority_changes_the_run_but_not_the_ledger(digits):
    honest = run_experiment(_small(num_clients=5), dataset=digits, progress=False)
    attacked = run_experiment(_small(num_clients=5, byzantine_fraction=0.4), dataset=digits, progress=False)

    assert attacked["test_accuracy"] != honest["test_accuracy"] or attacked["test_loss"] != honest["test_loss"]
    assert attacked["epsilon"] == honest["epsilon"]


def test_bad_settings_are_rejected_with_the_parameter_named():
    with pytest.raises(ValueError, match="method"):
        Experiment.create(method="adam")
    with pytest.raises(ValueError, match="byzantine_fraction"):
        Experiment.create(method="sgd", learning_rate=0.01, byzantine_fraction=0.2)
    with pytest.raises(ValueError, match="sample_rate"):
        Experiment.create(sample_rate=2.0)
    with pytest.raises(ConfigError, match=r"participation must be 1 when every client takes part in every round .*got 0.25"):
        Experiment.create(participation=0.25)  # every client takes part in every round


# --- recipes on tiny generated data, through the command line ------------------------------


def _write_mushroom(folder: Path, rows: int = 400) -> None:
    # Poisonous iff odor is foul: learnable by logistic regression.
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    header = ["class"] + [f"attribute-{i}" for i in range(22)]
    with open(folder / "mushroom.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        for _ in range(rows):
            poisonous = rng.random() < 0.5
            attributes = [("foul" if poisonous else "none")] + [str(v) for v in rng.integers(0, 3, 21)]
            writer.writerow(["poisonous" if poisonous else "edible"] + attributes)


def _write_idx(path: Path, values: np.ndarray) -> None:
    magic = 0x0803 if values.ndim == 3 else 0x0801
    header = magic.to_bytes(4, "big") + b"".join(n.to_bytes(4, "big") for n in values.shape)
    path.write_bytes(gzip.compress(header + values.astype(np.uint8).tobytes()))


def _class_images(labels: np.ndarray, shape: tuple[int, ...], rng) -> np.ndarray:
    # Class k lights up a band of rows: a CNN separates the classes quickly.
    images = rng.integers(0, 60, (labels.shape[0], *shape)).astype(np.uint8)
    height = shape[-2]
    for i, label in enumerate(labels):
        start = int(label) * height // 10
        images[i, ..., start : start + max(height // 10, 1), :] = 255
    return images


def _write_mnist(folder: Path, train: int = 600, test: int = 200) -> None:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    for stem, count in (("train", train), ("t10k", test)):
        labels = rng.integers(0, 10, count)
        _write_idx(folder / f"{stem}-images-idx3-ubyte.gz", _class_images(labels, (28, 28), rng))
        _write_idx(folder / f"{stem}-labels-idx1-ubyte.gz", labels)


def _write_cifar(folder: Path, per_batch: int = 40) -> None:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        labels = rng.integers(0, 10, per_batch)
        data = _class_images(labels, (3, 32, 32), rng).reshape(per_batch, -1)
        with open(folder / name, "wb") as handle:
            pickle.dump({b"data": data, b"labels": labels.tolist()}, handle, protocol=2)


def _run_cli(recipe: str, data_dir: Path | None, out: Path, capsys, *extra: str) -> list[dict]:
    argv = [recipe, "--out", str(out), "--quick", "--no-progress", "--no-plots", *extra]
    if data_dir is not None:
        argv += ["--data-dir", str(data_dir)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    records = json.loads((out / "results.json").read_text())
    for record in records:
        assert all(field in record for field in REQUIRED_FIELDS), sorted(record)
        assert f"| {record['label']} |" in printed
        if record["method"] in ("dp-signsgd", "jin-rectified"):
            assert record["epsilon"] <= record["target_epsilon"]
    return records


def test_mushroom_logreg_recipe_runs_all_nine_settings(tmp_path, capsys):
    _write_mushroom(tmp_path / "data" / "mushroom")

    records = _run_cli("mushroom-logreg", tmp_path / "data", tmp_path / "out", capsys, "--rounds", "12")

    assert {(r["method"], r["noise"]) for r in records} == {
        (m, n) for m in ("sgd", "signsgd", "dp-signsgd") for n in ("none", "gaussian", "levy")
    }
    by_label = {r["label"]: r for r in records}
    assert by_label["signsgd-none"]["test_accuracy"] > 0.8
    assert by_label["dp-signsgd-none"]["test_accuracy"] > 0.6  # chance ~0.5


def test_dp_sign_variants_report_jin_true_epsilon_far_above_its_per_step_epsilon(tmp_path, capsys):
    _write_mushroom(tmp_path / "data" / "mushroom")

    # Full batches (q = 1): no amplification by sampling, as in Jin et al.'s per-step analysis.
    records = _run_cli(
        "dp-sign-variants", tmp_path / "data", tmp_path / "out", capsys, "--rounds", "20", "--set", "sample_rate=1"
    )

    by_label = {r["label"]: r for r in records}
    for epsilon in (1, 10):
        jin = by_label[f"jin-dp-sign-eps{epsilon}"]
        assert jin["epsilon_per_step"] == epsilon
        assert jin["epsilon"] > 3 * epsilon  # not private over training
        assert by_label[f"jin-rectified-eps{epsilon}"]["epsilon"] <= epsilon
        assert by_label[f"dp-signsgd-eps{epsilon}"]["epsilon"] <= epsilon
        assert by_label[f"jin-rectified-eps{epsilon}"]["noise_multiplier"] > by_label[f"dp-signsgd-eps{epsilon}"]["noise_multiplier"]


@pytest.mark.parametrize("recipe", ["mnist-cnn", "fmnist-cnn"])
def test_cnn_recipes_list_the_epsilon_partition_grid_with_the_eps3_iid_target_first(recipe):
    runs = RECIPES[recipe].runs()

    private = [r for r in runs if r.method == "dp-signsgd"]
    assert (private[0].run.partitioner, private[0].run.target_epsilon) == ("iid", 3.0)
    assert {(r.run.partitioner, r.run.target_epsilon) for r in private} == {
        (p, e) for p in ("iid", "dirichlet") for e in (1.0, 3.0, 8.0)
    }
    assert all(r.run.target_delta == 1e-5 and r.num_clients == 10 for r in private)
    assert {r.run.partitioner for r in runs if r.method == "signsgd"} == {"iid", "dirichlet"}


@pytest.mark.parametrize(
    "recipe, folder",
    [pytest.param(r, f, marks=pytest.mark.slow) for r, f in (("mnist-cnn", "mnist"), ("fmnist-cnn", "fashion-mnist"))],
)
def test_cnn_recipes_run_on_generated_idx_files_and_the_ceiling_learns(tmp_path, capsys, recipe, folder):
    _write_mnist(tmp_path / "data" / folder)

    records = _run_cli(
        recipe, tmp_path / "data", tmp_path / "out", capsys, "--rounds", "8",
        "--only", "dp-signsgd-iid-eps3,signsgd-iid", "--set", "learning_rate=0.05", "--set", "sample_rate=0.5",
    )

    assert [r["label"] for r in records] == ["dp-signsgd-iid-eps3", "signsgd-iid"]
    assert records[0]["epsilon"] <= 3.0
    assert records[1]["test_accuracy"] > 0.2  # chance 0.1 (200 test images)


@pytest.mark.slow
@pytest.mark.parametrize("recipe, folder", [("mnist-cnn", "mnist"), ("fmnist-cnn", "fashion-mnist")])
def test_cnn_recipes_run_the_whole_grid_on_generated_idx_files(tmp_path, capsys, recipe, folder):
    _write_mnist(tmp_path / "data" / folder)

    records = _run_cli(recipe, tmp_path / "data", tmp_path / "out", capsys, "--rounds", "4")

    assert len(records) == 8


@pytest.mark.slow  # ~30 s: the 551k-parameter CNN's per-example gradients
def test_cifar10_recipe_runs_end_to_end_on_a_generated_batches_folder(tmp_path, capsys):
    _write_cifar(tmp_path / "data" / "cifar-10-batches-py")

    records = _run_cli("cifar10-cnn", tmp_path / "data", tmp_path / "out", capsys, "--rounds", "2")

    assert [r["label"] for r in records] == ["dp-signsgd-iid-eps8", "signsgd-iid"]
    assert records[0]["num_parameters"] > 500_000


def test_only_runs_the_matching_labels_and_keeps_earlier_results(tmp_path, capsys):
    _write_mushroom(tmp_path / "data" / "mushroom")
    out = tmp_path / "out"

    _run_cli("mushroom-logreg", tmp_path / "data", out, capsys, "--rounds", "2", "--only", "sgd-none,*-levy")
    records = _run_cli("mushroom-logreg", tmp_path / "data", out, capsys, "--rounds", "2", "--only", "dp-signsgd-levy")

    labels = [r["label"] for r in records]
    assert sorted(labels) == ["dp-signsgd-levy", "sgd-levy", "sgd-none", "signsgd-levy"]
    assert labels[-1] == "dp-signsgd-levy"  # replaced, not duplicated


def test_set_applies_only_to_the_runs_only_selects(tmp_path, capsys):
    # learning-rate 0 (automatic steps) is invalid for the recipe's sgd runs, which --only leaves out.
    _write_mushroom(tmp_path / "data" / "mushroom")

    records = _run_cli(
        "mushroom-logreg", tmp_path / "data", tmp_path / "out", capsys, "--rounds", "2",
        "--only", "dp-signsgd-none", "--set", "learning-rate=0",
    )

    assert [(r["label"], r["learning_rate"]) for r in records] == [("dp-signsgd-none", 0.0)]


def test_the_cli_prints_the_settings_checkers_warnings_for_the_runs_it_will_run(tmp_path, capsys):
    _write_mushroom(tmp_path / "data" / "mushroom")
    argv = ["mushroom-logreg", "--data-dir", str(tmp_path / "data"), "--rounds", "1", "--only", "dp-signsgd-none"]

    assert main([*argv, "--out", str(tmp_path / "quiet"), "--no-progress", "--no-plots"]) == 0
    quiet = capsys.readouterr().err
    assert main([*argv, "--out", str(tmp_path / "momentum"), "--no-progress", "--no-plots", "--set", "client-momentum=0.5"]) == 0
    warned = capsys.readouterr().err

    assert "warning:" not in quiet
    assert "warning: dp-signsgd-none: client-momentum=0.5 with vote='robust'" in warned


def test_resume_runs_only_the_labels_missing_from_results(tmp_path, capsys):
    _write_mushroom(tmp_path / "data" / "mushroom")
    out = tmp_path / "out"
    _run_cli("mushroom-logreg", tmp_path / "data", out, capsys, "--rounds", "2", "--only", "sgd-none")
    first = json.loads((out / "results.json").read_text())

    records = _run_cli("mushroom-logreg", tmp_path / "data", out, capsys, "--rounds", "2", "--only", "sgd-*", "--resume")

    assert records[0] == first[0]  # kept as it was, not run again
    assert sorted(r["label"] for r in records) == sorted(run.name() for run in RECIPES["mushroom-logreg"].runs() if run.name().startswith("sgd-"))
    assert len(records) > 1


def _resume_cli(data_dir: Path, out: Path, capsys, *extra: str) -> tuple[list[dict], str]:
    argv = ["mushroom-logreg", "--out", str(out), "--data-dir", str(data_dir), "--rounds", "2", "--only", "sgd-none"]
    assert main([*argv, "--no-progress", "--no-plots", "--resume", *extra]) == 0
    return json.loads((out / "results.json").read_text()), capsys.readouterr().err


def _count_runs(monkeypatch) -> list[str]:
    ran = []
    original = experiments_main.run_experiment

    def spy(experiment, **kwargs):
        ran.append(experiment.name())
        return original(experiment, **kwargs)

    monkeypatch.setattr(experiments_main, "run_experiment", spy)
    return ran


def test_resume_keeps_a_stored_run_whose_settings_are_the_same_wherever_the_data_now_lives(tmp_path, capsys, monkeypatch):
    _write_mushroom(tmp_path / "data" / "mushroom")
    out = tmp_path / "out"
    first, _ = _resume_cli(tmp_path / "data", out, capsys, "--set", "learning-rate=0.01")
    shutil.copytree(tmp_path / "data", tmp_path / "moved")
    ran = _count_runs(monkeypatch)

    records, log = _resume_cli(tmp_path / "moved", out, capsys, "--set", "learning-rate=0.01")

    assert ran == [] and records == first
    assert "1 run(s) already in" in log and "0 to go" in log


def test_resume_reruns_a_stored_run_made_with_other_settings_and_names_what_changed(tmp_path, capsys, monkeypatch):
    _write_mushroom(tmp_path / "data" / "mushroom")
    out = tmp_path / "out"
    _resume_cli(tmp_path / "data", out, capsys, "--set", "learning-rate=0.01")
    ran = _count_runs(monkeypatch)

    records, log = _resume_cli(tmp_path / "data", out, capsys, "--set", "learning-rate=0.02", "--set", "sample-rate=0.1")

    assert ran == ["sgd-none"]
    assert [(r["label"], r["learning_rate"], r["sample_rate"]) for r in records] == [("sgd-none", 0.02, 0.1)]
    assert "sgd-none" in log and "learning-rate 0.01 -> 0.02" in log and "sample-rate 0.05 -> 0.1" in log


def test_resume_reruns_a_stored_run_that_carries_no_settings(tmp_path, capsys, monkeypatch):
    # results.json written before records kept their run config: nothing shows the settings were the same.
    _write_mushroom(tmp_path / "data" / "mushroom")
    out = tmp_path / "out"
    first, _ = _resume_cli(tmp_path / "data", out, capsys)
    (out / "results.json").write_text(json.dumps([{k: v for k, v in r.items() if k != "run_config"} for r in first]))
    ran = _count_runs(monkeypatch)

    records, log = _resume_cli(tmp_path / "data", out, capsys)

    assert ran == ["sgd-none"] and [r["label"] for r in records] == ["sgd-none"]
    assert "sgd-none" in log and "no run config" in log


@pytest.mark.parametrize("recipe", ["mnist-scatternet", "fmnist-scatternet", "cifar10-scatternet"])
def test_scatternet_recipes_list_the_eps3_iid_target_first_then_auto_epsilons_dirichlet_cnn_and_ceiling(recipe):
    runs = RECIPES[recipe].runs()

    assert runs[0].name() == "linear-dp-signsgd-iid-eps3" and runs[0].run.learning_rate > 0
    assert runs[1].name() == "linear-dp-signsgd-iid-eps3-auto" and runs[1].run.learning_rate == 0.0
    assert {r.run.model for r in runs} == {"scatternet-linear", "scatternet-cnn"}
    assert {r.run.target_epsilon for r in runs if r.private} == {1.0, 3.0, 8.0}
    assert "dirichlet" in {r.run.partitioner for r in runs} and "signsgd" in {r.method for r in runs}
    assert all(r.run.target_delta == 1e-5 and r.num_clients == 10 for r in runs)


def test_scatternet_recipe_runs_on_generated_idx_files(tmp_path, capsys):
    pytest.importorskip("kymatio")
    _write_mnist(tmp_path / "data" / "mnist")

    records = _run_cli(
        "mnist-scatternet", tmp_path / "data", tmp_path / "out", capsys, "--rounds", "6",
        "--only", "*iid-eps3*,linear-signsgd-iid", "--set", "sample_rate=0.5",
    )

    assert [r["label"] for r in records] == [
        "linear-dp-signsgd-iid-eps3", "linear-dp-signsgd-iid-eps3-auto", "linear-dp-signsgd-iid-eps3-q0.1",
        "cnn-dp-signsgd-iid-eps3", "linear-signsgd-iid",
    ]
    assert records[0]["num_parameters"] == 81 * 7 * 7 * 10 + 10
    assert records[-1]["test_accuracy"] > 0.2  # the non-private ceiling learns the generated classes (chance 0.1)


def test_cifar10_scatternet_recipe_runs_on_a_generated_batches_folder(tmp_path, capsys):
    # No offline CIFAR-10 here: the path is tested on generated data in the standard layout.
    pytest.importorskip("kymatio")
    _write_cifar(tmp_path / "data" / "cifar-10-batches-py")

    records = _run_cli(
        "cifar10-scatternet", tmp_path / "data", tmp_path / "out", capsys, "--rounds", "2", "--only", "*iid-eps3",
    )

    assert [r["label"] for r in records] == ["linear-dp-signsgd-iid-eps3", "cnn-dp-signsgd-iid-eps3"]
    assert records[0]["num_parameters"] == 243 * 8 * 8 * 10 + 10


def test_robustness_recipe_lists_every_attack_fraction_clients_and_rule():
    from dpsign_fl.experiments.attacks import BYZANTINE_ATTACKS

    runs = RECIPES["mnist-robustness"].runs()
    assert len(runs) == 2 * 2 * (1 + 4 * len(BYZANTINE_ATTACKS))
    assert {(r.run.vote, r.num_clients) for r in runs} == {(v, c) for v in ("majority", "robust") for c in (10, 20)}
    assert {r.hooks.byzantine_fraction for r in runs} == {0.0, 0.1, 0.2, 0.3, 0.4}
    assert {r.hooks.byzantine_attack for r in runs if r.hooks.byzantine_fraction} == set(BYZANTINE_ATTACKS)


def test_every_recipe_is_exercised_here():
    assert set(RECIPES) == {
        "mushroom-logreg", "dp-sign-variants", "mnist-cnn", "fmnist-cnn", "cifar10-cnn",
        "mnist-scatternet", "fmnist-scatternet", "cifar10-scatternet", "mnist-robustness", "mnist-adversarial",
        "fmnist-adversarial", "shakespeare",
    }


def test_the_loop_gives_each_client_one_speaking_role_and_truncation_keeps_roles_aligned(tmp_path):
    from dpsign_fl.experiments.loop import load_run_data

    from .test_shakespeare import write_tiny_plays

    dataset = load_dataset("shakespeare", data_dir=str(write_tiny_plays(tmp_path)))
    role = dataset.natural_partitions["role"]
    experiment = Experiment.create(dataset="shakespeare", partitioner="role", num_clients=3)

    _, clients = load_run_data(experiment, dataset=dataset)
    _, first_five = load_run_data(experiment.with_changes(max_examples=5), dataset=dataset)

    assert [torch.equal(c.inputs, dataset.train_inputs[role.train_clients == i]) for i, c in enumerate(clients)] == [True] * 3
    # The first 5 training examples: ORLANDO's 1 and GLOSTER's 4; CLARENCE keeps none.
    assert [c.size for c in first_five] == [1, 4, 0]


@pytest.mark.parametrize("method", ["dp-signsgd", "signsgd"])
def test_the_loop_trains_a_sized_char_transformer_on_speaking_roles(tmp_path, method):
    from .test_shakespeare import write_tiny_plays

    dataset = load_dataset("shakespeare", data_dir=str(write_tiny_plays(tmp_path)))
    experiment = Experiment.create(
        dataset="shakespeare", partitioner="role", num_clients=3, num_rounds=2, sample_rate=0.5, method=method,
        model_width=16, model_depth=1, model_previous_characters=1, reproducible_noise=True,
    )

    record = run_experiment(experiment, dataset=dataset, progress=False)

    expected = build_model("char-transformer", input_shape=(80,), num_classes=97, width=16, depth=1, previous_characters=1)
    assert record["num_parameters"] == sum(p.numel() for p in expected.parameters())
    assert [row["round"] for row in record["history"]] == [0, 1, 2]
    assert all(0 <= row["accuracy"] <= 1 for row in record["history"])


def test_adversarial_recipe_lists_four_dp_rows_three_pretrained_ones_and_the_non_private_model_per_adv_epsilon():
    runs = RECIPES["mnist-adversarial"].runs()
    assert [r.name() for r in runs][:8] == [
        "dp-fgsm-rs-public-norm-adv0.1", "dp-fgsm-rs-plain-adv0.1", "dp-none-public-norm-adv0.1", "dp-none-plain-adv0.1",
        "dp-pgd-plain-pretrained-adv0.1", "dp-fgsm-rs-plain-pretrained-adv0.1", "dp-none-plain-pretrained-adv0.1",
        "signsgd-fgsm-rs-plain-adv0.1",
    ]
    assert {r.run.adv_epsilon for r in runs} == {0.1, 0.3} and len(runs) == 16
    assert all((r.run.adversarial_training == "pgd") == r.name().startswith("dp-pgd-") for r in runs)
    assert all(r.run.target_epsilon == 3.0 and r.num_clients == 10 for r in runs)
    assert all((r.run.pretrain_steps > 0) == ("-pretrained-" in r.name()) for r in runs)
    fmnist = RECIPES["fmnist-adversarial"].runs()  # no public pretraining set: no pretrained rows
    assert [r.run.adv_epsilon for r in fmnist] == [0.1] * 5 and not any(r.run.pretrain_steps for r in fmnist)


@pytest.mark.slow  # two recipe runs with PGD-20 evaluation: about 2 minutes on the 2-core machine
def test_adversarial_recipe_reports_clean_and_robust_accuracy_on_generated_idx_files(tmp_path, capsys):
    _write_mnist(tmp_path / "data" / "mnist", train=300, test=40)  # PGD-20 at every evaluation: keep the test set small
    _write_mnist(tmp_path / "data" / "fashion-mnist", train=300, test=40)
    records = _run_cli(
        "mnist-adversarial", tmp_path / "data", tmp_path / "out", capsys, "--rounds", "2",
        "--only", "dp-fgsm-rs-public-norm-adv0.1,signsgd-fgsm-rs-plain-adv0.1", "--set", "sample_rate=0.2",
    )
    assert [r["label"] for r in records] == ["dp-fgsm-rs-public-norm-adv0.1", "signsgd-fgsm-rs-plain-adv0.1"]
    assert all(0 <= r["test_robust_accuracy"] <= r["test_accuracy"] for r in records)
    assert records[0]["epsilon"] <= 3.0


# --- shakespeare: clients drawn per round, FedAvg, the bigram floor ------------------------------


def test_shakespeare_recipe_lists_every_method_for_each_partition_on_the_same_rounds_and_clients():
    runs = RECIPES["shakespeare"].runs()
    labels = [run.name() for run in runs]

    for partition in ("play", "role"):
        assert [label for label in labels if label.startswith(f"{partition}-")] == [
            f"{partition}-transformer-dp-signsgd-eps8", f"{partition}-transformer-dp-signsgd-eps8-majority",
            f"{partition}-transformer-dp-signsgd-eps3", f"{partition}-transformer-signsgd",
            f"{partition}-transformer-fedavg",
            f"{partition}-transformer-pretrained-dp-signsgd-eps8", f"{partition}-transformer-pretrained-dp-signsgd-eps3",
            f"{partition}-transformer-pretrained-signsgd", f"{partition}-transformer-pretrained-fedavg",
        ]
        same = {(r.run.num_rounds, r.num_clients, r.clients_per_round, r.run.sample_rate, r.run.model_name,
                 r.run.client_schedule, r.run.participation_margin) for r in runs if r.run.partitioner == partition}
        assert len(same) == 1
    # By role every role is drawn equally often and plans without margin; by play the draws are random, with it.
    assert {(r.run.client_schedule, r.run.participation_margin) for r in runs if r.run.partitioner == "role"} == {("balanced", 0.0)}
    assert {(r.run.client_schedule, r.run.participation_margin) for r in runs if r.run.partitioner == "play"} == {("random", 3.0)}
    assert {r.run.pretrain_steps > 0 for r in runs} == {True, False}
    assert all((r.run.pretrain_steps > 0) == ("-pretrained-" in r.name()) for r in runs)
    for run in runs:
        assert run.run.participation == run.clients_per_round / run.num_clients
    assert {r.run.vote for r in runs if r.name().endswith("-majority")} == {"majority"}
    assert RECIPES["shakespeare"].floor[0] == "bigram"
    steps = {r.name(): r.run.learning_rate for r in runs}
    for partition, private_step in (("play", SHAKESPEARE_LEARNING_RATE), ("role", SHAKESPEARE_ROLE_PRIVATE_LEARNING_RATE)):
        for label in ("dp-signsgd-eps8", "dp-signsgd-eps8-majority", "dp-signsgd-eps3"):
            assert steps[f"{partition}-transformer-{label}"] == private_step
        assert steps[f"{partition}-transformer-signsgd"] == SHAKESPEARE_LEARNING_RATE
    assert SHAKESPEARE_ROLE_PRIVATE_LEARNING_RATE != SHAKESPEARE_LEARNING_RATE


def test_shakespeare_recipe_runs_a_label_for_two_rounds_and_writes_the_bigram_floor(tmp_path, capsys):
    from .test_shakespeare import write_tiny_plays

    data = write_tiny_plays(tmp_path)
    (data / "shakespeare" / "sonnets_gut.txt").write_text("THE SONNETS\n\n" + "Shall I compare thee to a summer's day?\n" * 6)
    records = _run_cli(
        "shakespeare", data, tmp_path / "out", capsys, "--rounds", "2",
        "--only", "bigram,play-transformer-dp-signsgd-eps8,play-transformer-pretrained-dp-signsgd-eps8",
        "--set", "num-clients=2", "--set", "clients-per-round=1", "--set", "participation=0.5",
        "--set", "model-width=16", "--set", "model-depth=1", "--set", "sample-rate=0.5", "--set", "pretrain-steps=20",
    )

    by_label = {record["label"]: record for record in records}
    assert set(by_label) == {"bigram", "play-transformer-dp-signsgd-eps8", "play-transformer-pretrained-dp-signsgd-eps8"}
    assert by_label["play-transformer-dp-signsgd-eps8"]["rounds"] == 2
    assert 0 < by_label["bigram"]["test_accuracy"] <= 1
    # --set reaches every run: both start (round 0) from the draw of model-seed 0 after 20 steps on the poem
    assert {record["pretrain_steps"] for record in by_label.values() if record["label"] != "bigram"} == {20}
    from dpsign_fl.data import public_text
    from dpsign_fl.evaluation import evaluate
    from dpsign_fl.initial_model import PRETRAIN_RECIPES, pretrain
    from dpsign_fl.models import build_model

    dataset = load_dataset("shakespeare", data_dir=str(data))
    model = build_model("char-transformer", input_shape=(80,), num_classes=97, seed=0, width=16, depth=1)
    drawn_loss = evaluate(model, dataset.test_inputs, dataset.test_targets)[0]
    chunks = public_text("shakespeare", str(data))
    pretrain(model, chunks[:, :-1], chunks[:, 1:], steps=20, seed=0, recipe=PRETRAIN_RECIPES["shakespeare"], log=lambda line: None)
    pretrained_loss = evaluate(model, dataset.test_inputs, dataset.test_targets)[0]
    assert abs(pretrained_loss - drawn_loss) > 1e-3
    for record in by_label.values():
        if record["label"] != "bigram":
            assert record["history"][0]["loss"] == pytest.approx(pretrained_loss, abs=1e-6)


def test_each_round_draws_clients_per_round_distinct_clients_the_same_for_every_method():
    from dpsign_fl.experiments.loop import round_clients

    experiment = Experiment.create(num_clients=50, clients_per_round=5, participation=0.1)
    draws = [round_clients(experiment, t) for t in range(1, 41)]

    assert all(len(set(d)) == 5 and all(0 <= m < 50 for m in d) for d in draws)
    assert len({tuple(d) for d in draws}) > 1  # not the same clients every round
    assert draws == [round_clients(experiment.with_changes(method="fedavg", learning_rate=0.1), t) for t in range(1, 41)]
    assert round_clients(experiment.with_changes(clients_per_round=0, participation=1.0), 1) == list(range(50))


def test_the_balanced_schedule_draws_every_client_floor_or_ceil_of_t_k_over_n_times_and_random_does_not():
    from dpsign_fl.experiments.loop import round_clients

    experiment = Experiment.create(
        num_clients=105, clients_per_round=2, participation=2 / 105, num_rounds=1000, client_schedule="balanced"
    )
    counts = np.zeros(105, dtype=int)
    for t in range(1, 1001):
        drawn = round_clients(experiment, t)
        assert len(set(drawn)) == 2 and all(0 <= m < 105 for m in drawn)
        counts[drawn] += 1
        assert counts.max() - counts.min() <= 1  # at every round, not only at the end
    assert (counts.min(), counts.max()) == (19, 20)  # 2,000 draws of 105 clients: 19.05 each
    assert round_clients(experiment, 7) == round_clients(experiment.with_changes(method="fedavg", learning_rate=0.1), 7)
    assert round_clients(experiment, 7) == round_clients(experiment.with_changes(num_rounds=2000), 7)
    other_seed = [round_clients(experiment.with_changes(noise_seed=1), t) for t in range(1, 101)]
    assert other_seed != [round_clients(experiment, t) for t in range(1, 101)]
    # The negative control: the random schedule spreads the same draws far wider.
    random = np.zeros(105, dtype=int)
    for t in range(1, 1001):
        random[round_clients(experiment.with_changes(client_schedule="random"), t)] += 1
    assert random.sum() == 2000 and random.max() - random.min() > 5


@pytest.mark.parametrize("schedule, refusals", [("balanced", False), ("random", True)])
def test_a_plan_without_margin_is_never_refused_with_the_balanced_schedule_but_is_with_random_draws(
    digits, schedule, refusals
):
    from dpsign_fl.experiments import loop

    experiment = Experiment.create(
        dataset="digits", num_clients=10, clients_per_round=3, participation=0.3, participation_margin=0.0,
        num_rounds=20, sample_rate=0.05, reproducible_noise=True, client_schedule=schedule, eval_every=20,
    )

    record = loop.run_experiment(experiment, dataset=digits, progress=False)

    assert rounds.plan_release(experiment.run).num_releases == 6  # 20 * 3 / 10 exactly
    assert record["noise_multiplier"] == rounds.plan_release(experiment.run).release.noise_multiplier
    assert (record["refused"] > 0) is refusals
    assert record["epsilon"] <= 8.0


def test_a_client_drawn_in_some_rounds_releases_only_in_those_rounds(digits, monkeypatch):
    from dpsign_fl.experiments import loop

    calls = []
    real = loop.client_round
    monkeypatch.setattr(loop, "client_round", lambda *a, **k: calls.append(1) or real(*a, **k))
    experiment = Experiment.create(
        dataset="digits", num_clients=6, clients_per_round=2, participation=0.5, num_rounds=3, sample_rate=0.1,
        reproducible_noise=True,
    )

    record = loop.run_experiment(experiment, dataset=digits, progress=False)

    assert len(calls) == 3 * 2
    assert record["epsilon"] <= 8.0


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"num_clients": 4, "clients_per_round": 5}, "clients_per_round must be at most num_clients=4"),
        ({"num_clients": 10, "clients_per_round": 5, "participation": 0.2}, "participation must be at least"),
        ({"num_clients": 10, "participation": 0.5}, "participation must be 1 when every client"),
        ({"method": "fedavg", "learning_rate": 0.0}, "method 'fedavg'"),
    ],
)
def test_client_sampling_settings_that_cannot_hold_are_rejected_naming_them(fields, message):
    with pytest.raises(ConfigError, match=message):
        Experiment.create(**fields)


def test_fedavg_with_one_local_step_and_equal_clients_is_the_mean_gradient_step(digits):
    # FedAvg averages the clients' models weighted by their sizes; with one local
    # step on equal-sized IID clients that is the sgd method's mean-gradient step.
    settings = dict(dataset="digits", num_clients=4, num_rounds=2, sample_rate=0.2, learning_rate=0.1,
                    reproducible_noise=True, max_examples=400)
    fedavg, sgd = [], []
    run_experiment(Experiment.create(method="fedavg", **settings), dataset=digits, progress=False,
                   on_round=lambda t, w: fedavg.append(w.copy()))
    run_experiment(Experiment.create(method="sgd", **settings), dataset=digits, progress=False,
                   on_round=lambda t, w: sgd.append(w.copy()))

    np.testing.assert_allclose(fedavg[-1], sgd[-1], rtol=1e-4, atol=1e-6)


def test_fedavg_takes_local_steps_and_learns_digits(digits):
    experiment = Experiment.create(
        method="fedavg", local_steps=3, dataset="digits", num_clients=5, clients_per_round=3, participation=0.6,
        num_rounds=30, sample_rate=0.1, learning_rate=0.1, reproducible_noise=True,
    )

    record = run_experiment(experiment, dataset=digits, progress=False)

    assert record["test_accuracy"] > 0.5


def test_bigram_predicts_the_most_frequent_next_symbol_and_rejects_ids_outside_the_vocabulary():
    from dpsign_fl.experiments.bigram import bigram_predictions

    inputs = np.array([[0, 1, 1, 2], [1, 1, 0, 2]])
    targets = np.array([[1, 1, 2, 0], [1, 0, 2, 1]])
    # after 0: 1, 2 (tie -> 1); after 1: 1, 2, 1, 0 -> 1; after 2: 0, 1 (tie -> 0)
    assert bigram_predictions(inputs, targets, num_symbols=3).tolist() == [1, 1, 0]
    with pytest.raises(ValueError, match=r"train_targets must hold ids in \[0, 3\)"):
        bigram_predictions(inputs, targets + 1, num_symbols=3)
