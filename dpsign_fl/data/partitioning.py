"""Splitting a training set among clients: the data's own partitions, or the flwr-datasets partitioners.

Natural partitioners (``role``, ``play``: :data:`NATURAL_PARTITIONERS`) take the
clients the dataset defines (:attr:`Dataset.natural_partitions`), in their fixed
order; ``num_partitions`` may be smaller than the number of clients the data
defines, and then the first ``num_partitions`` of them take part (a warning
says how many are left out), never more. A dataset with natural partitions
(shakespeare) is split by one of them or ``iid``: its examples are chunks of
text, with no class label for ``dirichlet`` or ``pathological``.

The flwr-datasets partitioners run on an in-memory Hugging Face ``datasets.Dataset`` built
from the labels alone, so nothing is downloaded and the inputs are never
copied; the result is, per client, the indices of its training examples.

As ``flwr_datasets.FederatedDataset(shuffle=True, seed=seed)`` does, the labels
are shuffled with ``seed`` before partitioning (``IidPartitioner`` cuts
contiguous shards), and every partitioner that takes a seed gets ``seed``:
the same arguments always give the same partitions.
"""

from __future__ import annotations

import logging
import numbers

import numpy as np
import torch

from .loading import NATURAL_PARTITIONS, Dataset, NaturalPartition

log = logging.getLogger("dpsign_fl")

LABEL_PARTITIONERS = ("iid", "dirichlet", "pathological")
"""The flwr-datasets partitioners of :func:`partition_indices` (any dataset with class labels)."""
NATURAL_PARTITIONERS = tuple(dict.fromkeys(name for names in NATURAL_PARTITIONS.values() for name in names))
"""The partitions some dataset defines: ``role``, ``play`` (shakespeare)."""
PARTITIONERS = LABEL_PARTITIONERS + NATURAL_PARTITIONERS
DEFAULT_MIN_PARTITION_SIZE = 10
"""Dirichlet partitions are redrawn until each has this many examples (flwr-datasets' default)."""


