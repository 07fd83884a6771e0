"""The loss from hidden states, chunk by chunk: the same sum and gradients as the full logits
for masked, soft-weighted, packed and padded micro-batches, tied and untied heads, with
gradient checkpointing and under bf16 autocast; no tensor of a micro-batch's logits ever made,
forward or backward; and which implementation is chosen where."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from app.training import loss as head_loss
from app.training.batching import MicroBatch, collate, forward, loss_sum, micro_batch_loss
from app.training.data import IGNORE_INDEX, Row

VOCAB = 384
HIDDEN = 32


def _model(tied: bool, seed: int = 0) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        tie_word_embeddings=tied,
    )
    return LlamaForCausalLM(config).train()


def _rows(soft: bool, seed: int = 0) -> list[Row]:
    rng = np.random.default_rng(seed)
    rows = []
    for n in (41, 67, 23, 50):
        ids = rng.integers(0, VOCAB, size=n).astype(np.int64)
        labels = ids.copy()
        labels[rng.random(n) < 0.4] = IGNORE_INDEX  # masked steps
        weights = rng.random(n).astype(np.float32) if soft else None
        rows.append(Row(f"r{n}", ids, labels, weights))
    return rows


def _loss_and_grads(model: Any, batch: MicroBatch, chunked: bool) -> tuple[float, list[Any]]:
    model.zero_grad(set_to_none=True)
    summed = micro_batch_loss(model, batch) if chunked else loss_sum(forward(model, batch), batch)
    (summed * 0.37).backward()
    return float(summed.detach()), [p.grad for p in model.parameters()]


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> int:
    """Chunks of 16 positions, so every micro-batch here spans several."""
    monkeypatch.setattr(head_loss, "CHUNK_LOGITS", 16 * VOCAB)
    return 16


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("packing", [True, False], ids=["packed", "padded"])
@pytest.mark.parametrize("soft", [False, True], ids=["masked", "soft"])
def test_chunked_loss_and_gradients_equal_the_full_logits(
    small_chunks: int, tied: bool, packing: bool, soft: bool
) -> None:
    plain = _model(tied)
    chunked = copy.deepcopy(plain)
    head = head_loss.install(chunked, "chunked")
    assert head is not None
    assert head_loss.installed(chunked) is head
    if tied:
        assert chunked.lm_head.weight is chunked.model.embed_tokens.weight
    batch = collate(_rows(soft), packing)
    assert batch.num_trained > 3 * small_chunks
    want, want_grads = _loss_and_grads(plain, batch, chunked=False)
    got, got_grads = _loss_and_grads(chunked, batch, chunked=True)
    assert got == pytest.approx(want, rel=1e-6)
    for mine, theirs in zip(got_grads, want_grads, strict=True):
        assert mine is not None
        assert theirs is not None
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)
    # Outside a micro-batch's loss the output layer is the plain projection again.
    with torch.no_grad():
        torch.testing.assert_close(forward(chunked, batch), forward(plain, batch))


def test_chunked_loss_with_gradient_checkpointing_and_bf16_autocast(small_chunks: int) -> None:
    plain = _model(tied=False)
    chunked = copy.deepcopy(plain)
    head_loss.install(chunked, "chunked")
    plain.gradient_checkpointing_enable()
    chunked.gradient_checkpointing_enable()
    batch = collate(_rows(soft=True), packing=True)
    want, want_grads = _loss_and_grads(plain, batch, chunked=False)
    got, got_grads = _loss_and_grads(chunked, batch, chunked=True)
    assert got == pytest.approx(want, rel=1e-6)
    for mine, theirs in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)
    # bf16 autocast: the projection in bf16 as the output layer would run it, softmax in fp32.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = float(loss_sum(forward(plain, batch), batch).detach())
        got = float(micro_batch_loss(chunked, batch).detach())
    assert got == pytest.approx(want, rel=1e-3)


class _LargestLogits(TorchDispatchMode):
    """The most rows of any tensor whose last dimension is the vocabulary."""

    def __init__(self) -> None:
        super().__init__()
        self.rows = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(tensor, torch.Tensor) and tensor.dim() >= 1:
                if tensor.numel() == VOCAB * HIDDEN:
                    continue  # the output weight (transposed), its copies and gradient
                if tensor.shape[-1] == VOCAB:
                    self.rows = max(self.rows, tensor.numel() // VOCAB)
        return out


def test_no_tensor_holds_more_than_a_chunk_of_logits(small_chunks: int) -> None:
    model = _model(tied=False)
    head_loss.install(model, "chunked")
    batch = collate(_rows(soft=False), packing=True)
    with _LargestLogits() as seen:
        (micro_batch_loss(model, batch) * 1.0).backward()
    assert 0 < seen.rows <= small_chunks
    # The same probe sees the full logits when they are made.
    with _LargestLogits() as seen:
        loss_sum(forward(model, batch), batch).backward()
    assert seen.rows >= batch.num_tokens - 1


def test_liger_runs_where_it_can_and_soft_weights_go_chunked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[int] = []

    def fake_liger(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> Any:
        calls.append(len(targets))
        return head_loss.chunked_linear_cross_entropy(hidden, weight, targets)

    monkeypatch.setattr(head_loss, "_liger_sum", fake_liger)
    plain = _model(tied=False)
    model = copy.deepcopy(plain)
    head_loss.install(model, "liger")
    hard = collate(_rows(soft=False), packing=True)
    got = float(micro_batch_loss(model, hard).detach())
    assert calls == [hard.num_trained]
    assert got == pytest.approx(float(loss_sum(forward(plain, hard), hard)), rel=1e-6)
    soft = collate(_rows(soft=True), packing=True)
    got = float(micro_batch_loss(model, soft).detach())
    assert calls == [hard.num_trained], "Liger has no per-token weights"
    assert got == pytest.approx(float(loss_sum(forward(plain, soft), soft)), rel=1e-6)


def test_which_loss_runs_where() -> None:
    choose = head_loss.choose_loss
    assert choose("auto", "cuda", True, None) == "liger"
    assert choose("auto", "cuda", False, None) == "chunked"
    assert choose("auto", "cpu", True, None) == "chunked"
    assert choose("auto", "cuda", True, "the output layer has a bias") == "logits"
    assert choose("chunked", "cpu", False, None) == "chunked"
    assert choose("logits", "cuda", True, None) == "logits"
    assert choose("liger", "cuda", True, None) == "liger"
    with pytest.raises(head_loss.LossImplementationError, match="CUDA only"):
        choose("liger", "cpu", True, None)
    with pytest.raises(head_loss.LossImplementationError, match=r"srft\[liger\]"):
        choose("liger", "cuda", False, None)
    with pytest.raises(head_loss.LossImplementationError, match="bias"):
        choose("chunked", "cpu", False, "the output layer has a bias")
    with pytest.raises(head_loss.LossImplementationError, match="one of"):
        choose("fused", "cpu", False, None)


def test_models_whose_logits_are_not_a_plain_projection_keep_the_full_logits() -> None:
    model = _model(tied=False)
    assert head_loss.head_supported(model) is None
    model.config.final_logit_softcapping = 30.0
    assert "final_logit_softcapping" in (head_loss.head_supported(model) or "")
    model.config.final_logit_softcapping = None
    model.lm_head = torch.nn.Linear(HIDDEN, VOCAB, bias=True)
    assert "bias" in (head_loss.head_supported(model) or "")
