"""Tests of dpsign_fl.release.clipped_sum: the sum of per-example clipped gradients.

Golden values come from a one-example-at-a-time loop (one forward and one
``torch.autograd.grad`` per example, clip, sum), written here independently of
dpsign_fl.release.mechanism. Models run in float64 so that agreement is checked far
below float32 rounding (rtol 1e-9); one test repeats it in float32. Negative
controls (clip each tensor separately, clip the batch mean, a pass that misses
a parameter use) must be told apart by the same comparisons.
"""

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from dpsign_fl.release import clipped_sum, layer_rules
from dpsign_fl.release.clipped_sum import SUPPORTED_LAYERS, clipped_gradient_sum
from dpsign_fl.release.layer_rules import embedding_form
from dpsign_fl.release.mechanism import AUTOMATIC_CLIPPING_GAMMA, clip_factors, clip_per_sample
from dpsign_fl.models import MODELS, build_model

METHODS = ("vmap", "layers")
TIGHT = dict(rtol=1e-9, atol=1e-12)  # float64



pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---------------------------------------------------------------- reference and helpers


def one_at_a_time_clipped_sum(model, loss_fn, inputs, targets, *, clip_norm, clipping="flat"):
    """Reference: per example, autograd.grad of loss_fn on a batch of one; clip by one global norm; sum."""
    return clip_and_sum(model, one_at_a_time_gradients(model, loss_fn, inputs, targets), clip_norm, clipping)


def clip_and_sum(model, rows, clip_norm, clipping="flat"):
    params = [p for p in model.parameters() if p.requires_grad]
    total = torch.zeros(sum(p.numel() for p in params), dtype=params[0].dtype)
    for grad in rows:
        norm = float(torch.linalg.vector_norm(grad))
        if not torch.isfinite(grad).all() or not math.isfinite(norm):
            continue  # a non-finite example contributes nothing
        if clipping == "flat":
            factor = 1.0 if norm <= clip_norm else clip_norm / norm
        else:
            factor = clip_norm / (norm + AUTOMATIC_CLIPPING_GAMMA)
        total += factor * grad
    return total


def one_at_a_time_gradients(model, loss_fn, inputs, targets):
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for i in range(inputs.shape[0]):
        loss = loss_fn(model(inputs[i : i + 1]), targets[i : i + 1])
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        rows.append(torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(params, grads)]))
    return rows