def partition_indices(
    targets: torch.Tensor | np.ndarray,
    *,
    num_partitions: int,
    partitioner: str = "iid",
    alpha: float = 0.5,
    classes_per_partition: int = 2,
    seed: int = 0,
    min_partition_size: int | None = None,
) -> list[np.ndarray]:
    """Split example indices among ``num_partitions`` clients.

    - ``"iid"``: ``IidPartitioner``, equal shards (sizes differ by at most one).
    - ``"dirichlet"``: ``DirichletPartitioner(partition_by="label", alpha)``:
      each class is split among the partitions in proportions drawn from
      Dirichlet(alpha); small alpha gives skewed label distributions.
    - ``"pathological"``: ``PathologicalPartitioner`` with
      ``num_classes_per_partition=classes_per_partition`` and
      ``class_assignment_mode="first-deterministic"`` (partition i always gets
      class ``i mod K``, so no class is left out when ``num_partitions >= K``);
      each class is split evenly among the partitions that hold it.

    Partitions are disjoint; for ``"iid"`` and ``"dirichlet"`` they cover every
    index, for ``"pathological"`` classes no partition drew are left out (with
    a warning from flwr-datasets).

    Args:
        targets: 1-D integer class labels of the training set.
        num_partitions: number of clients, in ``[1, len(targets)]``.
        partitioner: one of ``LABEL_PARTITIONERS``.
        alpha: Dirichlet concentration, > 0 (``"dirichlet"`` only).
        classes_per_partition: classes per client, in ``[1, number of classes]``
            (``"pathological"`` only).
        seed: seed of the shuffle and of the partitioner.
        min_partition_size: smallest partition ``"dirichlet"`` accepts (it
            redraws up to 10 times, then raises); None means
            ``min(10, len(targets) // (2 * num_partitions))``.

    Returns:
        ``num_partitions`` sorted int64 arrays of indices into ``targets``.

    Raises:
        ValueError: if an argument is out of range, or flwr-datasets cannot
            build the partitions (e.g. Dirichlet keeps drawing partitions
            smaller than ``min_partition_size``).
    """
    labels = _labels(targets)
    _check_arguments(labels, num_partitions, partitioner, alpha, classes_per_partition, min_partition_size)
    if min_partition_size is None:
        min_partition_size = min(DEFAULT_MIN_PARTITION_SIZE, labels.shape[0] // (2 * num_partitions))

    import datasets  # heavy imports, only when partitioning

    order = np.random.default_rng(seed).permutation(labels.shape[0])
    table = datasets.Dataset.from_dict({"label": labels[order], "position": np.arange(labels.shape[0])})
    # In the arrow format a column reads as one array; in the default format the
    # partitioners' np.array(dataset["label"]) walks it row by row (~1 s per 60k).
    table = table.with_format("arrow")
    splitter = _make_partitioner(partitioner, num_partitions, alpha, classes_per_partition, seed, min_partition_size)
    splitter.dataset = table
    return [np.sort(order[positions]) for positions in _read_assignment(splitter, num_partitions)]


def check_partitioner(dataset_name: str, partitioner: str) -> None:
    """Refuse a partitioner that cannot split the dataset.

    A dataset with natural partitions is split by one of them or ``iid``; the
    others by a label partitioner. One place for the rule: the run settings
    check it before anything is loaded, :func:`partition_dataset` again.

    Raises:
        ValueError: naming the partitioners the dataset accepts.
    """
    if partitioner not in PARTITIONERS:
        raise ValueError(f"partitioner must be one of {PARTITIONERS}, got {partitioner!r}")
    natural = NATURAL_PARTITIONS.get(dataset_name, ())
    if natural and partitioner not in ("iid", *natural):
        raise ValueError(
            f"partitioner must be one of {('iid', *natural)} for dataset {dataset_name!r} (its examples are chunks "
            f"of text: no class label to split by), got {partitioner!r}"
        )
    if not natural and partitioner not in LABEL_PARTITIONERS:
        defining = tuple(name for name, names in NATURAL_PARTITIONS.items() if partitioner in names)
        raise ValueError(
            f"partitioner must be one of {LABEL_PARTITIONERS} for dataset {dataset_name!r} "
            f"({partitioner!r} splits only {', '.join(defining)}), got {partitioner!r}"
        )


def partition_dataset(
    dataset: Dataset,
    *,
    num_partitions: int,
    partitioner: str = "iid",
    alpha: float = 0.5,
    classes_per_partition: int = 2,
    seed: int = 0,
    min_partition_size: int | None = None,
) -> list[np.ndarray]:
    """Split a dataset's training examples among ``num_partitions`` clients.

    A natural partitioner gives the first ``num_partitions`` clients the data
    defines, in their fixed order (:func:`natural_partition_indices`); a label
    partitioner splits by ``train_targets`` (:func:`partition_indices`; ``iid``
    also splits a dataset without class labels, such as shakespeare's text).

    Args:
        dataset: the loaded dataset; only its train split is partitioned.
        num_partitions, partitioner, alpha, classes_per_partition, seed,
            min_partition_size: as in :func:`partition_indices`.

    Returns:
        ``num_partitions`` sorted int64 arrays of indices into the training set.

    Raises:
        ValueError: if the partitioner cannot split this dataset, or as
            :func:`partition_indices` and :func:`natural_partition_indices` do.
    """
    if partitioner in NATURAL_PARTITIONERS:
        natural = dataset.natural_partitions.get(partitioner)
        if natural is None:
            raise ValueError(
                f"partitioner {partitioner!r} needs a dataset that defines it, got dataset {dataset.name!r} "
                f"(it defines {tuple(dataset.natural_partitions) or 'none'})"
            )
        return natural_partition_indices(natural, num_partitions=num_partitions, name=partitioner)
    targets = dataset.train_targets
    if targets.ndim != 1:
        if partitioner != "iid":
            raise ValueError(
                f"partitioner must be 'iid' or one of the dataset's own {tuple(dataset.natural_partitions)} for dataset "
                f"{dataset.name!r} (its targets are sequences, not class labels), got {partitioner!r}"
            )
        targets = np.zeros(targets.shape[0], dtype=np.int64)  # IidPartitioner reads no label
    return partition_indices(
        targets,
        num_partitions=num_partitions,
        partitioner=partitioner,
        alpha=alpha,
        classes_per_partition=classes_per_partition,
        seed=seed,
        min_partition_size=min_partition_size,
    )


def natural_partition_indices(natural: NaturalPartition, *, num_partitions: int, name: str = "natural") -> list[np.ndarray]:
    """The training indices of the first ``num_partitions`` clients of a natural partition.

    Partition i is client i of ``natural.clients`` (a SuperNode's
    ``partition-id`` names a role), whatever ``num_partitions`` is; with fewer
    partitions than clients, the clients after the first ``num_partitions`` take
    no part, and a warning says so.

    Args:
        natural: the dataset's partition.
        num_partitions: in ``[1, len(natural.clients)]``.
        name: the partitioner's name, for messages.

    Returns:
        ``num_partitions`` sorted int64 index arrays, disjoint.

    Raises:
        ValueError: if ``num_partitions`` is out of range.
    """
    total = len(natural.clients)
    if not _is_int(num_partitions) or not 1 <= num_partitions <= total:
        raise ValueError(
            f"num_partitions must be an integer in [1, {total}] (the clients partitioner {name!r} defines), "
            f"got {num_partitions!r}"
        )
    if num_partitions < total:
        log.warning(
            "partitioner %r defines %d clients; with num_partitions=%d the first %d take part (%s .. %s) "
            "and the other %d do not", name, total, num_partitions, num_partitions, natural.clients[0],
            natural.clients[num_partitions - 1], total - num_partitions,
        )
    clients = natural.train_clients.numpy()
    order = np.argsort(clients, kind="stable")  # stable: each client's indices stay sorted
    bounds = np.cumsum(np.bincount(clients, minlength=total))
    return [part.astype(np.int64, copy=False) for part in np.split(order, bounds[:-1])[:num_partitions]]


def describe_natural_partition(dataset: Dataset, partitioner: str) -> str:
    """One line on a natural partition: how many clients, how unequal (for the settings checker).

    Raises:
        KeyError: if the dataset does not define ``partitioner``.
    """
    natural = dataset.natural_partitions[partitioner]
    sizes = np.bincount(natural.train_clients.numpy(), minlength=len(natural.clients))
    return (
        f"{dataset.name}: partitioner {partitioner!r} defines {len(natural.clients):,} clients (partition-id 0 = "
        f"{natural.clients[0]!r} .. {len(natural.clients) - 1} = {natural.clients[-1]!r}); training examples per "
        f"client: smallest {sizes.min():,}, median {np.median(sizes):g}, largest {sizes.max():,}; "
        f"{dataset.train_targets.shape[0]:,} training and {dataset.test_targets.shape[0]:,} test examples"
    )


def partition(dataset: Dataset, *, partition_id: int, num_partitions: int, **split) -> tuple[torch.Tensor, torch.Tensor]:
    """Return one client's share of the training set.

    Args:
        dataset: the loaded dataset; only its train split is partitioned.
        partition_id: the client's partition, in ``[0, num_partitions)``.
        num_partitions: the number of partitions.
        **split: ``partitioner``, ``alpha``, ``classes_per_partition``,
            ``seed``, ``min_partition_size``, as in :func:`partition_dataset`.

    Returns:
        ``(inputs, targets)`` of the partition, in the training set's order.
        Every call computes all partitions (~0.02 s for 60k labels, after a
        one-time ~2 s import of ``datasets``); callers needing several keep
        the output of :func:`partition_dataset`.

    Raises:
        ValueError: if ``partition_id`` is out of range, or as
            :func:`partition_dataset` does.
    """
    if not _is_int(num_partitions) or num_partitions < 1:
        raise ValueError(f"num_partitions must be an integer >= 1, got {num_partitions!r}")
    if not _is_int(partition_id) or not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition_id must be an integer in [0, {num_partitions}), got {partition_id!r}")
    index = torch.from_numpy(partition_dataset(dataset, num_partitions=num_partitions, **split)[partition_id])
    return dataset.train_inputs[index], dataset.train_targets[index]


def _make_partitioner(
    partitioner: str, num_partitions: int, alpha: float, classes_per_partition: int, seed: int, min_partition_size: int
):
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, PathologicalPartitioner

    if partitioner == "iid":
        return IidPartitioner(num_partitions=num_partitions)
    if partitioner == "dirichlet":
        return DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            alpha=float(alpha),
            min_partition_size=min_partition_size,
            seed=seed,
        )
    return PathologicalPartitioner(
        num_partitions=num_partitions,
        partition_by="label",
        num_classes_per_partition=classes_per_partition,
        class_assignment_mode="first-deterministic",
        seed=seed,
    )


