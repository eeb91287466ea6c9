"""Tests of dpsign_fl.data: loading every dataset offline, file formats, partitions.

Real MNIST, Fashion-MNIST and Mushroom copies are read from $DPSIGN_DATA_DIR
(default: ../shared/data beside the repository); tests that need them skip when
it is absent. CIFAR-10, the UCI mushroom file and the hub are stood in for by
tiny generated files and fakes: nothing here touches the network.
"""

from __future__ import annotations

import collections
import gzip
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dpsign_fl.data import LABEL_PARTITIONERS, Dataset, load_dataset, partition, partition_indices, read_idx
from dpsign_fl.data import partitioning
from dpsign_fl.data.files import IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("DPSIGN_DATA_DIR", REPO_ROOT.parent / "shared" / "data"))
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


@pytest.fixture(scope="module")
def fresh_interpreter(tmp_path_factory) -> dict:
    """Run the data layer once in a fresh, offline interpreter and report what happened.

    Fresh, because huggingface_hub reads HF_HUB_OFFLINE once at import and other
    tests may have imported flwr already; once, because it costs seconds.
    """
    code = (
        "import json, sys\n"
        "import numpy as np\n"
        "from dpsign_fl.data import load_dataset, partition_indices\n"
        "report = {}\n"
        "try:\n    load_dataset('fashion-mnist')\n"
        "except RuntimeError as exc:\n    report['hub_error'] = str(exc)\n"
        "load_dataset('digits')\n"
        "partition_indices(np.arange(100) % 10, num_partitions=5, partitioner='dirichlet')\n"
        "report['flwr_modules'] = sorted(m for m in sys.modules if m == 'flwr' or m.startswith('flwr.'))\n"
        "print(json.dumps(report))\n"
    )
    hf_home = tmp_path_factory.mktemp("hf-home")  # an empty cache: nothing to fall back on
    env = {**os.environ, **OFFLINE_ENV, "HF_HOME": str(hf_home), "FLWR_TELEMETRY_ENABLED": "0"}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def _needs(folder: str) -> Path:
    path = DATA_DIR / folder
    if not path.is_dir():
        pytest.skip(f"no offline copy at {path}; set DPSIGN_DATA_DIR to a folder holding {folder}/")
    return path


def _write_idx(path: Path, values: np.ndarray, *, magic: int, compress: bool) -> None:
    header = magic.to_bytes(4, "big") + b"".join(n.to_bytes(4, "big") for n in values.shape)
    payload = header + values.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(payload) if compress else payload)


def _write_tiny_mnist(folder: Path, *, compress: bool) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(7, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=7, dtype=np.uint8)
    suffix = ".gz" if compress else ""
    for prefix in ("train", "t10k"):
        _write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}", images, magic=IDX_IMAGES_MAGIC, compress=compress)
        _write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", labels, magic=IDX_LABELS_MAGIC, compress=compress)
    return images, labels


def _write_cifar_batch(path: Path, data: np.ndarray, labels: list[int], protocol: int) -> None:
    batch = {b"batch_label": b"fake", b"labels": labels, b"data": data, b"filenames": [b"x.png"] * len(labels)}
    path.write_bytes(pickle.dumps(batch, protocol=protocol))


def _write_tiny_cifar(parent: Path, protocol: int = 2) -> Path:
    folder = parent / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(4, 3072), dtype=np.uint8)
        data[0, :1024], data[0, 1024:2048], data[0, 2048:] = 255, 0, 51  # red, green, blue planes
        _write_cifar_batch(folder / name, data, [int(v) for v in rng.integers(0, 10, size=4)], protocol)
    return folder


def _skewed_labels(num_examples: int = 3000, num_classes: int = 10) -> np.ndarray:
    return np.random.default_rng(2).integers(0, num_classes, size=num_examples)


# --- digits -------------------------------------------------------------------------------------


