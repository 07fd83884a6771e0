"""Micro-batches under a token budget, packed or padded, with masks kept, and the loss.

Packed: several rows in one sequence, position ids restarting at every row and no attention
across rows (transformers builds the block-diagonal causal mask from restarting position ids
when no attention mask is passed), and the first token of each row never a target, so no row
learns from the one before it. Padded: one row per sequence, padded to the longest.

The loss is a sum over trained tokens; the trainer divides it by the trained tokens of the
whole accumulated batch, so every trained token weighs the same whatever its micro-batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional

from app.recipe.render import IGNORE_INDEX
from app.training.data import Row
from app.training.loss import installed, model_loss_sum


@dataclass
class MicroBatch:
    input_ids: torch.Tensor  # [batch, length]
    labels: torch.Tensor  # IGNORE_INDEX where no loss; not shifted
    weights: torch.Tensor | None  # per-token loss weights (soft), or None
    attention_mask: torch.Tensor | None  # padded batches only
    position_ids: torch.Tensor | None  # packed batches only
    num_tokens: int  # real (not padding) tokens
    num_trained: int  # tokens with a loss (targets), as the loss counts them
    attention_square: int = 0  # sum of the rows' squared lengths (attention FLOPs)

    def to(self, device: torch.device) -> MicroBatch:
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device, non_blocking=True)

        return MicroBatch(
            self.input_ids.to(device, non_blocking=True),
            self.labels.to(device, non_blocking=True),
            move(self.weights),
            move(self.attention_mask),
            move(self.position_ids),
            self.num_tokens,
            self.num_trained,
            self.attention_square,
        )


def plan(
    lengths: Sequence[int], order: Sequence[int], budget: int, packing: bool
) -> list[list[int]]:
    """Group row indices, in `order`, into micro-batches of at most `budget` tokens (a row
    longer than the budget goes alone). Padded batches count rows x longest row."""
    groups: list[list[int]] = []
    current: list[int] = []
    used = longest = 0
    for index in order:
        size = lengths[index]
        if packing:
            fits = used + size <= budget
        else:
            fits = (len(current) + 1) * max(longest, size) <= budget
        if current and not fits:
            groups.append(current)
            current, used, longest = [], 0, 0
        current.append(index)
        used += size
        longest = max(longest, size)
    if current:
        groups.append(current)
    return groups


def collate(rows: Sequence[Row], packing: bool, pad_id: int = 0) -> MicroBatch:
    soft = any(r.weights is not None for r in rows)
    square = sum(len(r.input_ids) ** 2 for r in rows)
    if packing:
        ids = np.concatenate([r.input_ids for r in rows])
        labels = np.concatenate([_no_first_target(r.labels) for r in rows])
        positions = np.concatenate([np.arange(len(r.input_ids)) for r in rows])
        weights = np.concatenate([_weights(r) for r in rows]) if soft else None
        return _batch(ids[None], labels[None], weights, None, positions[None], square)
    longest = max(len(r.input_ids) for r in rows)
    ids = np.full((len(rows), longest), pad_id, dtype=np.int64)
    labels = np.full((len(rows), longest), IGNORE_INDEX, dtype=np.int64)
    mask = np.zeros((len(rows), longest), dtype=np.int64)
    weights = np.zeros((len(rows), longest), dtype=np.float32) if soft else None
    for i, row in enumerate(rows):
        n = len(row.input_ids)
        ids[i, :n] = row.input_ids
        labels[i, :n] = _no_first_target(row.labels)
        mask[i, :n] = 1
        if weights is not None:
            weights[i, :n] = _weights(row)
    return _batch(ids, labels, weights, mask, None, square)


def _no_first_target(labels: np.ndarray) -> np.ndarray:
    # Nothing predicts a row's first token; in a pack, its predecessor is another row.
    out = labels.copy()
    out[0] = IGNORE_INDEX
    return out


def _weights(row: Row) -> np.ndarray:
    if row.weights is not None:
        return row.weights
    trained: np.ndarray = (row.labels != IGNORE_INDEX).astype(np.float32)
    return trained


def _batch(
    ids: np.ndarray,
    labels: np.ndarray,
    weights: np.ndarray | None,
    mask: np.ndarray | None,
    positions: np.ndarray | None,
    square: int,
) -> MicroBatch:
    trained = int((labels[:, 1:] != IGNORE_INDEX).sum())
    real = int(mask.sum()) if mask is not None else int(ids.size)
    return MicroBatch(
        torch.from_numpy(ids),
        torch.from_numpy(labels),
        None if weights is None else torch.from_numpy(weights.reshape(ids.shape)),
        None if mask is None else torch.from_numpy(mask),
        None if positions is None else torch.from_numpy(positions),
        real,
        trained,
        square,
    )


def loss_sum(logits: torch.Tensor, batch: MicroBatch) -> torch.Tensor:
    """Sum of cross-entropy over the trained targets (times their soft weights, if any):
    position t predicts token t + 1."""
    targets = batch.labels[:, 1:]
    # Only the positions with a target, upcast: the float32 copy of a whole micro-batch's
    # logits (tokens x vocabulary) would dwarf everything else on the GPU.
    keep = targets != IGNORE_INDEX
    scores = logits[:, :-1, :][keep].float()
    ce = functional.cross_entropy(scores, targets[keep], reduction="none")
    if batch.weights is not None:
        ce = ce * batch.weights[:, 1:][keep]
    return ce.sum()


def micro_batch_loss(model: torch.nn.Module, batch: MicroBatch) -> torch.Tensor:
    """The summed loss of a micro-batch: from the hidden states, chunk by chunk, when the
    model's output layer was given the loss (`loss.install`), else from its full logits."""
    head = installed(model)
    if head is None:
        return loss_sum(forward(model, batch), batch)
    return model_loss_sum(model, batch, head)


def forward(model: torch.nn.Module, batch: MicroBatch) -> torch.Tensor:
    """The model's logits for a micro-batch (no cache: training)."""
    out = model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        use_cache=False,
    )
    logits: torch.Tensor = out.logits
    return logits
