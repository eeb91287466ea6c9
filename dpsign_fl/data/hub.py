"""The Hugging Face hub source of the image datasets (network needed on first use).

``datasets.load_dataset`` downloads once into the Hugging Face cache
(``HF_HOME``) and reads the cache afterwards. We call it directly rather than
through ``flwr_datasets.FederatedDataset``: partitioning happens on the labels
in :mod:`.partitioning`, and FederatedDataset also sends a telemetry event.
"""

from __future__ import annotations

import numpy as np

HUB_REPOSITORIES = {
    "mnist": ("ylecun/mnist", "image"),
    "fashion-mnist": ("zalando-datasets/fashion_mnist", "image"),
    "cifar10": ("uoft-cs/cifar10", "img"),
}
"""Dataset name -> (hub repository id, image column); the label column is ``label``."""


def read_hub_images(name: str, *, local_format: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Load an image dataset's train and test splits from the Hugging Face hub.

    Args:
        name: a key of ``HUB_REPOSITORIES``.
        local_format: how to provide the data offline, quoted in the error.

    Returns:
        ``(train_images, train_labels, test_images, test_labels)``: images uint8
        ``[N, C, H, W]``, labels int64 ``[N]``.

    Raises:
        RuntimeError: if the hub cannot be reached and the data is not in the
            Hugging Face cache (the original error is chained).
    """
    import datasets  # heavy import, only for this source

    repository, image_column = HUB_REPOSITORIES[name]
    try:
        splits = datasets.load_dataset(repository)
    except Exception as exc:  # offline: ConnectionError; also missing repos, cache errors
        raise RuntimeError(
            f"dataset {name!r} needs data: pass data_dir (run-config data-dir / --data-dir) pointing at "
            f"{local_format}, or go online to load it from the Hugging Face hub ({repository}); "
            f"the hub said: {exc}"
        ) from exc
    arrays = []
    for split in ("train", "test"):
        # The Image feature decodes to PIL images, one uint8 array each. (Not
        # with_format("numpy"): some datasets releases import a torchvision
        # class there that torchvision 0.29 no longer has.)
        table = splits[split]
        images = np.stack([np.asarray(image, dtype=np.uint8) for image in table[image_column]])
        arrays += [_channels_first(images), np.asarray(table["label"], dtype=np.int64)]
    return tuple(arrays)


def _channels_first(images: np.ndarray) -> np.ndarray:
    if images.ndim == 3:  # greyscale [N, H, W]
        return images[:, None]
    if images.ndim == 4:  # colour [N, H, W, C]
        return images.transpose(0, 3, 1, 2)
    raise ValueError(f"hub images must be [N, H, W] or [N, H, W, C], got {list(images.shape)}")
