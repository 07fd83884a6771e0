"""A tiny random causal LM saved locally with a test tokenizer (no downloads): for the
training tests, the consumer tests and the benchmarks."""

from __future__ import annotations

from pathlib import Path


def tiny_model(directory: Path, tokenizer_dir: Path, seed: int = 0, tied: bool = False) -> Path:
    """A 2-layer Llama with random weights and the test tokenizer, saved to `directory`;
    `tied`: the output layer shares the input embedding."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    torch.manual_seed(seed)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=8192,
            tie_word_embeddings=tied,
        )
    )
    model.save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    return directory
