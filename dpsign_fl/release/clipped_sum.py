"""The sum of per-example clipped gradients, without the ``[B, d]`` matrix.

The pre-noise core of the DP-SIGN release (:mod:`dpsign_fl.release.mechanism`): the
same value as ``clip_per_sample(per_sample_gradients(...), ...).sum(0)``, by one
of two methods that never hold all B per-example gradients at once:

- ``"layers"``: one forward and one backward pass over the whole batch. Module
  hooks keep each layer's input ``a``; during the backward a hook on each
  layer's output receives its ``g`` (gradient of the SUM of per-example
  losses w.r.t. that output, whose row i depends on example i only) and runs
  the layer's rule at once, so that ``a`` and ``g`` can be dropped as the
  backward goes on (``torch.autograd.grad`` is asked only for the outputs of
  the layers below which no other layer lies). Per-example
  squared norms come per layer from ``(a, g)``: by the "ghost" identity
  ``||g_i a_i^T||^2 = ||a_i||^2 ||g_i||^2`` or ``sum_ts (a_t.a_s)(g_t.g_s)``
  (Goodfellow 2015, arXiv:1510.01799; Li et al. 2022, arXiv:2110.05679, Sec. 4)
  or by materialising one layer's per-example gradients for a chunk of
  examples, whichever a flop count says is cheaper (Bu et al. 2022,
  arXiv:2205.10683, "mixed ghost clipping"); materialised gradients are kept
  for the sum where :data:`KEEP_BYTES` allows, in a workspace reused from
  call to call (:class:`dpsign_fl.release.layer_rules.Keeper`). The clipped
  sum is then, per layer, the factor-weighted sum of the kept gradients or
  one weight-gradient product with factor-scaled ``g``.
- ``"vmap"``: ``torch.func`` ``vmap(grad)`` in chunks of examples; per chunk the
  per-example norms, then per parameter the factor-weighted sum over the chunk.
  Works for any model ``torch.func`` supports.

The layer pass supports :data:`SUPPORTED_LAYERS` and assumes that every such
layer sees the examples along dim 0 of its input (batch first). It checks what
it can at run time (each layer called once, with gradients enabled; each
parameter used once, by its own layer, counted in the autograd graph; batch
sizes; no in-place change of a kept tensor); ``"auto"`` falls
back to ``"vmap"`` when a check fails. A model that moves the batch into
another dimension of the same size cannot be detected: give it
``method="vmap"``.
"""

from __future__ import annotations

import functools
from collections import Counter
from typing import Callable

import torch
from torch import nn

from .layer_rules import (
    KEEP_BYTES, RULES, SUPPORTED_LAYERS, Keeper, finite_rows, min_input_dims, positions, reads_output, squared_norms,
)
from .mechanism import CLIPPING_MODES, _check_clip_norm, _reject_batchnorm, clip_factors, example_gradient

METHODS = ("auto", "vmap", "layers")
VMAP_SCRATCH_BYTES = 256 * 2**20
"""Per-example gradients held per vmap chunk (the default chunk size is derived from it)."""

MAX_TERMS_RATIO = 1000.0
"""How many times its gradient's norm an example's float32 terms may sum to before they, not the norm, set its clip.

Where a layer's part of the clipped sum is recomputed as a float32 sum over
positions (ghost and recomputed forms: :func:`dpsign_fl.release.layer_rules.term_sizes`),
each example is clipped as if its norm were at least the size of its terms
divided by this ratio, so that their rounding (about 6e-8 of that size) moves
its contribution by a few 1e-5 of C at most, however a model makes the terms
cancel. The project's models on honest data stay far below it (at most 14 measured:
docs/privacy.md, "Hostile instructions"), so their clipping is unchanged; a model
whose own layers cancel the terms on some inputs (a convolution before a GroupNorm
with one channel per group, on a near-constant image) clips those examples harder:
their utility, not the privacy, changes.
"""

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class _Unsupported(Exception):
    """The layer pass cannot prove it computes per-example gradients of this model."""


