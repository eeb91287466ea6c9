"""Speed and memory of a LoRA client step on a GPT-2 against a non-private step on the same batch.

``python -m dpsign_fl.bench.llm_step`` prints a table (needs ``pip install -e ".[llm]"``).
Compared, on the same randomly initialised GPT-2 with LoRA on its attention
projections (``c_attn``) and the same batch of token sequences, interleaved:

- ``non_private``: ``model(input_ids, attention_mask, labels=...).loss.backward()``,
  the model's own loss, gradients of the adapters only (the base is frozen);
- ``layers``: :func:`dpsign_fl.release.clipped_sum.clipped_gradient_sum` of the
  adapters' per-example gradients (:func:`dpsign_fl.llm.causal_lm_loss`);
- ``release``: the whole :func:`dpsign_fl.release.client_release` at sample
  rate 1 (the clipped sum, noise, sign), what a client pays per round.

Times and peak memory are measured as in :mod:`dpsign_fl.bench.client_step`
(wall-clock at fixed ``torch.set_num_threads``; peak-RSS growth of a fresh
interpreter over two runs of a step, minus the non-private step's).
"""

from __future__ import annotations

import torch

from ..release.clipped_sum import clipped_gradient_sum
from ..llm import causal_lm_loss, packed_calls
from ..release import ReleaseSettings, client_release
from .client_step import fresh_peak_rss_mib, step_table
from .timing import interleaved_seconds, time_call

SIZES = {
    # name: (vocab_size, width, layers, heads, seq_len, lora rank)
    "tiny-gpt2": (97, 128, 4, 4, 80, 8),
    "distilgpt2-shape": (50257, 768, 6, 12, 128, 8),
}
STEPS = ("non_private", "layers", "release")
RELEASE = ReleaseSettings(sample_rate=1.0, clip_norm=1.0, noise_multiplier=1.0)


def build(size: str, batch_size: int):
    """``(PEFT GPT-2 with LoRA on c_attn, packed [B, 2, T], labels [B, T])``, seeded; random weights (no download)."""
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    vocab_size, width, layers, heads, seq_len, rank = SIZES[size]
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=vocab_size, n_positions=max(seq_len, 128), n_embd=width, n_layer=layers,
                        n_head=heads, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    lora = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["c_attn"], lora_dropout=0.0, fan_in_fan_out=True)
    model = get_peft_model(GPT2LMHeadModel(config), lora).train()
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab_size, (batch_size, seq_len), generator=generator)
    packed = torch.stack([ids, torch.ones_like(ids)], dim=1)
    return model, packed, ids.clone()


def run_step(step: str, model, packed: torch.Tensor, labels: torch.Tensor) -> None:
    """Run one step of :data:`STEPS` (the model must be in :func:`dpsign_fl.llm.packed_calls` but for non_private)."""
    if step == "non_private":
        model.zero_grad(set_to_none=True)
        model(input_ids=packed[:, 0], attention_mask=packed[:, 1], labels=labels, use_cache=False).loss.backward()
        model.zero_grad(set_to_none=True)
    elif step == "layers":
        clipped_gradient_sum(model, causal_lm_loss, packed, labels, clip_norm=RELEASE.clip_norm, method="layers")
    else:
        client_release(model, packed, labels, RELEASE, generator=torch.Generator().manual_seed(0), loss_fn=causal_lm_loss)


def _run_packed(step: str, model, packed, labels) -> None:
    """One step; the private ones with the model's calls packed (:func:`dpsign_fl.llm.packed_calls`)."""
    if step == "non_private":
        run_step(step, model, packed, labels)
    else:
        with packed_calls(model):
            run_step(step, model, packed, labels)


def measure_llm_step(size: str = "tiny-gpt2", batch_size: int = 32, repeats: int = 5, threads: int = 1,
                     memory: bool = True) -> dict:
    """Time (and optionally measure the peak memory of) each step of :data:`STEPS`.

    Returns:
        ``{"size", "batch_size", "seq_len", "threads", "adapter_coordinates", "all_coordinates",
        "seconds": {step: (min, median)}, "ratio": {step: (by min, by median)}, "peak_extra_mib": {step: MiB}}``;
        ratio is non-private seconds / step seconds (1 = as fast as a non-private step).

    Raises:
        ValueError: for an unknown size, or a batch size, repeats or threads < 1.
    """
    if size not in SIZES:
        raise ValueError(f"size must be one of {tuple(SIZES)}, got {size!r}")
    if batch_size < 1 or repeats < 1 or threads < 1:
        raise ValueError(f"batch_size, repeats and threads must be >= 1, got {batch_size}, {repeats}, {threads}")
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model, packed, labels = build(size, batch_size)
        seconds = interleaved_seconds(list(STEPS), lambda step: time_call(lambda: _run_packed(step, model, packed, labels)), repeats)
    finally:
        torch.set_num_threads(previous_threads)
    base = seconds["non_private"]
    peaks = {step: _peak_rss_mib(size, batch_size, step, threads) if memory else float("nan") for step in STEPS}
    return {
        "size": size,
        "batch_size": batch_size,
        "seq_len": SIZES[size][4],
        "threads": threads,
        "adapter_coordinates": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "all_coordinates": sum(p.numel() for p in model.parameters()),
        "seconds": seconds,
        "ratio": {step: (base[0] / s[0], base[1] / s[1]) for step, s in seconds.items()},
        "peak_extra_mib": {step: peaks[step] - peaks["non_private"] for step in STEPS},
        "peak_mib": peaks,
    }


def _peak_rss_mib(size: str, batch_size: int, step: str, threads: int) -> float:
    """Peak-RSS growth (MiB) over two runs of ``step`` in a fresh interpreter."""
    return fresh_peak_rss_mib(
        f"from dpsign_fl.bench.llm_step import build, _run_packed\nmodel, packed, labels = build({size!r}, {batch_size})\n",
        f"_run_packed({step!r}, model, packed, labels)\n",
        threads,
    )


def format_table(rows: list[dict]) -> str:
    """Render results of :func:`measure_llm_step` as a fixed-width table."""
    lead = [("model", "<18", "size"), ("batch", ">6", "batch_size"), ("T", ">5", "seq_len"), ("thr", ">4", "threads")]
    lead += [("adapters", ">10,", "adapter_coordinates")]
    return step_table(rows, lead, [("peak MiB", "peak_mib"), ("extra MiB", "peak_extra_mib")])


def main() -> None:
    """Print the table for the tiny GPT-2 (batch 32 and 128) and a distilgpt2-shaped model (batch 8)."""
    rows = []
    for size, batch_size in (("tiny-gpt2", 32), ("tiny-gpt2", 128), ("distilgpt2-shape", 8)):
        rows.append(measure_llm_step(size, batch_size))
        print(format_table(rows[-1:]), flush=True)
    print()
    print(format_table(rows))


if __name__ == "__main__":
    main()
