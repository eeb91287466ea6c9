"""Per-layer rules of the layer pass of :mod:`dpsign_fl.release.clipped_sum`.

For each supported layer type, from the layer's input ``a`` and the gradient
``g`` of the summed loss w.r.t. its output (row i depends on example i only):

- ``norms(module, a, g, out, chunk_size, keeper)``: the per-example squared norm
  of the gradient of the layer's trainable parameters, ``[B]``; the per-example
  squared size of the float32 terms ``total`` will sum that example's part from
  (float64 ``[B]``, see :func:`term_sizes`; None where ``total`` sums the very
  per-example tensors the norms were measured on); and a cache of per-example
  tensors for the second step. By the "ghost" identity
  ``||g_i a_i^T||^2 = ||a_i||^2 ||g_i||^2`` (Goodfellow 2015, arXiv:1510.01799),
  its sum over position pairs (Li et al. 2022, arXiv:2110.05679, Sec. 4), or by
  materialising a chunk of per-example gradients, whichever a flop count says
  is cheaper (Bu et al. 2022, arXiv:2205.10683, "mixed ghost clipping"; the
  ghost forms' flops count :data:`GHOST_COST` times: they run in float64).
  ``out`` is the layer's output for the types :func:`reads_output` names, else None;
  ``keeper`` (:class:`Keeper`) hands out the memory per-example gradients are kept in.
- ``total(module, a, g, factors, cache)``: ``{parameter name: sum_i factors_i
  grad_i}``, one weight-gradient product with factor-scaled ``g`` (``a`` and ``g``
  are None where ``complete`` says the cache holds all it needs).
- ``unsupported(module)``: a reason the rule cannot handle this instance, or "".
- ``kept_bytes(module, a, out)``: the bytes of per-example gradients ``norms``
  keeps if the keeper lets it (0: it keeps none), known before ``g`` is.
- ``complete(module, cache)``: whether ``total`` needs nothing but the cache.

Nothing here adds noise or decides anything about privacy: the caller clips with
the factors these norms give.
"""

from __future__ import annotations

import math
import threading
from typing import Callable, NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

LAYER_SCRATCH_BYTES = 64 * 2**20
"""Scratch memory per chunk of one layer's per-example work in the layer pass."""
MAX_CHUNK = 32
"""Largest default chunk of the layer pass: small chunks stay in cache (measured faster on CPU)."""
KEEP_BYTES = 64 * 2**20
"""Per-example gradients the layer pass may keep between its two passes (per call).

Where a layer's norms already materialise its per-example gradients, keeping
them (granted largest spatial size first: the most compute per byte) spares the
second weight-gradient product; the rest are recomputed. Never more than this,
so never the ``[B, d]`` matrix of a large model.
"""


