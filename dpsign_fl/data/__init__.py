"""Datasets and client partitions, in memory, as preprocessed torch tensors.

- :mod:`.loading`: the :class:`Dataset` container and :func:`load_dataset`
  (which source to read, preprocessing, train/test split).
- :mod:`.files`: readers for the standard on-disk formats (IDX, the
  ``cifar-10-batches-py`` pickles, the UCI mushroom file).
- :mod:`.shakespeare`: the plays, parsed into speaking roles and cut into
  disjoint chunks of characters; the fixed vocabulary.
- :mod:`.hub`: the Hugging Face hub source (needs network on first use).
- :mod:`.partitioning`: splitting a training set among clients: the data's
  own partitions (a role, a play) or the flwr-datasets partitioners.

Nothing here imports ``flwr`` (``flwr_datasets`` is a separate package), and
nothing is cached between calls: callers that load a dataset repeatedly keep
the :class:`Dataset` themselves.
"""

from .files import read_idx
from .loading import (
    DATASETS, NATURAL_PARTITIONS, PRETRAINING_SETS, PUBLIC_TEXTS, SOURCES, Dataset, NaturalPartition, load_dataset,
    pixel_statistics, pretraining_set, public_digits, public_images, public_text,
)
from .partitioning import (
    LABEL_PARTITIONERS,
    NATURAL_PARTITIONERS,
    PARTITIONERS,
    check_partitioner,
    describe_natural_partition,
    partition,
    partition_dataset,
    partition_indices,
)

__all__ = [
    "pixel_statistics",
    "PRETRAINING_SETS",
    "PUBLIC_TEXTS",
    "pretraining_set",
    "public_digits",
    "public_images",
    "public_text",
    "DATASETS",
    "LABEL_PARTITIONERS",
    "NATURAL_PARTITIONERS",
    "NATURAL_PARTITIONS",
    "PARTITIONERS",
    "SOURCES",
    "Dataset",
    "NaturalPartition",
    "check_partitioner",
    "describe_natural_partition",
    "load_dataset",
    "partition",
    "partition_dataset",
    "partition_indices",
    "read_idx",
]
