"""Causal language models (Hugging Face ``transformers``, LoRA via ``peft``) in a DP-SIGN release.

Nothing here imports ``transformers`` or ``peft`` (the optional extra
``dpsign-fl[llm]``): a model is recognised by the classes of the modules
already loaded, and everything else is torch.

One example is one token sequence, a row of ``input_ids`` (for the
Shakespeare chunks: 81 characters of one role). The release's per-example
gradient is the gradient of that sequence's own next-token loss (:func:`causal_lm_loss`)
with respect to the trainable parameters only (the LoRA adapters: the frozen
base weights are neither differentiated nor sent), clipped to ``clip_norm``
over all adapters together.

How a sequence reaches the clipped-sum code (:mod:`dpsign_fl.release.clipped_sum`,
which calls ``model(inputs)`` and ``loss_fn(outputs, targets)``):
:func:`token_examples` packs ``input_ids`` and ``attention_mask`` into one
int64 tensor ``[N, 2, T]`` (right-padded), the labels into ``[N, T]``
(``-100`` at padding), and :func:`packed_calls` makes ``model(packed)`` mean
``model(input_ids=..., attention_mask=..., use_cache=False).logits`` for the
duration of a release. Right padding keeps each example independent of the
others: causal attention never lets a real token see the padding after it,
and the positions of its tokens do not depend on the batch.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

from .release.clipped_sum import clipped_gradient_sum

IGNORE_INDEX = -100
"""The label of a position without a next-token loss (padding), as in ``transformers``."""
INPUT_IDS_KEY = "input_ids"
ATTENTION_MASK_KEY = "attention_mask"
_PROBE_TOKENS = 4
"""Tokens per sequence of the data-independent probe of :func:`check_per_example_support`."""


class UnsupportedModel(ValueError):
    """The release cannot compute exact per-example gradients of this model's trainable parameters.

    The message names the module or use at fault; it describes the model's
    structure only, never the data.
    """


def is_causal_lm(model: nn.Module) -> bool:
    """Whether ``model`` is a ``transformers`` causal LM, or a ``peft`` model around one.

    Decided from the modules already imported: when ``transformers`` is not
    loaded, no model can be one, and nothing is imported to find out.
    """
    transformers = sys.modules.get("transformers")
    if transformers is None:
        return False
    peft = sys.modules.get("peft")
    base = model
    if peft is not None and isinstance(model, peft.PeftModel):
        base = model.get_base_model()
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return isinstance(base, transformers.PreTrainedModel) and type(base).__name__ in set(
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()
    )


def token_examples(train_data, *, vocab_size: int | None = None, max_length: int | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The user's tokenised sequences as ``(packed [N, 2, T], labels [N, T])``, right-padded.

    ``packed[:, 0]`` holds the token ids (0 at padding), ``packed[:, 1]`` the
    attention mask; ``labels`` the token ids with :data:`IGNORE_INDEX` at padding.
    A sequence keeps its tokens whose attention mask is 1, in order (left
    padding becomes right padding). Sequences of fewer than 2 tokens have no
    next token to predict (a zero gradient) and are left out.

    Args:
        train_data: ``input_ids`` (and optionally ``attention_mask``, 1 = a
            real token) as: a mapping or a Hugging Face ``datasets.Dataset``
            with those columns; a sequence, ``torch.utils.data.Dataset`` or
            ``DataLoader`` (its dataset; its batching is not used) of dict
            samples; or an int tensor ``[N, T]`` of ids without padding. A
            column may be a tensor ``[N, T]`` or a list of variable-length rows.
        vocab_size: when given, every kept id must be in ``[0, vocab_size)``.
        max_length: when given, no kept sequence may be longer.

    Raises:
        TypeError: for data of another kind.
        ValueError: for ids or masks that are not integers, a mask of another
            length or with values other than 0 and 1, an id out of range, a
            sequence longer than ``max_length``, or no sequence left.
    """
    ids, masks = _columns(train_data)
    rows = []
    for index, row in enumerate(ids):
        row = _integer_row(row, f"{INPUT_IDS_KEY}[{index}]")
        if masks is not None:
            mask = _integer_row(masks[index], f"{ATTENTION_MASK_KEY}[{index}]")
            if mask.shape != row.shape or not bool(((mask == 0) | (mask == 1)).all()):
                raise ValueError(f"{ATTENTION_MASK_KEY}[{index}] must be 0/1 of the length of its {INPUT_IDS_KEY}")
            row = row[mask == 1]
        if row.numel() >= 2:
            rows.append(row)
    if not rows:
        raise ValueError("train_data must hold at least one sequence of 2 or more tokens")
    length = max(row.numel() for row in rows)
    if max_length is not None and length > max_length:
        raise ValueError(f"sequences must have at most {max_length} tokens (the model's positions), got {length}")
    packed = torch.zeros(len(rows), 2, length, dtype=torch.int64)
    labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.int64)
    for index, row in enumerate(rows):
        packed[index, 0, : row.numel()] = row
        packed[index, 1, : row.numel()] = 1
        labels[index, : row.numel()] = row
    if vocab_size is not None:
        ids_seen = packed[:, 0][packed[:, 1] == 1]
        if bool((ids_seen < 0).any() | (ids_seen >= vocab_size).any()):
            raise ValueError(f"token ids must be in [0, {vocab_size}) (the model's vocabulary)")
    return packed, labels


