"""The DP-SIGN release: Poisson sampling, per-sample gradients, clipping, noise, sign.

Privacy of one release (docs/privacy.md has the whole model):

- Neighbouring relation: add/remove one example of one client's dataset.
- Released: ``sign(sum_i clip(g_i) + N(0, (noise_multiplier * clip_norm)^2 I))``
  for the Poisson-sampled batch S (each example in S with probability
  ``sample_rate``, independently). The sign is post-processing.
- Sensitivity: every clipped per-example gradient has L2 norm <= ``clip_norm``
  over ALL parameters together, so adding or removing one example moves the sum
  by at most ``clip_norm`` (clipping the batch mean would move it by up to
  ``2 * clip_norm``; clipping each tensor separately by ``clip_norm * sqrt(k)``).
- The release is therefore one Sampled Gaussian Mechanism SGM(q, sigma)
  (Mironov, Talwar, Zhang 2019, arXiv:1908.10530, Def. 4), accounted in
  :mod:`dpsign_fl.privacy`.
- An empty batch still releases (the sign of pure noise): skipping it would
  reveal that S was empty.
- Randomness: a ``torch.Generator``; when none is given, one seeded from the
  operating system's secure random source (:func:`secure_generator`).
- Float precision: the noise is drawn and added in float64, whatever the
  model's dtype, and the clipping bound has a floor (:data:`MIN_CLIP_NORM`).
  In float32 a server-chosen ``clip_norm`` of 8e-46 made ``sigma * C`` round to
  0 while one clipped example still moved the sum by one float32 step: a
  release without noise. With ``C >= MIN_CLIP_NORM`` every clipped example's
  coordinates stay far above float32's subnormal range (rounding can only
  shrink a contribution by a relative 2^-24, never lift a zero to the
  smallest subnormal), and ``sigma * C`` is a normal float64.
"""

from __future__ import annotations

import math
import numbers
import secrets
import sys
from typing import Callable

import torch
from torch import nn

from ..privacy.accounting import check_noise_multiplier as _check_noise_multiplier
from ..privacy.accounting import check_sample_rate as _check_sample_rate
from ..privacy.limits import CLIP_NORM_RANGE

CLIPPING_MODES = ("flat", "automatic")
MIN_CLIP_NORM, MAX_CLIP_NORM = CLIP_NORM_RANGE
"""The clipping bounds C a release accepts (:data:`dpsign_fl.privacy.limits.CLIP_NORM_RANGE`; module docstring: float precision)."""
AUTOMATIC_CLIPPING_GAMMA = 0.01
"""Stability constant gamma of automatic clipping, C * g / (||g|| + gamma).

Bu et al. 2022 ("Automatic Clipping", arXiv:2206.07136) use gamma = 0.01; the
resulting norm is C * ||g|| / (||g|| + gamma) < C, so the sensitivity stays C.
"""


def secure_generator(seed: int | None = None, device: str | torch.device = "cpu") -> torch.Generator:
    """Return a torch generator, seeded from ``seed`` or from the OS's secure source.

    Args:
        seed: a fixed seed for reproducible experiments, or None (default) for a
            63-bit seed drawn with :func:`secrets.randbits` (the OS CSPRNG).
        device: the device the generator draws on.

    Returns:
        A seeded ``torch.Generator``.
    """
    generator = torch.Generator(device=device)
    generator.manual_seed(secrets.randbits(63) if seed is None else int(seed))
    return generator


