"""Speed and memory of one client step: the clipped gradient sum against a non-private step.

``python -m dpsign_fl.bench.client_step`` prints a table. Compared, on the same
model and batch, in one process, interleaved (each repeat runs every step once):

- ``non_private``: ``loss_fn(model(x), y).backward()``, the cost to beat;
- ``materialised``: ``clip_per_sample(per_sample_gradients(...)).sum(0)``, the
  earlier path of ``client_release`` (vmap chunks of 256, a ``[B, d]`` matrix);
- ``vmap`` and ``layers``: :func:`dpsign_fl.release.clipped_sum.clipped_gradient_sum`;
- ``release``: the whole :func:`dpsign_fl.release.client_release` at sample
  rate 1 (sampling, the clipped sum by ``method="auto"``, noise, sign): what a
  client pays per round on this batch;
- ``release_fgsm_rs`` and ``release_pgd``: the same release with adversarial
  training (:mod:`dpsign_fl.release.adversarial`; fgsm-rs, and pgd with
  :data:`BENCH_PGD_STEPS` steps, at eps 0.1), image models only: the cost
  of robust training against the plain DP release.

Times are wall-clock seconds (``time.perf_counter``) at a fixed
``torch.set_num_threads``. Peak extra memory is the growth of the process's
peak resident set (Linux ``VmHWM``, reset through ``/proc/self/clear_refs``)
while running one step twice, in a fresh subprocess per step, after the model
and batch are built, minus the same for the non-private step; it counts every
allocation (torch's CPU allocator hands memory straight to malloc).
"""

from __future__ import annotations

import subprocess
import sys

import torch
from torch import nn
from torch.nn import functional as F

from ..release.clipped_sum import clipped_gradient_sum
from ..release.mechanism import clip_per_sample, per_sample_gradients
from ..models import MODELS, TransformerBlock, build_model
from ..release import DEFAULT_CHUNK_SIZE, ReleaseSettings, client_release
from ..release.adversarial import AdversarialSettings
from .timing import interleaved_seconds, time_call

TRANSFORMERS = {
    # name: (vocab_size, width, depth, heads, seq_len)
    "transformer": (4000, 256, 2, 4, 64),
    "transformer-10m": (8000, 512, 2, 8, 64),
}
STEPS = ("non_private", "materialised", "vmap", "layers", "release", "release_fgsm_rs", "release_pgd")
BENCH_PGD_STEPS = 10
CLIP_NORM = 1.0
NUM_CLASSES = 10
MATERIALISED_MEMORY_LIMIT_BYTES = 6 * 2**30
"""The materialised path holds ~5 copies of the [B, d] matrix (measured before it was replaced); above this it is skipped."""
RELEASE = ReleaseSettings(sample_rate=1.0, clip_norm=CLIP_NORM, noise_multiplier=1.0)
_INPUT_SHAPES = {"logreg": (1, 28, 28), "mlp": (1, 28, 28), "tanh-cnn": (1, 28, 28), "cifar-cnn": (3, 32, 32)}
CHARACTERS = (80, 97)
"""char-transformer's batch: chunks of 80 character ids, 97 symbols (the Shakespeare data's shape)."""