class Block(nn.Module):
    """Pre-norm transformer block: attention from four Linear layers, LayerNorm, MLP."""

    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.query, self.key, self.value, self.out = (nn.Linear(width, width) for _ in range(4))
        self.up, self.down = nn.Linear(width, 2 * width), nn.Linear(2 * width, width)

    def forward(self, x):
        batch, steps, width = x.shape
        h = self.norm1(x)
        q, k, v = (
            layer(h).reshape(batch, steps, self.heads, -1).transpose(1, 2)
            for layer in (self.query, self.key, self.value)
        )
        attention = torch.softmax(q @ k.mT / math.sqrt(width // self.heads), dim=-1)
        x = x + self.out((attention @ v).transpose(1, 2).reshape(batch, steps, width))
        return x + self.down(torch.tanh(self.up(self.norm2(x))))


class TinyTransformer(nn.Module):
    """Tokens [B, T] -> Embedding + positions -> 2 blocks -> LayerNorm -> per-token logits [B, T, vocab]."""

    def __init__(self, vocab=23, width=12, heads=3, steps=6):
        super().__init__()
        self.tokens, self.positions = nn.Embedding(vocab, width, padding_idx=0), nn.Embedding(steps, width)
        self.blocks = nn.Sequential(Block(width, heads), Block(width, heads))
        self.norm, self.head = nn.LayerNorm(width), nn.Linear(width, vocab)

    def forward(self, ids):
        positions = torch.arange(ids.shape[1]).expand(ids.shape[0], -1)
        return self.head(self.norm(self.blocks(self.tokens(ids) + self.positions(positions))))


def token_loss(outputs, targets):
    """Mean over the batch of each sequence's mean token loss (all sequences have the same length)."""
    return F.cross_entropy(outputs.flatten(0, 1), targets.flatten())


# cifar-cnn at 16x16 in float64 (CPU convolutions in float64 are ~10x slower than in
# float32): the same layers, a smaller first Linear; 32x32 is checked in float32.
INPUT_SHAPES = {
    "logreg": (2, 5, 5), "mlp": (13,), "tanh-cnn": (1, 28, 28), "tanh-cnn-public-norm": (1, 28, 28), "cifar-cnn": (3, 16, 16),
    "scatternet-linear": (81, 3, 3), "scatternet-cnn": (81, 4, 4), "char-transformer": (6,),
}
FULL_SIZE = {"tanh-cnn": (1, 28, 28), "cifar-cnn": (3, 32, 32)}
SEQUENCE_MODELS = ("char-transformer",)


def project_model(name, batch_size, dtype=torch.float64, seed=0, input_shape=None, num_classes=10):
    """A project model and a batch: images or features with a class each, or character ids with a target per position.

    The loss is F.cross_entropy for every model: sequence models put the
    classes on dim 1 (``[B, classes, T]``), so its mean over all positions is
    the mean of the per-example means.
    """
    input_shape = input_shape or INPUT_SHAPES[name]
    model = build_model(name, input_shape=input_shape, num_classes=num_classes, seed=seed).to(dtype)
    generator = torch.Generator().manual_seed(seed + 1)
    if name in SEQUENCE_MODELS:
        inputs = torch.randint(0, num_classes, (batch_size, *input_shape), generator=generator)
        targets = torch.randint(0, num_classes, (batch_size, *input_shape), generator=generator)
    else:
        inputs = torch.randn(batch_size, *input_shape, generator=generator, dtype=dtype)
        targets = torch.randint(0, num_classes, (batch_size,), generator=generator)
    return model, F.cross_entropy, inputs, targets


def transformer_case(batch_size, seed=0):
    torch.manual_seed(seed)
    model = TinyTransformer().double()
    generator = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(0, 23, (batch_size, 6), generator=generator)  # id 0 is padding
    return model, token_loss, ids, torch.randint(0, 23, (batch_size, 6), generator=generator)


def clip_norms_for(model, loss_fn, inputs, targets, rows=None):
    """(small, large): most examples clipped at the small one, none at the large one."""
    rows = one_at_a_time_gradients(model, loss_fn, inputs, targets) if rows is None else rows
    norms = torch.stack([torch.linalg.vector_norm(g) for g in rows])
    small, large = 0.5 * float(norms.median()), 2.0 * float(norms.max())
    assert float((norms > small).double().mean()) > 0.5 and bool((norms < large).all())
    return small, large


def model_state(model):
    return (
        [p.detach().clone() for p in model.parameters()],
        [p.requires_grad for p in model.parameters()],
        [None if p.grad is None else p.grad.clone() for p in model.parameters()],
    )


def assert_model_unchanged(model, state):
    values, flags, grads = state
    for p, value, flag, grad in zip(model.parameters(), values, flags, grads):
        assert torch.equal(p.detach(), value)
        assert p.requires_grad == flag
        assert (p.grad is None) if grad is None else torch.equal(p.grad, grad)
    for module in model.modules():
        hooks = (module._forward_hooks, module._forward_pre_hooks, module._backward_hooks, module._backward_pre_hooks)
        assert all(len(h) == 0 for h in hooks)


# ---------------------------------------------------------------- agreement with the reference


@pytest.mark.parametrize("batch_size", [0, 1, 7, 64])
@pytest.mark.parametrize("name", MODELS)
def test_clipped_sum_equals_one_example_at_a_time_for_project_models(name, batch_size):
    model, loss_fn, inputs, targets = project_model(name, batch_size)
    assert_every_method_clips_as_one_at_a_time(model, loss_fn, inputs, targets)


@pytest.mark.parametrize("batch_size", [1, 7, 64])
def test_clipped_sum_equals_one_example_at_a_time_for_a_transformer(batch_size):
    assert_every_method_clips_as_one_at_a_time(*transformer_case(batch_size))


def assert_every_method_clips_as_one_at_a_time(model, loss_fn, inputs, targets):
    """Both clipping modes, at a clip norm that clips most examples and one that clips none (tiny and huge for B <= 1)."""
    rows = one_at_a_time_gradients(model, loss_fn, inputs, targets)
    regimes = clip_norms_for(model, loss_fn, inputs, targets, rows) if inputs.shape[0] > 1 else (1e-3, 1e3)
    for clipping in ("flat", "automatic"):
        for clip_norm in regimes:
            expected = clip_and_sum(model, rows, clip_norm, clipping)
            for method in METHODS:
                actual = clipped_gradient_sum(
                    model, loss_fn, inputs, targets, clip_norm=clip_norm, clipping=clipping, method=method
                )
                assert actual.shape == expected.shape and actual.dtype == torch.float64
                torch.testing.assert_close(actual, expected, **TIGHT, msg=f"{method} {clipping} C={clip_norm}")


@pytest.mark.parametrize("name", ["tanh-cnn", "cifar-cnn"])
def test_float32_clipped_sum_matches_reference_to_float_tolerance(name):
    model, loss_fn, inputs, targets = project_model(name, 64, dtype=torch.float32, input_shape=FULL_SIZE[name])
    rows = one_at_a_time_gradients(model, loss_fn, inputs, targets)
    small, _ = clip_norms_for(model, loss_fn, inputs, targets, rows)
    expected = clip_and_sum(model, rows, small)
    for method in METHODS:
        actual = clipped_gradient_sum(model, loss_fn, inputs, targets, clip_norm=small, method=method)
        assert actual.dtype == torch.float32
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)


def test_char_transformer_at_full_size_matches_reference_in_float32():
    # 80 positions, 97 symbols, the default width, depth and previous characters: the sizes at which
    # the layer pass picks its per-layer forms (embedding tables, materialised Linear gradients).
    model, loss_fn, inputs, targets = project_model(
        "char-transformer", 12, dtype=torch.float32, input_shape=(80,), num_classes=97
    )
    rows = one_at_a_time_gradients(model, loss_fn, inputs, targets)
    small, _ = clip_norms_for(model, loss_fn, inputs, targets, rows)
    expected = clip_and_sum(model, rows, small)
    for method in METHODS:
        actual = clipped_gradient_sum(model, loss_fn, inputs, targets, clip_norm=small, method=method)
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-6)


def test_auto_takes_the_layer_pass_for_char_transformer(monkeypatch):
    model, loss_fn, inputs, targets = project_model("char-transformer", 5)
    expected = one_at_a_time_clipped_sum(model, loss_fn, inputs, targets, clip_norm=0.1)

    def no_vmap(*args):
        raise AssertionError("auto fell back to vmap")

    monkeypatch.setattr(clipped_sum, "_vmap_pass", no_vmap)
    actual = clipped_gradient_sum(model, loss_fn, inputs, targets, clip_norm=0.1, method="auto")

    torch.testing.assert_close(actual, expected, **TIGHT)


class EmbeddingBag(nn.Module):
    """Ids [B, S] -> Embedding (row 0: padding) -> tanh -> flatten -> Linear: one embedding on its own."""

    def __init__(self, rows, steps):
        super().__init__()
        self.embed, self.head = nn.Embedding(rows, 4, padding_idx=0), nn.Linear(steps * 4, 3)

    def forward(self, ids):
        return self.head(torch.tanh(self.embed(ids)).flatten(1))


@pytest.mark.parametrize("keep_bytes", [0, 2**40])
@pytest.mark.parametrize(
    ("rows", "steps", "form"),
    [(5, 6, "table"), (72, 6, "table"), (73, 6, "ghost"), (50, 3, "ghost")],  # table while rows <= 2 steps^2
)
def test_embedding_norms_by_table_and_by_ghost_equal_one_example_at_a_time(monkeypatch, rows, steps, form, keep_bytes):
    monkeypatch.setattr(clipped_sum, "KEEP_BYTES", keep_bytes)  # the tables kept for the total, or not
    torch.manual_seed(6)
    model = EmbeddingBag(rows, steps).double()
    generator = torch.Generator().manual_seed(7)
    ids = torch.randint(0, min(rows, 4), (9, steps), generator=generator)  # few distinct ids: repeats and padding
    targets = torch.randint(0, 3, (9,), generator=generator)
    small, _ = clip_norms_for(model, F.cross_entropy, ids, targets)
    expected = one_at_a_time_clipped_sum(model, F.cross_entropy, ids, targets, clip_norm=small)

    actual = clipped_gradient_sum(model, F.cross_entropy, ids, targets, clip_norm=small, method="layers")

    assert embedding_form(rows, steps) == form
    torch.testing.assert_close(actual, expected, **TIGHT)


