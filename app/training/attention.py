"""Which attention kernel the model gets, and why.

Packed rows restart their position ids; transformers reads that as a packed sequence. With
`sdpa` or `eager` it builds a dense block-diagonal mask and the kernel computes (and pays for)
the whole pack x pack score matrix. `flash_attention_2` takes the rows' boundaries from the
position ids (varlen) and `flex_attention` gets a document mask as a BlockMask: both skip the
blocks across rows. So with packing on CUDA the trainer asks for flash_attention_2 when the
`flash_attn` package is there, else flex_attention (the portable one), else the model's
default (sdpa). On the CPU it keeps the default: flex_attention's forward works there (and
gives the same output, tested) but torch 2.13 has no backward for it on the CPU, so it cannot
train there. Padded rows need none of this: the model's default.

The trainer tries the candidates in order and takes the first the model loads with.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AttentionChoice:
    candidates: tuple[str | None, ...]  # in order; None: the model's default
    reason: str


def choose_attention(
    requested: str | None, packing: bool, device_type: str, flash_attn: bool, flex: bool
) -> AttentionChoice:
    if requested == "flex_attention" and device_type != "cuda":
        raise ValueError(
            "attn_implementation flex_attention cannot train on the CPU (torch has no "
            "backward for it there); use sdpa, or a GPU"
        )
    if requested:
        return AttentionChoice((requested,), "as asked (--attn-implementation)")
    if not packing:
        return AttentionChoice((None,), "padded rows: the model's default")
    if device_type != "cuda":
        return AttentionChoice(
            (None,),
            "packed rows on the CPU: the model's default (flex_attention has no backward "
            "on the CPU)",
        )
    candidates: list[str | None] = []
    if flash_attn:
        candidates.append("flash_attention_2")
    if flex:
        candidates.append("flex_attention")
    candidates.append(None)
    return AttentionChoice(
        tuple(candidates), "packed rows on CUDA: a kernel that attends within each row"
    )


def kernels_available() -> tuple[bool, bool]:
    """(flash_attention_2, flex_attention) as transformers sees them."""
    from transformers.utils.import_utils import (
        is_flash_attn_2_available,
        is_torch_flex_attn_available,
    )

    return bool(is_flash_attn_2_available()), bool(is_torch_flex_attn_available())
