"""Models for the experiments, all fit for per-example gradients.

Every model works with ``torch.func.functional_call`` + ``vmap(grad)``
(:func:`dpsign_fl.release.mechanism.per_sample_gradients`): no BatchNorm (it mixes the
examples of a batch; GroupNorm normalises within one example) and no in-place
activations.

- ``logreg``: flatten, Linear(F, classes).
- ``mlp``: flatten, Linear(F, 64), tanh, Linear(64, classes).
- ``tanh-cnn``: the 28x28 CNN of Papernot et al. ("Tempered Sigmoid
  Activations for Deep Learning with Differential Privacy", arXiv:2007.14191),
  also used by Tramer & Boneh 2021 (arXiv:2011.11660): 26,010 parameters for
  10 classes.
- ``tanh-cnn-public-norm``: ``tanh-cnn`` with a :class:`PublicStatisticsNorm`
  after each convolution: per-channel means and variances computed once from
  a small PUBLIC set (:func:`fit_public_statistics`; which set:
  :func:`dpsign_fl.data.public_images`), frozen buffers, never computed from
  a private batch. No parameter is added: 26,010 parameters for 10 classes.
- ``cifar-cnn``: the CIFAR-10 CNN of the same papers (three blocks of two 3x3
  convolutions and a max-pool, 32/64/128 channels, then Linear(2048, 128),
  Linear(128, classes)), tanh; we add GroupNorm after every convolution
  (stable training without BatchNorm): 551,466 parameters for 10 classes.
- ``scatternet-linear`` and ``scatternet-cnn``: heads on wavelet-scattering
  features (:mod:`dpsign_fl.data.features`; inputs ``[81 k, h, w]``), as in
  Tramer & Boneh 2021. Both first normalise each example on its own
  (GroupNorm, :data:`SCATTER_GROUPS` groups, no learned scale: no parameter,
  no statistic of the training set). Linear: 39,700 parameters on MNIST.
  CNN: Conv(32, 3x3), tanh, max-pool 2, Conv(64, 3x3), tanh, Linear:
  47,626 parameters on MNIST.
- ``char-transformer``: next-character prediction on ``[B, T]`` character ids
  (inputs ``(T,)``; the vocabulary is ``num_classes``): a causal pre-norm
  transformer (GPT-2's block order, Radford et al. 2019) with learned
  positions. Each position also adds learned embeddings of the
  ``previous_characters`` characters before it (one table per offset, plus a
  "before the chunk" row): without them a small model trained by sign votes
  stalled near the bigram level. Width, depth and the number of previous
  characters are :func:`build_model` options (run-config keys
  ``model-width``, ``model-depth``, ``model-previous-characters``), one
  attention head per :data:`HEAD_WIDTH` channels. Returns logits
  ``[B, num_classes, T]``: classes on dim 1, as ``F.cross_entropy`` expects
  for a target per position, so the one loss of the project needs nothing
  special (its mean over all B * T positions is the mean of the per-example
  means). Defaults (width 64, depth 2, 3 previous characters): 136,545
  parameters for 97 symbols and T = 80; why: :mod:`dpsign_fl.model_sizes`.

  Every layer is an Embedding, LayerNorm or Linear that sees the batch on
  dim 0 (attention is two Linear layers around
  ``F.scaled_dot_product_attention``), so the layer pass of
  :mod:`dpsign_fl.release.clipped_sum` computes exact per-example gradients of it.

No LSTM (LEAF's ``char-lstm``, Caldas et al. 2018, arXiv:1812.01097): torch.func
runs ``nn.LSTM`` one example at a time, measured about 50x slower than a
non-private step at batch 50 (docs/performance.md).
"""

from __future__ import annotations

import functools
import math
import numbers

import torch
from torch import nn
from torch.nn import functional as F

from .model_sizes import HEAD_WIDTH, PREVIOUS_CHARACTERS, TRANSFORMER_DEPTH, TRANSFORMER_WIDTH

MODELS = ("logreg", "mlp", "tanh-cnn", "tanh-cnn-public-norm", "cifar-cnn", "scatternet-linear", "scatternet-cnn", "char-transformer")
SCATTER_GROUPS = 27  # GroupNorm groups over the scattering channels (81 per input channel)
MLP_HIDDEN_UNITS = 64
CIFAR_CNN_GROUPS = 8  # GroupNorm groups per convolution
TRANSFORMER_MLP_RATIO = 4