def layer_zoo():
    """One small model per path of the layer pass (named after the path it takes)."""
    torch.manual_seed(3)
    image = (2, 7, 7)
    cases = {
        "linear-sequence-ghost": (nn.Sequential(nn.Linear(5, 9), nn.Tanh(), nn.Linear(9, 3)), (2, 5)),
        "linear-sequence-materialised": (nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 3)), (6, 2)),
        "conv-grouped-and-frozen-bias": (nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.Tanh()), image),
        "conv-patches-depthwise-strided": (nn.Sequential(nn.Conv2d(2, 4, 3, stride=2, groups=2), nn.Tanh()), image),
        "conv-ghost-dilated": (nn.Sequential(nn.Conv2d(2, 16, 3, dilation=2, padding="valid"), nn.Tanh()), image),
        "conv1d-and-groupnorm": (nn.Sequential(nn.Conv1d(2, 4, 3, stride=2), nn.GroupNorm(2, 4), nn.Tanh()), (2, 9)),
        "groupnorm-without-spatial": (nn.Sequential(nn.Linear(4, 6), nn.GroupNorm(3, 6), nn.Tanh()), (4,)),
        "layernorm-two-dims-and-rmsnorm": (nn.Sequential(nn.LayerNorm((3, 4)), nn.RMSNorm(4), nn.Tanh()), (2, 3, 4)),
    }
    cases["conv-grouped-and-frozen-bias"][0][0].bias.requires_grad_(False)
    return cases


@pytest.mark.parametrize("case", sorted(layer_zoo()))
def test_each_layer_path_equals_one_example_at_a_time(case):
    body, shape = layer_zoo()[case]
    model = nn.Sequential(body, nn.Flatten(), nn.LazyLinear(3)).double()
    generator = torch.Generator().manual_seed(4)
    inputs = torch.randn(9, *shape, generator=generator, dtype=torch.float64)
    model(inputs)  # materialise the lazy head
    targets = torch.randint(0, 3, (9,), generator=generator)
    small, _ = clip_norms_for(model, F.cross_entropy, inputs, targets)

    expected = one_at_a_time_clipped_sum(model, F.cross_entropy, inputs, targets, clip_norm=small)
    actual = clipped_gradient_sum(model, F.cross_entropy, inputs, targets, clip_norm=small, method="layers")

    torch.testing.assert_close(actual, expected, **TIGHT)


@pytest.mark.parametrize(
    ("weights", "normalised_again"), [("usual", 0), ("a-zero-weight", 3), ("a-tiny-weight", 3), ("a-large-bias", 2)]
)
def test_normalisation_layers_read_x_hat_off_their_output_where_the_weight_allows(monkeypatch, weights, normalised_again):
    """x_hat = (y - bias) / weight unless a weight is 0 or tiny, or |bias / weight| > AFFINE_FROM_OUTPUT_MAX_RATIO (RMSNorm: no bias)."""
    torch.manual_seed(12)
    norms = [nn.GroupNorm(2, 4), nn.LayerNorm(5), nn.RMSNorm(5)]
    model = nn.Sequential(*norms, nn.Tanh(), nn.Flatten(), nn.Linear(20, 3)).double()
    with torch.no_grad():
        for norm in norms:
            norm.weight.copy_(torch.empty_like(norm.weight).uniform_(0.5, 2.0) * torch.randn_like(norm.weight).sign())
            if getattr(norm, "bias", None) is not None:
                norm.bias.uniform_(-1.0, 1.0)
                if weights == "a-large-bias":
                    norm.bias[0] = (layer_rules.AFFINE_FROM_OUTPUT_MAX_RATIO + 1) * norm.weight[0].abs()
            if weights in ("a-zero-weight", "a-tiny-weight"):
                norm.weight[1] = 0.0 if weights == "a-zero-weight" else 1e-200  # below sqrt(float64's tiny)
    calls = []
    normalized = layer_rules._normalized
    monkeypatch.setattr(layer_rules, "_normalized", lambda module, a: calls.append(module) or normalized(module, a))
    generator = torch.Generator().manual_seed(13)
    inputs = torch.randn(9, 4, 5, generator=generator, dtype=torch.float64) * 3 + 1
    targets = torch.randint(0, 3, (9,), generator=generator)
    small, _ = clip_norms_for(model, F.cross_entropy, inputs, targets)
    expected = one_at_a_time_clipped_sum(model, F.cross_entropy, inputs, targets, clip_norm=small)

    actual = clipped_gradient_sum(model, F.cross_entropy, inputs, targets, clip_norm=small, method="layers")

    torch.testing.assert_close(actual, expected, **TIGHT)
    assert len(calls) == normalised_again


@pytest.mark.parametrize("keep_bytes", [0, 2**40])
@pytest.mark.parametrize("chunk_size", [None, 1, 5])
def test_chunking_and_keeping_per_example_gradients_do_not_change_the_sum(monkeypatch, chunk_size, keep_bytes):
    monkeypatch.setattr(clipped_sum, "KEEP_BYTES", keep_bytes)
    model, loss_fn, inputs, targets = project_model("cifar-cnn", 11)
    expected = one_at_a_time_clipped_sum(model, loss_fn, inputs, targets, clip_norm=0.05)
    for method in METHODS:
        actual = clipped_gradient_sum(
            model, loss_fn, inputs, targets, clip_norm=0.05, method=method, chunk_size=chunk_size
        )
        torch.testing.assert_close(actual, expected, **TIGHT)


# ---------------------------------------------------------------- memory: the workspace and the backward


def full_size_char_transformer(batch_size):
    """char-transformer at 80 positions and 97 symbols: its Linear gradients and embedding tables are kept."""
    return project_model("char-transformer", batch_size, input_shape=(80,), num_classes=97)