def clipped_gradient_sum(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    clip_norm: float,
    clipping: str = "flat",
    method: str = "auto",
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Return ``sum_i clip(g_i)``, the sum of the batch's clipped per-example gradients.

    Privacy: neighbouring relation add/remove one example. Every example's
    clipped gradient has L2 norm <= ``clip_norm`` over ALL trainable parameters
    together (one norm per example, not per tensor), so the sum has L2
    sensitivity ``clip_norm``; an example whose gradient or norm is not finite
    contributes exactly zero. The layer pass clips an example as if its norm
    were at least the size of the float32 terms its contribution is summed from
    over :data:`MAX_TERMS_RATIO` (harder, never softer: against a model that
    makes the terms cancel, whose rounding could otherwise move the sum by more
    than ``clip_norm``; the project's models stay far below it). Released:
    nothing; this function adds no noise and draws no randomness (the Gaussian
    noise of the release is added by the caller, :mod:`dpsign_fl.release.mechanism`).

    ``g_i`` is the gradient of the loss of example i, which is
    ``loss_fn(model(x_i[None]), y_i[None])``: ``loss_fn`` on a batch must be the
    MEAN of these per-example losses (as ``F.cross_entropy`` with its default
    ``reduction="mean"``); the layer pass differentiates ``B * loss_fn`` on the
    whole batch. Clipping: ``"flat"``, ``g * min(1, C / ||g||)`` (Abadi et al.
    2016, arXiv:1607.00133); ``"automatic"``, ``C * g / (||g|| + gamma)`` (Bu et
    al. 2022, arXiv:2206.07136) with gamma = ``AUTOMATIC_CLIPPING_GAMMA``.

    Args:
        model: the model; read only. Its trainable parameters (``requires_grad``)
            are differentiated, in ``model.parameters()`` order. Hooks are added
            and removed; parameters, ``requires_grad`` and ``.grad`` are untouched.
        loss_fn: ``loss_fn(outputs, targets)``, the mean of per-example losses.
        inputs: ``[B, ...]`` examples (B may be 0).
        targets: ``[B, ...]`` targets.
        clip_norm: C > 0.
        clipping: ``"flat"`` or ``"automatic"``.
        method: ``"layers"`` (hooks on :data:`SUPPORTED_LAYERS`), ``"vmap"``
            (``torch.func``), or ``"auto"``: ``"layers"`` when every module that
            owns trainable parameters is supported and its run-time checks pass,
            else ``"vmap"``.
        chunk_size: examples per chunk of per-example work; None = chosen from
            :data:`LAYER_SCRATCH_BYTES` / :data:`VMAP_SCRATCH_BYTES`.

    Returns:
        Tensor ``[d]`` in the parameters' dtype (float32 for this project's
        models), d = number of trainable parameter entries, each parameter
        flattened row-major; zeros when B = 0.

    Raises:
        ValueError: on a bad ``clip_norm``, ``clipping``, ``method`` or
            ``chunk_size``; BatchNorm in training mode; batch sizes that
            disagree; a non-scalar loss; ``method="layers"`` on a model it
            cannot handle.
    """
    _check_clip_norm(clip_norm)
    if clipping not in CLIPPING_MODES:
        raise ValueError(f"clipping must be one of {CLIPPING_MODES}, got {clipping!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be None or an integer >= 1, got {chunk_size!r}")
    _reject_batchnorm(model)
    if inputs.shape[0] != targets.shape[0]:
        raise ValueError(
            f"inputs and targets must have the same batch size, got {inputs.shape[0]} and {targets.shape[0]}"
        )
    params = [p for p in model.parameters() if p.requires_grad]
    reference = params[0] if params else torch.empty(0)
    total = torch.zeros(sum(p.numel() for p in params), dtype=reference.dtype, device=reference.device)
    if inputs.shape[0] == 0 or not params:
        return total
    if method != "vmap":
        try:
            return _layer_pass(model, params, loss_fn, inputs, targets, clip_norm, clipping, chunk_size, total)
        except _Unsupported as error:
            if method == "layers":
                raise ValueError(f"method='layers' cannot handle this model: {error}; use method='vmap'") from None
    return _vmap_pass(model, loss_fn, inputs, targets, clip_norm, clipping, chunk_size, total)


# ---------------------------------------------------------------- vmap


def _vmap_pass(model, loss_fn, inputs, targets, clip_norm, clipping, chunk_size, total):
    names, params, gradient = example_gradient(model, loss_fn)
    per_example = torch.func.vmap(gradient, in_dims=(None, 0, 0))
    sums = {name: torch.zeros_like(p) for name, p in params.items()}
    batch = inputs.shape[0]
    step = chunk_size or max(1, VMAP_SCRATCH_BYTES // (total.numel() * total.element_size()))
    for start in range(0, batch, step):
        grads = per_example(params, inputs[start : start + step], targets[start : start + step])
        squares = sum(squared_norms(grads[name]) for name in names)
        factors = clip_factors(squares.sqrt(), clip_norm=clip_norm, clipping=clipping)
        keep = finite_rows(squares)
        for name in names:
            grad, weights = (grads[name], factors) if keep is None else (grads[name][keep], factors[keep])
            sums[name] += torch.tensordot(weights, grad, dims=1)
        del grads
    torch.cat([sums[name].reshape(-1) for name in names], out=total)
    return total


# ---------------------------------------------------------------- the layer pass


def _layer_pass(model, params, loss_fn, inputs, targets, clip_norm, clipping, chunk_size, total):
    owners, loss, kept = _forward(model, loss_fn, inputs, targets)
    uses, first = _walk_graph(loss, [out for _, _, out in kept])
    with Keeper(_grants(kept)) as keeper:
        layers = _norms_during_backward(loss * inputs.shape[0], kept, first, chunk_size, keeper)
        del kept
        _check_uses(owners, {layer[0] for layer in layers}, uses)
        with torch.no_grad():
            norms = _clipped_norms(inputs.shape[0], layers, total)
            factors = clip_factors(norms, clip_norm=clip_norm, clipping=clipping)
            keep_rows = finite_rows(norms)
            sums = {}
            for index in range(len(layers)):
                (module, _, _, cache, a, g), layers[index] = layers[index], None  # free as we go
                weights = factors
                if keep_rows is not None:
                    a, g = (None if x is None else x[keep_rows] for x in (a, g))
                    weights = factors[keep_rows]
                    cache = {key: value[keep_rows] for key, value in cache.items()}
                for name, value in RULES[type(module)].total(module, a, g, weights, cache).items():
                    sums[id(getattr(module, name))] = value.reshape(-1)
            # One copy into ``total``; a parameter whose layer does not reach the loss gets zeros.
            torch.cat([sums.pop(id(p)) if id(p) in sums else p.new_zeros(p.numel()) for p in params], out=total)
    return total


def _clipped_norms(batch: int, layers: list[tuple], total: torch.Tensor) -> torch.Tensor:
    """Per example, the norm its clip factor is computed from: the gradient's norm, or the size of its float32
    terms over :data:`MAX_TERMS_RATIO` where that is larger (never smaller than the gradient's norm)."""
    squares = torch.zeros(batch, dtype=total.dtype, device=total.device)
    terms = torch.zeros(batch, dtype=torch.float64, device=total.device)
    for layer in layers:
        squares += layer[1]
        if layer[2] is not None:
            terms += layer[2]
    return torch.maximum(squares.sqrt(), (terms.sqrt() / MAX_TERMS_RATIO).to(squares.dtype))


def _forward(model, loss_fn, inputs, targets) -> tuple[list[nn.Module], torch.Tensor, list[tuple]]:
    """One forward with hooks: the modules owning trainable parameters, the loss, and ``(module, a, out)``
    (input and output) for every layer whose output requires a gradient. Hooks are removed even on error."""
    owners = _check_layers(model)
    batch = inputs.shape[0]
    records: dict[nn.Module, list] = {module: [] for module in owners}

    def keep(module, args, kwargs, output):
        a = args[0] if args else kwargs.get("input")
        versions = getattr(a, "_version", 0), getattr(output, "_version", 0)
        records[module].append((a, output, *versions, torch.is_grad_enabled()))

    handles = [module.register_forward_hook(keep, with_kwargs=True) for module in owners]
    try:
        loss = loss_fn(model(inputs), targets)
    finally:
        for handle in handles:
            handle.remove()
    if loss.numel() != 1:
        raise ValueError(
            f"loss_fn must return a scalar (the mean of per-example losses), got shape {tuple(loss.shape)}"
        )
    kept = [(module, a, out) for module, a, out in _check_records(records, batch) if out.requires_grad]
    return owners, loss, kept


def _grants(kept: list[tuple]) -> dict[int, int]:
    """The layers that may keep their per-example gradients, and how many bytes each.

    Most positions per example first (the most compute per kept byte), within :data:`KEEP_BYTES`.
    """
    grants, left = {}, KEEP_BYTES
    for module, a, out in sorted(kept, key=lambda layer: positions(layer[0], layer[2]), reverse=True):
        size = RULES[type(module)].kept_bytes(module, a, out)
        if 0 < size <= left:
            grants[id(module)], left = size, left - size
    return grants


def _norms_during_backward(summed_loss, kept, first, chunk_size, keeper) -> list[tuple]:
    """One backward: ``(module, squares, terms, cache, a, g)`` per layer whose output reaches the loss, in ``kept``'s order.

    ``g`` is the gradient of ``summed_loss`` (the sum of per-example losses)
    w.r.t. the layer's output. Each layer's rule runs as soon as its ``g``
    exists (a hook on the output), so that ``a`` and ``g`` are dropped right
    away where the cache is all the total needs (then both are None): the pass
    never holds every layer's ``g`` at once. ``torch.autograd.grad`` is asked
    for the outputs of the ``first`` layers only (no other layer's output lies
    below theirs in the graph); every other layer's output lies on the way to
    them. No parameter's ``.grad`` is computed or written. Hooks are removed
    even on error.
    """
    results: list = [None] * len(kept)

    def norms(index, g):
        if g is None:  # an undefined gradient (a custom backward returned None): the layer is not reached
            return
        module, a, out = kept[index]
        rule = RULES[type(module)]
        with torch.no_grad():
            read = out.detach() if reads_output(module) else None
            squares, terms, cache = rule.norms(module, a, g, read, chunk_size, keeper)
        complete = rule.complete(module, cache)
        results[index] = (module, squares, terms, cache, None if complete else a, None if complete else g)
        kept[index] = None  # drop a and out

    requested = [index for index in range(len(kept)) if first[index]]
    handles = [
        kept[index][2].register_hook(functools.partial(norms, index))
        for index in range(len(kept)) if not first[index]
    ]
    try:
        grads = [None] * len(requested)
        if requested and summed_loss.grad_fn is not None:
            grads = torch.autograd.grad(summed_loss, [kept[index][2] for index in requested], allow_unused=True)
    finally:
        for handle in handles:
            handle.remove()
    for index, g in zip(requested, grads):
        if g is not None:
            norms(index, g)
    return [result for result in results if result is not None]


def _check_layers(model: nn.Module) -> list[nn.Module]:
    """Return the modules owning trainable parameters; raise _Unsupported if the layer pass cannot take them."""
    owners = []
    for name, module in model.named_modules():
        own = [key for key, p in module.named_parameters(recurse=False) if p.requires_grad]
        if not own:
            continue
        rule = RULES.get(type(module))
        if rule is None:
            raise _Unsupported(f"module {name or 'model'} of type {type(module).__name__} owns trainable parameters")
        unexpected = set(own) - {"weight", "bias"}
        reason = f"parameters {sorted(unexpected)}" if unexpected else rule.unsupported(module)
        if reason:
            raise _Unsupported(f"module {name} ({type(module).__name__}) has {reason}")
        owners.append(module)
    registrations = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False) if p.requires_grad)
    if any(count > 1 for count in registrations.values()):
        raise _Unsupported("a trainable parameter is registered in two places (weight tying)")
    return owners


