"""Tiny randomly initialised causal LMs with LoRA, built from ``transformers`` config classes (no download).

Import only after ``pytest.importorskip("transformers")`` and ``("peft")``.
Dropout is 0 so that a batched pass and a one-example-at-a-time loop see the
same function; the weights depend on ``seed`` alone, as a server and its
clients must agree on the frozen base model.
"""

import torch
from peft import LoraConfig, get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from dpsign_fl.data.shakespeare import NUM_SYMBOLS, chunk, encode

VOCAB_SIZE = NUM_SYMBOLS
POSITIONS = 96
WORDS = ("the", "king", "queen", "doth", "speak", "of", "love", "and", "death", "my", "lord", "thou", "art",
         "sweet", "night", "day", "fair", "hath", "come", "go", "what", "is", "a", "man", "not", "to", "be")


def tiny_gpt2_base(seed: int = 0):
    """A 2-block GPT-2 (width 32, character vocabulary), without adapters."""
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=VOCAB_SIZE, n_positions=POSITIONS, n_embd=32, n_layer=2, n_head=2,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config)


def tiny_gpt2(seed: int = 0, *, rank: int = 4, target_modules=("c_attn",), use_dora: bool = False):
    """:func:`tiny_gpt2_base` with LoRA (or DoRA) on the given Conv1D projections."""
    base = tiny_gpt2_base(seed)
    lora = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(target_modules), lora_dropout=0.0,
                      fan_in_fan_out=True, task_type="CAUSAL_LM", use_dora=use_dora)
    return get_peft_model(base, lora)


def tiny_llama(seed: int = 0, *, rank: int = 4, target_modules=("q_proj", "v_proj")):
    """A 2-block Llama (width 32, grouped-query attention, RMSNorm, RoPE) with LoRA on the given projections."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=POSITIONS,
                         bos_token_id=0, eos_token_id=0, pad_token_id=0)
    base = LlamaForCausalLM(config)
    lora = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(target_modules), lora_dropout=0.0,
                      task_type="CAUSAL_LM")
    return get_peft_model(base, lora)


def with_random_lora_b(model, seed: int = 1):
    """``model`` with every lora_B drawn at random (PEFT starts them at 0, where lora_A's gradient is 0)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(0.1 * torch.randn(parameter.shape, generator=generator))
    return model


def generated_chunks(seed: int, count: int) -> torch.Tensor:
    """``count`` disjoint 81-character chunks of seeded word salad, as Shakespeare symbol ids ``[count, 81]``."""
    generator = torch.Generator().manual_seed(seed)
    words = []
    while sum(len(word) + 1 for word in words) < 81 * count:
        words.append(WORDS[int(torch.randint(len(WORDS), (1,), generator=generator))])
    return torch.from_numpy(chunk(encode(" ".join(words))))[:count]