def test_the_workspace_is_reused_and_its_stale_contents_never_reach_the_sum():
    layer_rules.free_workspace()
    model, loss_fn, inputs, targets = full_size_char_transformer(5)
    clipped_gradient_sum(model, loss_fn, inputs, targets, clip_norm=0.1, method="layers")
    buffer = layer_rules._WORKSPACE.buffer
    assert buffer is not None and buffer.numel() > 0
    buffer.fill_(255)  # every byte 0xFF: NaN in float32 and float64, wherever a rule read without writing first
    expected = one_at_a_time_clipped_sum(model, loss_fn, inputs[:4], targets[:4], clip_norm=0.1)

    actual = clipped_gradient_sum(model, loss_fn, inputs[:4], targets[:4], clip_norm=0.1, method="layers")

    torch.testing.assert_close(actual, expected, **TIGHT)
    assert layer_rules._WORKSPACE.buffer is buffer  # a smaller batch fits: the same memory, not a new allocation
    assert bool((buffer != 255).any())


def test_a_pass_inside_another_pass_leaves_the_workspace_alone():
    model, loss_fn, inputs, targets = full_size_char_transformer(3)
    clipped_gradient_sum(model, loss_fn, inputs, targets, clip_norm=0.1, method="layers")
    buffer = layer_rules._WORKSPACE.buffer
    buffer.fill_(255)
    expected = one_at_a_time_clipped_sum(model, loss_fn, inputs, targets, clip_norm=0.1)

    with layer_rules.Keeper({}):  # an outer pass holds the workspace
        actual = clipped_gradient_sum(model, loss_fn, inputs, targets, clip_norm=0.1, method="layers")
    assert bool((buffer == 255).all())
    torch.testing.assert_close(actual, expected, **TIGHT)
    clipped_gradient_sum(model, loss_fn, inputs, targets, clip_norm=0.1, method="layers")
    assert not bool((buffer == 255).all())  # control: a pass of its own writes there


@pytest.mark.parametrize("keep_bytes", [0, 2**40])
def test_each_layer_drops_its_input_and_output_gradient_where_its_cache_suffices(monkeypatch, keep_bytes):
    monkeypatch.setattr(clipped_sum, "KEEP_BYTES", keep_bytes)
    model, loss_fn, inputs, targets = full_size_char_transformer(2)
    seen = []
    original = clipped_sum._norms_during_backward
    monkeypatch.setattr(
        clipped_sum, "_norms_during_backward", lambda *args: seen.extend(original(*args)) or list(seen)
    )

    clipped_gradient_sum(model, loss_fn, inputs, targets, clip_norm=0.1, method="layers")

    held = {type(module).__name__ for module, _, _, _, a, g in seen if a is not None or g is not None}
    assert len(seen) == sum(1 for m in model.modules() if type(m) in SUPPORTED_LAYERS)
    assert held == (set() if keep_bytes else {"Linear"})  # with nothing kept the Linear totals need a and g


class Branches(nn.Module):
    """first -> h; out = second(h.detach()) + third(h): second's gradient reaches no other layer."""

    def __init__(self):
        super().__init__()
        self.first, self.second, self.third = nn.Linear(4, 5), nn.Linear(5, 3), nn.Linear(5, 3)

    def forward(self, x):
        h = torch.tanh(self.first(x))
        return self.second(h.detach()) + self.third(h)


def test_the_graph_walk_asks_autograd_only_for_the_first_layers_and_every_layer_still_counts():
    torch.manual_seed(3)
    model = Branches().double()
    inputs, targets = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    _, loss, kept = clipped_sum._forward(model, F.cross_entropy, inputs, targets)
    _, first = clipped_sum._walk_graph(loss, [out for _, _, out in kept])
    expected = one_at_a_time_clipped_sum(model, F.cross_entropy, inputs, targets, clip_norm=0.05)

    actual = clipped_gradient_sum(model, F.cross_entropy, inputs, targets, clip_norm=0.05, method="layers")

    assert {module: flag for (module, _, _), flag in zip(kept, first)} == {
        model.first: True, model.second: True, model.third: False,
    }
    torch.testing.assert_close(actual, expected, **TIGHT)


class NoGradient(torch.autograd.Function):
    """Doubles its input; its backward returns None (an undefined gradient, not zeros)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return 2 * x

    @staticmethod
    def setup_context(ctx, inputs, output):  # the torch.func-ready form, for auto's vmap fallback
        pass

    @staticmethod
    def backward(ctx, g):
        return None


class Cut(nn.Module):
    """first -> second -> NoGradient -> third: second's output (hooked, first lies below it) gets no gradient."""

    def __init__(self):
        super().__init__()
        self.first, self.second, self.third = nn.Linear(4, 5), nn.Linear(5, 5), nn.Linear(5, 3)

    def forward(self, x):
        return self.third(NoGradient.apply(self.second(torch.tanh(self.first(x)))))


def test_a_layer_whose_output_gradient_is_undefined_is_not_reached_and_auto_falls_back():
    torch.manual_seed(5)
    model = Cut().double()
    inputs, targets = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    expected = one_at_a_time_clipped_sum(model, F.cross_entropy, inputs, targets, clip_norm=0.05)

    actual = clipped_gradient_sum(model, F.cross_entropy, inputs, targets, clip_norm=0.05, method="auto")

    torch.testing.assert_close(actual, expected, **TIGHT)
    with pytest.raises(ValueError, match="reaches the loss 1 times, expected 0"):
        clipped_gradient_sum(model, F.cross_entropy, inputs, targets, clip_norm=0.05, method="layers")


def test_a_graph_deeper_than_the_recursion_limit_is_walked():
    torch.manual_seed(4)
    layers = [module for _ in range(400) for module in (nn.Linear(2, 2), nn.Tanh())]  # ~1,600 graph nodes deep
    model = nn.Sequential(*layers).double()
    inputs, targets = torch.randn(3, 2, dtype=torch.float64), torch.randint(0, 2, (3,))
    expected = one_at_a_time_clipped_sum(model, F.cross_entropy, inputs, targets, clip_norm=1e-3)

    actual = clipped_gradient_sum(model, F.cross_entropy, inputs, targets, clip_norm=1e-3, method="layers")

    torch.testing.assert_close(actual, expected, **TIGHT)


