"""The loss from the final hidden states and the output layer, without the full logits.

A micro-batch of 32k tokens and a 152k-token vocabulary has 5 G logits (9.7 GB in bf16, twice
that with their gradient). Only the positions with a target need any, and each of those only
long enough to give its loss and its gradient, so `chunked_linear_cross_entropy` projects a
chunk of positions at a time, takes their cross-entropy and, in the same pass, their gradients
with respect to the hidden states and the projection weight; backward only scales what the
forward kept. At most one chunk's logits exist at any time.

The trainer reaches the output layer from inside the model's own forward (`install`): the
layer, while a micro-batch's targets are set, returns the summed loss instead of logits. Under
FSDP2 the root module's parameters, the output layer's included, are gathered for exactly the
span of that forward, so the projection weight the loss reads is the full one, and its gradient
goes back through FSDP's reduce-scatter as the logits' would have.

Kinds (`loss_implementation`): `chunked` (the PyTorch code here, any device), `liger` (Liger
Kernel's fused linear cross-entropy, CUDA, the `liger` extra; micro-batches with soft weights
use `chunked`, Liger has no per-token weights), `logits` (the model's full logits and
`batching.loss_sum`, as before), `auto` (liger where it can run, else chunked, else logits).
All of them return the same per-token sum that the trainer normalises.
"""

from __future__ import annotations

import importlib.util
import logging
import types
from collections.abc import Callable
from typing import Any

import torch

from app.recipe.render import IGNORE_INDEX
from app.training.config import LOSS_IMPLEMENTATIONS

log = logging.getLogger("srft.train")

# Logits per chunk: 32 M (128 MiB in float32, and as much again for their gradient).
CHUNK_LOGITS = 2**25
# Config attributes of models whose logits are not a plain projection of the hidden states
# (soft-capped, scaled): they keep the full-logits loss.
_LOGIT_TRANSFORMS = (
    "final_logit_softcapping",
    "logit_scale",
    "logits_scaling",
    "output_multiplier_scale",
)
_HEAD_ATTRIBUTE = "_srft_head_loss"


class LossImplementationError(ValueError):
    """The loss implementation asked for cannot run on this model or device."""


def liger_installed() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def head_supported(model: torch.nn.Module) -> str | None:
    """None if the model's logits are its output layer's plain projection (no bias, no
    soft-cap or scale); otherwise why not."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if not isinstance(head, torch.nn.Linear):
        return "the model has no linear output layer"
    if head.bias is not None:
        return "the output layer has a bias"
    config = getattr(model, "config", None)
    for name in _LOGIT_TRANSFORMS:
        if getattr(config, name, None) not in (None, 1.0):
            return f"the model's logits are transformed ({name})"
    return None


def choose_loss(requested: str, device_type: str, liger: bool, unsupported: str | None) -> str:
    """The loss implementation to run: `requested` unless it cannot run here (an error), and
    for `auto`, Liger on CUDA when installed, else chunked, else the full logits."""
    if requested not in LOSS_IMPLEMENTATIONS:
        raise LossImplementationError(
            f"loss_implementation must be one of {', '.join(LOSS_IMPLEMENTATIONS)}"
        )
    if requested == "logits":
        return requested
    if unsupported is not None:
        if requested == "auto":
            return "logits"
        raise LossImplementationError(f"loss_implementation {requested}: {unsupported}")
    if requested == "liger" and device_type != "cuda":
        raise LossImplementationError("loss_implementation liger runs on CUDA only")
    if requested == "liger" and not liger:
        raise LossImplementationError(
            "loss_implementation liger needs Liger Kernel: pip install 'srft[liger]'"
        )
    if requested == "auto":
        return "liger" if device_type == "cuda" and liger else "chunked"
    return requested


class _Targets:
    """What the output layer needs while a micro-batch's loss is computed."""

    def __init__(self) -> None:
        self.labels: torch.Tensor | None = None
        self.weights: torch.Tensor | None = None


class HeadLoss:
    """The output layer, taught to return a micro-batch's summed loss (see the module text)."""

    def __init__(self, head: torch.nn.Linear, kind: str) -> None:
        self.head = head
        self.kind = kind
        self.targets = _Targets()
        self._plain: Callable[..., Any] = head.forward
        head.forward = types.MethodType(_head_forward, head)  # type: ignore[method-assign]
        setattr(head, _HEAD_ATTRIBUTE, self)

    def loss(self, hidden: torch.Tensor) -> torch.Tensor:
        labels, weights = self.targets.labels, self.targets.weights
        assert labels is not None
        targets = labels[:, 1:]
        keep = targets != IGNORE_INDEX
        chosen = hidden[:, :-1, :][keep]
        picked = targets[keep]
        token_weights = None if weights is None else weights[:, 1:][keep]
        if self.kind == "liger" and token_weights is None:
            return _liger_sum(chosen, self.head.weight, picked)
        return chunked_linear_cross_entropy(chosen, self.head.weight, picked, token_weights)


