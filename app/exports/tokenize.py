"""Conversations to training rows with a tokenizer: render, encode, weigh, handle overflow.

Shared by the exporter (`tokenized_parquet`) and the trainer (reading `openai_jsonl`), so both
tokenize with the same span code. No database, HTTP or torch here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from app.recipe.render import (
    ChatRenderer,
    Encoded,
    NotPrefixStable,
    RenderedChat,
    SpanStats,
    TokenRow,
    encode_rendered,
    render_chat,
    split_pieces,
    truncate,
    weigh_tokens,
)


@dataclass(frozen=True)
class Example:
    """One conversation to tokenize, with a loss weight per trained assistant message."""

    key: str  # the trajectory id, carried into the rows
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None
    step_messages: tuple[int, ...]  # message index of every step, in order
    weights: dict[int, float]  # message index -> weight, for steps with weight > 0


@dataclass
class Tokenized:
    """What became of one example: rows, or why it produced none."""

    key: str
    rows: list[TokenRow] = field(default_factory=list)
    # Rows (or pieces of a split) not written and why: "no_trained_tokens", "too_long".
    dropped: dict[str, int] = field(default_factory=dict)
    truncated: int = 0  # rows cut at max_seq_len (overflow=truncate, or a step too long to split)
    stats: SpanStats = field(default_factory=SpanStats)
    # Set when the example cannot be exported at all (template or limit problem).
    error: str | None = None
    error_code: str | None = None

    def drop(self, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1


@dataclass(frozen=True)
class TokenizeConfig:
    max_seq_len: int | None = None
    overflow: str = "truncate"


class ChatTokenizer:
    """A tokenizer with its renderer and the ids of its special tokens."""

    def __init__(self, tokenizer: Any) -> None:
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError(
                f"tokenizer {tokenizer.name_or_path!r} is not a fast tokenizer: token offsets "
                "(needed to map turns onto tokens) come only from a tokenizer.json"
            )
        self.tokenizer = tokenizer
        self.renderer = ChatRenderer(tokenizer)
        self.special_ids = frozenset(int(i) for i in tokenizer.all_special_ids) | frozenset(
            int(i) for i, t in tokenizer.added_tokens_decoder.items() if t.special
        )

    @property
    def name(self) -> str:
        return str(self.tokenizer.name_or_path)

    def render(self, example: Example, wanted: Sequence[int]) -> RenderedChat:
        return render_chat(self.renderer, example.messages, example.tools, wanted)

    def encode(self, rendered: Sequence[RenderedChat]) -> list[Encoded]:
        return encode_rendered(self.tokenizer, rendered, self.special_ids)


@lru_cache(maxsize=4)
def load_chat_tokenizer(name: str, revision: str | None = None) -> ChatTokenizer:
    """Load a tokenizer by local path or hub id (cached per process)."""
    from transformers import AutoTokenizer

    return ChatTokenizer(AutoTokenizer.from_pretrained(name, revision=revision))


def tokenize_examples(
    chat: ChatTokenizer, examples: Sequence[Example], config: TokenizeConfig
) -> list[Tokenized]:
    """Rows for each example, in order. Encoding is batched across the examples."""
    results = [Tokenized(e.key) for e in examples]
    rendered: list[tuple[int, RenderedChat]] = []
    for position, example in enumerate(examples):
        try:
            rendered.append((position, chat.render(example, sorted(example.weights))))
        except NotPrefixStable as error:
            results[position].error = f"message {error.message_index}: {error}"
            results[position].error_code = "template_not_prefix_stable"
    encoded = chat.encode([r for _, r in rendered])
    to_split: list[int] = []
    for (position, _), enc in zip(rendered, encoded, strict=True):
        result, example = results[position], examples[position]
        result.stats.add(enc.stats)
        row = weigh_tokens(enc, example.weights)
        limit = config.max_seq_len
        if limit is None or len(row.input_ids) <= limit:
            _keep(result, row)
        elif enc.prefix_tokens > limit:
            if config.overflow == "drop":
                result.drop("too_long")
            else:
                result.error = (
                    f"the task prefix is {enc.prefix_tokens} tokens, longer than max_seq_len "
                    f"{limit}: raise max_seq_len, or use overflow=drop to skip such rows"
                )
                result.error_code = "prefix_too_long"
        elif config.overflow == "drop":
            result.drop("too_long")
        elif config.overflow == "truncate":
            result.truncated += 1
            _keep(result, truncate(row, limit))
        else:
            to_split.append(position)
    if to_split:
        assert config.max_seq_len is not None
        _split(chat, [examples[p] for p in to_split], [results[p] for p in to_split], config)
    return results


def _keep(result: Tokenized, row: TokenRow) -> None:
    if row.num_trained == 0:
        result.drop("no_trained_tokens")
    else:
        result.rows.append(row)


def _split(
    chat: ChatTokenizer,
    examples: Sequence[Example],
    results: Sequence[Tokenized],
    config: TokenizeConfig,
) -> None:
    """Split overflowing conversations at step boundaries, each piece after the task prefix."""
    limit = config.max_seq_len
    assert limit is not None
    # Every step's token position is needed to cut between steps, trained or not.
    full = chat.encode([chat.render(e, e.step_messages) for e in examples])
    pieces: list[tuple[int, int, Example, list[int]]] = []
    for position, (example, enc) in enumerate(zip(examples, full, strict=True)):
        starts = [first for _, first, _ in enc.turn_tokens]
        sizes = [b - a for a, b in zip(starts, [*starts[1:], len(enc.input_ids)], strict=True)]
        parts = split_pieces(
            example.messages,
            example.step_messages,
            example.weights,
            sizes,
            starts[0],
            limit,
        )
        for number, piece in enumerate(parts):
            sub = Example(example.key, piece.messages, example.tools, (), piece.weights)
            pieces.append((position, number, sub, piece.wanted))
    rendered = [chat.render(sub, sorted(sub.weights)) for _, _, sub, _ in pieces]
    for (position, number, sub, _), enc in zip(pieces, chat.encode(rendered), strict=True):
        result = results[position]
        result.stats.add(enc.stats)
        row = weigh_tokens(enc, sub.weights)
        if len(row.input_ids) > limit:
            # A single step longer than what is left after the prefix.
            result.truncated += 1
            row = truncate(row, limit)
        _keep(result, TokenRow(row.input_ids, row.weights, number))


def weights_from_messages(messages: Sequence[Mapping[str, Any]]) -> dict[int, float]:
    """Weights of an `openai_jsonl` row: its assistant messages' `weight` (default 1)."""
    return {
        i: float(m.get("weight", 1))
        for i, m in enumerate(messages)
        if m.get("role") == "assistant" and float(m.get("weight", 1)) > 0
    }
