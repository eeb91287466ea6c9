"""dpsign_fl.llm: token sequences, the per-example next-token loss, exact per-example LoRA clipping.

The reference of every clipped sum is a one-example-at-a-time loop over the
UNPADDED sequences with the model's own loss (``model(input_ids, labels=input_ids).loss``),
so one comparison checks the loss, the masking of padding and the
independence of the examples of a batch.
"""

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from transformers import GPT2Config, GPT2Model  # noqa: E402

from dpsign_fl.release.clipped_sum import clipped_gradient_sum  # noqa: E402
from dpsign_fl.llm import (  # noqa: E402
    IGNORE_INDEX,
    UnsupportedModel,
    causal_lm_loss,
    check_per_example_support,
    is_causal_lm,
    packed_calls,
    token_examples,
)
from dpsign_fl.release.mechanism import clip_per_sample  # noqa: E402

from .tiny import VOCAB_SIZE, tiny_gpt2, tiny_llama, with_random_lora_b  # noqa: E402

LENGTHS = (5, 12, 3, 9, 12, 2)
BUILDERS = {"gpt2": lambda: tiny_gpt2(target_modules=("c_attn", "c_proj")),
            "llama": lambda: tiny_llama(target_modules=("q_proj", "v_proj", "o_proj", "down_proj"))}


def sequences(lengths=LENGTHS, seed=3):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB_SIZE, (length,), generator=generator) for length in lengths]


