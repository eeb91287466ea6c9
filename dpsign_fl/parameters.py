"""Model parameters <-> one flat float32 vector: the coordinate order of every sign and vote.

Coordinate order: the trainable parameters in ``model.parameters()`` order (for
named arrays, the order of the mapping), each flattened row-major. Packed signs
(:mod:`dpsign_fl.vote.packing`), votes and the server update all use this order; the
Flower adapter converts ``ArrayRecord``s with the same two functions.
"""

from __future__ import annotations

from typing import Iterable, Mapping

import numpy as np
import torch
from torch import nn


def flatten(arrays: Iterable[np.ndarray]) -> np.ndarray:
    """Concatenate arrays, each flattened row-major, into one float32 vector."""
    return np.concatenate([np.asarray(array).reshape(-1).astype(np.float32) for array in arrays])


def unflatten(flat: np.ndarray, template: Mapping[str, tuple[tuple[int, ...], np.dtype]]) -> dict[str, np.ndarray]:
    """Split a flat vector into named arrays of the template's shapes and dtypes, in its order.

    Raises:
        ValueError: if the vector's length differs from the template's total size.
    """
    expected = sum(int(np.prod(shape)) for shape, _ in template.values())
    if flat.shape != (expected,):
        raise ValueError(f"flat vector must have shape ({expected},), got {flat.shape}")
    result, offset = {}, 0
    for name, (shape, dtype) in template.items():
        size = int(np.prod(shape))
        result[name] = flat[offset : offset + size].reshape(shape).astype(dtype)
        offset += size
    return result


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The (name, parameter) pairs whose signs a client releases, in ``parameters()`` order."""
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


def model_vector(model: nn.Module) -> np.ndarray:
    """Return the trainable parameters as one float32 vector (the module docstring's order)."""
    return flatten(p.detach().cpu().numpy() for _, p in trainable_parameters(model))


def load_model_vector(model: nn.Module, flat: np.ndarray) -> None:
    """Write a vector from :func:`model_vector` back into ``model``.

    Raises:
        ValueError: if the vector's length differs from the model's size.
    """
    params = [p for _, p in trainable_parameters(model)]
    expected = sum(p.numel() for p in params)
    if flat.shape != (expected,):
        raise ValueError(f"flat parameters must have shape ({expected},), got {flat.shape}")
    offset = 0
    with torch.no_grad():
        for p in params:
            p.copy_(torch.from_numpy(np.ascontiguousarray(flat[offset : offset + p.numel()])).view_as(p))
            offset += p.numel()