def _columns(train_data) -> tuple[list, list | None]:
    """``(input_ids rows, attention_mask rows or None)`` of the kinds :func:`token_examples` takes."""
    if isinstance(train_data, torch.Tensor):
        return list(train_data), None
    if isinstance(train_data, DataLoader):
        train_data = train_data.dataset
    if isinstance(train_data, Mapping) or hasattr(train_data, "column_names"):  # a datasets.Dataset reads by column
        columns = list(train_data.keys() if isinstance(train_data, Mapping) else train_data.column_names)
        if INPUT_IDS_KEY not in columns:
            raise TypeError(f"train_data must have a column {INPUT_IDS_KEY!r}, got columns {columns}")
        masks = list(train_data[ATTENTION_MASK_KEY]) if ATTENTION_MASK_KEY in columns else None
        return list(train_data[INPUT_IDS_KEY]), masks
    if not hasattr(train_data, "__getitem__") or not hasattr(train_data, "__len__"):
        raise TypeError(
            f"train_data must be token ids: a mapping or dataset with an {INPUT_IDS_KEY!r} column, a sequence "
            f"of dict samples or an int tensor [N, T], got {type(train_data).__name__}"
        )
    samples = [train_data[i] for i in range(len(train_data))]
    if not all(isinstance(sample, Mapping) and INPUT_IDS_KEY in sample for sample in samples):
        raise TypeError(f"train_data's samples must be dicts with an {INPUT_IDS_KEY!r} key")
    if any(ATTENTION_MASK_KEY in sample for sample in samples):
        return [s[INPUT_IDS_KEY] for s in samples], [s.get(ATTENTION_MASK_KEY, [1] * len(s[INPUT_IDS_KEY])) for s in samples]
    return [s[INPUT_IDS_KEY] for s in samples], None