def _head_forward(head: torch.nn.Linear, hidden: torch.Tensor) -> torch.Tensor:
    owner: HeadLoss = getattr(head, _HEAD_ATTRIBUTE)
    if owner.targets.labels is None:
        out: torch.Tensor = owner._plain(hidden)
        return out
    return owner.loss(hidden)


def install(model: torch.nn.Module, kind: str) -> HeadLoss | None:
    """Teach the model's output layer the loss (`kind` from `choose_loss`); None for logits."""
    if kind == "logits":
        return None
    head = model.get_output_embeddings()  # type: ignore[operator]
    assert isinstance(head, torch.nn.Linear)
    return HeadLoss(head, kind)


def installed(model: torch.nn.Module) -> HeadLoss | None:
    """The HeadLoss of a model (or of the one DDP wraps), if `install` gave it one."""
    inner = getattr(model, "module", model)
    get_head = getattr(inner, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    found: HeadLoss | None = getattr(head, _HEAD_ATTRIBUTE, None)
    return found


def model_loss_sum(model: torch.nn.Module, batch: Any, head: HeadLoss) -> torch.Tensor:
    """The summed loss of a micro-batch (`batching.MicroBatch`), computed inside the
    model's forward by its output layer."""
    head.targets.labels, head.targets.weights = batch.labels, batch.weights
    try:
        out = model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
            use_cache=False,
        )
    finally:
        head.targets.labels = head.targets.weights = None
    summed: torch.Tensor = out.logits
    return summed


def chunked_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    token_weights: torch.Tensor | None = None,
    chunk: int | None = None,
) -> torch.Tensor:
    """sum_i w_i * CE(hidden_i @ weight.T, targets_i), in float32, chunk by chunk.

    hidden: [N, H], the positions that have a target; weight: [V, H]; targets: [N];
    token_weights: [N] or None (all 1). The projection runs in the autocast dtype when
    autocast is on (as the output layer would), the softmax in float32."""
    if chunk is None:
        chunk = max(1, CHUNK_LOGITS // weight.shape[0])
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        compute = torch.get_autocast_dtype(device_type)
    else:
        compute = torch.promote_types(hidden.dtype, weight.dtype)
    grads = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    result: torch.Tensor = _ChunkedLinearCrossEntropy.apply(  # type: ignore[no-untyped-call]
        hidden, weight, targets, token_weights, chunk, compute, grads
    )
    return result


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        token_weights: torch.Tensor | None,
        chunk: int,
        compute: torch.dtype,
        grads: bool,
    ) -> torch.Tensor:
        want_hidden = grads and ctx.needs_input_grad[0]
        want_weight = grads and ctx.needs_input_grad[1]
        with torch.autocast(hidden.device.type, enabled=False):
            projection = weight.to(compute)
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            grad_hidden = torch.empty_like(hidden) if want_hidden else None
            grad_weight = (
                torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
                if want_weight
                else None
            )
            for start in range(0, hidden.shape[0], chunk):
                part = hidden[start : start + chunk].to(compute)
                wanted = targets[start : start + chunk]
                logits = (part @ projection.t()).float()
                lse = torch.logsumexp(logits, dim=-1)
                losses = lse - logits.gather(1, wanted[:, None])[:, 0]
                scale = None
                if token_weights is not None:
                    scale = token_weights[start : start + chunk].float()
                    losses = losses * scale
                total += losses.sum()
                if not (want_hidden or want_weight):
                    continue
                # d CE / d logits = softmax - one-hot, times the token's weight; in place on
                # the chunk's logits so no second [chunk, V] buffer is made.
                gradient = logits.sub_(lse[:, None]).exp_()
                gradient[torch.arange(len(wanted), device=gradient.device), wanted] -= 1.0
                if scale is not None:
                    gradient.mul_(scale[:, None])
                gradient_c = gradient.to(compute)
                if grad_hidden is not None:
                    grad_hidden[start : start + chunk] = (gradient_c @ projection).to(hidden.dtype)
                if grad_weight is not None:
                    grad_weight.add_((gradient_c.t() @ part).float())
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        return total

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[Any, ...]:
        grad_hidden, grad_weight = ctx.saved_tensors
        hidden_dtype, weight_dtype = ctx.dtypes
        d_hidden = None if grad_hidden is None else (grad_hidden * grad_output).to(hidden_dtype)
        d_weight = None if grad_weight is None else (grad_weight * grad_output).to(weight_dtype)
        return d_hidden, d_weight, None, None, None, None, None


def _liger_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    from liger_kernel.transformers.functional import (  # type: ignore[import-not-found]
        liger_fused_linear_cross_entropy,
    )

    out = liger_fused_linear_cross_entropy(
        hidden, weight, targets, ignore_index=IGNORE_INDEX, reduction="sum"
    )
    summed: torch.Tensor = out[0] if isinstance(out, tuple) else out
    return summed.float()
