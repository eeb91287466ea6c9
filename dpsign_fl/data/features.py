"""What a model sees: raw inputs, or fixed wavelet-scattering features (ScatterNet).

The ``scatternet-*`` models (:mod:`dpsign_fl.models`) train on the wavelet
scattering transform of the images (Oyallon & Mallat; used for DP learning by
Tramer & Boneh, "Differentially Private Learning Needs Better Features",
arXiv:2011.11660): kymatio's ``Scattering2D`` with J = 2 and L = 8 angles,
i.e. 1 + J L + L^2 J (J - 1) / 2 = 81 channels per input channel at a quarter
of the height and width: ``[81, 7, 7]`` for 28x28 images, ``[243, 8, 8]`` for
32x32 colour images.

Privacy: the transform is fixed (its filters depend on J, L and the image size,
never on data) and acts on one example at a time, so the features of a
dataset are a per-example function of it: training on them is the same
mechanism as training on the pixels. The models normalise each example on its
own (GroupNorm without learned scale, inside the model); nothing is fitted to
the training set, so there is nothing to account.

Features are computed once per dataset and cached (keyed by a hash of the
inputs, J, L and kymatio's version) in :func:`dpsign_fl.cache.trusted_cache_dir`;
later processes map the cached file into memory (processes on one machine
share its pages). They are what a model trains on, so only a file this user or
root owns and nobody else can write, in a folder nobody else can change, is
read, never through a link; where the folder is refused, nothing is cached.

kymatio is an optional dependency: ``pip install "dpsign-fl[scatternet]"``
(kymatio 0.3 imports ``scipy.special.sph_harm``, which SciPy 1.17 removed, so
the extra also pins SciPy below 1.17).
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch

from ..atomic_file import fsync_folder
from ..cache import open_cached_file, trusted_cache_dir
from .loading import Dataset, load_dataset

log = logging.getLogger("dpsign_fl")

SCATTERING_J = 2
"""Scales of the scattering transform (Tramer & Boneh 2021 use J = 2)."""
SCATTERING_ANGLES = 8
"""Orientations L of the Morlet wavelets."""
FEATURES_FORMAT = 1
"""Bumped whenever cached features would no longer match what this code computes."""
_BATCH = 1024


def load_run_dataset(settings) -> Dataset:
    """The dataset a run trains and evaluates on: ``settings.dataset``, as ``settings.model_name`` sees it.

    One place for the app's clients and server, the research loop and the
    experiments CLI.

    Args:
        settings: a :class:`dpsign_fl.settings.RunSettings`.

    Raises:
        ValueError, OSError: from :func:`dpsign_fl.data.load_dataset`.
        ImportError: a ScatterNet model without kymatio installed.
    """
    from ..models import input_features

    dataset = load_dataset(settings.dataset, data_dir=settings.data_dir or None, seed=settings.data_seed)
    if input_features(settings.model_name) == "scattering":
        dataset = scattering_features(dataset)
    return dataset


def scattering_features(dataset: Dataset) -> Dataset:
    """The same dataset with every image replaced by its scattering coefficients (cached).

    Args:
        dataset: images ``[N, C, H, W]`` with H and W multiples of 4.

    Returns:
        A :class:`Dataset` with inputs ``[N, 81 C, H / 4, W / 4]`` and the same targets.

    Raises:
        ValueError: for inputs that are not images of that kind.
        ImportError: without kymatio (the ``scatternet`` extra).
    """
    shape = dataset.input_shape
    if len(shape) != 3 or shape[1] % 4 or shape[2] % 4:
        raise ValueError(
            f"ScatterNet features need images [C, H, W] with H and W multiples of 4, got {list(shape)} "
            f"for dataset {dataset.name!r}"
        )
    kymatio = _kymatio()
    key = _cache_key(dataset, kymatio.__version__)
    folder = trusted_cache_dir("features")  # None: refused, with a warning naming it
    path = None if folder is None else folder / f"{dataset.name}-scattering-J{SCATTERING_J}-{key}.pt"
    if path is not None:
        try:
            # Checked on the opened file; mapped by name, which nobody else can swap in a trusted folder.
            with open_cached_file(path):
                cached = torch.load(path, mmap=True, weights_only=True)
            return _with_inputs(dataset, cached["train"], cached["test"])
        except FileNotFoundError:
            pass
        except (OSError, RuntimeError, KeyError, ValueError) as error:
            log.warning("cached features %s could not be read (%s); computing them again", path, error)
    train = _transform(dataset.train_inputs, dataset.name, "train")
    test = _transform(dataset.test_inputs, dataset.name, "test")
    if path is not None:
        _save(path, {"train": train, "test": test})
        log.info("ScatterNet features of %s cached in %s", dataset.name, path)
    return _with_inputs(dataset, train, test)


def _kymatio():
    try:
        import kymatio
        from kymatio.torch import Scattering2D  # noqa: F401  (fails on SciPy >= 1.17 with kymatio 0.3)
    except ImportError as error:
        raise ImportError(
            "the scatternet models need kymatio: pip install \"dpsign-fl[scatternet]\" "
            f"(kymatio 0.3 needs SciPy < 1.17); import failed with: {error}"
        ) from None
    return kymatio


def _transform(images: torch.Tensor, name: str, split: str) -> torch.Tensor:
    from kymatio.torch import Scattering2D

    count, channels, height, width = images.shape
    scattering = Scattering2D(J=SCATTERING_J, shape=(height, width), L=SCATTERING_ANGLES)
    out = None
    started = last_log = time.monotonic()
    with torch.no_grad():
        for start in range(0, count, _BATCH):
            batch = scattering(images[start:start + _BATCH].contiguous())  # [b, C, K, H/4, W/4]
            batch = batch.reshape(batch.shape[0], -1, *batch.shape[-2:])
            if out is None:
                out = torch.empty((count, *batch.shape[1:]), dtype=torch.float32)
            out[start:start + batch.shape[0]] = batch
            if time.monotonic() - last_log > 10:
                last_log = time.monotonic()
                log.info("ScatterNet features of %s (%s): %d of %d images, %.0f s", name, split,
                         start + batch.shape[0], count, last_log - started)
    if out is None:
        out = torch.empty((0, channels * _channels_per_input(), height // 4, width // 4))
    return out


def _channels_per_input() -> int:
    j, angles = SCATTERING_J, SCATTERING_ANGLES
    return 1 + j * angles + angles * angles * j * (j - 1) // 2


def _cache_key(dataset: Dataset, kymatio_version: str) -> str:
    digest = hashlib.sha256()
    digest.update(f"{FEATURES_FORMAT}|{SCATTERING_J}|{SCATTERING_ANGLES}|{kymatio_version}|".encode())
    for tensor in (dataset.train_inputs, dataset.test_inputs):
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(np.ascontiguousarray(tensor.numpy()).data)
    return digest.hexdigest()[:16]


def _save(path: Path, tensors: dict) -> None:
    """Write atomically (temporary file, rename): a concurrent reader sees the old file or the whole new one."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(tensors, temporary)
        os.replace(temporary, path)
        fsync_folder(path.parent)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        log.warning("ScatterNet features could not be cached in %s (%s); they will be computed again next time", path, error)


def _with_inputs(dataset: Dataset, train: torch.Tensor, test: torch.Tensor) -> Dataset:
    return Dataset(
        train_inputs=train, train_targets=dataset.train_targets, test_inputs=test,
        test_targets=dataset.test_targets, num_classes=dataset.num_classes, name=dataset.name,
    )
