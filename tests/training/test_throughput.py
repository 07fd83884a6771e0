"""Attention across packed rows, and throughput one can read: the kernel chosen for the
device and packing; flex_attention's packed forward equal to the padded one; the model FLOPs
behind MFU; the metrics a run writes; a compiled model training as the eager one does."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from app.training.attention import choose_attention
from app.training.batching import collate, forward
from app.training.config import TrainConfig
from app.training.data import Row
from app.training.throughput import ModelShape, model_flops, model_shape, throughput
from app.training.trainer import train
from tests.exports.conftest import Corpus


def _config(**changes: Any) -> Any:
    from transformers import LlamaConfig

    values: dict[str, Any] = {
        "vocab_size": 300,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
    }
    return LlamaConfig(**(values | changes))


def test_which_attention_kernel_runs_where() -> None:
    cuda = choose_attention(None, True, "cuda", flash_attn=True, flex=True)
    assert cuda.candidates == ("flash_attention_2", "flex_attention", None)
    assert choose_attention(None, True, "cuda", False, True).candidates == ("flex_attention", None)
    assert choose_attention(None, True, "cuda", False, False).candidates == (None,)
    assert choose_attention(None, True, "cpu", True, True).candidates == (None,)
    assert choose_attention(None, False, "cuda", True, True).candidates == (None,)
    assert choose_attention("eager", True, "cuda", True, True).candidates == ("eager",)
    with pytest.raises(ValueError, match="cannot train on the CPU"):
        choose_attention("flex_attention", True, "cpu", False, True)


def test_flex_attention_packed_forward_equals_the_padded_one() -> None:
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    flex = LlamaForCausalLM._from_config(_config(), attn_implementation="flex_attention").eval()
    sdpa = LlamaForCausalLM._from_config(_config(), attn_implementation="sdpa").eval()
    sdpa.load_state_dict(flex.state_dict())
    assert flex.config._attn_implementation == "flex_attention"
    rng = np.random.default_rng(0)
    rows = []
    for n in (40, 57, 31):
        ids = rng.integers(0, 300, size=n).astype(np.int64)
        rows.append(Row(f"r{n}", ids, ids.copy(), None))
    packed, padded = collate(rows, packing=True), collate(rows, packing=False)
    with torch.no_grad():
        packed_logits = forward(flex, packed)[0]
        padded_logits = forward(sdpa, padded)
    start = 0
    for i, row in enumerate(rows):
        n = len(row.input_ids)
        torch.testing.assert_close(
            packed_logits[start : start + n], padded_logits[i, :n], rtol=1e-5, atol=1e-5
        )
        start += n


def test_model_flops_of_a_qwen2_half_billion_shape() -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=151_936,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    with torch.device("meta"):
        model = Qwen2ForCausalLM(config)
    shape = model_shape(model)
    # Qwen2.5-0.5B's published parameter count; tied, the head multiplies as one matrix.
    assert sum(p.numel() for p in model.parameters()) == 494_032_768
    assert shape == ModelShape(494_032_768, 24, 896)
    # 8,192 tokens in two rows of 4,096: 6 N per token plus causal attention per row.
    flops = model_flops(shape, 8192, 2 * 4096**2)
    assert flops == 6 * 494_032_768 * 8192 + 6 * 24 * 896 * 2 * 4096**2
    rates = throughput(shape, 8192, 2048, 2 * 4096**2, 0.5, peak=989.0)
    assert rates["mfu"] == pytest.approx(flops / 0.5 / 1e12 / 989.0)
    assert rates["trained_tokens_per_s"] == 4096


def test_untied_heads_count_once_and_the_input_embedding_not_at_all() -> None:
    from transformers import LlamaForCausalLM

    untied = LlamaForCausalLM(_config(tie_word_embeddings=False))
    tied = LlamaForCausalLM(_config(tie_word_embeddings=True))
    total_untied = sum(p.numel() for p in untied.parameters())
    assert model_shape(untied).matmul_parameters == total_untied - 300 * 32
    assert model_shape(tied).matmul_parameters == sum(p.numel() for p in tied.parameters())


def test_a_run_logs_mfu_time_split_and_memory_and_compiles_when_asked(
    corpus: Corpus, export_folder: dict[str, Any], model_dir: Path, tmp_path: Path
) -> None:
    import torch._dynamo

    def run(name: str, **changes: Any) -> list[dict[str, Any]]:
        config = TrainConfig(
            data=str(corpus.path(export_folder)),
            model=str(model_dir),
            output=str(tmp_path / name),
            max_steps=2,
            lr=3e-3,
            tokens_per_micro_batch=4096,
            max_seq_len=4096,
            **changes,
        )
        train(config, progress=False)
        return [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").open()]

    eager = run("eager", peak_tflops=0.5)
    for record in eager:
        assert record["mfu"] == pytest.approx(record["model_tflops_per_s"] / 0.5)
        assert record["model_tflops_per_s"] > 0
        split = record["data_s"] + record["forward_backward_s"] + record["optimizer_s"]
        assert split == pytest.approx(record["step_s"])
        assert record["forward_backward_s"] > record["data_s"]
        assert record["tokens_per_s"] == pytest.approx(record["tokens"] / record["step_s"])
        assert record["peak_memory_mib"] > 0
    torch._dynamo.reset()
    compiled = run("compiled", torch_compile=True)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0, "nothing was compiled"
    assert all(record["mfu"] is None for record in compiled), "no peak known for a CPU"
    for a, b in zip(eager, compiled, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
