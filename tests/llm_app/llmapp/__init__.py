"""A Flower app that fine-tunes a causal LM with LoRA, privately, through dpsign-fl."""