def _read_assignment(splitter, num_partitions: int, *, use_assignment_table: bool = True) -> list[np.ndarray]:
    """Return, per partition, the table positions the partitioner assigned to it.

    The public route, ``load_partition(i)`` for every i, takes ~3 s for 60k
    labels and the pathological partitioner (each ``select`` hashes its list
    of numpy integers for the dataset fingerprint). The Dirichlet and
    pathological partitioners build their whole assignment,
    ``_partition_id_to_indices``, when ``num_partitions`` is first read (~0.02 s);
    we read it from there when it has the expected form, else take the public
    route (IidPartitioner, or a future flwr-datasets; a test checks that both
    routes agree).
    """
    if use_assignment_table:
        splitter.num_partitions  # noqa: B018 - builds the assignment
        table = getattr(splitter, "_partition_id_to_indices", None)
        if isinstance(table, dict) and sorted(table) == list(range(num_partitions)):
            return [np.asarray(table[i], dtype=np.int64) for i in range(num_partitions)]
    return [
        np.asarray(splitter.load_partition(i).with_format("arrow")["position"], dtype=np.int64)
        for i in range(num_partitions)
    ]


def _labels(targets: torch.Tensor | np.ndarray) -> np.ndarray:
    labels = targets.detach().cpu().numpy() if isinstance(targets, torch.Tensor) else np.asarray(targets)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"targets must be a 1-D array of integer labels, got {labels.dtype} {list(labels.shape)}")
    return labels.astype(np.int64, copy=False)