def test_digits_loads_all_1797_examples_as_normalised_8x8_images():
    dataset = load_dataset("digits")

    assert dataset.input_shape == (1, 8, 8)
    assert dataset.train_inputs.shape[0] + dataset.test_inputs.shape[0] == 1797
    assert (dataset.train_inputs.shape[0], dataset.test_inputs.shape[0]) == (1437, 360)
    assert dataset.train_inputs.dtype == torch.float32 and dataset.train_targets.dtype == torch.int64
    assert dataset.num_classes == 10 and dataset.name == "digits"
    assert abs(dataset.train_inputs.mean().item()) < 0.02  # fixed constants, close to the split's own
    assert abs(dataset.train_inputs.std().item() - 1) < 0.02


def test_digits_normalisation_does_not_depend_on_which_examples_are_in_the_train_split():
    # A statistic of the train split would depend on every client's data (not accounted).
    # Negative control: the two splits' own means differ, so a split statistic would show.
    one, other = load_dataset("digits", seed=1), load_dataset("digits", seed=2)
    pixels_one = torch.cat([one.train_inputs, one.test_inputs]).flatten(1)
    pixels_other = torch.cat([other.train_inputs, other.test_inputs]).flatten(1)

    assert sorted(map(tuple, pixels_one.tolist())) == sorted(map(tuple, pixels_other.tolist()))
    assert one.train_inputs.mean().item() != other.train_inputs.mean().item()


def test_digits_split_is_deterministic_for_a_seed_and_stratified():
    first, again, other = load_dataset("digits", seed=3), load_dataset("digits", seed=3), load_dataset("digits", seed=4)

    assert torch.equal(first.train_inputs, again.train_inputs)
    assert torch.equal(first.test_targets, again.test_targets)
    assert not torch.equal(first.test_inputs, other.test_inputs)
    counts = torch.bincount(first.test_targets, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37  # 20% of ~180 per class


def test_digits_has_no_hub_source():
    with pytest.raises(ValueError, match="scikit-learn"):
        load_dataset("digits", source="hf")


# --- MNIST-style IDX files ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "folder", "mean", "std"),
    [("mnist", "mnist", 0.1307, 0.3081), ("fashion-mnist", "fashion-mnist", 0.2860, 0.3530)],
)
def test_idx_datasets_load_70000_normalised_images_from_the_offline_copy(name, folder, mean, std):
    data_dir = _needs(folder)

    dataset = load_dataset(name, data_dir=str(data_dir))

    assert dataset.train_inputs.shape == (60000, 1, 28, 28)
    assert dataset.test_inputs.shape == (10000, 1, 28, 28)
    assert dataset.train_targets.shape == (60000,) and dataset.test_targets.shape == (10000,)
    assert set(dataset.train_targets.unique().tolist()) == set(range(10))
    # The published constants are the train set's own statistics.
    assert abs(dataset.train_inputs.mean().item()) < 2e-3
    assert abs(dataset.train_inputs.std().item() - 1) < 2e-3
    assert dataset.train_inputs.min().item() == pytest.approx(-mean / std, abs=1e-5)


def test_idx_dataset_is_found_in_a_subfolder_of_data_dir():
    _needs("mnist")

    dataset = load_dataset("mnist", data_dir=str(DATA_DIR))

    assert dataset.train_inputs.shape[0] == 60000