# ---------------------------------------------------------------- non-finite examples


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("poison", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_example_contributes_exactly_zero_and_the_rest_stay_correct(method, poison):
    model, loss_fn, inputs, targets = project_model("tanh-cnn", 7)
    bad = inputs.clone()
    bad[3, 0, 10, 10] = poison
    keep = [0, 1, 2, 4, 5, 6]

    actual = clipped_gradient_sum(model, loss_fn, bad, targets, clip_norm=0.1, method=method)
    without = clipped_gradient_sum(model, loss_fn, inputs[keep], targets[keep], clip_norm=0.1, method=method)

    assert torch.isfinite(actual).all()
    torch.testing.assert_close(actual, without, **TIGHT)
    torch.testing.assert_close(
        actual, one_at_a_time_clipped_sum(model, loss_fn, bad, targets, clip_norm=0.1), **TIGHT
    )


def test_clip_factors_are_zero_for_non_finite_norms():
    norms = torch.tensor([0.0, 0.5, 4.0, float("nan"), float("inf")])

    flat = clip_factors(norms, clip_norm=1.0, clipping="flat")
    automatic = clip_factors(norms, clip_norm=1.0, clipping="automatic")

    torch.testing.assert_close(flat, torch.tensor([1.0, 1.0, 0.25, 0.0, 0.0]))
    gamma = AUTOMATIC_CLIPPING_GAMMA
    torch.testing.assert_close(automatic, torch.tensor([1 / gamma, 1 / (0.5 + gamma), 1 / (4 + gamma), 0.0, 0.0]))


# ---------------------------------------------------------------- sensitivity and negative controls


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("clipping", ["flat", "automatic"])
def test_adding_one_example_moves_the_sum_by_at_most_clip_norm(method, clipping):
    model, loss_fn, inputs, targets = project_model("cifar-cnn", 8)
    clip_norm = 0.01  # far below every example's norm: every example is clipped
    for extra in range(8):
        keep = [i for i in range(8) if i != extra]
        with_all = clipped_gradient_sum(
            model, loss_fn, inputs, targets, clip_norm=clip_norm, clipping=clipping, method=method
        )
        without = clipped_gradient_sum(
            model, loss_fn, inputs[keep], targets[keep], clip_norm=clip_norm, clipping=clipping, method=method
        )
        shift = float(torch.linalg.vector_norm(with_all - without))
        assert shift <= clip_norm * (1 + 1e-9)
        assert shift > 0.9 * clip_norm  # the example is clipped to (almost) exactly C, not dropped


def clip_each_tensor_then_sum(model, loss_fn, inputs, targets, clip_norm):
    """NOT sensitivity C: every parameter tensor of every example clipped to C on its own."""
    sizes = [p.numel() for p in model.parameters()]
    total = 0
    for grad in one_at_a_time_gradients(model, loss_fn, inputs, targets):
        pieces = [piece * min(1.0, clip_norm / float(torch.linalg.vector_norm(piece))) for piece in grad.split(sizes)]
        total = total + torch.cat(pieces)
    return total


def clip_batch_mean(model, loss_fn, inputs, targets, clip_norm):
    """NOT sensitivity C (it is 2C): the batch-mean gradient clipped to C."""
    mean = torch.stack(one_at_a_time_gradients(model, loss_fn, inputs, targets)).mean(0)
    return mean * min(1.0, clip_norm / float(torch.linalg.vector_norm(mean)))


@pytest.mark.parametrize("control", [clip_each_tensor_then_sum, clip_batch_mean])
def test_negative_controls_per_tensor_or_mean_clipping_are_detected(control):
    model, loss_fn, inputs, targets = project_model("mlp", 7)
    small, _ = clip_norms_for(model, loss_fn, inputs, targets)
    expected = one_at_a_time_clipped_sum(model, loss_fn, inputs, targets, clip_norm=small)
    wrong = control(model, loss_fn, inputs, targets, small)

    for method in METHODS:
        actual = clipped_gradient_sum(model, loss_fn, inputs, targets, clip_norm=small, method=method)
        torch.testing.assert_close(actual, expected, **TIGHT)
        with pytest.raises(AssertionError):
            torch.testing.assert_close(actual, wrong, rtol=1e-3, atol=1e-6)


# ---------------------------------------------------------------- models the layer pass must not take


class FunctionallyTied(nn.Module):
    """Input embedding reused as the output layer through F.linear (a use outside its own forward)."""

    def __init__(self):
        super().__init__()
        self.embed, self.mix = nn.Embedding(11, 5), nn.Linear(5, 5)

    def forward(self, ids):
        return F.linear(torch.tanh(self.mix(self.embed(ids))), self.embed.weight).mean(1)


class CalledTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer, self.head = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.layer(torch.tanh(self.layer(x)))))


class OwnParameter(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale, self.head = nn.Parameter(torch.linspace(0.5, 2.0, 4)), nn.Linear(4, 3)

    def forward(self, x):
        return self.head(x * self.scale)


class SequenceFirst(nn.Module):
    """Moves the batch off dim 0 before a Linear: the layer pass must refuse, not mis-clip."""

    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(4, 3)

    def forward(self, x):
        return self.layer(x.transpose(0, 1)).mean(0)


class FrozenByNoGrad(nn.Module):
    """A Linear run under no_grad (as reentrant checkpointing would): its autograd gradient is zero."""

    def __init__(self):
        super().__init__()
        self.frozen, self.head = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        with torch.no_grad():
            x = torch.tanh(self.frozen(x))
        return self.head(x)


def registered_tied():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4))
    model[2].weight = model[0].weight
    return model


def unsupported_cases():
    torch.manual_seed(5)
    vectors = torch.randn(6, 4, dtype=torch.float64)
    labels = torch.randint(0, 3, (6,))
    batchnorm_eval = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 3)).eval()
    return {
        "functional-tying": (FunctionallyTied(), torch.randint(0, 11, (6, 3)), torch.randint(0, 11, (6,))),
        "module-called-twice": (CalledTwice(), vectors, labels),
        "parameter-on-a-plain-module": (OwnParameter(), vectors, labels),
        "registered-tying": (registered_tied(), vectors, torch.randint(0, 4, (6,))),
        "batchnorm-in-eval-mode": (batchnorm_eval, vectors, labels),
        "batch-moved-off-dim-0": (SequenceFirst(), torch.randn(6, 5, 4, dtype=torch.float64), labels),
        "layer-run-under-no-grad": (FrozenByNoGrad(), vectors, labels),
    }


