"""The app's model and data: a tiny GPT-2 with LoRA (built from its config, no download) and generated text.

On a machine that reaches the Hugging Face hub, ``build_model`` would be
``get_peft_model(AutoModelForCausalLM.from_pretrained("distilgpt2"), LORA)``
and the data a tokenised dataset (docs/llm.md). Every node and the server
build the same frozen base model: here from the same seed.
"""

import torch
from peft import LoraConfig, get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel

from dpsign_fl.data.shakespeare import NUM_SYMBOLS, chunk, encode

LORA = LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn"], lora_dropout=0.0, fan_in_fan_out=True,
                  task_type="CAUSAL_LM")
WORDS = ("the", "king", "queen", "doth", "speak", "of", "love", "and", "death", "my", "lord", "thou", "art",
         "sweet", "night", "day", "fair", "hath", "come", "go", "what", "is", "a", "man", "not", "to", "be")


def build_base_model(seed: int = 0) -> GPT2LMHeadModel:
    """The frozen base: a 2-block GPT-2 over the 97 Shakespeare symbols, the same weights for a seed."""
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=NUM_SYMBOLS, n_positions=96, n_embd=64, n_layer=2, n_head=4,
                        bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config)


def build_model(seed: int = 0):
    """The base model with LoRA (rank 8) on its attention projections: only the adapters train."""
    return get_peft_model(build_base_model(seed), LORA)


def load_data(partition_id: int, count: int = 24) -> dict:
    """This node's text: ``count`` 81-character chunks of generated word salad, as ``input_ids``."""
    generator = torch.Generator().manual_seed(1000 + partition_id)
    words = []
    while sum(len(word) + 1 for word in words) < 81 * count:
        words.append(WORDS[int(torch.randint(len(WORDS), (1,), generator=generator))])
    return {"input_ids": torch.from_numpy(chunk(encode(" ".join(words))))}