@pytest.mark.parametrize("compress", [True, False])
def test_idx_files_gzip_or_not_give_pixels_scaled_and_normalised(tmp_path, compress):
    images, labels = _write_tiny_mnist(tmp_path, compress=compress)

    dataset = load_dataset("mnist", data_dir=str(tmp_path), source="local")

    expected = (images[:, None].astype(np.float32) / 255 - 0.1307) / 0.3081
    np.testing.assert_allclose(dataset.train_inputs.numpy(), expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(dataset.test_targets.numpy(), labels)


def test_read_idx_rejects_a_bad_magic_number(tmp_path):
    _write_idx(tmp_path / "labels.gz", np.arange(5), magic=IDX_LABELS_MAGIC, compress=True)

    with pytest.raises(ValueError, match="magic number must be 0x00000803, got 0x00000801"):
        read_idx(tmp_path / "labels.gz", magic=IDX_IMAGES_MAGIC)


def test_read_idx_rejects_files_that_are_not_idx_or_are_truncated(tmp_path):
    (tmp_path / "junk").write_bytes(b"\xff\xd8\xff\xe0 not idx")
    _write_idx(tmp_path / "short", np.zeros((3, 4, 4)), magic=IDX_IMAGES_MAGIC, compress=False)
    (tmp_path / "short").write_bytes((tmp_path / "short").read_bytes()[:-1])

    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "junk")
    with pytest.raises(ValueError, match="header says shape"):
        read_idx(tmp_path / "short")


def test_idx_folder_with_swapped_image_and_label_files_fails_clearly(tmp_path):
    _write_tiny_mnist(tmp_path, compress=True)
    train_images = tmp_path / "train-images-idx3-ubyte.gz"
    train_labels = tmp_path / "train-labels-idx1-ubyte.gz"
    swapped = train_images.read_bytes()
    train_images.write_bytes(train_labels.read_bytes())
    train_labels.write_bytes(swapped)

    with pytest.raises(ValueError, match="train-images-idx3-ubyte.gz: magic number"):
        load_dataset("mnist", data_dir=str(tmp_path))


# --- CIFAR-10 -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("point_at", "protocol"), [("parent", 2), ("folder", 2), ("parent", 5)])
def test_cifar10_batches_folder_loads_as_normalised_channels_first_images(tmp_path, point_at, protocol):
    folder = _write_tiny_cifar(tmp_path, protocol)

    dataset = load_dataset("cifar10", data_dir=str(tmp_path if point_at == "parent" else folder))

    assert dataset.train_inputs.shape == (20, 3, 32, 32) and dataset.test_inputs.shape == (4, 3, 32, 32)
    assert dataset.num_classes == 10 and dataset.input_shape == (3, 32, 32)
    first = dataset.train_inputs[0]  # red 255, green 0, blue 51 everywhere
    expected = [(1 - 0.4914) / 0.2470, (0 - 0.4822) / 0.2435, (0.2 - 0.4465) / 0.2616]
    for channel, value in enumerate(expected):
        torch.testing.assert_close(first[channel], torch.full((32, 32), value), rtol=1e-5, atol=1e-5)


def test_cifar10_batch_with_other_objects_is_refused_not_executed(tmp_path):
    folder = _write_tiny_cifar(tmp_path)
    evil = {b"data": np.zeros((1, 3072), np.uint8), b"labels": collections.OrderedDict()}
    (folder / "test_batch").write_bytes(pickle.dumps(evil, protocol=2))

    with pytest.raises(ValueError, match="refusing to unpickle collections.OrderedDict"):
        load_dataset("cifar10", data_dir=str(folder))


def test_cifar10_folder_missing_a_batch_names_it(tmp_path):
    folder = _write_tiny_cifar(tmp_path)
    (folder / "data_batch_4").unlink()

    with pytest.raises(FileNotFoundError, match="data_batch_4"):
        load_dataset("cifar10", data_dir=str(tmp_path))


# --- Mushroom -----------------------------------------------------------------------------------


def test_mushroom_csv_one_hot_encodes_22_attributes_into_117_features():
    _needs("mushroom")

    dataset = load_dataset("mushroom", data_dir=str(DATA_DIR / "mushroom"))

    assert dataset.input_shape == (117,)
    assert dataset.train_inputs.shape[0] + dataset.test_inputs.shape[0] == 8124
    assert dataset.num_classes == 2
    assert torch.all(dataset.train_inputs.sum(dim=1) == 22)  # one value per attribute
    # UCI: 4,208 edible, 3,916 poisonous (label 1).
    assert int(dataset.train_targets.sum() + dataset.test_targets.sum()) == 3916