def squared_norms(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(x.reshape(x.shape[0], -1), dim=1).square()


GHOST_COST = 2
"""Flops of the ghost forms count this many times when choosing a form: their Gram products run in float64."""


def ghost_squares(left: torch.Tensor, right: torch.Tensor | None, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``sum_ts mask_ts (left_t . left_s)(right_t . right_s)`` per row, in float64.

    ``left``, ``right``: ``[N, T, *]`` (``right`` None: the factor is 1); ``mask``: ``[N, T, T]`` or None.

    The ghost identity's terms can be far larger than their sum (a model can make
    a layer's per-position gradients cancel), and float32 would round each term
    by about 6e-8 of its size: the rounding of the squares could then exceed
    the true squared norm and the example go unclipped. In float64 the terms
    would have to cancel to about 1e-6 of their size before the rounding
    mattered (docs/privacy.md, "Hostile instructions"). Returns float64 ``[N]``.
    """
    left = left.double()
    products = left @ left.mT
    if right is not None:
        right = right.double()
        products *= right @ right.mT
    return (products if mask is None else products * mask).sum((1, 2))


def finite_rows(squares: torch.Tensor) -> torch.Tensor | None:
    """Indices of the examples with a finite norm, or None when all are finite (the usual case)."""
    finite = torch.isfinite(squares)
    return None if bool(finite.all()) else torch.nonzero(finite).flatten()


def term_sizes(left: torch.Tensor, right: torch.Tensor | None) -> torch.Tensor:
    """``(sum_t ||left_t|| ||right_t||)^2`` per row, float64 ``[N]``: the squared size of an example's terms.

    ``left``, ``right``: ``[N, T, *]`` (``right`` None: the factor is 1). A layer
    whose ``total`` computes an example's part of the clipped sum as a float32
    sum over positions of ``right_t left_t^T`` (a matrix product, an index-add)
    rounds it by about 6e-8 of this size, not of the part's norm; the layer
    pass clips each example as if its norm were at least this size over
    :data:`dpsign_fl.release.clipped_sum.MAX_TERMS_RATIO`, so that the rounding
    stays a tiny fraction of the clip norm even when a model makes the terms
    cancel (docs/privacy.md, "Hostile instructions").
    """
    sizes = torch.linalg.vector_norm(left.flatten(2), dim=2)
    if right is not None:
        sizes = sizes * torch.linalg.vector_norm(right.flatten(2), dim=2)
    return sizes.sum(1).double().square()


def positions(module: nn.Module, out: torch.Tensor) -> int:
    """Positions per example (spatial or sequence) at which a layer's weight is applied (``out``: its output)."""
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        return math.prod(out.shape[2:])
    return out[0].numel() // max(1, out.shape[-1])


def _chunks(batch: int, scratch_per_example: int, chunk_size: int | None, element_size: int = 4):
    step = chunk_size or min(MAX_CHUNK, max(1, LAYER_SCRATCH_BYTES // max(1, scratch_per_example * element_size)))
    return [slice(start, start + step) for start in range(0, batch, step)]


class _Workspace(threading.local):
    """Per thread: the CPU buffer :class:`Keeper` hands out, and whether a layer pass is using it."""

    buffer: torch.Tensor | None = None
    busy: bool = False


_WORKSPACE = _Workspace()
_ALIGN = 64
"""Byte alignment of each tensor carved out of the workspace."""


def free_workspace() -> None:
    """Free this thread's workspace buffer (the next layer pass allocates a new one)."""
    _WORKSPACE.buffer = None


class Keeper:
    """The tensors one layer pass keeps per-example gradients in, for the layers it was granted.

    ``grants`` maps ``id(module)`` to the bytes that layer may keep (planned
    before the backward, within :data:`KEEP_BYTES`). On the CPU the tensors
    are views of one buffer per thread, reused by the thread's next pass:
    fresh memory would cost a page fault for every 4 KiB written, every pass
    (docs/performance.md). After a pass that needed more than the buffer holds,
    the buffer is replaced by one of that size (never more than the grants); it
    stays allocated until :func:`free_workspace` or the thread's end. A pass
    nested in another on the same thread, and other devices, get fresh tensors.
    What :meth:`take` returns holds garbage: every rule overwrites all of it.
    Use as a context manager around the pass.
    """

    def __init__(self, grants: dict[int, int]):
        self.grants, self.used, self.shared = dict(grants), 0, False

    def __enter__(self) -> "Keeper":
        self.shared = not _WORKSPACE.busy
        _WORKSPACE.busy = True
        return self

    def __exit__(self, *exc) -> None:
        if self.shared:
            _WORKSPACE.busy = False
            buffer = _WORKSPACE.buffer
            if self.used > (0 if buffer is None else buffer.numel()):
                _WORKSPACE.buffer = None  # freed before its successor is allocated
                _WORKSPACE.buffer = torch.empty(self.used, dtype=torch.uint8)

    def take(self, module: nn.Module, like: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor | None:
        """An uninitialised tensor of ``shape`` and ``like``'s dtype and device, or None where not granted."""
        size = math.prod(shape) * like.element_size()
        if size > self.grants.pop(id(module), 0):
            return None
        if not self.shared or like.device.type != "cpu":
            return like.new_empty(shape)
        start = -(-self.used // _ALIGN) * _ALIGN
        self.used = start + size
        buffer = _WORKSPACE.buffer
        if buffer is None or self.used > buffer.numel():
            return like.new_empty(shape)
        return buffer[start : self.used].view(like.dtype).view(shape)


def _scaled(x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return x * weights.reshape(-1, *[1] * (x.ndim - 1))


def _wants(module: nn.Module, name: str) -> bool:
    p = getattr(module, name, None)
    return p is not None and p.requires_grad


# ---------------------------------------------------------------- per-layer rules
# Each layer type has a Rule of five functions (see RULES below; their contracts: the module docstring).


def _linear_form(steps: int, fan_in: int, fan_out: int) -> str:
    """How a Linear's per-example weight norms are computed: ``"outer"``, ``"ghost"`` or ``"materialise"``."""
    if steps == 1:
        return "outer"
    # T^2 (in + out) in float64 vs T in out
    return "ghost" if GHOST_COST * steps * (fan_in + fan_out) <= fan_in * fan_out else "materialise"


def _linear_kept_bytes(module, a, out):
    fan_in, fan_out = a.shape[-1], out.shape[-1]
    if not _wants(module, "weight") or _linear_form(a[0].numel() // fan_in, fan_in, fan_out) != "materialise":
        return 0
    return a.shape[0] * fan_in * fan_out * out.element_size()


def _weight_kept(module, cache):
    return not _wants(module, "weight") or "weight" in cache


def _linear_norms(module, a, g, out, chunk_size, keeper):
    a = a.reshape(a.shape[0], -1, a.shape[-1])
    g = g.reshape(g.shape[0], -1, g.shape[-1])
    (batch, steps, fan_in), fan_out = a.shape, g.shape[-1]
    squares = torch.zeros(batch, dtype=g.dtype, device=g.device)
    cache = {}
    if _wants(module, "weight"):
        form = _linear_form(steps, fan_in, fan_out)
        if form == "outer":
            squares += squared_norms(a) * squared_norms(g)
        elif form == "ghost":
            for part in _chunks(batch, 2 * steps * steps, chunk_size):
                squares[part] += ghost_squares(a[part], g[part])
        else:
            kept = keeper.take(module, g, (batch, fan_out, fan_in))
            for part in _chunks(batch, fan_in * fan_out, chunk_size):
                # Written straight into the kept tensor when there is one: no copy of the per-example gradients.
                grads = torch.bmm(g[part].mT, a[part], out=None if kept is None else kept[part])
                squares[part] += squared_norms(grads)
            if kept is not None:
                cache["weight"] = kept
    # One position: the total's one term per example is the gradient measured; kept: the total sums those.
    terms = term_sizes(a, g) if steps > 1 and _wants(module, "weight") and "weight" not in cache else None
    return _add_bias(module, lambda: g.sum(1), squares, terms, cache)


def _add_bias(module, bias_grads, squares, terms, cache):
    """Cache the per-example bias gradients ``bias_grads()`` when the bias is trained, and add their squared norms."""
    if _wants(module, "bias"):
        cache["bias"] = bias_grads()
        squares += squared_norms(cache["bias"])
    return squares, terms, cache


def _linear_total(module, a, g, weights, cache):
    sums = {}
    if "weight" in cache:
        sums["weight"] = torch.tensordot(weights, cache["weight"], dims=1)
    elif _wants(module, "weight"):
        fan_in, fan_out = a.shape[-1], g.shape[-1]
        # Scale whichever of a, g is smaller: sum_i f_i g_i^T a_i is bilinear.
        if fan_in < fan_out:
            a = _scaled(a, weights)
        else:
            g = _scaled(g, weights)
        sums["weight"] = g.reshape(-1, fan_out).mT @ a.reshape(-1, fan_in)
    if "bias" in cache:
        sums["bias"] = weights @ cache["bias"]
    return sums


def _conv_unsupported(module):
    if module.padding_mode != "zeros" or module.padding == "same":
        return f"padding {module.padding!r} with padding_mode {module.padding_mode!r} (only zeros, numeric)"
    return ""


def _padding(module) -> tuple[int, ...]:
    return (0,) * len(module.kernel_size) if module.padding == "valid" else tuple(module.padding)


def _patches(module, a):
    """Patches ``[b, C_in * prod(kernel), L]`` of a Conv1d/Conv2d input, as the convolution reads them.

    An ``as_strided`` view of the zero-padded input, copied once (several times
    faster than ``F.unfold``'s im2col on CPU).
    """
    padding, dims = _padding(module), len(module.kernel_size)
    if any(padding):
        a = F.pad(a, [p for p in reversed(padding) for _ in range(2)])
    kernel, dilation, stride = module.kernel_size, module.dilation, module.stride
    out_sizes = [(a.shape[2 + i] - dilation[i] * (kernel[i] - 1) - 1) // stride[i] + 1 for i in range(dims)]
    strides = a.stride()
    view = a.as_strided(
        (*a.shape[:2], *kernel, *out_sizes),
        (*strides[:2], *(strides[2 + i] * dilation[i] for i in range(dims)),
         *(strides[2 + i] * stride[i] for i in range(dims))),
        a.storage_offset(),
    )
    return view.reshape(a.shape[0], a.shape[1] * math.prod(kernel), math.prod(out_sizes))


def _convolution_weight_grad(module, a, g, groups):
    """The convolution's own weight-gradient kernel on (a, g), summed over dim 0."""
    dims = len(module.kernel_size)
    shape = (g.shape[1], a.shape[1] // groups, *module.kernel_size)
    return torch.ops.aten.convolution_backward(
        g, a, module.weight.new_empty(shape),  # the weight's values are not read for the weight gradient
        None, module.stride, _padding(module), module.dilation, False, (0,) * dims, groups, (False, True, False),
    )[1]


def _conv_form(module, steps: int) -> str:
    """How a convolution's per-example weight norms are computed (``steps``: output positions per example)."""
    per_group_in, per_group_out = module.weight[0].numel(), module.out_channels // module.groups
    if GHOST_COST * steps * (per_group_in + per_group_out) <= per_group_in * per_group_out:
        return "ghost"
    return "patches" if module.in_channels == module.groups else "grouped"


def _conv_kept_bytes(module, a, out):
    if not _wants(module, "weight") or _conv_form(module, positions(module, out)) == "ghost":
        return 0
    return a.shape[0] * module.weight.numel() * out.element_size()


def _conv_norms(module, a, g, out, chunk_size, keeper):
    """Per-example norms of a convolution, by the cheapest of three exact forms.

    ``ghost`` (Gram matrices of patches and outputs, ``L^2 (K + C)`` flops) when
    it needs no more flops than materialising (``L K C``); otherwise the
    per-example weight gradients, for a chunk of examples, either from the
    patches by a batched matmul (one input channel per group, where the
    patches are small) or by the convolution's weight-gradient kernel with the
    examples folded into groups (no patches at all).
    """
    batch, groups, out_spatial = a.shape[0], module.groups, g.shape[2:]
    g = g.reshape(batch, module.out_channels, -1)
    steps, per_group_in, per_group_out = g.shape[2], module.weight[0].numel(), module.out_channels // groups
    squares, cache = torch.zeros(batch, dtype=g.dtype, device=g.device), {}
    if _wants(module, "weight"):
        kind = _conv_form(module, steps)
        scratch = {
            "ghost": groups * (2 * steps * steps + per_group_in * steps),
            "patches": groups * (per_group_in * steps + per_group_in * per_group_out),
            "grouped": 2 * groups * per_group_in * per_group_out,
        }[kind]
        kept = None if kind == "ghost" else keeper.take(module, g, (batch, *module.weight.shape))
        for part in _chunks(batch, scratch, chunk_size):
            size = a[part].shape[0]
            if kind == "ghost":
                patches = _patches(module, a[part]).reshape(-1, per_group_in, steps)  # [b * groups, K, L]
                outs = g[part].reshape(-1, per_group_out, steps)
                squares[part] += ghost_squares(patches.mT, outs.mT).reshape(size, groups).sum(1)
                continue
            if kind == "grouped":  # example j's group k is group j * groups + k
                folded_a, folded_g = a[part].reshape(1, -1, *a.shape[2:]), g[part].reshape(1, -1, *out_spatial)
                grads = _convolution_weight_grad(module, folded_a, folded_g, groups * size)
            else:
                patches = _patches(module, a[part]).reshape(-1, per_group_in, steps)
                grads = g[part].reshape(-1, per_group_out, steps) @ patches.mT
            grads = grads.reshape(size, *module.weight.shape)
            squares[part] += squared_norms(grads)
            if kept is not None:
                kept[part] = grads
        if kept is not None:
            cache["weight"] = kept
    terms = _conv_terms(module, a, g, chunk_size) if _wants(module, "weight") and "weight" not in cache else None
    return _add_bias(module, lambda: g.sum(2), squares, terms, cache)


def _conv_terms(module, a, g, chunk_size):
    """:func:`term_sizes` of a convolution: per position and group, patch norm times output-gradient norm.

    The patches' squared norms are the convolution of ``a^2`` with a kernel of
    ones (no patches materialised), a chunk of examples at a time; ``g``: ``[B, C_out, L]``.
    """
    groups, dims = module.groups, len(module.kernel_size)
    ones = a.new_ones(groups, module.in_channels // groups, *module.kernel_size)
    convolve = F.conv1d if dims == 1 else F.conv2d
    sizes = []
    for part in _chunks(a.shape[0], a[0].numel(), chunk_size):
        patch_squares = convolve(a[part].square(), ones, None, module.stride, _padding(module), module.dilation, groups)
        size = patch_squares.shape[0]
        patch_norms = patch_squares.clamp(min=0).sqrt().reshape(size, groups, -1)  # [b, groups, L]
        outs = g[part].reshape(size, groups, module.out_channels // groups, -1)  # [b, groups, out per group, L]
        # One term per (position, group): [b, L * groups, 1] and [b, L * groups, out per group].
        sizes.append(term_sizes(
            patch_norms.mT.reshape(size, -1, 1), outs.permute(0, 3, 1, 2).reshape(size, -1, outs.shape[2])
        ))
    return torch.cat(sizes)


def _conv_total(module, a, g, weights, cache):
    sums = {}
    if "weight" in cache:
        sums["weight"] = torch.tensordot(weights, cache["weight"], dims=1)
    elif _wants(module, "weight"):
        # The weight gradient is bilinear in (a, g): scale the smaller one, then
        # let the convolution's own backward kernel sum over examples.
        if a.numel() < g.numel():
            a = _scaled(a, weights)
        else:
            g = _scaled(g, weights)
        sums["weight"] = _convolution_weight_grad(module, a, g, module.groups)
    if "bias" in cache:
        sums["bias"] = weights @ cache["bias"].reshape(cache["bias"].shape[0], -1)
    return sums


AFFINE_FROM_OUTPUT_MAX_RATIO = 16.0
"""Largest ``|bias / weight|`` at which a normalisation layer's weight gradients are read off its output.

``x_hat = (y - bias) / weight`` loses about ``1 + |bias / weight|`` units in
the last place of ``y`` to cancellation; past this bound (or at a weight
that is zero, tiny or not finite) the rule normalises the input again instead.
"""


def reads_output(module: nn.Module) -> bool:
    """Whether the layer pass hands this layer's rule the layer's output (normalisation layers)."""
    return isinstance(module, (nn.GroupNorm, nn.LayerNorm, nn.RMSNorm))


def _normalized(module, a):
    if isinstance(module, nn.GroupNorm):
        return F.group_norm(a, module.num_groups, eps=module.eps)
    if isinstance(module, nn.RMSNorm):
        return F.rms_norm(a, module.normalized_shape, eps=module.eps)
    return F.layer_norm(a, module.normalized_shape, eps=module.eps)


def _affine_norms(module, a, g, out, chunk_size, keeper):
    """GroupNorm, LayerNorm, RMSNorm: per-example affine gradients, which are small, kept in the cache.

    The weight's per-example gradient is ``reduce(g * x_hat)``, ``x_hat`` the
    normalised input. With ``y = x_hat * weight + bias`` the layer's output,
    that is ``(reduce(g * y) - bias * reduce(g)) / weight``: no second
    normalisation of the input, where the weight allows it
    (:data:`AFFINE_FROM_OUTPUT_MAX_RATIO`).
    """
    batch = a.shape[0]
    if isinstance(module, nn.GroupNorm):  # [B, C, *]: sum over the positions after the channels
        reduce = lambda x: x.reshape(batch, x.shape[1], -1).sum(2)  # noqa: E731
    else:  # [B, *, *normalized_shape]: sum over the positions before the normalised dims
        reduce = lambda x: x.reshape(batch, -1, *module.normalized_shape).sum(1)  # noqa: E731
    cache, bias = {}, getattr(module, "bias", None)
    summed_g = reduce(g) if bias is not None else None  # the bias's gradients, and a term of the weight's
    if _wants(module, "weight"):
        weight = module.weight.detach()
        if bias is not None:
            bias = bias.detach()
        if _output_is_usable(weight, bias, out):
            summed = reduce(g * out)
            cache["weight"] = (summed if bias is None else summed - bias * summed_g) / weight
        else:
            cache["weight"] = reduce(g * _normalized(module, a))
    if _wants(module, "bias"):
        cache["bias"] = summed_g
    return sum(squared_norms(value) for value in cache.values()), None, cache


def _output_is_usable(weight, bias, out) -> bool:
    """Whether x_hat may be read off ``out``: float32/64, every weight finite and at least the square root of
    the dtype's smallest normal number (so that ``x_hat * weight`` keeps its precision), ``|bias| <= ratio * |weight|``.

    A model the server sends decides which path runs, never the clipping: both give each example one
    vector whose norm is the one clipped.
    """
    if out is None or out.dtype not in (torch.float32, torch.float64):
        return False
    magnitude = weight.abs()
    if not bool((torch.isfinite(weight) & (magnitude >= torch.finfo(out.dtype).tiny ** 0.5)).all()):
        return False
    return bias is None or bool((bias.abs() <= AFFINE_FROM_OUTPUT_MAX_RATIO * magnitude).all())


def _affine_total(module, a, g, weights, cache):
    return {name: torch.tensordot(weights, value, dims=1) for name, value in cache.items()}


def _embedding_unsupported(module):
    if module.max_norm is not None:
        return "max_norm (it rewrites the weight during the forward)"
    if module.scale_grad_by_freq:
        return "scale_grad_by_freq (it mixes the examples of a batch)"
    return ""


def embedding_form(rows: int, steps: int) -> str:
    """How the layer pass computes an embedding's per-example norms: ``"table"`` or ``"ghost"`` (flop count)."""
    return "table" if rows <= GHOST_COST * steps * steps else "ghost"


def _embedding_kept_bytes(module, ids, out):
    steps = ids[0].numel()
    if steps == 1 or embedding_form(module.num_embeddings, steps) != "table":
        return 0
    return ids.shape[0] * module.weight.numel() * out.element_size()


def _embedding_norms(module, ids, g, out, chunk_size, keeper):
    """Per-example squared norms of an embedding's gradient, by the cheaper of two exact forms.

    ``ghost``: ``||grad_i||^2`` = the sum over positions t, s with equal ids of
    ``g_t . g_s`` (``S^2 W`` flops per example of S positions, width W).
    ``table``: the per-example gradient itself, each ``g_t`` added into row
    ``id_t`` of a zero ``[rows, W]`` table (``(S + rows) W``), for a chunk of
    examples; taken when the table has no more rows than S^2 (small
    vocabularies, positions, long sequences). The tables are kept for the
    total while the keeper allows.
    """
    batch = ids.shape[0]
    ids = ids.reshape(batch, -1)
    g = g.reshape(batch, ids.shape[1], -1)
    if module.padding_idx is not None:  # the padding row receives no gradient
        g = g.masked_fill((ids == module.padding_idx).unsqueeze(-1), 0)
    (steps, width), rows = g.shape[1:], module.num_embeddings
    cache = {"ids": ids, "outputs": g}
    if steps == 1:
        squares = squared_norms(g)
    elif embedding_form(rows, steps) == "table":
        squares = torch.zeros(batch, dtype=g.dtype, device=g.device)
        kept = keeper.take(module, g, (batch, rows, width))
        for part in _chunks(batch, rows * width, chunk_size):
            size = g[part].shape[0]
            offsets = torch.arange(size, device=ids.device).unsqueeze(1) * rows  # example j's rows start at j * rows
            table = g.new_zeros(size * rows, width) if kept is None else kept[part].view(size * rows, width).zero_()
            table.index_add_(0, (ids[part] + offsets).reshape(-1), g[part].reshape(-1, width))
            squares[part] = squared_norms(table.view(size, -1))
        if kept is not None:
            cache = {"weight": kept}
    else:
        squares = torch.zeros(batch, dtype=g.dtype, device=g.device)
        for part in _chunks(batch, 2 * steps * steps, chunk_size):
            same = ids[part].unsqueeze(2) == ids[part].unsqueeze(1)
            squares[part] = ghost_squares(g[part], None, same)
    terms = term_sizes(g, None) if steps > 1 and "weight" not in cache else None
    return squares, terms, cache


def _embedding_total(module, ids, g, weights, cache):
    if "weight" in cache:  # the per-example tables of the norms, kept
        return {"weight": torch.tensordot(weights, cache["weight"], dims=1)}
    g = cache["outputs"]
    weight = torch.zeros_like(module.weight)
    weight.index_add_(0, cache["ids"].reshape(-1), _scaled(g, weights).reshape(-1, g.shape[-1]))
    return {"weight": weight}


def _always(module):
    return ""


def _keeps_nothing(module, a, out):
    return 0


def _cache_suffices(module, cache):
    return True


class Rule(NamedTuple):
    """One layer type's functions (module docstring)."""

    norms: Callable
    total: Callable
    unsupported: Callable
    kept_bytes: Callable
    complete: Callable


_LINEAR = Rule(_linear_norms, _linear_total, _always, _linear_kept_bytes, _weight_kept)
_CONV = Rule(_conv_norms, _conv_total, _conv_unsupported, _conv_kept_bytes, _weight_kept)
_AFFINE = Rule(_affine_norms, _affine_total, _always, _keeps_nothing, _cache_suffices)
RULES = {
    nn.Linear: _LINEAR,
    nn.Conv1d: _CONV,
    nn.Conv2d: _CONV,
    nn.GroupNorm: _AFFINE,
    nn.LayerNorm: _AFFINE,
    nn.RMSNorm: _AFFINE,
    # The cache holds either the kept tables or the ids and output gradients.
    nn.Embedding: Rule(
        _embedding_norms, _embedding_total, _embedding_unsupported, _embedding_kept_bytes, _cache_suffices
    ),
}


def min_input_dims(module: nn.Module) -> int:
    """Input dimensions of a batched call (fewer: an unbatched call, whose dim 0 is not the batch)."""
    if isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
        return len(module.normalized_shape) + 1
    return {nn.Conv1d: 3, nn.Conv2d: 4, nn.Embedding: 1}.get(type(module), 2)
SUPPORTED_LAYERS = tuple(RULES)
"""Layer types of the fast path (exact types: a subclass may change the forward)."""