def poisson_sample(num_examples: int, sample_rate: float, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """Poisson-sample indices: each example is kept independently with probability exactly q.

    The accountant assumes inclusion probability q exactly; :func:`bernoulli_mask`
    draws it so for every float q (a float32 comparison ``rand() < q`` would
    round q to a multiple of 2^-24).

    Args:
        num_examples: n, the size of the local dataset.
        sample_rate: q in (0, 1], a Python or numpy float (read as float64).
        generator: a CPU ``torch.Generator``; None means :func:`secure_generator`.

    Returns:
        A LongTensor of the sampled indices, in increasing order (possibly empty).

    Raises:
        ValueError: if ``num_examples < 0`` or ``sample_rate`` is not in (0, 1].
    """
    if int(num_examples) != num_examples or num_examples < 0:
        raise ValueError(f"num_examples must be an integer >= 0, got {num_examples}")
    _check_sample_rate(sample_rate)
    generator = generator if generator is not None else secure_generator()
    keep = bernoulli_mask(int(num_examples), float(sample_rate), generator=generator)
    return torch.nonzero(keep, as_tuple=False).flatten()


_DOUBLE_BITS = 53
"""``torch.rand(..., dtype=torch.float64)`` on the CPU returns k / 2^53 for a uniform integer k."""


def bernoulli_mask(count: int, probability: float, *, generator: torch.Generator) -> torch.Tensor:
    """Return ``count`` independent booleans, each True with probability exactly ``probability``.

    A float64 ``p`` is a dyadic rational. Write ``p * 2^53 = m + f`` with m an
    integer and f in [0, 1) (both exact in float64). With U uniform on the
    integers 0 .. 2^53 - 1 (one float64 ``torch.rand`` draw times 2^53, exact):
    U < m gives True, U > m False, and U = m (probability 2^-53) is decided by a
    fresh draw with probability f, recursively. So P(True) = m / 2^53 +
    f / 2^53 = p exactly; the recursion ends because each level removes 53
    bits of p's binary expansion (at most 1074 bits).

    Args:
        count: how many booleans.
        probability: p in [0, 1].
        generator: a CPU ``torch.Generator``.

    Returns:
        A bool tensor of shape ``[count]``.
    """
    scale = float(2**_DOUBLE_BITS)
    scaled = probability * scale  # exact: a power-of-two scaling of a double
    whole = float(int(scaled))
    fraction = scaled - whole  # exact
    draws = torch.rand(count, generator=generator, dtype=torch.float64) * scale  # integers, exact
    keep = draws < whole
    ties = torch.nonzero(draws == whole, as_tuple=False).flatten()
    if ties.numel() and fraction > 0:
        keep[ties] = bernoulli_mask(ties.numel(), fraction, generator=generator)
    return keep


def per_sample_gradients(
    model: nn.Module,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Return the gradient of the loss of each example, flattened, as rows.

    Uses ``torch.func``: ``vmap(grad(loss of one example))`` over the batch.

    Args:
        model: the model; its trainable parameters are differentiated, in
            ``model.parameters()`` order.
        loss_fn: ``loss_fn(outputs, targets)`` on a batch of ONE example
            (e.g. ``nn.functional.cross_entropy``).
        inputs: ``[B, ...]`` examples.
        targets: ``[B, ...]`` targets.
        chunk_size: examples per vmap chunk (bounds memory); None = all at once.

    Returns:
        Tensor ``[B, d]`` with d = number of trainable parameter entries.

    Raises:
        ValueError: if the model has BatchNorm in training mode (it mixes examples,
            so per-example gradients are undefined), or batch sizes disagree.
    """
    _reject_batchnorm(model)
    if inputs.shape[0] != targets.shape[0]:
        raise ValueError(
            f"inputs and targets must have the same batch size, got {inputs.shape[0]} and {targets.shape[0]}"
        )
    names, params, gradient = example_gradient(model, loss_fn)
    num_coordinates = sum(p.numel() for p in params.values())
    if inputs.shape[0] == 0:
        return torch.zeros(0, num_coordinates, dtype=next(iter(params.values())).dtype)
    grads = torch.func.vmap(gradient, in_dims=(None, 0, 0), chunk_size=chunk_size)(params, inputs, targets)
    return torch.cat([grads[name].reshape(inputs.shape[0], -1) for name in names], dim=1)


def example_gradient(model: nn.Module, loss_fn: Callable) -> tuple[list[str], dict[str, torch.Tensor], Callable]:
    """``(names, params, gradient)`` for ``torch.func``: one example's gradient, to ``vmap`` over a batch.

    ``names``: the trainable parameters in ``model.parameters()`` order;
    ``params``: them by name, detached; ``gradient(params, x, y)``: the
    gradient (a dict by name) of ``loss_fn`` on the batch of ONE example ``x``
    with target ``y``, the buffers held as they are now.
    """
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    params = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    buffers = {name: b.detach() for name, b in model.named_buffers()}

    def example_loss(parameters, x, y):
        outputs = torch.func.functional_call(model, (parameters, buffers), (x.unsqueeze(0),))
        return loss_fn(outputs, y.unsqueeze(0))

    return names, params, torch.func.grad(example_loss)


def clip_factors(norms: torch.Tensor, *, clip_norm: float, clipping: str) -> torch.Tensor:
    """Return each example's clipping factor; 0 where its norm is not finite.

    ``clip(g_i) = factors[i] * g_i`` with factor ``min(1, C / ||g_i||)`` (flat)
    or ``C / (||g_i|| + gamma)`` (automatic). A non-finite norm means a NaN or
    inf entry (or an overflow): the example contributes zero, which keeps every
    contribution's norm <= C (callers must drop such examples rather than
    multiply them by 0, since 0 * inf is NaN).

    Args:
        norms: ``[B]`` per-example L2 norms over all trainable parameters.
        clip_norm: C > 0 (not validated here: the public entry point does it).
        clipping: ``"flat"`` or ``"automatic"``.

    Returns:
        ``[B]`` factors in [0, 1] (flat) or [0, C / gamma) (automatic).
    """
    if clipping == "flat":
        # clamp avoids 0/0 for a zero gradient, whose factor is then 1.
        factors = torch.clamp(clip_norm / torch.clamp(norms, min=1e-12), max=1.0)
    else:
        factors = clip_norm / (norms + AUTOMATIC_CLIPPING_GAMMA)
    return torch.where(torch.isfinite(norms), factors, torch.zeros_like(factors))


def clip_per_sample(
    per_sample_grads: torch.Tensor, *, clip_norm: float, clipping: str = "flat"
) -> torch.Tensor:
    """Clip each row to global L2 norm ``clip_norm``.

    ``"flat"``: ``g * min(1, C / ||g||)`` (Abadi et al. 2016); rows inside the
    ball are unchanged. ``"automatic"``: ``C * g / (||g|| + gamma)`` (Bu et al.
    2022) with gamma = :data:`AUTOMATIC_CLIPPING_GAMMA`. Both bound every row's
    norm by ``clip_norm``: the sensitivity of the sum is ``clip_norm``. A row
    with a non-finite entry (NaN or inf, e.g. from a diverged loss) becomes zeros.

    Args:
        per_sample_grads: ``[B, d]``, one flattened gradient per row.
        clip_norm: C > 0.
        clipping: ``"flat"`` or ``"automatic"``.

    Returns:
        The clipped ``[B, d]`` tensor.

    Raises:
        ValueError: on a bad ``clip_norm``, ``clipping`` or shape.
    """
    _check_clip_norm(clip_norm)
    if per_sample_grads.ndim != 2:
        raise ValueError(f"per_sample_grads must be 2-D [B, d], got shape {tuple(per_sample_grads.shape)}")
    if clipping not in CLIPPING_MODES:
        raise ValueError(f"clipping must be one of {CLIPPING_MODES}, got {clipping!r}")
    norms = torch.linalg.vector_norm(per_sample_grads, dim=1)
    clipped = per_sample_grads * clip_factors(norms, clip_norm=clip_norm, clipping=clipping)[:, None]
    # A row with a NaN or inf entry would turn the whole sum into NaN and the
    # release into a deterministic all -1 vector: one example would then change
    # the output distribution without bound. Such a row contributes zeros, so
    # every row's norm stays <= clip_norm whatever the input.
    finite = torch.isfinite(clipped).all(dim=1, keepdim=True)
    return torch.where(finite, clipped, torch.zeros_like(clipped))


def noisy_clipped_sum(
    per_sample_grads: torch.Tensor,
    *,
    clip_norm: float,
    noise_multiplier: float,
    clipping: str = "flat",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Return ``sum_i clip(g_i) + N(0, (noise_multiplier * clip_norm)^2 I)``.

    The Gaussian mechanism on the clipped sum (sensitivity ``clip_norm`` under
    add/remove-one). ``noise_multiplier = 0`` adds no noise (not private).

    Raises:
        ValueError: on bad arguments.
    """
    _check_noise_multiplier(noise_multiplier)
    clipped = clip_per_sample(per_sample_grads, clip_norm=clip_norm, clipping=clipping)
    return noisy_sum(clipped.sum(dim=0), clip_norm=clip_norm, noise_multiplier=noise_multiplier, generator=generator)


def noisy_sum(
    total: torch.Tensor, *, clip_norm: float, noise_multiplier: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Return ``total + N(0, (noise_multiplier * clip_norm)^2 I)`` in float64: the Gaussian mechanism's noise.

    ``total`` is a sum of per-example contributions of norm <= ``clip_norm``
    (sensitivity ``clip_norm``). The noise is drawn and added in float64 (a
    float32 ``sigma * C`` can round to zero; module docstring), so the result
    is float64 whatever ``total``'s dtype. ``noise_multiplier = 0`` adds
    nothing (not private). Randomness: ``generator``, else the OS's secure source.

    Raises:
        ValueError: on a bad ``clip_norm`` or ``noise_multiplier``, or a noise
            scale ``noise_multiplier * clip_norm`` that is not a normal float64.
    """
    _check_noise_multiplier(noise_multiplier)
    _check_clip_norm(clip_norm)
    total = total.to(torch.float64)
    if noise_multiplier == 0:
        return total
    scale = float(noise_multiplier) * float(clip_norm)
    if not sys.float_info.min <= scale < float("inf"):
        raise ValueError(
            f"noise_multiplier * clip_norm must be a normal float64, got {noise_multiplier!r} * {clip_norm!r} = {scale!r}"
        )
    generator = generator if generator is not None else secure_generator(device=total.device)
    noise = standard_normal(total.numel(), generator=generator, device=total.device).reshape(total.shape)
    return noise.mul_(scale).add_(total)  # total + noise * scale, without two more temporaries


_BOX_MULLER_BLOCK = 16
"""Draws per block of :func:`standard_normal`'s CPU path: 8 radii and 8 angles from 16 uniforms."""


def standard_normal(count: int, *, generator: torch.Generator, device: str | torch.device = "cpu") -> torch.Tensor:
    """Return ``count`` independent N(0, 1) draws in float64: ``torch.randn``'s draws, computed faster on the CPU.

    On the CPU ``torch.randn`` in float64 draws the Box-Muller transform of
    float64 uniforms (k / 2^53), element by element. This draws the same
    uniforms from ``generator`` in the same order and applies the same
    transform to whole blocks with vectorised ``log``, ``sqrt``, ``cos`` and
    ``sin`` (in a release, 2.4 -> 1.6 ms for 136,545 draws; docs/performance.md): in each
    block of 16 uniforms, ``u_j`` and ``u_{j+8}`` (j < 8) give
    ``r = sqrt(-2 log(1 - u_j))`` and ``theta = 2 pi u_{j+8}``, then
    ``r cos(theta)`` at j and ``r sin(theta)`` at j + 8; when ``count`` is not
    a multiple of 16 the last 16 are drawn again from 16 fresh uniforms. Each
    draw equals ``torch.randn``'s up to the rounding of those functions (a few
    units in the last place) and the generator ends in the same state, so
    seeded runs make the same releases (a sign could differ only where the
    noisy sum lies within about 1e-15 of zero). Privacy needs a Gaussian draw
    in float64, not these exact numbers: ``1 - u >= 2^-53``, so the largest
    magnitude is ``sqrt(106 log 2) = 8.57``, as for ``torch.randn``. Fewer
    than 16 draws, and other devices, call ``torch.randn``.
    """
    device = torch.device(device)
    if device.type != "cpu" or count < _BOX_MULLER_BLOCK:
        return torch.randn(count, generator=generator, device=device, dtype=torch.float64)
    draws = torch.rand(count, generator=generator, dtype=torch.float64)
    whole = count - count % _BOX_MULLER_BLOCK
    _box_muller_(draws[:whole])
    if whole < count:  # the last block overlaps the one before it, as in torch.randn
        tail = torch.rand(_BOX_MULLER_BLOCK, generator=generator, dtype=torch.float64)
        draws[-_BOX_MULLER_BLOCK:] = _box_muller_(tail)
    return draws


def _box_muller_(uniforms: torch.Tensor) -> torch.Tensor:
    """Replace blocks of 16 ``uniforms`` (length a multiple of 16) by their Box-Muller transform, in place.

    Three temporaries of half the length (the radii, the angles, their sines); the results are written straight
    into ``uniforms``.
    """
    blocks = uniforms.view(-1, 2, _BOX_MULLER_BLOCK // 2)
    # Contiguous copies (not views, even where a view would pass as contiguous): the transform runs faster on them.
    radius = blocks[:, 0].clone(memory_format=torch.contiguous_format)
    radius.neg_().add_(1.0).log_().mul_(-2.0).sqrt_()  # 1 - u is exact and >= 2^-53
    angle = blocks[:, 1].clone(memory_format=torch.contiguous_format).mul_(2.0 * math.pi)
    torch.mul(torch.sin(angle), radius, out=blocks[:, 1])
    torch.mul(radius, angle.cos_(), out=blocks[:, 0])
    return uniforms


def dp_sign(
    per_sample_grads: torch.Tensor,
    *,
    clip_norm: float,
    noise_multiplier: float,
    clipping: str = "flat",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The DP-SIGN release: the sign of the noisy sum of clipped per-example gradients.

    Privacy: one Sampled Gaussian Mechanism release when the rows come from a
    Poisson-sampled batch (module docstring: neighbours, sensitivity ``clip_norm``,
    randomness). ``B = 0`` is valid and returns the sign of pure noise.

    Args:
        per_sample_grads: ``[B, d]`` per-example gradients (B may be 0).
        clip_norm: C > 0, the L2 bound on each example's whole gradient.
        noise_multiplier: sigma >= 0; the noise std is ``sigma * C``.
        clipping: ``"flat"`` or ``"automatic"`` (:func:`clip_per_sample`).
        generator: noise source; None = seeded from the OS's secure source.

    Returns:
        int8 tensor ``[d]`` of +-1. An exact zero maps to +1 (probability zero
        with noise; the convention keeps the release one bit per coordinate).

    Raises:
        ValueError: on bad arguments.
    """
    noisy = noisy_clipped_sum(
        per_sample_grads,
        clip_norm=clip_norm,
        noise_multiplier=noise_multiplier,
        clipping=clipping,
        generator=generator,
    )
    return to_signs(noisy)


def to_signs(values: torch.Tensor) -> torch.Tensor:
    """Return ``sign(values)`` as int8 +-1, with exact zeros mapped to +1."""
    return (values >= 0).to(torch.int8).mul_(2).sub_(1)


def _reject_batchnorm(model: nn.Module) -> None:
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training:
            raise ValueError(
                f"model has BatchNorm in training mode ({name or type(module).__name__}): it mixes "
                "examples within a batch, so per-example gradients and DP do not apply; "
                "use GroupNorm (nn.GroupNorm) or LayerNorm instead"
            )


def _check_clip_norm(clip_norm: float) -> None:
    if not clip_norm > 0 or clip_norm == float("inf"):
        raise ValueError(f"clip_norm must be a finite number > 0, got {clip_norm}")


def check_release_clip_norm(clip_norm: float) -> None:
    """Raise ValueError unless ``clip_norm`` is in [:data:`MIN_CLIP_NORM`, :data:`MAX_CLIP_NORM`] (a release's range)."""
    if isinstance(clip_norm, bool) or not isinstance(clip_norm, numbers.Real) or not MIN_CLIP_NORM <= clip_norm <= MAX_CLIP_NORM:
        raise ValueError(f"clip_norm must be in [{MIN_CLIP_NORM:g}, {MAX_CLIP_NORM:g}], got {clip_norm!r}")