def test_uci_agaricus_lepiota_file_parses_with_poisonous_as_label_1(tmp_path):
    rows = [
        "p,x,s,n,t,p,f,c,n,k,e,e,s,s,w,w,p,w,o,p,k,s,u",
        "e,x,s,y,t,a,f,c,b,k,e,c,s,s,w,w,p,w,o,p,n,n,g",
        "e,b,s,w,t,l,f,c,b,n,e,c,s,s,w,w,p,w,o,p,n,n,m",
        "p,x,y,w,t,p,f,c,n,n,e,?,s,s,w,w,p,w,o,p,k,s,u",
        "e,x,s,g,f,n,f,w,b,k,t,e,s,s,w,w,p,w,o,e,n,a,g",
    ] * 4
    (tmp_path / "agaricus-lepiota.data").write_text("\n".join(rows) + "\n")
    columns = list(zip(*(row.split(",") for row in rows)))
    expected_features = sum(len(set(column)) for column in columns[1:])

    dataset = load_dataset("mushroom", data_dir=str(tmp_path))

    assert dataset.input_shape == (expected_features,)
    assert dataset.train_inputs.shape[0] + dataset.test_inputs.shape[0] == 20
    assert int(dataset.train_targets.sum() + dataset.test_targets.sum()) == 8


def test_mushroom_without_data_dir_says_how_to_provide_it():
    with pytest.raises(ValueError, match="needs data_dir.*mushroom.csv"):
        load_dataset("mushroom")


# --- bad arguments ------------------------------------------------------------------------------


def test_missing_data_dir_folder_is_a_value_error_naming_data_dir(tmp_path):
    with pytest.raises(ValueError, match="data_dir must be an existing folder"):
        load_dataset("mnist", data_dir=str(tmp_path / "nowhere"))


def test_data_dir_without_the_files_says_what_it_expected(tmp_path):
    with pytest.raises(FileNotFoundError, match="no mnist data in data_dir.*train-images-idx3-ubyte.gz"):
        load_dataset("mnist", data_dir=str(tmp_path))


def test_unknown_dataset_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="name must be one of .*'digits'.*'mushroom'"):
        load_dataset("imagenet")


def test_unknown_source_is_rejected():
    with pytest.raises(ValueError, match="source must be one of"):
        load_dataset("mnist", source="ftp")


def test_local_source_without_data_dir_is_rejected():
    with pytest.raises(ValueError, match="data_dir is required for source='local'"):
        load_dataset("cifar10", source="local")


def _dataset(train_inputs, train_targets):
    return Dataset(train_inputs, train_targets, torch.zeros(1, 2), torch.zeros(1, dtype=torch.int64), 10, "t")


def test_a_label_outside_the_classes_is_refused_when_the_data_is_loaded_not_when_sampled():
    targets = torch.tensor([1, 99, 3], dtype=torch.int64)
    with pytest.raises(ValueError, match=r"train targets must be class indices in \[0, 10\): 1 are not"):
        _dataset(torch.zeros(3, 2), targets)


def test_a_non_finite_input_is_refused_when_the_data_is_loaded():
    inputs = torch.zeros(3, 2)
    inputs[2, 1] = float("nan")
    with pytest.raises(ValueError, match="train inputs must be finite: 1 examples"):
        _dataset(inputs, torch.zeros(3, dtype=torch.int64))


def test_valid_data_loads_negative_control():
    assert _dataset(torch.zeros(3, 2), torch.tensor([0, 9, 3])).num_classes == 10


def test_dataset_rejects_inputs_and_targets_of_different_lengths():
    with pytest.raises(ValueError, match="same length"):
        Dataset(torch.zeros(3, 2), torch.zeros(2, dtype=torch.int64), torch.zeros(1, 2),
                torch.zeros(1, dtype=torch.int64), num_classes=2, name="x")


