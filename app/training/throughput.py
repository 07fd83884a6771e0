"""Throughput one can read: model FLOPs utilisation, the time split of a step, peak memory.

Model FLOPs of a trained token, forward and backward (the PaLM appendix's count, with the
causal half of attention): 6 x the parameters that multiply (every weight but the input
embedding; the output projection counts, tied or not) per token, plus, per layer, 6 x the
attention width x the row's length per token for the scores and their mixing, i.e.
6 * layers * width * sum(row length^2) per micro-batch. Rows, not packs: a pack whose
attention crosses rows does work that is not counted, as padding is not. Recomputation under
gradient checkpointing is not counted either (that is what "model" FLOPs means).

MFU = those FLOPs per second / the device's peak: `--peak-tflops`, or the dense bf16 peak of a
known GPU when training in bf16; none on the CPU unless given.
"""

from __future__ import annotations

import resource
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import torch

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity), by a name torch reports.
KNOWN_PEAK_BF16_TFLOPS = {  # the first name found in the device's name wins
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H200": 989.0,
    "H100": 989.0,
    "A100": 312.0,
}


@dataclass(frozen=True)
class ModelShape:
    matmul_parameters: int  # every parameter but the input embedding, plus the head if tied
    layers: int
    attention_width: int  # heads x head size


def model_shape(model: torch.nn.Module) -> ModelShape:
    config: Any = getattr(model, "config", None)
    total = sum(p.numel() for p in model.parameters())
    get_in = getattr(model, "get_input_embeddings", None)
    get_out = getattr(model, "get_output_embeddings", None)
    embedding = get_in() if callable(get_in) else None
    head = get_out() if callable(get_out) else None
    matmul = total
    if embedding is not None:
        matmul -= embedding.weight.numel()
        if head is not None and head.weight is embedding.weight:
            matmul += head.weight.numel()
    layers = int(getattr(config, "num_hidden_layers", 0) or 0)
    hidden = int(getattr(config, "hidden_size", 0) or 0)
    heads = int(getattr(config, "num_attention_heads", 0) or 0)
    head_dim = getattr(config, "head_dim", None) or (hidden // heads if heads else 0)
    return ModelShape(matmul, layers, int(heads * head_dim) if heads else hidden)


def model_flops(shape: ModelShape, tokens: int, attention_square: int) -> float:
    """FLOPs of training (forward and backward) on `tokens` tokens whose rows' squared
    lengths sum to `attention_square`."""
    return 6.0 * shape.matmul_parameters * tokens + 6.0 * shape.layers * (
        shape.attention_width * attention_square
    )


def peak_tflops(given: float | None, device: torch.device, bf16: bool) -> float | None:
    """The peak to hold MFU against: the one given, else a known GPU's in bf16, else None."""
    if given is not None:
        return given
    if device.type != "cuda" or not bf16:
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in KNOWN_PEAK_BF16_TFLOPS.items():
        if key in name:
            return value
    return None


def peak_memory_bytes(device: torch.device) -> int:
    """On CUDA the most allocated since the last `reset_peak_memory`; on the CPU the
    process's peak resident set (its whole life: the OS keeps no other)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


@dataclass
class StepClock:
    """Seconds spent on data, forward/backward and the optimizer; on CUDA each phase ends
    with a synchronisation so the split is the GPU's, not the launch queue's."""

    device: torch.device
    seconds: dict[str, float] = field(default_factory=dict)
    _last: float = 0.0

    def start(self) -> None:
        self.seconds = {"data": 0.0, "forward_backward": 0.0, "optimizer": 0.0}
        self._sync()
        self._last = time.perf_counter()

    def lap(self, phase: str) -> None:
        self._sync()
        now = time.perf_counter()
        self.seconds[phase] += now - self._last
        self._last = now

    @property
    def total(self) -> float:
        return sum(self.seconds.values())

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def throughput(
    shape: ModelShape,
    tokens: int,
    trained: int,
    attention_square: int,
    seconds: float,
    peak: float | None,
) -> dict[str, float | None]:
    """tokens/s, trained tokens/s, model TFLOP/s and MFU of one step (all ranks' tokens;
    with several ranks, the peak is all ranks' too: the caller multiplies)."""
    achieved = model_flops(shape, tokens, attention_square) / max(seconds, 1e-9) / 1e12
    return {
        "tokens_per_s": tokens / max(seconds, 1e-9),
        "trained_tokens_per_s": trained / max(seconds, 1e-9),
        "model_tflops_per_s": achieved,
        "mfu": None if peak is None else achieved / peak,
    }