def _check_arguments(
    labels: np.ndarray,
    num_partitions: int,
    partitioner: str,
    alpha: float,
    classes_per_partition: int,
    min_partition_size: int | None,
) -> None:
    if partitioner not in LABEL_PARTITIONERS:
        raise ValueError(f"partitioner must be one of {LABEL_PARTITIONERS}, got {partitioner!r}")
    if not _is_int(num_partitions) or not 1 <= num_partitions <= labels.shape[0]:
        raise ValueError(
            f"num_partitions must be an integer in [1, {labels.shape[0]}] (the number of examples), "
            f"got {num_partitions!r}"
        )
    if partitioner == "dirichlet":
        if not (isinstance(alpha, numbers.Real) and 0 < alpha < float("inf")):
            raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}")
        if min_partition_size is not None and (not _is_int(min_partition_size) or min_partition_size < 0):
            raise ValueError(f"min_partition_size must be an integer >= 0 or None, got {min_partition_size!r}")
    if partitioner == "pathological":
        num_classes = np.unique(labels).shape[0]
        if not _is_int(classes_per_partition) or not 1 <= classes_per_partition <= num_classes:
            raise ValueError(
                f"classes_per_partition must be an integer in [1, {num_classes}] (the classes present), "
                f"got {classes_per_partition!r}"
            )


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)