# --- Hugging Face hub ---------------------------------------------------------------------------


def test_hub_failure_names_data_dir_and_the_hub_repository(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'ylecun/mnist' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)

    with pytest.raises(RuntimeError, match=r"dataset 'mnist' needs data: pass data_dir .*\(ylecun/mnist\)"):
        load_dataset("mnist")


def test_hub_loading_offline_fails_fast_with_the_helpful_message(fresh_interpreter):
    assert "dataset 'fashion-mnist' needs data: pass data_dir" in fresh_interpreter["hub_error"]
    assert "zalando-datasets/fashion_mnist" in fresh_interpreter["hub_error"]


@pytest.mark.parametrize(("name", "column", "shape"), [("mnist", "image", (28, 28)), ("cifar10", "img", (32, 32, 3))])
def test_hub_splits_convert_to_the_same_tensors_as_local_files(monkeypatch, name, column, shape):
    import datasets

    rng = np.random.default_rng(3)
    images = {split: rng.integers(0, 256, size=(3, *shape), dtype=np.uint8) for split in ("train", "test")}
    features = datasets.Features({column: datasets.Image(), "label": datasets.ClassLabel(num_classes=10)})
    fake = datasets.DatasetDict(
        {
            split: datasets.Dataset.from_dict({column: list(values), "label": [1, 2, 3]}, features=features)
            for split, values in images.items()
        }
    )
    requested = []
    monkeypatch.setattr(datasets, "load_dataset", lambda repository: requested.append(repository) or fake)

    dataset = load_dataset(name)

    channels_first = images["train"][:, None] if len(shape) == 2 else images["train"].transpose(0, 3, 1, 2)
    mean, std = (0.1307, 0.3081) if name == "mnist" else (0.4914, 0.2470)
    np.testing.assert_allclose(dataset.train_inputs[:, 0].numpy(), (channels_first[:, 0] / 255 - mean) / std, atol=1e-5)
    assert dataset.test_targets.tolist() == [1, 2, 3]
    assert requested == [{"mnist": "ylecun/mnist", "cifar10": "uoft-cs/cifar10"}[name]]


# --- partitions ---------------------------------------------------------------------------------


@pytest.mark.parametrize("partitioner", ["iid", "dirichlet"])
def test_partitions_are_disjoint_and_cover_every_example(partitioner):
    labels = _skewed_labels()

    parts = partition_indices(labels, num_partitions=7, partitioner=partitioner, seed=1)

    assert len(parts) == 7
    joined = np.concatenate(parts)
    assert np.array_equal(np.sort(joined), np.arange(labels.shape[0]))  # disjoint and covering
    assert all(np.array_equal(part, np.sort(part)) and part.dtype == np.int64 for part in parts)


def test_iid_partitions_have_equal_sizes_and_the_global_label_mix():
    labels = _skewed_labels()

    parts = partition_indices(torch.from_numpy(labels), num_partitions=6, partitioner="iid", seed=0)

    assert {len(part) for part in parts} == {500}
    assert max(_total_variation(labels, part) for part in parts) < 0.1


def test_dirichlet_partitions_have_skewed_label_distributions_unlike_iid():
    labels = _skewed_labels()

    dirichlet = partition_indices(labels, num_partitions=10, partitioner="dirichlet", alpha=0.1, seed=0)
    iid = partition_indices(labels, num_partitions=10, partitioner="iid", seed=0)

    assert np.mean([_total_variation(labels, part) for part in dirichlet]) > 0.4
    assert np.mean([_total_variation(labels, part) for part in iid]) < 0.1  # negative control


