"""A tiny random causal LM saved locally with a test tokenizer (no downloads): for the
training tests, the consumer tests and the benchmarks."""

from __future__ import annotations

from pathlib import Path


def tiny_model(
    directory: Path,
    tokenizer_dir: Path,
    seed: int = 0,
    tied: bool = False,
    *,
    hidden: int = 32,
    heads: int = 2,
    max_positions: int = 8192,
    end_token: str | None = None,
) -> Path:
    """A 2-layer Llama with random weights and the test tokenizer, saved to `directory`;
    `tied`: the output layer shares the input embedding; `hidden` wide (the MLP twice that)
    with `heads` attention heads; `end_token`: the config's end of sequence (and no
    beginning), its padding the tokenizer's."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=tied,
    )
    if end_token is not None:
        config.bos_token_id = None
        config.eos_token_id = tokenizer.convert_tokens_to_ids(end_token)
        config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    return directory