def one_at_a_time(model, rows, clip_norm, clipping="flat"):
    """sum_i clip(grad of the model's own loss on sequence i alone), over the trainable parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    grads = []
    for row in rows:
        loss = model(input_ids=row[None], labels=row[None]).loss
        grads.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]))
    return clip_per_sample(torch.stack(grads), clip_norm=clip_norm, clipping=clipping).sum(0)


@pytest.mark.parametrize("clipping", ["flat", "automatic"])
@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_clipped_sum_of_padded_lora_batch_equals_the_one_example_at_a_time_loop(name, clipping):
    model = with_random_lora_b(BUILDERS[name]()).train()
    rows = sequences()
    packed, labels = token_examples({"input_ids": [row.tolist() for row in rows]})

    with packed_calls(model):
        total = clipped_gradient_sum(model, causal_lm_loss, packed, labels, clip_norm=0.5, clipping=clipping,
                                     method="layers")
    reference = one_at_a_time(model, rows, 0.5, clipping)

    assert total.shape == (sum(p.numel() for p in model.parameters() if p.requires_grad),)
    torch.testing.assert_close(total, reference, rtol=1e-4, atol=1e-6)
    assert reference.abs().max() > 1e-3  # clipping bites: per-example norms are above 0.5


def test_labels_at_padding_must_be_masked_negative_control():
    # The same batch with the padding's labels left in: the sum moves away from the reference.
    model = with_random_lora_b(BUILDERS["gpt2"]()).train()
    rows = sequences()
    packed, _ = token_examples({"input_ids": [row.tolist() for row in rows]})
    unmasked = packed[:, 0].clone()

    with packed_calls(model):
        total = clipped_gradient_sum(model, causal_lm_loss, packed, unmasked, clip_norm=0.5, method="layers")

    assert not torch.allclose(total, one_at_a_time(model, rows, 0.5), rtol=1e-3, atol=1e-5)


def test_the_loss_of_one_sequence_is_the_models_own_next_token_loss():
    model = BUILDERS["llama"]()
    row = sequences()[1]
    packed, labels = token_examples(row[None])

    with packed_calls(model):
        ours = causal_lm_loss(model(packed), labels)

    torch.testing.assert_close(ours, model(input_ids=row[None], labels=row[None]).loss)


def test_the_batch_loss_is_the_mean_of_per_sequence_losses_not_the_mean_over_all_tokens():
    model = BUILDERS["gpt2"]()
    rows = sequences((3, 12))
    packed, labels = token_examples({"input_ids": [row.tolist() for row in rows]})

    with packed_calls(model):
        ours = causal_lm_loss(model(packed), labels)
    each = [model(input_ids=row[None], labels=row[None]).loss for row in rows]
    token_mean = model(input_ids=packed[:, 0], attention_mask=packed[:, 1], labels=labels).loss

    torch.testing.assert_close(ours, torch.stack(each).mean())
    assert not torch.isclose(ours, token_mean)  # transformers' batch loss weighs the long sequence more


def test_token_examples_take_columns_samples_tensors_loaders_and_datasets_alike():
    datasets = pytest.importorskip("datasets")
    rows = [[5, 6, 7], [8, 9, 10, 11]]
    masks = [[1, 1, 1], [1, 1, 1, 1]]
    expected = token_examples({"input_ids": rows})
    samples = [{"input_ids": r, "attention_mask": m} for r, m in zip(rows, masks)]
    for data in (
        {"input_ids": rows, "attention_mask": masks},
        samples,
        DataLoader(samples, batch_size=1),
        datasets.Dataset.from_dict({"input_ids": rows, "attention_mask": masks}),
    ):
        packed, labels = token_examples(data)
        assert torch.equal(packed, expected[0]) and torch.equal(labels, expected[1])
    packed, _ = token_examples(torch.tensor([[1, 2, 3], [4, 5, 6]]))
    assert packed[:, 1].all()


def test_token_examples_right_pad_keep_masked_tokens_out_and_leave_out_sequences_without_a_next_token():
    packed, labels = token_examples(
        {"input_ids": [[0, 0, 7, 8, 9], [3, 4, 0, 0, 0], [6, 0, 0, 0, 0]], "attention_mask": [[0, 0, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0]]}
    )

    assert packed.tolist() == [[[7, 8, 9], [1, 1, 1]], [[3, 4, 0], [1, 1, 0]]]
    assert labels.tolist() == [[7, 8, 9], [3, 4, IGNORE_INDEX]]


@pytest.mark.parametrize(
    ("data", "options", "message"),
    [
        ({"input_ids": [[1, 2, 99]]}, {"vocab_size": 98}, r"token ids must be in \[0, 98\)"),
        ({"input_ids": [[1, 2, 3, 4]]}, {"max_length": 3}, "at most 3 tokens"),
        ({"input_ids": [[1, 2]], "attention_mask": [[1, 2]]}, {}, "must be 0/1"),
        ({"input_ids": [[1.0, 2.0]]}, {}, "must be a 1-D sequence of integers"),
        ({"input_ids": [[1]]}, {}, "at least one sequence of 2 or more tokens"),
    ],
)
def test_token_examples_refuse_bad_sequences_naming_the_rule(data, options, message):
    with pytest.raises(ValueError, match=message):
        token_examples(data, **options)


def test_token_examples_refuse_data_of_another_kind():
    with pytest.raises(TypeError, match="column 'input_ids'"):
        token_examples({"text": ["hello"]})
    with pytest.raises(TypeError, match="dicts with an 'input_ids' key"):
        token_examples([(1, 2)])


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_lora_adapters_of_gpt2_and_llama_blocks_are_supported(name):
    model = BUILDERS[name]()
    with packed_calls(model):
        check_per_example_support(model)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: tiny_gpt2(target_modules=("wte", "c_attn")), "lora_embedding_A"),  # LoRA on an embedding: bare parameters
        (lambda: tiny_gpt2().merge_and_unload().requires_grad_(True), "Conv1D"),  # full fine-tuning of GPT-2
        (lambda: tiny_gpt2().merge_and_unload(), "no trainable parameters"),
        (lambda: with_checkpointing(tiny_gpt2(), reentrant=True), "runs with gradients disabled"),
        (lambda: tiny_gpt2(use_dora=True), "DoraLinearLayer"),
    ],
)
def test_a_model_the_layer_pass_cannot_handle_is_refused_naming_the_module(build, message):
    model = build()
    with packed_calls(model), pytest.raises(UnsupportedModel, match=message) as refused:
        check_per_example_support(model)
    assert "vmap" not in str(refused.value)


def with_checkpointing(model, *, reentrant: bool):
    model.train().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    return model


def test_non_reentrant_gradient_checkpointing_keeps_the_sum_exact():
    model = with_random_lora_b(BUILDERS["gpt2"]()).train()
    rows = sequences()
    reference = one_at_a_time(model, rows, 0.5)
    packed, labels = token_examples({"input_ids": [row.tolist() for row in rows]})

    with_checkpointing(model, reentrant=False)
    with packed_calls(model):
        check_per_example_support(model)
        total = clipped_gradient_sum(model, causal_lm_loss, packed, labels, clip_norm=0.5, method="layers")

    torch.testing.assert_close(total, reference, rtol=1e-4, atol=1e-6)


def test_a_model_that_is_not_a_causal_lm_is_refused():
    torch.manual_seed(0)
    encoder = GPT2Model(GPT2Config(vocab_size=VOCAB_SIZE, n_positions=16, n_embd=16, n_layer=1, n_head=2))
    with packed_calls(encoder), pytest.raises(UnsupportedModel, match="next-token logits"):
        check_per_example_support(encoder)


def test_causal_lms_with_or_without_peft_are_recognised_and_nothing_else():
    torch.manual_seed(0)
    encoder = GPT2Model(GPT2Config(vocab_size=VOCAB_SIZE, n_positions=16, n_embd=16, n_layer=1, n_head=2))
    assert is_causal_lm(tiny_gpt2()) and is_causal_lm(tiny_llama()) and is_causal_lm(tiny_gpt2().merge_and_unload())
    assert not is_causal_lm(encoder) and not is_causal_lm(nn.Linear(2, 2))


def test_packed_calls_leave_no_hook_behind():
    model = tiny_gpt2()
    before = (len(model._forward_pre_hooks), len(model._forward_hooks))
    with pytest.raises(RuntimeError, match="inside"):
        with packed_calls(model):
            raise RuntimeError("inside")
    assert (len(model._forward_pre_hooks), len(model._forward_hooks)) == before


@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("return_tensors", [None, "pt"])
def test_a_tokenizers_output_is_train_data_as_it_comes_padded_on_either_side(padding_side, return_tensors):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, "the": 2, "king": 3, "doth": 4, "speak": 5}
    words = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, pad_token="[PAD]", unk_token="[UNK]",
                                        padding_side=padding_side)

    packed, labels = token_examples(tokenizer(["the king doth speak", "the king"], padding=True,
                                              return_tensors=return_tensors))

    assert packed.tolist() == [[[2, 3, 4, 5], [1, 1, 1, 1]], [[2, 3, 0, 0], [1, 1, 0, 0]]]
    assert labels.tolist() == [[2, 3, 4, 5], [2, 3, IGNORE_INDEX, IGNORE_INDEX]]