_DEFAULT_MODELS = {
    "digits": "mlp",
    "mnist": "tanh-cnn",
    "fashion-mnist": "tanh-cnn",
    "cifar10": "cifar-cnn",
    "mushroom": "logreg",
    "shakespeare": "char-transformer",
}


def build_model(
    name: str,
    *,
    input_shape: tuple[int, ...],
    num_classes: int,
    seed: int | None = None,
    width: int = TRANSFORMER_WIDTH,
    depth: int = TRANSFORMER_DEPTH,
    previous_characters: int = PREVIOUS_CHARACTERS,
) -> nn.Module:
    """Build a freshly initialised model.

    Initialisation is PyTorch's default for every layer (Linear and Conv2d:
    Kaiming-uniform weights with a = sqrt(5), uniform biases in +-1/sqrt(fan_in);
    GroupNorm and LayerNorm: ones and zeros; Embedding: standard normal).

    Args:
        name: one of ``MODELS``.
        input_shape: shape of one example, e.g. ``(1, 28, 28)``, ``(117,)``, or
            ``(T,)`` character ids for ``char-transformer``.
        num_classes: number of outputs, >= 2 (for ``char-transformer`` also
            the input vocabulary).
        seed: with a seed, the weights are drawn from a private
            ``torch.Generator`` seeded with it, the same values
            ``torch.manual_seed(seed)`` would give, and the global random state
            is neither read nor changed. None draws from the global generator.
        width: ``char-transformer`` only: channels, a multiple of :data:`HEAD_WIDTH`.
        depth: ``char-transformer`` only: transformer blocks, >= 1.
        previous_characters: ``char-transformer`` only: previous characters
            embedded at each position, >= 0. The other models have fixed
            sizes and ignore these three.

    Returns:
        The model, on the CPU, in training mode.

    Raises:
        ValueError: for an unknown name, a bad ``num_classes``, or an
            ``input_shape`` the model cannot take.
    """
    if name not in MODELS:
        raise ValueError(f"name must be one of {MODELS}, got {name!r}")
    input_shape = tuple(input_shape)
    if not input_shape or not all(_is_int(n) and n > 0 for n in input_shape):
        raise ValueError(f"input_shape must be a non-empty tuple of positive integers, got {input_shape!r}")
    if not _is_int(num_classes) or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    input_shape, num_classes = tuple(int(n) for n in input_shape), int(num_classes)
    builder = _BUILDERS[name]
    if name == "char-transformer":
        _check_transformer_size(width, depth, previous_characters)
        builder = functools.partial(
            _char_transformer, width=int(width), depth=int(depth), previous_characters=int(previous_characters)
        )
    if seed is None:
        return builder(input_shape, num_classes)
    # Built on the meta device, no random numbers are drawn; the weights are
    # then drawn from a local generator in construction order.
    with torch.device("meta"):
        model = builder(input_shape, num_classes)
    model = model.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(int(seed))
    with torch.no_grad():
        for module in model.modules():
            _reset_parameters(module, generator)
    return model


def default_model(dataset_name: str) -> str:
    """Return the model used for a dataset unless the user names another.

    Args:
        dataset_name: one of ``dpsign_fl.data.DATASETS``.

    Returns:
        One of ``MODELS``.

    Raises:
        ValueError: for an unknown dataset.
    """
    if dataset_name not in _DEFAULT_MODELS:
        raise ValueError(f"dataset_name must be one of {tuple(_DEFAULT_MODELS)}, got {dataset_name!r}")
    return _DEFAULT_MODELS[dataset_name]


def input_features(name: str) -> str:
    """What a model takes: ``"scattering"`` (the scatternet models) or ``"pixels"`` (the dataset's own inputs)."""
    return "scattering" if name.startswith("scatternet-") else "pixels"