def test_pathological_partitions_hold_at_most_k_classes_each_and_are_disjoint():
    labels = _skewed_labels()

    parts = partition_indices(labels, num_partitions=10, partitioner="pathological", classes_per_partition=2, seed=0)

    assert all(1 <= np.unique(labels[part]).shape[0] <= 2 for part in parts)
    joined = np.concatenate(parts)
    assert np.unique(joined).shape[0] == joined.shape[0]
    # first-deterministic assignment: partition i holds class i, so all 10 classes are used.
    assert np.unique(labels[joined]).shape[0] == 10


@pytest.mark.filterwarnings("ignore:Classes.*will NOT be used")  # pathological: 5 partitions x 2 < 10 classes
@pytest.mark.parametrize("partitioner", LABEL_PARTITIONERS)
def test_partitions_are_deterministic_for_a_seed_and_change_with_it(partitioner):
    labels = _skewed_labels()

    first = partition_indices(labels, num_partitions=5, partitioner=partitioner, seed=11)
    again = partition_indices(labels, num_partitions=5, partitioner=partitioner, seed=11)
    other = partition_indices(labels, num_partitions=5, partitioner=partitioner, seed=12)

    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other))


@pytest.mark.filterwarnings("ignore:Classes.*will NOT be used")
@pytest.mark.parametrize("partitioner", ["dirichlet", "pathological"])
def test_assignment_read_from_the_partitioner_equals_its_load_partition(partitioner):
    import datasets

    labels = _skewed_labels(500)
    table = datasets.Dataset.from_dict({"label": labels, "position": np.arange(500)}).with_format("arrow")

    def assignment(use_assignment_table):
        splitter = partitioning._make_partitioner(partitioner, 4, 0.5, 2, 5, 10)
        splitter.dataset = table
        return partitioning._read_assignment(splitter, 4, use_assignment_table=use_assignment_table)

    fast, public = assignment(True), assignment(False)

    assert all(np.array_equal(a, b) for a, b in zip(fast, public))


def test_partition_returns_the_rows_of_its_indices():
    dataset = load_dataset("digits")
    indices = partition_indices(dataset.train_targets, num_partitions=4, partitioner="dirichlet", seed=2)[3]

    inputs, targets = partition(dataset, partition_id=3, num_partitions=4, partitioner="dirichlet", seed=2)

    assert torch.equal(inputs, dataset.train_inputs[torch.from_numpy(indices)])
    assert torch.equal(targets, dataset.train_targets[torch.from_numpy(indices)])


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"partitioner": "shards"}, "partitioner must be one of"),
        ({"num_partitions": 0}, "num_partitions must be an integer in"),
        ({"num_partitions": 3001}, "num_partitions must be an integer in"),
        ({"partitioner": "dirichlet", "alpha": 0.0}, "alpha must be"),
        ({"partitioner": "pathological", "classes_per_partition": 11}, "classes_per_partition must be"),
        ({"partitioner": "dirichlet", "min_partition_size": -1}, "min_partition_size must be"),
    ],
)
def test_bad_partition_arguments_raise_value_errors_naming_the_key(kwargs, key):
    arguments = {"num_partitions": 4, **kwargs}
    with pytest.raises(ValueError, match=key):
        partition_indices(_skewed_labels(), **arguments)


@pytest.mark.parametrize(("partition_id", "num_partitions"), [(4, 4), (-1, 4), (0, 0)])
def test_partition_id_out_of_range_is_rejected(partition_id, num_partitions):
    dataset = load_dataset("digits")
    key = "partition_id" if num_partitions else "num_partitions"
    with pytest.raises(ValueError, match=key):
        partition(dataset, partition_id=partition_id, num_partitions=num_partitions)


def test_data_layer_never_imports_flwr(fresh_interpreter):
    assert fresh_interpreter["flwr_modules"] == []


def _total_variation(labels: np.ndarray, part: np.ndarray) -> float:
    overall = np.bincount(labels, minlength=10) / labels.shape[0]
    local = np.bincount(labels[part], minlength=10) / max(part.shape[0], 1)
    return 0.5 * float(np.abs(overall - local).sum())