def _walk_graph(loss: torch.Tensor, outputs: list[torch.Tensor]) -> tuple[Counter, list[bool]]:
    """One walk of the loss's autograd graph.

    Returns, per trainable parameter (by id), the edges into it; and per
    tensor of ``outputs`` (the layers' outputs) whether it is a "first"
    output: none of the other outputs lies below it in the graph (its
    gradient flows to no other layer), or it does not reach the loss.
    """
    uses: Counter = Counter()
    below: dict = {}  # node -> whether a layer's output node lies strictly below it
    layer_nodes = {out.grad_fn for out in outputs}
    stack = [] if loss.grad_fn is None else [loss.grad_fn]
    while stack:  # post-order, iterative: graphs can be deeper than Python's recursion limit
        node = stack[-1]
        if node in below:
            stack.pop()
            continue
        children = [child for child, _ in node.next_functions if child is not None]
        pending = [child for child in children if child not in below and getattr(child, "variable", None) is None]
        if pending:
            stack.extend(pending)
            continue
        stack.pop()
        found = False
        for child in children:
            variable = getattr(child, "variable", None)  # an AccumulateGrad node: a leaf
            if variable is not None:
                uses[id(variable)] += 1
            elif child in layer_nodes or below[child]:
                found = True
        below[node] = found
    return uses, [not below.get(out.grad_fn, False) for out in outputs]