def num_parameters(model: nn.Module) -> int:
    """Return d, the number of trainable parameter entries (the length of a release)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _logreg(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), num_classes))


def _mlp(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(math.prod(input_shape), MLP_HIDDEN_UNITS),
        nn.Tanh(),
        nn.Linear(MLP_HIDDEN_UNITS, num_classes),
    )


def _tanh_cnn(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    if len(input_shape) != 3 or input_shape[1:] != (28, 28):
        raise ValueError(f"input_shape must be (channels, 28, 28) for tanh-cnn, got {input_shape!r}")
    # 28 -conv8/2,pad2-> 13 -pool2/1-> 12 -conv4/2-> 5 -pool2/1-> 4
    return nn.Sequential(
        nn.Conv2d(input_shape[0], 16, kernel_size=8, stride=2, padding=2),
        nn.Tanh(),
        nn.MaxPool2d(kernel_size=2, stride=1),
        nn.Conv2d(16, 32, kernel_size=4, stride=2),
        nn.Tanh(),
        nn.MaxPool2d(kernel_size=2, stride=1),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 32),
        nn.Tanh(),
        nn.Linear(32, num_classes),
    )


class PublicStatisticsNorm(nn.Module):
    """``(x - mean) / sqrt(var + eps)`` per channel, with frozen statistics of a public set.

    The statistics are buffers, not parameters: no sign is released for them
    and the votes never move them. They are named ``running_mean`` and
    ``running_var`` as BatchNorm's, so that the model sync treats them as
    statistics that travel with the model (:data:`dpsign_fl.vote.model_sync.BATCHNORM_STATISTICS`).
    Unlike BatchNorm they never change in a forward pass, in any mode: each
    example is normalised on its own with fixed numbers, so per-example
    gradients and the sensitivity are as for a model without it.
    """

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def reset_statistics(self) -> None:
        """Mean 0 and variance 1 (the identity) until :func:`fit_public_statistics` sets them."""
        with torch.no_grad():
            self.running_mean.zero_()
            self.running_var.fill_(1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (x.ndim - 2)
        return (x - self.running_mean.view(shape)) / torch.sqrt(self.running_var.view(shape) + self.eps)


@torch.no_grad()
def fit_public_statistics(model: nn.Module, public_inputs: torch.Tensor) -> None:
    """Set every :class:`PublicStatisticsNorm` of ``model`` from a public set, in forward order.

    Each layer gets the per-channel mean and (biased) variance of its input
    over ``public_inputs``, with the layers before it already set. Called once,
    by the server, before round 1; the statistics then stay fixed.

    Privacy: ``public_inputs`` must be public data (never a client's): the
    statistics travel to every client with the model.

    Raises:
        ValueError: if ``public_inputs`` is empty or not finite.
    """
    if public_inputs.shape[0] == 0 or not bool(torch.isfinite(public_inputs).all()):
        raise ValueError(f"public_inputs must be a non-empty finite batch, got shape {list(public_inputs.shape)}")
    was_training = model.training
    model.eval()
    for layer in [m for m in model.modules() if isinstance(m, PublicStatisticsNorm)]:
        seen = []
        handle = layer.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
        try:
            model(public_inputs)
        finally:
            handle.remove()
        dims = [0] + list(range(2, seen[0].ndim))
        layer.running_mean.copy_(seen[0].mean(dim=dims))
        layer.running_var.copy_(seen[0].var(dim=dims, unbiased=False))
    model.train(was_training)


def uses_public_statistics(model: nn.Module) -> bool:
    """Whether ``model`` holds a :class:`PublicStatisticsNorm` (the server must fit it before round 1)."""
    return any(isinstance(m, PublicStatisticsNorm) for m in model.modules())


def _tanh_cnn_public_norm(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    plain = _tanh_cnn(input_shape, num_classes)
    layers = []
    for layer in plain:
        layers.append(layer)
        if isinstance(layer, nn.Conv2d):
            layers.append(PublicStatisticsNorm(layer.out_channels))
    return nn.Sequential(*layers)


def _cifar_cnn(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    if len(input_shape) != 3 or input_shape[1] % 8 or input_shape[2] % 8:
        raise ValueError(
            f"input_shape must be (channels, height, width) with height and width multiples of 8 for cifar-cnn, "
            f"got {input_shape!r}"
        )
    layers: list[nn.Module] = []
    in_channels = input_shape[0]
    for channels in (32, 64, 128):
        for _ in range(2):
            layers += [
                nn.Conv2d(in_channels, channels, kernel_size=3, padding=1),
                nn.GroupNorm(CIFAR_CNN_GROUPS, channels),
                nn.Tanh(),
            ]
            in_channels = channels
        layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
    flat = 128 * (input_shape[1] // 8) * (input_shape[2] // 8)
    layers += [nn.Flatten(), nn.Linear(flat, 128), nn.Tanh(), nn.Linear(128, num_classes)]
    return nn.Sequential(*layers)


def _scatter_input(input_shape: tuple[int, ...], name: str) -> None:
    if len(input_shape) != 3 or input_shape[0] % SCATTER_GROUPS:
        raise ValueError(
            f"input_shape must be ScatterNet features (channels, height, width) with channels a multiple of "
            f"{SCATTER_GROUPS} for {name}, got {input_shape!r}"
        )


def _scatternet_linear(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    _scatter_input(input_shape, "scatternet-linear")
    return nn.Sequential(
        nn.GroupNorm(SCATTER_GROUPS, input_shape[0], affine=False),
        nn.Flatten(),
        nn.Linear(math.prod(input_shape), num_classes),
    )


def _scatternet_cnn(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    _scatter_input(input_shape, "scatternet-cnn")
    if min(input_shape[1:]) < 2:
        raise ValueError(f"input_shape must be at least 2x2 for scatternet-cnn, got {input_shape!r}")
    pooled = (input_shape[1] // 2) * (input_shape[2] // 2)
    return nn.Sequential(
        nn.GroupNorm(SCATTER_GROUPS, input_shape[0], affine=False),
        nn.Conv2d(input_shape[0], 32, kernel_size=3, padding=1),
        nn.Tanh(),
        nn.MaxPool2d(kernel_size=2, stride=2),
        nn.Conv2d(32, 64, kernel_size=3, padding=1),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(64 * pooled, num_classes),
    )


class TransformerBlock(nn.Module):
    """Pre-norm transformer block: ``x + attention(norm(x))``, then ``x + mlp(norm(x))``.

    Attention is two ``nn.Linear`` layers (queries, keys and values in one, as
    GPT-2's ``c_attn``; the output projection) around
    ``F.scaled_dot_product_attention``, and the MLP is Linear, GELU, Linear:
    every layer with parameters sees the batch on dim 0, as the layer pass of
    :mod:`dpsign_fl.release.clipped_sum` requires. Inputs and outputs ``[B, T, width]``.

    Args:
        width: channels; a multiple of ``heads``.
        heads: attention heads.
        causal: whether position t attends to positions <= t only.
        mlp_ratio: hidden units of the MLP per channel.
    """

    def __init__(self, width: int, heads: int, *, causal: bool = False, mlp_ratio: int = TRANSFORMER_MLP_RATIO):
        super().__init__()
        if width % heads:
            raise ValueError(f"width must be a multiple of heads ({heads}), got {width}")
        self.heads, self.causal = heads, causal
        self.norm1 = nn.LayerNorm(width)
        self.qkv, self.out = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.up, self.down = nn.Linear(width, mlp_ratio * width), nn.Linear(mlp_ratio * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, steps, width = x.shape
        qkv = self.qkv(self.norm1(x)).reshape(batch, steps, 3, self.heads, width // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, heads, T, head width]
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        x = x + self.out(attended.transpose(1, 2).reshape(batch, steps, width))
        return x + self.down(F.gelu(self.up(self.norm2(x))))


class CharTransformer(nn.Module):
    """``char-transformer``: character ids ``[B, T]`` -> next-character logits ``[B, vocab_size, T]``.

    The input at position t is the sum of the embeddings of character t, of
    position t, and of characters t-1, ..., t-``previous_characters`` (one
    table per offset, each with an extra row for "before the chunk"); then
    causal pre-norm blocks, a final LayerNorm and a Linear head. Every
    Embedding sees ids ``[B, ...]``: positions are expanded over the batch.

    Args:
        vocab_size: symbols in and out.
        seq_len: longest sequence (the learned positions).
        width, depth, heads: channels, blocks, attention heads.
        previous_characters: previous characters embedded at each position.
    """

    def __init__(self, vocab_size: int, seq_len: int, *, width: int, depth: int, heads: int, previous_characters: int):
        super().__init__()
        self.vocab_size, self.previous_characters = vocab_size, previous_characters
        self.tokens = nn.Embedding(vocab_size, width)
        # One Embedding for all offsets (rows k * (vocab_size + 1) + id): one layer call in the layer pass.
        self.previous = nn.Embedding(previous_characters * (vocab_size + 1), width) if previous_characters else None
        self.positions = nn.Embedding(seq_len, width)
        self.blocks = nn.Sequential(*(TransformerBlock(width, heads, causal=True) for _ in range(depth)))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab_size)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        batch, steps = ids.shape
        x = self.tokens(ids) + self.positions(torch.arange(steps, device=ids.device).expand(batch, -1))
        if self.previous is not None:
            x = x + self.previous(self.previous_ids(ids)).sum(2)
        x = self.head(self.norm(self.blocks(x)))
        return x.transpose(1, 2)  # classes on dim 1, as F.cross_entropy takes a target per position

    def previous_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows of :attr:`previous` for every position and offset, ``[B, T, previous_characters]``.

        Offset k (1-based) reads character t - k, or the extra row
        ``vocab_size`` where t - k falls before the chunk.
        """
        steps, rows = ids.shape[1], self.vocab_size + 1
        shifted = [
            F.pad(ids, (k, 0), value=self.vocab_size)[:, :steps] + (k - 1) * rows
            for k in range(1, self.previous_characters + 1)
        ]
        return torch.stack(shifted, dim=2)


def _check_transformer_size(width, depth, previous_characters) -> None:
    if not _is_int(width) or width < HEAD_WIDTH or width % HEAD_WIDTH:
        raise ValueError(f"width must be a positive multiple of {HEAD_WIDTH}, got {width!r}")
    if not _is_int(depth) or depth < 1:
        raise ValueError(f"depth must be an integer >= 1, got {depth!r}")
    if not _is_int(previous_characters) or previous_characters < 0:
        raise ValueError(f"previous_characters must be an integer >= 0, got {previous_characters!r}")


def _char_transformer(
    input_shape: tuple[int, ...], num_classes: int, *, width: int, depth: int, previous_characters: int
) -> nn.Module:
    if len(input_shape) != 1:
        raise ValueError(f"input_shape must be (sequence length,) for char-transformer, got {input_shape!r}")
    return CharTransformer(
        num_classes, input_shape[0], width=width, depth=depth, heads=width // HEAD_WIDTH,
        previous_characters=previous_characters,
    )


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


_BUILDERS = {
    "logreg": _logreg, "mlp": _mlp, "tanh-cnn": _tanh_cnn, "tanh-cnn-public-norm": _tanh_cnn_public_norm,
    "cifar-cnn": _cifar_cnn,
    "scatternet-linear": _scatternet_linear, "scatternet-cnn": _scatternet_cnn, "char-transformer": _char_transformer,
}


def _reset_parameters(module: nn.Module, generator: torch.Generator) -> None:
    """PyTorch's default initialisation of one layer, drawn from ``generator``."""
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        # As nn.Linear/_ConvNd.reset_parameters (torch 2.x), with the generator.
        nn.init.kaiming_uniform_(module.weight, a=math.sqrt(5), generator=generator)
        if module.bias is not None:
            fan_in = module.weight[0].numel()
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
            nn.init.uniform_(module.bias, -bound, bound, generator=generator)
    elif isinstance(module, (nn.GroupNorm, nn.LayerNorm)):
        module.reset_parameters()  # deterministic: ones and zeros
    elif isinstance(module, PublicStatisticsNorm):
        module.reset_statistics()
    elif isinstance(module, nn.Embedding):
        # As nn.Embedding.reset_parameters.
        nn.init.normal_(module.weight, generator=generator)
        if module.padding_idx is not None:
            module.weight[module.padding_idx].zero_()
    elif any(True for _ in module.parameters(recurse=False)):
        raise TypeError(f"no seeded initialisation for {type(module).__name__}")