class TokenClassifier(nn.Module):
    """Token and position Embedding, (non-causal) transformer blocks, LayerNorm, mean over positions, Linear head."""

    def __init__(self, vocab_size: int, width: int, depth: int, heads: int, seq_len: int, num_classes: int):
        super().__init__()
        self.tokens, self.positions = nn.Embedding(vocab_size, width), nn.Embedding(seq_len, width)
        self.blocks = nn.Sequential(*(TransformerBlock(width, heads) for _ in range(depth)))
        self.norm, self.head = nn.LayerNorm(width), nn.Linear(width, num_classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # Positions get a batch dimension so that every layer sees the batch on dim 0.
        positions = torch.arange(ids.shape[1], device=ids.device).expand(ids.shape[0], -1)
        x = self.blocks(self.tokens(ids) + self.positions(positions))
        return self.head(self.norm(x).mean(dim=1))


def build_transformer(name: str = "transformer", *, num_classes: int = NUM_CLASSES, seed: int = 0) -> nn.Module:
    """Build one of :data:`TRANSFORMERS` (``transformer-10m``: 10.4M parameters).

    Raises:
        ValueError: for an unknown name.
    """
    if name not in TRANSFORMERS:
        raise ValueError(f"name must be one of {tuple(TRANSFORMERS)}, got {name!r}")
    vocab_size, width, depth, heads, seq_len = TRANSFORMERS[name]
    torch.manual_seed(seed)
    return TokenClassifier(vocab_size, width, depth, heads, seq_len, num_classes)


def measure_client_step(model_name: str, batch_size: int, repeats: int = 5, threads: int = 1, memory: bool = True) -> dict:
    """Time the non-private step, the earlier materialised path, both clipped-sum methods and the release.

    Args:
        model_name: one of ``dpsign_fl.models.MODELS`` or of :data:`TRANSFORMERS`.
        batch_size: examples per step.
        repeats: timed repeats of each step (after one warm-up), interleaved.
        threads: ``torch.set_num_threads`` for the timing and memory runs.
        memory: also measure peak memory (a fresh interpreter per step; slow).

    Returns:
        ``{"model", "batch_size", "threads", "num_parameters", "seconds": {step: (min, median)},
        "ratio": {step: (by min, by median)}, "peak_extra_mib": {step: MiB}}``; ratio is
        non-private seconds / step seconds (1 = as fast as a non-private step);
        peak_extra_mib is each step's peak-RSS growth minus the non-private step's.
        A step that cannot run (the materialised path past :data:`MATERIALISED_MEMORY_LIMIT_BYTES`,
        ``layers`` on an unsupported model) is left out.

    Raises:
        ValueError: for an unknown model or a batch size or repeats < 1.
    """
    if model_name not in MODELS and model_name not in TRANSFORMERS:
        raise ValueError(f"model_name must be one of {MODELS + tuple(TRANSFORMERS)}, got {model_name!r}")
    if batch_size < 1 or repeats < 1 or threads < 1:
        raise ValueError(f"batch_size, repeats and threads must be >= 1, got {batch_size}, {repeats}, {threads}")
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model, inputs, targets = _setup(model_name, batch_size)
        steps = _runnable_steps(model, batch_size, inputs)
        seconds = interleaved_seconds(steps, lambda step: time_call(lambda: _run(step, model, inputs, targets)), repeats)
    finally:
        torch.set_num_threads(previous_threads)
    base = seconds["non_private"]
    peaks = {step: _peak_rss_mib(model_name, batch_size, step, threads) if memory else float("nan") for step in steps}
    return {
        "model": model_name,
        "batch_size": batch_size,
        "threads": threads,
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "seconds": seconds,
        "ratio": {step: (base[0] / s[0], base[1] / s[1]) for step, s in seconds.items()},
        "peak_extra_mib": {step: peaks[step] - peaks["non_private"] for step in steps},
    }


def _setup(model_name: str, batch_size: int):
    generator = torch.Generator().manual_seed(1)
    if model_name in TRANSFORMERS:
        model = build_transformer(model_name)
        vocab_size, _, _, _, seq_len = TRANSFORMERS[model_name]
        inputs = torch.randint(0, vocab_size, (batch_size, seq_len), generator=generator)
    elif model_name == "char-transformer":
        seq_len, vocab_size = CHARACTERS
        model = build_model(model_name, input_shape=(seq_len,), num_classes=vocab_size, seed=0)
        inputs = torch.randint(0, vocab_size, (batch_size, seq_len), generator=generator)
        return model, inputs, torch.randint(0, vocab_size, (batch_size, seq_len), generator=generator)
    else:
        shape = _INPUT_SHAPES[model_name]
        model = build_model(model_name, input_shape=shape, num_classes=NUM_CLASSES, seed=0)
        inputs = torch.randn(batch_size, *shape, generator=generator)
    targets = torch.randint(0, NUM_CLASSES, (batch_size,), generator=generator)
    return model, inputs, targets


def _runnable_steps(model: nn.Module, batch_size: int, inputs: torch.Tensor) -> list[str]:
    num_parameters = sum(p.numel() for p in model.parameters())
    steps = ["non_private"]
    if 5 * batch_size * num_parameters * 4 <= MATERIALISED_MEMORY_LIMIT_BYTES:
        steps.append("materialised")
    steps += ["vmap", "layers", "release"]
    if inputs.is_floating_point() and inputs.ndim == 4:  # images: adversarial training applies
        steps += ["release_fgsm_rs", "release_pgd"]
    return steps


def _adversarial_release(attack: str, channels: int) -> ReleaseSettings:
    """RELEASE with adversarial training at eps 0.1 (bench-only pixel statistics: mean 0.5, std 0.25)."""
    adversarial = AdversarialSettings(attack, 0.1, BENCH_PGD_STEPS, 0.0, (0.5,) * channels, (0.25,) * channels)
    return ReleaseSettings(RELEASE.sample_rate, RELEASE.clip_norm, RELEASE.noise_multiplier, adversarial=adversarial)


def _run(step: str, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> None:
    if step == "non_private":
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(inputs), targets).backward()
        model.zero_grad(set_to_none=True)
    elif step == "materialised":
        grads = per_sample_gradients(model, F.cross_entropy, inputs, targets, chunk_size=DEFAULT_CHUNK_SIZE)
        clip_per_sample(grads, clip_norm=CLIP_NORM).sum(0)
    elif step == "release":
        client_release(model, inputs, targets, RELEASE, generator=torch.Generator().manual_seed(0))
    elif step in ("release_fgsm_rs", "release_pgd"):
        settings = _adversarial_release(step.removeprefix("release_").replace("_", "-"), inputs.shape[1])
        client_release(model, inputs, targets, settings, generator=torch.Generator().manual_seed(0))
    else:
        clipped_gradient_sum(model, F.cross_entropy, inputs, targets, clip_norm=CLIP_NORM, method=step)


def _peak_rss_mib(model_name: str, batch_size: int, step: str, threads: int) -> float:
    """Peak-RSS growth (MiB) over two runs of ``step`` in a fresh interpreter."""
    return fresh_peak_rss_mib(
        "from dpsign_fl.bench.client_step import _setup, _run\n"
        f"model, inputs, targets = _setup({model_name!r}, {batch_size})\n",
        f"_run({step!r}, model, inputs, targets)\n",
        threads,
    )


def fresh_peak_rss_mib(setup: str, run: str, threads: int) -> float:
    """Peak-RSS growth (MiB) over two executions of the code ``run`` after ``setup``, in a fresh interpreter.

    Linux: the peak (``VmHWM``) is reset to the current RSS by writing 5 to
    ``/proc/self/clear_refs`` after ``setup`` (building the model and batch),
    so the import's own peak does not hide the step's.
    """
    code = (
        f"import torch\nfrom dpsign_fl.bench.client_step import _status_kib\ntorch.set_num_threads({threads})\n{setup}"
        f"open('/proc/self/clear_refs', 'w').write('5')\nbefore = _status_kib('VmRSS')\n{run}{run}"
        "print((_status_kib('VmHWM') - before) / 1024)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(done.stdout.strip().splitlines()[-1])


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def format_table(rows: list[dict]) -> str:
    """Render results of :func:`measure_client_step` as a fixed-width table."""
    lead = [("model", "<16", "model"), ("batch", ">6", "batch_size"), ("thr", ">4", "threads"), ("d", ">11,", "num_parameters")]
    return step_table(rows, lead, [("extra MiB", "peak_extra_mib")])


def step_table(rows: list[dict], lead: list[tuple[str, str, str]], memory: list[tuple[str, str]]) -> str:
    """A fixed-width table, one line per row and step: the ``lead`` columns, the step's times and ratios, its memory.

    Args:
        rows: measurements with ``seconds`` and ``ratio`` (step -> (min, median)) and the keys named.
        lead: ``(title, format spec, key)`` per leading column.
        memory: ``(title, key)`` per trailing column, each a step -> MiB mapping.
    """
    header = "".join(f"{title:{spec.rstrip(',')}}" for title, spec, _ in lead) + f"  {'step':<12}{'min s':>9}{'med s':>9}"
    header += f"{'ratio min':>10}{'ratio med':>10}" + "".join(f"{title:>10}" for title, _ in memory)
    lines = [header, "-" * len(header)]
    for row in rows:
        for step, (low, mid) in row["seconds"].items():
            ratio = row["ratio"][step]
            lines.append(
                "".join(f"{row[key]:{spec}}" for _, spec, key in lead)
                + f"  {step:<12}{low:>9.4f}{mid:>9.4f}{ratio[0]:>9.2f}x{ratio[1]:>9.2f}x"
                + "".join(f"{row[key][step]:>10.0f}" for _, key in memory)
            )
    return "\n".join(lines)


def main() -> None:
    """Print the table for the project's CNNs and char-transformer (1 and 2 threads) and both transformers."""
    cases = [("tanh-cnn", 256, 1), ("tanh-cnn", 256, 2), ("cifar-cnn", 256, 1), ("cifar-cnn", 256, 2)]
    cases += [("char-transformer", 50, 1), ("char-transformer", 50, 2), ("transformer", 64, 1), ("transformer-10m", 64, 1)]
    rows = []
    for model_name, batch_size, threads in cases:
        rows.append(measure_client_step(model_name, batch_size, repeats=5, threads=threads))
        print(format_table(rows[-1:]), flush=True)
    print()
    print(format_table(rows))


if __name__ == "__main__":
    main()
