"""Splitting a training set among clients with the flwr-datasets partitioners.

The partitioners run on an in-memory Hugging Face ``datasets.Dataset`` built
from the labels alone, so nothing is downloaded and the inputs are never
copied; the result is, per client, the indices of its training examples.

As ``flwr_datasets.FederatedDataset(shuffle=True, seed=seed)`` does, the labels
are shuffled with ``seed`` before partitioning (``IidPartitioner`` cuts
contiguous shards), and every partitioner that takes a seed gets ``seed``:
the same arguments always give the same partitions.
"""

from __future__ import annotations

import numbers

import numpy as np
import torch

from .loading import Dataset

PARTITIONERS = ("iid", "dirichlet", "pathological")
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
        partitioner: one of ``PARTITIONERS``.
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


def partition(
    dataset: Dataset,
    *,
    partition_id: int,
    num_partitions: int,
    partitioner: str = "iid",
    alpha: float = 0.5,
    classes_per_partition: int = 2,
    seed: int = 0,
    min_partition_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return one client's share of the training set.

    Args:
        dataset: the loaded dataset; only its train split is partitioned.
        partition_id: the client's partition, in ``[0, num_partitions)``.
        num_partitions, partitioner, alpha, classes_per_partition, seed,
            min_partition_size: as in :func:`partition_indices`.

    Returns:
        ``(inputs, targets)`` of the partition, in the training set's order.
        Every call computes all partitions (~0.02 s for 60k labels, after a
        one-time ~2 s import of ``datasets``); callers needing several keep
        the output of :func:`partition_indices`.

    Raises:
        ValueError: if ``partition_id`` is out of range, or as
            :func:`partition_indices` does.
    """
    if not _is_int(num_partitions) or num_partitions < 1:
        raise ValueError(f"num_partitions must be an integer >= 1, got {num_partitions!r}")
    if not _is_int(partition_id) or not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition_id must be an integer in [0, {num_partitions}), got {partition_id!r}")
    indices = partition_indices(
        dataset.train_targets,
        num_partitions=num_partitions,
        partitioner=partitioner,
        alpha=alpha,
        classes_per_partition=classes_per_partition,
        seed=seed,
        min_partition_size=min_partition_size,
    )[partition_id]
    index = torch.from_numpy(indices)
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
    if partitioner not in PARTITIONERS:
        raise ValueError(f"partitioner must be one of {PARTITIONERS}, got {partitioner!r}")
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