def _check_records(records: dict, batch: int) -> list[tuple]:
    """Return (module, input, output) per called layer; raise _Unsupported where the pass would be wrong."""
    kept = []
    for module, calls in records.items():
        layer = type(module).__name__
        if len(calls) > 1:
            raise _Unsupported(f"a {layer} is called {len(calls)} times per forward")
        if not calls:
            continue
        a, out, a_version, out_version, grad_enabled = calls[0]
        if not grad_enabled:
            # e.g. reentrant checkpointing, whose backward would write .grad behind the pass's back.
            raise _Unsupported(f"a {layer} with trainable parameters runs with gradients disabled")
        if not isinstance(a, torch.Tensor) or not isinstance(out, torch.Tensor):
            raise _Unsupported(f"a {layer} takes or returns something other than one tensor")
        if a.ndim < min_input_dims(module) or a.shape[0] != batch or out.shape[0] != batch:
            raise _Unsupported(
                f"a {layer} sees input {tuple(a.shape)} and output {tuple(out.shape)}, "
                f"not the batch of {batch} on dim 0"
            )
        if a._version != a_version or out._version != out_version:
            # Changed in place after the layer ran: a and g would no longer be this layer's.
            raise _Unsupported(f"the input or output of a {layer} is modified in place")
        kept.append((module, a, out))
    return kept


def _check_uses(owners: list[nn.Module], reached: set, uses: Counter) -> None:
    """Each trainable parameter must reach the loss exactly through its own layer's one call, or not at all.

    A layer whose output reaches the loss uses each of its parameters once (one
    edge in the graph, checked for every supported type); any other count means
    a use the layer pass does not see (functional tying, a call of the layer's
    weight outside its forward), whose gradient it would miss.
    """
    for module in owners:
        expected = 1 if module in reached else 0
        for p in module.parameters(recurse=False):
            if p.requires_grad and uses[id(p)] != expected:
                raise _Unsupported(
                    f"a parameter of a {type(module).__name__} reaches the loss {uses[id(p)]} times, "
                    f"expected {expected} (used outside its layer's forward?)"
                )

