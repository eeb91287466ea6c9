"""The in-memory dataset container and :func:`load_dataset`.

Preprocessing is fixed per dataset so that every client, the server's
evaluation and every source (local files or the hub) see the same tensors:

- mnist, fashion-mnist, cifar10: pixels / 255, then per channel
  ``(x - mean) / std`` with the usual published constants (not statistics of
  anyone's data, so normalisation costs no privacy).
- digits: pixels / 16 (the range of scikit-learn's copy), then ``(x - mean) / std``
  with fixed constants (the mean and std of the whole public copy, written down
  once: a statistic of the train split would depend on every client's data).
- mushroom: one-hot 0/1 features, not normalised.
- shakespeare: symbol ids of the fixed vocabulary (:mod:`.shakespeare`), not
  normalised: inputs int64 ``[N, 80]``, targets int64 ``[N, 80]`` (each
  position's next character), and the natural partitions ``role`` and ``play``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import numpy as np
import torch

from . import files, hub, shakespeare

DATASETS = ("digits", "mnist", "fashion-mnist", "cifar10", "mushroom", "shakespeare")
SOURCES = ("auto", "local", "hf")
NATURAL_PARTITIONS = {"shakespeare": shakespeare.PARTITIONS}
"""Per dataset, the partitions its data defines (one client per speaking role, per play)."""

_NUM_CLASSES = {
    "digits": 10, "mnist": 10, "fashion-mnist": 10, "cifar10": 10, "mushroom": 2, "shakespeare": shakespeare.NUM_SYMBOLS,
}
_CHANNEL_STATS = {  # (mean, std) per channel of the train set
    "mnist": ((0.1307,), (0.3081,)),
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "digits": ((0.3053,), (0.3760,)),  # scikit-learn's 1,797 images / 16
}
_TEST_FRACTION = 0.2  # digits, mushroom and shakespeare ship without a test split
_NO_HUB_SOURCE = {
    # flwr-datasets' LEAF copy holds every 80-character window with its next character: windows
    # overlap, so one character is in up to 81 examples; its unit of privacy is not ours.
    "shakespeare": " that maps exactly: flwrlabs/shakespeare holds overlapping 80-character windows",
}


@dataclass(frozen=True, eq=False)
class NaturalPartition:
    """Clients that the data itself defines (a play's speaking roles), and each example's client.

    Attributes:
        clients: the clients' names in their fixed order: client i is partition i.
        train_clients: int64 ``[N]``: each training example's client, in ``[0, len(clients))``.
        test_clients: int64 ``[M]``: each test example's client.
    """

    clients: tuple[str, ...]
    train_clients: torch.Tensor
    test_clients: torch.Tensor


@dataclass(frozen=True, eq=False)
class Dataset:
    """A preprocessed dataset held in memory.

    Attributes:
        train_inputs: ``[N, ...]``: float32 features (images ``[N, C, H, W]``, tables
            ``[N, F]``) or int64 symbol ids in ``[0, num_classes)`` (text ``[N, T]``:
            the inputs and the targets share one vocabulary).
        train_targets: int64 class indices: ``[N]``, or one per position ``[N, T]``.
        test_inputs: same dtype and per-example shape as ``train_inputs``.
        test_targets: same per-example shape as ``train_targets``.
        num_classes: number of classes; targets lie in ``[0, num_classes)``.
        name: the dataset's name, one of ``DATASETS`` for loaded ones.
        natural_partitions: partitioner name -> :class:`NaturalPartition`, for the
            partitions the data defines (shakespeare: ``role``, ``play``); empty for
            the others.
    """

    train_inputs: torch.Tensor
    train_targets: torch.Tensor
    test_inputs: torch.Tensor
    test_targets: torch.Tensor
    num_classes: int
    name: str
    natural_partitions: Mapping[str, NaturalPartition] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for split in ("train", "test"):
            inputs, targets = getattr(self, f"{split}_inputs"), getattr(self, f"{split}_targets")
            if inputs.dtype not in (torch.float32, torch.int64) or targets.dtype != torch.int64 or targets.ndim < 1:
                raise ValueError(
                    f"{split} inputs must be float32 or int64 and targets int64 [N, ...], got {inputs.dtype} and "
                    f"{targets.dtype} {list(targets.shape)}"
                )
            if inputs.shape[0] != targets.shape[0]:
                raise ValueError(
                    f"{split} inputs and targets must have the same length, "
                    f"got {inputs.shape[0]} and {targets.shape[0]}"
                )
        for part in ("inputs", "targets"):
            train, test = getattr(self, f"train_{part}"), getattr(self, f"test_{part}")
            if train.shape[1:] != test.shape[1:] or train.dtype != test.dtype:
                raise ValueError(
                    f"train and test {part} must have the same dtype and per-example shape, got {train.dtype} "
                    f"{list(train.shape[1:])} and {test.dtype} {list(test.shape[1:])}"
                )
        for split in ("train", "test"):
            inputs = getattr(self, f"{split}_inputs")
            check_examples(inputs, getattr(self, f"{split}_targets"), self.num_classes, name=split)
            if not inputs.is_floating_point() and inputs.numel() and not (
                0 <= int(inputs.min()) and int(inputs.max()) < self.num_classes
            ):
                raise ValueError(f"{split} inputs of integer type must be symbol ids in [0, {self.num_classes})")
        for partitioner, natural in self.natural_partitions.items():
            _check_natural_partition(partitioner, natural, self.train_targets.shape[0], self.test_targets.shape[0])

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The shape of one example, e.g. ``(1, 28, 28)``, ``(117,)`` or ``(80,)``."""
        return tuple(self.train_inputs.shape[1:])


def pixel_statistics(name: str) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """Return the (mean, std) per channel with which an image dataset's pixels in [0, 1] are normalised.

    None for a dataset that is not images (mushroom, shakespeare).
    """
    return _CHANNEL_STATS.get(name)


PUBLIC_SETS = {"mnist": "fashion-mnist", "fashion-mnist": "mnist"}
"""Per private dataset, the public dataset whose first training images give the public statistics."""

PUBLIC_SET_SIZE = 128
"""How many public images the server computes normalisation statistics from."""


def public_images(name: str, data_dir: str | None, *, count: int = PUBLIC_SET_SIZE) -> torch.Tensor:
    """The server's public set for dataset ``name``: the first ``count`` training images of :data:`PUBLIC_SETS`.

    The images are normalised with ``name``'s constants (:func:`pixel_statistics`),
    as the private inputs the model sees. Read from ``data_dir`` only.

    Raises:
        ValueError: if ``name`` has no public set, or ``data_dir`` is empty.
    """
    if name not in PUBLIC_SETS:
        raise ValueError(f"dataset must be one of {tuple(PUBLIC_SETS)} for public statistics, got {name!r}")
    if not data_dir:
        raise ValueError(
            f"data_dir must hold {PUBLIC_SETS[name]!r} (the public set of {name!r}) for public statistics, got {data_dir!r}"
        )
    images = files.read_idx_folder(files.find_folder(PUBLIC_SETS[name], data_dir))[0][:count]
    mean, std = _CHANNEL_STATS[name]
    return _normalise(images / np.float32(255), mean, std)


PUBLIC_TEXTS = ("shakespeare",)
"""The datasets whose folder also holds a public text (:func:`public_text`)."""

PRETRAINING_SETS = {
    "shakespeare": "the five poems of the data folder, which no client holds (public_text)",
    "mnist": "scikit-learn's 1,797 handwritten digits (UCI optdigits), drawn at MNIST's size (public_digits)",
}
"""The datasets whose server may pretrain on a public set before round 1 (``pretrain-steps``), and that set."""

DIGIT_BOX = 20
"""public_digits: the 8 x 8 digits are resized to DIGIT_BOX x DIGIT_BOX pixels, centred in 28 x 28 as MNIST's are."""


def public_text(name: str, data_dir: str | None) -> torch.Tensor:
    """The server's public text for dataset ``name``: int64 ``[N, 81]`` disjoint chunks, as the clients' examples.

    shakespeare: the five poems of the folder (:func:`.shakespeare.read_public_text`),
    which no client holds. Read from ``data_dir`` only.

    Raises:
        ValueError: if ``name`` has no public text, ``data_dir`` is empty, or the text is shorter than one chunk.
        FileNotFoundError: if the folder holds no poem.
    """
    if name not in PUBLIC_TEXTS:
        raise ValueError(f"dataset must be one of {PUBLIC_TEXTS} for a public text, got {name!r}")
    if not data_dir:
        raise ValueError(f"data_dir must hold {name!r} (its poems are the public text), got {data_dir!r}")
    text = shakespeare.read_public_text(files.find_folder(name, data_dir))
    chunks = shakespeare.chunk(shakespeare.encode(text))
    if chunks.shape[0] == 0:
        raise ValueError(f"the public text of {data_dir!r} has {len(text)} characters, fewer than one chunk")
    return torch.from_numpy(chunks)


def pretraining_set(name: str, data_dir: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The server's public pretraining examples for dataset ``name`` (:data:`PRETRAINING_SETS`): ``(inputs, targets)``.

    Shaped as the clients' examples: shakespeare, chunks of 80 character ids
    and their next characters (:func:`public_text`); mnist, normalised
    ``[1797, 1, 28, 28]`` images and their digits (:func:`public_digits`).

    Raises:
        ValueError: if ``name`` has no public pretraining set, or its text is missing or too short.
    """
    if name == "shakespeare":
        chunks = public_text(name, data_dir)
        return chunks[:, :-1], chunks[:, 1:]
    if name == "mnist":
        return public_digits()
    raise ValueError(f"dataset must be one of {tuple(PRETRAINING_SETS)} for public pretraining, got {name!r}")


def public_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's digits drawn as MNIST draws its digits: ``[1797, 1, 28, 28]`` images, normalised as MNIST's.

    Each 8 x 8 image (16 grey levels) is resized bilinearly to :data:`DIGIT_BOX`
    pixels square and centred on a black 28 x 28 field. A public dataset
    (UCI's optdigits, 43 writers), shipped inside scikit-learn: nothing is downloaded.
    """
    from sklearn.datasets import load_digits
    from torch.nn import functional as F

    digits = load_digits()
    images = torch.from_numpy((digits.images / 16.0).astype(np.float32)[:, None])
    images = F.interpolate(images, size=(DIGIT_BOX, DIGIT_BOX), mode="bilinear", align_corners=False).clamp_(0, 1)
    margin = (28 - DIGIT_BOX) // 2
    images = F.pad(images, (margin, margin, margin, margin))
    mean, std = _CHANNEL_STATS["mnist"]
    return _normalise(images.numpy(), mean, std), torch.from_numpy(digits.target.astype(np.int64))


def _check_natural_partition(partitioner: str, natural: NaturalPartition, num_train: int, num_test: int) -> None:
    for split, clients, length in (("train", natural.train_clients, num_train), ("test", natural.test_clients, num_test)):
        if clients.dtype != torch.int64 or clients.shape != (length,):
            raise ValueError(
                f"natural partition {partitioner!r}: {split}_clients must be int64 [{length}], "
                f"got {clients.dtype} {list(clients.shape)}"
            )
        if clients.numel() and not (0 <= int(clients.min()) and int(clients.max()) < len(natural.clients)):
            raise ValueError(f"natural partition {partitioner!r}: {split}_clients must be in [0, {len(natural.clients)})")


def check_examples(inputs: torch.Tensor, targets: torch.Tensor, num_classes: int | None, *, name: str) -> None:
    """Refuse data a release could fail on: non-finite inputs, class targets out of range, ragged shapes.

    Checked once, when the data is loaded and before any release: a bad record
    found only when a round samples it would make the failure itself depend on
    the data.

    Args:
        inputs: ``[N, ...]``.
        targets: ``[N, ...]``; class indices when ``num_classes`` is given.
        num_classes: the number of classes, or None for targets that are not classes.
        name: how errors name the data.

    Raises:
        ValueError: naming how many examples are bad.
    """
    if inputs.shape[0] != targets.shape[0]:
        raise ValueError(f"{name} inputs and targets must have the same length, got {inputs.shape[0]} and {targets.shape[0]}")
    if num_classes is not None and targets.numel():
        if targets.is_floating_point() or not (0 <= int(targets.min()) and int(targets.max()) < num_classes):
            bad = int(((targets < 0) | (targets >= num_classes)).sum()) if not targets.is_floating_point() else targets.numel()
            raise ValueError(f"{name} targets must be class indices in [0, {num_classes}): {bad} are not")
    if inputs.is_floating_point() and not bool(torch.isfinite(inputs).all()):
        bad = int((~torch.isfinite(inputs.reshape(inputs.shape[0], -1))).any(dim=1).sum())
        raise ValueError(f"{name} inputs must be finite: {bad} examples hold NaN or inf")


def load_dataset(name: str, *, data_dir: str | None = None, source: str = "auto", seed: int = 0) -> Dataset:
    """Load and preprocess a dataset into memory.

    Sources: ``"local"`` reads ``data_dir`` (or a known subfolder of it, such as
    ``data_dir/mnist``); ``"hf"`` downloads from the Hugging Face hub (mnist,
    fashion-mnist, cifar10 only); ``"auto"`` reads ``data_dir`` when given and
    the hub otherwise. digits ships inside scikit-learn and needs neither;
    mushroom and shakespeare need ``data_dir``.
    Nothing is cached here: callers that load repeatedly keep the result.

    Args:
        name: one of ``DATASETS``.
        data_dir: the folder holding the dataset's files (see ``files.LOCAL_FORMATS``).
        source: one of ``SOURCES``.
        seed: seed of the stratified 80/20 train/test split of digits and
            mushroom (which ship unsplit); the other datasets keep their
            official split (shakespeare: each role's last 20 %, in text order)
            and ignore it.

    Returns:
        The :class:`Dataset`.

    Raises:
        ValueError: for an unknown name or source, a ``data_dir`` that is not an
            existing folder, or a dataset that needs a ``data_dir`` and got none.
        FileNotFoundError: if ``data_dir`` exists but does not hold the data.
        RuntimeError: if the hub is needed but cannot be reached.
    """
    if name not in DATASETS:
        raise ValueError(f"name must be one of {DATASETS}, got {name!r}")
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    if name == "digits":
        if source == "hf":
            raise ValueError("dataset 'digits' has no hub source: it ships with scikit-learn; use source='auto'")
        return _load_digits(seed)
    if name in ("mushroom", "shakespeare"):
        if source == "hf" or data_dir is None:
            raise ValueError(
                f"dataset {name!r} needs data_dir (it has no hub source{_NO_HUB_SOURCE.get(name, '')}): pass "
                f"data_dir (run-config data-dir / --data-dir) pointing at {files.LOCAL_FORMATS[name]}; "
                f"got data_dir={data_dir!r}, source={source!r}"
            )
        if name == "shakespeare":
            return _load_shakespeare(files.find_folder(name, data_dir))
        features, labels = files.read_mushroom_folder(files.find_folder(name, data_dir))
        return _split_and_build(name, features, labels, seed)
    if source == "hf" or (source == "auto" and data_dir is None):
        arrays = hub.read_hub_images(name, local_format=files.LOCAL_FORMATS[name])
    elif data_dir is None:
        raise ValueError(
            f"data_dir is required for source='local', got None: point it at {files.LOCAL_FORMATS[name]}"
        )
    elif name == "cifar10":
        arrays = files.read_cifar10_folder(files.find_folder(name, data_dir))
    else:
        arrays = files.read_idx_folder(files.find_folder(name, data_dir))
    return _build_image_dataset(name, *arrays)


def _build_image_dataset(
    name: str, train_images: np.ndarray, train_labels: np.ndarray, test_images: np.ndarray, test_labels: np.ndarray
) -> Dataset:
    mean, std = _CHANNEL_STATS[name]
    return Dataset(
        train_inputs=_normalise(train_images / np.float32(255), mean, std),
        train_targets=torch.from_numpy(np.asarray(train_labels, dtype=np.int64)),
        test_inputs=_normalise(test_images / np.float32(255), mean, std),
        test_targets=torch.from_numpy(np.asarray(test_labels, dtype=np.int64)),
        num_classes=_NUM_CLASSES[name],
        name=name,
    )


def _load_digits(seed: int) -> Dataset:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None]  # [1797, 1, 8, 8] in [0, 1]
    train, test = _stratified_split(digits.target, seed)
    mean, std = _CHANNEL_STATS["digits"]
    return Dataset(
        train_inputs=_normalise(images[train], mean, std),
        train_targets=torch.from_numpy(digits.target[train].astype(np.int64)),
        test_inputs=_normalise(images[test], mean, std),
        test_targets=torch.from_numpy(digits.target[test].astype(np.int64)),
        num_classes=_NUM_CLASSES["digits"],
        name="digits",
    )


def _load_shakespeare(folder) -> Dataset:
    examples = shakespeare.split_roles(shakespeare.read_roles(folder), test_fraction=_TEST_FRACTION)
    train, test = torch.from_numpy(examples.train_chunks), torch.from_numpy(examples.test_chunks)
    train_roles, test_roles = torch.from_numpy(examples.train_roles), torch.from_numpy(examples.test_roles)
    role_plays = torch.from_numpy(examples.role_plays)
    # Inputs and targets are two views of the same chunks (positions 0..T-1 and 1..T): no copy.
    return Dataset(
        train_inputs=train[:, :-1],
        train_targets=train[:, 1:],
        test_inputs=test[:, :-1],
        test_targets=test[:, 1:],
        num_classes=_NUM_CLASSES["shakespeare"],
        name="shakespeare",
        natural_partitions={
            "role": NaturalPartition(examples.roles, train_roles, test_roles),
            "play": NaturalPartition(examples.plays, role_plays[train_roles], role_plays[test_roles]),
        },
    )


def _split_and_build(name: str, features: np.ndarray, labels: np.ndarray, seed: int) -> Dataset:
    train, test = _stratified_split(labels, seed)
    return Dataset(
        train_inputs=torch.from_numpy(np.ascontiguousarray(features[train], dtype=np.float32)),
        train_targets=torch.from_numpy(labels[train].astype(np.int64)),
        test_inputs=torch.from_numpy(np.ascontiguousarray(features[test], dtype=np.float32)),
        test_targets=torch.from_numpy(labels[test].astype(np.int64)),
        num_classes=_NUM_CLASSES[name],
        name=name,
    )


def _stratified_split(labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.model_selection import train_test_split

    indices = np.arange(labels.shape[0])
    train, test = train_test_split(indices, test_size=_TEST_FRACTION, stratify=labels, random_state=seed)
    # Sorted, so that the split is a set: row order carries no extra randomness.
    return np.sort(train), np.sort(test)


def _normalise(images: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """Return ``(images - mean) / std`` per channel (axis 1) as a float32 tensor."""
    channels = (1, len(mean), 1, 1)
    out = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
    out.sub_(torch.tensor(mean).view(channels)).div_(torch.tensor(std).view(channels))
    return out