@pytest.mark.parametrize("case", sorted(unsupported_cases()))
def test_auto_falls_back_to_vmap_and_layers_refuses_models_it_cannot_prove(case):
    model, inputs, targets = unsupported_cases()[case]
    model = model.double()
    state = model_state(model)
    expected = one_at_a_time_clipped_sum(model, F.cross_entropy, inputs, targets, clip_norm=0.1)

    actual = clipped_gradient_sum(model, F.cross_entropy, inputs, targets, clip_norm=0.1, method="auto")

    torch.testing.assert_close(actual, expected, **TIGHT)
    with pytest.raises(ValueError, match="method='layers' cannot handle this model"):
        clipped_gradient_sum(model, F.cross_entropy, inputs, targets, clip_norm=0.1, method="layers")
    assert_model_unchanged(model, state)


def test_functional_tying_would_be_missed_without_the_use_check(monkeypatch):
    # Negative control for the graph check: with it disabled, the layer pass
    # misses the output-layer use of the embedding and the sum is wrong.
    model, inputs, targets = unsupported_cases()["functional-tying"]
    model = model.double()
    expected = one_at_a_time_clipped_sum(model, F.cross_entropy, inputs, targets, clip_norm=0.1)
    monkeypatch.setattr(clipped_sum, "_check_uses", lambda *args: None)

    unchecked = clipped_gradient_sum(model, F.cross_entropy, inputs, targets, clip_norm=0.1, method="layers")

    with pytest.raises(AssertionError):
        torch.testing.assert_close(unchecked, expected, rtol=1e-3, atol=1e-6)


def test_supported_layers_are_the_documented_ones():
    expected = {nn.Linear, nn.Conv1d, nn.Conv2d, nn.GroupNorm, nn.LayerNorm, nn.RMSNorm, nn.Embedding}
    assert set(SUPPORTED_LAYERS) == expected


# ---------------------------------------------------------------- the model is left as it was


@pytest.mark.parametrize("method", ["auto", "vmap", "layers"])
def test_model_is_unchanged_parameters_flags_grads_and_no_hooks(method):
    model, loss_fn, inputs, targets = project_model("cifar-cnn", 5)
    model[0].bias.requires_grad_(False)
    model[3].weight.grad = torch.full_like(model[3].weight, 7.0)
    state = model_state(model)

    clipped_gradient_sum(model, loss_fn, inputs, targets, clip_norm=0.1, method=method)

    assert_model_unchanged(model, state)


def test_model_is_unchanged_when_the_loss_raises():
    model, _, inputs, targets = project_model("tanh-cnn", 5)
    state = model_state(model)

    def broken_loss(outputs, targets):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        clipped_gradient_sum(model, broken_loss, inputs, targets, clip_norm=0.1, method="layers")

    assert_model_unchanged(model, state)


def test_frozen_parameters_are_left_out():
    model, loss_fn, inputs, targets = project_model("cifar-cnn", 6)
    for p in model[0].parameters():
        p.requires_grad_(False)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    expected = one_at_a_time_clipped_sum(model, loss_fn, inputs, targets, clip_norm=0.1)

    for method in METHODS:
        actual = clipped_gradient_sum(model, loss_fn, inputs, targets, clip_norm=0.1, method=method)
        assert actual.shape == (trainable,)
        torch.testing.assert_close(actual, expected, **TIGHT)


# ---------------------------------------------------------------- bad input


def test_empty_batch_gives_zeros_of_length_d():
    model, loss_fn, inputs, targets = project_model("cifar-cnn", 0)

    actual = clipped_gradient_sum(model, loss_fn, inputs, targets, clip_norm=1.0)

    assert torch.equal(actual, torch.zeros(sum(p.numel() for p in model.parameters()), dtype=torch.float64))


def test_batchnorm_in_training_mode_is_rejected_pointing_to_groupnorm():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(2 * 6 * 6, 3))

    with pytest.raises(ValueError, match="GroupNorm"):
        clipped_gradient_sum(
            model, F.cross_entropy, torch.randn(4, 1, 8, 8), torch.zeros(4, dtype=torch.long), clip_norm=1.0
        )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"clip_norm": 0.0}, r"clip_norm must be a finite number > 0, got 0.0"),
        ({"clip_norm": float("inf")}, r"clip_norm must be a finite number > 0, got inf"),
        ({"clip_norm": 1.0, "clipping": "per-layer"}, r"clipping must be one of \('flat', 'automatic'\), got 'per-la"),
        ({"clip_norm": 1.0, "method": "opacus"}, r"method must be one of \('auto', 'vmap', 'layers'\), got 'opacus'"),
        ({"clip_norm": 1.0, "chunk_size": 0}, r"chunk_size must be None or an integer >= 1, got 0"),
    ],
)
def test_bad_arguments_are_rejected_by_name(kwargs, message):
    model, loss_fn, inputs, targets = project_model("mlp", 3)

    with pytest.raises(ValueError, match=message):
        clipped_gradient_sum(model, loss_fn, inputs, targets, **kwargs)


def test_mismatched_batch_sizes_are_rejected():
    model, loss_fn, inputs, targets = project_model("mlp", 4)

    with pytest.raises(ValueError, match="same batch size, got 4 and 3"):
        clipped_gradient_sum(model, loss_fn, inputs, targets[:3], clip_norm=1.0)


def test_client_release_equals_the_materialised_path_with_the_same_randomness():
    # The shipped release (clipped_gradient_sum) against the earlier one (every per-example
    # gradient materialised, clip_per_sample, sum, noise, sign), drawing the same sample and noise.
    from dpsign_fl.release.mechanism import dp_sign, noisy_sum, per_sample_gradients, poisson_sample
    from dpsign_fl.models import build_model
    from dpsign_fl.release import ReleaseSettings, client_release

    torch.manual_seed(0)
    model = build_model("tanh-cnn", input_shape=(1, 28, 28), num_classes=10, seed=0)
    inputs, targets = torch.randn(200, 1, 28, 28), torch.randint(0, 10, (200,))
    settings = ReleaseSettings(sample_rate=0.3, clip_norm=0.5, noise_multiplier=0.8)

    signs = client_release(model, inputs, targets, settings, generator=torch.Generator().manual_seed(3))

    generator = torch.Generator().manual_seed(3)
    index = poisson_sample(200, 0.3, generator=generator)
    grads = per_sample_gradients(model, F.cross_entropy, inputs[index], targets[index])
    reference_state = generator.get_state()
    expected = dp_sign(grads, clip_norm=0.5, noise_multiplier=0.8, generator=generator)
    generator.set_state(reference_state)
    noisy = noisy_sum(torch.zeros(grads.shape[1]), clip_norm=0.5, noise_multiplier=0.8, generator=generator)
    clipped = clip_per_sample(grads, clip_norm=0.5).sum(0)
    # Coordinates whose noisy sum is within float rounding of 0 may flip; no other may.
    decided = (clipped + noisy).abs() > 1e-4
    assert torch.equal(signs[decided], expected[decided])
    assert int(decided.sum()) > 0.999 * signs.numel()