def _integer_row(row, name: str) -> torch.Tensor:
    row = torch.as_tensor(row)
    if row.is_floating_point() or row.is_complex() or row.dtype == torch.bool or row.ndim != 1:
        raise ValueError(f"{name} must be a 1-D sequence of integers, got dtype {row.dtype} and shape {tuple(row.shape)}")
    return row.to(torch.int64)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The mean over the batch of each sequence's own next-token loss.

    A sequence's loss is the mean cross-entropy of predicting token t + 1 from
    positions <= t, over its positions whose next label is not
    :data:`IGNORE_INDEX` (the loss ``transformers`` computes for
    ``model(input_ids, labels=input_ids)`` on that one sequence). This is not
    the model's batch loss, which averages over all tokens of the batch and so
    weighs long sequences more: the clipped-sum code needs the mean of
    per-example losses (:func:`dpsign_fl.release.clipped_sum.clipped_gradient_sum`).
    A sequence without a label contributes 0.

    Args:
        logits: ``[B, T, V]``.
        labels: ``[B, T]`` token ids, :data:`IGNORE_INDEX` where there is no loss.

    Returns:
        A scalar tensor.
    """
    predicted, targets = logits[:, :-1], labels[:, 1:]
    losses = F.cross_entropy(
        predicted.reshape(-1, predicted.shape[-1]).float(), targets.reshape(-1), ignore_index=IGNORE_INDEX,
        reduction="none",
    ).reshape(targets.shape)
    counts = (targets != IGNORE_INDEX).sum(1).clamp(min=1)
    return (losses.sum(1) / counts).mean()


@contextmanager
def packed_calls(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, ``model(packed)`` returns ``model(input_ids=packed[:, 0], attention_mask=packed[:, 1]).logits``.

    ``packed`` is ``[B, 2, T]`` from :func:`token_examples`. Only calls with
    one such tensor are rewritten; the hooks are removed on leaving the block.
    """
    def unpack(module, args, kwargs):
        if len(args) == 1 and not kwargs and isinstance(args[0], torch.Tensor) and args[0].ndim == 3 \
                and args[0].shape[1] == 2:
            packed = args[0]
            return (), {INPUT_IDS_KEY: packed[:, 0], ATTENTION_MASK_KEY: packed[:, 1], "use_cache": False}
        return None

    def logits(module, args, kwargs, output):
        return output.logits if hasattr(output, "logits") else output

    handles = [model.register_forward_pre_hook(unpack, with_kwargs=True),
               model.register_forward_hook(logits, with_kwargs=True)]
    try:
        yield model
    finally:
        for handle in handles:
            handle.remove()


def check_per_example_support(model: nn.Module) -> None:
    """Raise :class:`UnsupportedModel` unless the layer pass gives exact per-example gradients of ``model``.

    Runs the layer pass (:mod:`dpsign_fl.release.clipped_sum`, ``method="layers"``)
    once on a fixed probe of two sequences of token 0, so the answer depends
    on the model's structure alone and may be given before any example is
    sampled. Supported: trainable parameters that are the weights and biases
    of ``nn.Linear`` (LoRA's ``lora_A`` and ``lora_B`` on GPT-2's ``Conv1D``
    or Llama's ``nn.Linear`` projections), ``nn.LayerNorm``, ``nn.Embedding``
    and the other types of :data:`dpsign_fl.release.clipped_sum.SUPPORTED_LAYERS`,
    each called once per forward. Not supported, for example: LoRA on an
    embedding (``lora_embedding_A``, a bare parameter), DoRA's magnitude
    vectors, trained GPT-2 ``Conv1D`` or Llama ``LlamaRMSNorm`` weights,
    gradient checkpointing (a layer run twice). ``model`` must be in
    :func:`packed_calls`.
    """
    probe = torch.zeros(2, 2, _PROBE_TOKENS, dtype=torch.int64)
    probe[:, 1] = 1
    labels = torch.zeros(2, _PROBE_TOKENS, dtype=torch.int64)
    if not any(p.requires_grad for p in model.parameters()):
        raise UnsupportedModel("the model has no trainable parameters (requires_grad): wrap it with peft.get_peft_model")
    with torch.no_grad():
        outputs = model(probe)
    if not isinstance(outputs, torch.Tensor) or outputs.ndim != 3 or tuple(outputs.shape[:2]) != (2, _PROBE_TOKENS):
        raise UnsupportedModel("the model must return next-token logits [B, T, V] (a causal language model)")
    try:
        clipped_gradient_sum(model, causal_lm_loss, probe, labels, clip_norm=1.0, method="layers")
    except ValueError as error:
        reason = str(error).removeprefix("method='layers' cannot handle this model: ").removesuffix("; use method='vmap'")
        raise UnsupportedModel(
            f"exact per-example gradients need every trainable parameter to be the weight or bias of a supported "
            f"layer called once per forward (LoRA's lora_A/lora_B are nn.Linear): {reason}"
        ) from None
