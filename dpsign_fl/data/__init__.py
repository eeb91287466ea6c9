"""Datasets and client partitions, in memory, as preprocessed torch tensors.

- :mod:`.loading`: the :class:`Dataset` container and :func:`load_dataset`
  (which source to read, preprocessing, train/test split).
- :mod:`.files`: readers for the standard on-disk formats (IDX, the
  ``cifar-10-batches-py`` pickles, the UCI mushroom file).
- :mod:`.hub`: the Hugging Face hub source (needs network on first use).
- :mod:`.partitioning`: splitting a training set among clients with the
  flwr-datasets partitioners.

Nothing here imports ``flwr`` (``flwr_datasets`` is a separate package), and
nothing is cached between calls: callers that load a dataset repeatedly keep
the :class:`Dataset` themselves.
"""

from .files import read_idx
from .loading import DATASETS, SOURCES, Dataset, load_dataset
from .partitioning import PARTITIONERS, partition, partition_indices

__all__ = [
    "DATASETS",
    "PARTITIONERS",
    "SOURCES",
    "Dataset",
    "load_dataset",
    "partition",
    "partition_indices",
    "read_idx",
]