# ---------------------------------------------------------------- a hostile model: terms that cancel


def _float32_ghost_squares(left, right, mask=None):
    """The ghost identity computed in the layer's float32 (the code before float64 Gram matrices)."""
    products = left @ left.mT
    if right is not None:
        products = products * (right @ right.mT)
    return (products if mask is None else products * mask).sum((1, 2))


def _cancelling_model(kind):
    """A model within the 1e6 bound on its entries whose ghost terms are about 1e10 and cancel to about 1e3.

    Two positions per example; the loss reads position 0 along ``u`` and position 1
    along nearly ``-u``, so the weight's per-example gradient is a small
    difference of two large terms (true norm about 10-60).
    """
    torch.manual_seed(0)
    width = 8
    if kind == "linear":  # the gradient of the second Linear is u (a_0 - a_1)^T with a_t = 1e5 x_t
        model = nn.Sequential(nn.Linear(width, width, bias=False), nn.Linear(width, width, bias=False))
        with torch.no_grad():
            model[0].weight.copy_(1e5 * torch.eye(width))
            model[1].weight.zero_()
        x = torch.randn(64, width)
        inputs = torch.stack([x, x + 1e-4 * torch.randn(64, width)], dim=1)
        u = torch.randn(width)
        u /= u.norm()
        loss_fn = lambda out, _targets: ((out[:, 0] - out[:, 1]) @ u).mean()
    else:  # one id at both positions; the embedding's gradient row is 1e5 (u - u') with u' = u + 1e-4 w
        model = nn.Sequential(nn.Embedding(200, width), nn.Linear(width, width, bias=False))
        with torch.no_grad():
            model[1].weight.copy_(1e5 * torch.eye(width))
        model[1].weight.requires_grad_(False)
        ids = torch.randint(0, 200, (64, 1))
        inputs = ids.expand(64, 2).contiguous()
        u = torch.randn(64, width)
        u /= u.norm(dim=1, keepdim=True)
        near = u + 1e-4 * torch.randn(64, width)
        def loss_fn(out, _targets):
            rows = out.shape[0]
            return ((out[:, 0] * u[:rows]).sum() - (out[:, 1] * near[:rows]).sum()) / rows
    return model, loss_fn, inputs


def _largest_contribution(model, loss_fn, inputs):
    """The largest norm one example adds to the clipped sum (C = 1): each example alone through the layer pass."""
    return max(
        float(clipped_gradient_sum(model, loss_fn, inputs[i : i + 1], torch.zeros(1), clip_norm=1.0, method="layers").norm())
        for i in range(inputs.shape[0])
    )


@pytest.mark.parametrize("kind", ["linear", "embedding"])
def test_a_model_whose_ghost_terms_cancel_cannot_push_an_example_past_the_clip_norm(monkeypatch, kind):
    # The float64 norms on their own: the clip by the terms' size (tested below) would also stop these examples.
    monkeypatch.setattr(clipped_sum, "MAX_TERMS_RATIO", math.inf)
    model, loss_fn, inputs = _cancelling_model(kind)
    if kind == "embedding":
        assert embedding_form(200, 2) == "ghost"
    else:
        assert layer_rules._linear_form(2, 8, 8) == "ghost"
    true_norms = [
        clip_and_sum(model, one_at_a_time_gradients(model, loss_fn, inputs[i : i + 1], torch.zeros(1)), math.inf).norm()
        for i in range(8)
    ]
    assert min(true_norms) > 5  # every example must be clipped: its gradient is far longer than C = 1
    # Not 1 + 1e-7: without the clip by the terms' size the clipped sum's float32 product of the terms (1e5
    # each) rounds by 3e-4 of C here (the next test); in float32 the norms failed by far more.
    assert _largest_contribution(model, loss_fn, inputs) <= 1 + 1e-3
    # Negative control: the same identity in float32 lets examples through unclipped.
    monkeypatch.setattr(layer_rules, "ghost_squares", _float32_ghost_squares)
    assert _largest_contribution(model, loss_fn, inputs) > 2


def _cancelling_linear(scale, gap, examples=200):
    """The two-position Linear construction of :func:`_cancelling_model` with the first layer at ``scale`` and
    the positions' inputs ``gap`` apart: the closer they are, the more exactly the second layer's terms cancel."""
    torch.manual_seed(0)
    width = 8
    model = nn.Sequential(nn.Linear(width, width, bias=False), nn.Linear(width, width, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(scale * torch.eye(width))
        model[1].weight.zero_()
    x = torch.randn(examples, width)
    inputs = torch.stack([x, x + gap * torch.randn(examples, width)], dim=1)
    u = torch.randn(width)
    u /= u.norm()
    return model, lambda out, _targets: ((out[:, 0] - out[:, 1]) @ u).mean(), inputs


def test_cancelling_terms_cannot_round_an_example_past_the_clip_norm_in_the_float32_sum(monkeypatch):
    project = clipped_sum.MAX_TERMS_RATIO
    worst = {}
    for ratio in (project, math.inf):  # the control: no clip by the terms' size
        monkeypatch.setattr(clipped_sum, "MAX_TERMS_RATIO", ratio)
        worst[ratio] = max(_largest_contribution(*_cancelling_linear(1e6, gap)) for gap in (1e-5, 1e-6))
    # Measured: 1.0000 with the ratio 1e3; 1.0043 and 1.0489 C without (the float64 norms clip these
    # examples, but the float32 sum of their 1e6-sized terms rounds past C).
    assert worst[project] <= 1 + 1e-5
    assert worst[math.inf] > 1.01


def _brute_term_sizes(model, loss_fn, x, y):
    """Per example, sqrt of the sum over layers of (sum over positions of |a_t| |g_t|)^2, from unfolded patches
    and autograd on one example; layers with one position (their total sums what was measured) count 0."""
    records, handles = [], []
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding)) and module.weight.requires_grad:
            handles.append(module.register_forward_hook(lambda m, args, out: records.append((m, args[0], out))))
    sizes = []
    try:
        for i in range(x.shape[0]):
            records.clear()
            loss = loss_fn(model(x[i : i + 1]), y[i : i + 1])
            grads = torch.autograd.grad(loss, [out for _, _, out in records])
            total = 0.0
            for (module, a, _), g in zip(records, grads):
                a = a.detach()
                if isinstance(module, nn.Linear):
                    a, g = a.reshape(-1, module.in_features), g.reshape(-1, module.out_features)
                elif isinstance(module, nn.Embedding):
                    g = g.reshape(-1, module.embedding_dim)
                    keep = a.reshape(-1) != (-1 if module.padding_idx is None else module.padding_idx)
                    g = g[keep]
                    a = torch.ones(g.shape[0], 1, dtype=g.dtype)
                else:
                    one_d = isinstance(module, nn.Conv1d)
                    padding = (0,) * len(module.kernel_size) if module.padding == "valid" else module.padding
                    pair = lambda v, first=1: (first, v[0]) if one_d else tuple(v)  # noqa: E731
                    patches = F.unfold(
                        a.unsqueeze(2) if one_d else a, pair(module.kernel_size), dilation=pair(module.dilation),
                        padding=pair(padding, 0), stride=pair(module.stride),
                    )[0]
                    groups = module.groups
                    a = patches.reshape(groups, -1, patches.shape[-1]).permute(2, 0, 1).reshape(-1, patches.shape[0] // groups)
                    g = g.reshape(groups, module.out_channels // groups, -1).permute(2, 0, 1).reshape(a.shape[0], -1)
                if a.shape[0] > 1:
                    total += float((a.norm(dim=1) * g.norm(dim=1)).sum()) ** 2
            sizes.append(math.sqrt(total))
    finally:
        for handle in handles:
            handle.remove()
    return sizes


def _embedding_cases():
    torch.manual_seed(5)
    return {
        "embedding-ghost": (EmbeddingBag(73, 6), 73),
        "embedding-table-recomputed": (EmbeddingBag(5, 6), 5),
    }


@pytest.mark.parametrize("chunk_size", [None, 2])
@pytest.mark.parametrize("case", sorted(layer_zoo()) + sorted(_embedding_cases()))
def test_each_layer_path_clips_by_its_terms_size_as_a_per_position_loop_gives_it(monkeypatch, case, chunk_size):
    # Nothing kept: every layer with positions recomputes its part of the sum from its terms.
    monkeypatch.setattr(clipped_sum, "KEEP_BYTES", 0)
    generator = torch.Generator().manual_seed(4)
    if case in _embedding_cases():
        model, rows = _embedding_cases()[case]
        model = model.double()
        inputs = torch.randint(0, min(rows, 4), (9, 6), generator=generator)
    else:
        body, shape = layer_zoo()[case]
        model = nn.Sequential(body, nn.Flatten(), nn.LazyLinear(3)).double()
        inputs = torch.randn(9, *shape, generator=generator, dtype=torch.float64)
        model(inputs)  # materialise the lazy head
    targets = torch.randint(0, 3, (9,), generator=generator)
    rows = one_at_a_time_gradients(model, F.cross_entropy, inputs, targets)
    norms = [float(g.norm()) for g in rows]
    sizes = _brute_term_sizes(model, F.cross_entropy, inputs, targets)
    if not any(sizes):  # only normalisation layers and one-position heads: every total sums what it measured
        assert case in ("groupnorm-without-spatial", "layernorm-two-dims-and-rmsnorm")
        return
    assert all(sizes)
    # A ratio at which every example's terms, over the ratio, are at least 10 times its gradient's norm, and a
    # clip norm below all of those: each example's factor is then clip_norm * ratio / its terms' size.
    ratio = 0.1 * min(size / norm for norm, size in zip(norms, sizes))
    monkeypatch.setattr(clipped_sum, "MAX_TERMS_RATIO", ratio)
    clip_norm = 0.5 * min(size / ratio for size in sizes)

    actual = clipped_gradient_sum(
        model, F.cross_entropy, inputs, targets, clip_norm=clip_norm, method="layers", chunk_size=chunk_size
    )

    expected = sum(clip_norm * ratio / size * g for g, size in zip(rows, sizes))
    torch.testing.assert_close(actual, expected, **TIGHT)
    plain = clip_and_sum(model, rows, clip_norm)  # control: the clip by the gradients' norms alone
    assert float((actual - plain).norm()) > 0.5 * float(plain.norm())


@pytest.mark.parametrize("case", ["linear-sequence-materialised", "conv-grouped-and-frozen-bias", "embedding-table-kept"])
def test_layers_that_keep_their_per_example_gradients_are_not_clipped_by_terms(monkeypatch, case):
    monkeypatch.setattr(clipped_sum, "KEEP_BYTES", 2**40)
    monkeypatch.setattr(clipped_sum, "MAX_TERMS_RATIO", 1e-300)  # would clip everything to nothing
    generator = torch.Generator().manual_seed(4)
    if case == "embedding-table-kept":
        model = _embedding_cases()["embedding-table-recomputed"][0].double()
        inputs = torch.randint(0, 4, (9, 6), generator=generator)
    else:
        body, shape = layer_zoo()[case]
        model = nn.Sequential(body, nn.Flatten(), nn.LazyLinear(3)).double()
        inputs = torch.randn(9, *shape, generator=generator, dtype=torch.float64)
        model(inputs)
    targets = torch.randint(0, 3, (9,), generator=generator)
    small, _ = clip_norms_for(model, F.cross_entropy, inputs, targets)

    actual = clipped_gradient_sum(model, F.cross_entropy, inputs, targets, clip_norm=small, method="layers")

    expected = one_at_a_time_clipped_sum(model, F.cross_entropy, inputs, targets, clip_norm=small)
    torch.testing.assert_close(actual, expected, **TIGHT)
