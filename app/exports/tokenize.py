"""Conversations to training rows with a tokenizer: render, encode, weigh, handle overflow.

Shared by the exporter (`tokenized_parquet`, and `openai_jsonl` rows measured against
`max_seq_len`) and the trainer (reading `openai_jsonl`), so all tokenize with the same span
code. Also which tokenizers an export may name and load (the trainer's are its user's own
business). No database, HTTP or torch here.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from app.recipe.render import (
    ChatRenderer,
    Encoded,
    NotPrefixStableError,
    RenderedChat,
    SpanStats,
    TokenRow,
    encode_rendered,
    render_chat,
    split_pieces,
    truncate,
    weigh_tokens,
)
from app.recipe.tokenizer_names import (
    is_hub_id,
    path_shaped,
    revision_allowed,
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
    # With `TokenizeConfig.messages`: the rows as conversations (the whole, or its pieces).
    pieces: list[Example] = field(default_factory=list)
    # Rows (or pieces of a split) not written and why: "no_trained_tokens", "too_long".
    dropped: dict[str, int] = field(default_factory=dict)
    # Rows whose tokens were cut at max_seq_len (overflow=truncate, or a split piece holding
    # one step that is longer alone); as messages, rows whose last steps were left out.
    truncated: int = 0
    stats: SpanStats = field(default_factory=SpanStats)
    # Set when the example cannot be exported at all (template or limit problem).
    error: str | None = None
    error_code: str | None = None

    def drop(self, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1


# A row that cannot fit max_seq_len however it is cut: its task prefix alone is longer.
PREFIX_TOO_LONG = "prefix_too_long"


@dataclass(frozen=True)
class TokenizeConfig:
    max_seq_len: int | None = None
    overflow: str = "truncate"
    # Measure and split conversations, and return them as messages (`Tokenized.pieces`), not
    # tokens: rows of `openai_jsonl`. No message can be cut, so `truncate` keeps the steps
    # that fit (the first piece of a split) and a step too long alone is dropped.
    messages: bool = False
    # A row whose task prefix alone is longer than max_seq_len fails the export (True), or is
    # dropped and counted as PREFIX_TOO_LONG (False).
    strict: bool = True


class NotFastTokenizerError(ValueError):
    """The tokenizer loaded, but has no token offsets to map turns onto tokens."""


class ChatTokenizer:
    """A tokenizer with its renderer and the ids of its special tokens."""

    def __init__(self, tokenizer: Any) -> None:
        if not getattr(tokenizer, "is_fast", False):
            raise NotFastTokenizerError(
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
    """Load a tokenizer by local path or hub id (cached per process). Unrestricted: the trainer
    reads its user's own files; exports go through `load_export_tokenizer`."""
    from transformers import AutoTokenizer

    return ChatTokenizer(AutoTokenizer.from_pretrained(name, revision=revision))


# ---------------------------------------------------------------- an export's tokenizer
#
# An export names its tokenizer, and the worker loads it: a Hugging Face Hub id, or a folder
# inside a directory the operator allows (SRFT_TOKENIZER_DIRS), nothing else on the server.
# Refusals are decided on the text alone and say the same whatever exists on disk.


class TokenizerUnavailableError(Exception):
    """An export's tokenizer cannot be loaded. `reason` is for the worker's log only: the
    caller gets `message`, which says nothing about what exists on the server."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(reason)
        self.name = name
        self.reason = reason

    @property
    def message(self) -> str:
        return (
            f"the tokenizer {self.name!r} could not be loaded from the Hub or an allowed directory"
        )


def load_export_tokenizer(
    name: str, revision: str | None, roots: Sequence[Path]
) -> tuple[ChatTokenizer, str]:
    """An export's tokenizer, and the name its tokenizing processes should load it by.

    A Hub id is loaded from the Hub (or its cache), never from a folder of the same name in the
    working directory; a path only from inside `roots` (absolute, symlinks resolved) once its
    own symlinks are resolved too. Raises `TokenizerUnavailableError` for every failure but
    `NotFastTokenizerError`."""
    source = _export_source(name, revision, roots)
    try:
        return load_chat_tokenizer(source, revision), source
    except NotFastTokenizerError:
        raise
    except Exception as error:
        raise TokenizerUnavailableError(name, f"{type(error).__name__}: {error}") from error


def _export_source(name: str, revision: str | None, roots: Sequence[Path]) -> str:
    if revision is not None and not revision_allowed(revision):
        raise TokenizerUnavailableError(name, f"revision {revision!r} is not allowed")
    if is_hub_id(name):
        # transformers loads a name that is also a folder (or file) relative to the working
        # directory from there, before it asks the Hub.
        if os.path.lexists(name):
            raise TokenizerUnavailableError(
                name,
                f"{name!r} exists in the working directory {os.getcwd()}; a Hub id is "
                "never loaded from a local folder",
            )
        return name
    if not path_shaped(name):
        raise TokenizerUnavailableError(name, "neither a Hub id nor an absolute path")
    real = Path(os.path.realpath(name))
    if not _inside(real, roots):
        raise TokenizerUnavailableError(
            name, f"{real} is outside SRFT_TOKENIZER_DIRS {list(roots)}"
        )
    if not real.is_dir():
        raise TokenizerUnavailableError(name, f"{real} is not a directory")
    for entry in real.iterdir():
        target = Path(os.path.realpath(entry))
        if not _inside(target, roots):
            raise TokenizerUnavailableError(
                name, f"{entry} leads outside SRFT_TOKENIZER_DIRS: {target}"
            )
    return str(real)


def _inside(path: Path, roots: Sequence[Path]) -> bool:
    return any(path.is_relative_to(root) for root in roots)


def tokenize_examples(
    chat: ChatTokenizer, examples: Sequence[Example], config: TokenizeConfig
) -> list[Tokenized]:
    """Rows for each example, in order. Encoding is batched across the examples."""
    results = [Tokenized(e.key) for e in examples]
    rendered: list[tuple[int, RenderedChat]] = []
    for position, example in enumerate(examples):
        # As messages only the length counts: no turn's span is needed.
        wanted = () if config.messages else sorted(example.weights)
        try:
            rendered.append((position, chat.render(example, wanted)))
        except NotPrefixStableError as error:
            _not_prefix_stable(results[position], error)
    encoded = chat.encode([r for _, r in rendered])
    to_split: list[int] = []
    for (position, _), enc in zip(rendered, encoded, strict=True):
        result, example = results[position], examples[position]
        result.stats.add(enc.stats)
        limit = config.max_seq_len
        if limit is None or len(enc.input_ids) <= limit:
            _keep(result, example, enc, config)
        elif enc.prefix_tokens > limit:
            if config.overflow == "drop":
                result.drop("too_long")
            elif not config.strict:
                result.drop(PREFIX_TOO_LONG)
            else:
                result.error = (
                    f"the task prefix is {enc.prefix_tokens} tokens, longer than max_seq_len "
                    f"{limit}: raise max_seq_len, or leave strict off to drop such rows"
                )
                result.error_code = PREFIX_TOO_LONG
        elif config.overflow == "drop":
            result.drop("too_long")
        elif config.overflow == "truncate" and not config.messages:
            row = weigh_tokens(enc, example.weights)
            _keep_tokens(result, truncate(row, limit), truncated=True)
        else:
            to_split.append(position)
    if to_split:
        assert config.max_seq_len is not None
        _split(chat, [examples[p] for p in to_split], [results[p] for p in to_split], config)
    return results


def _not_prefix_stable(result: Tokenized, error: NotPrefixStableError) -> None:
    result.error = f"message {error.message_index}: {error}"
    result.error_code = "template_not_prefix_stable"


def _keep(
    result: Tokenized,
    example: Example,
    enc: Encoded,
    config: TokenizeConfig,
    *,
    truncated: bool = False,
) -> None:
    if not config.messages:
        _keep_tokens(result, weigh_tokens(enc, example.weights), truncated=truncated)
    elif not example.weights:
        result.drop("no_trained_tokens")
    else:
        result.pieces.append(example)
        result.truncated += 1 if truncated else 0


def _keep_tokens(result: Tokenized, row: TokenRow, *, truncated: bool = False) -> None:
    """Keep a row with trained tokens (counted as truncated if it was cut); drop the rest."""
    if row.num_trained == 0:
        result.drop("no_trained_tokens")
    else:
        result.rows.append(row)
        result.truncated += 1 if truncated else 0


# A split is re-rendered and checked; a piece of several steps that came out longer than
# estimated (tokens merging differently where a piece is joined) is split again with the
# limit lowered by the excess, at most this many times.
_SPLIT_TRIES = 4


def _split(
    chat: ChatTokenizer,
    examples: Sequence[Example],
    results: Sequence[Tokenized],
    config: TokenizeConfig,
) -> None:
    """Split overflowing conversations at step boundaries, each piece after the task prefix.

    Nothing is cut unless one step, alone after the prefix, is longer than `max_seq_len`: as
    tokens, that piece is truncated (and counted); as messages, it is dropped as too long.
    As messages with overflow=truncate, only the first piece is kept: the row is cut at the
    last step boundary that fits."""
    limit = config.max_seq_len
    assert limit is not None
    for example, result in zip(examples, results, strict=True):
        try:
            # Every step's token position is needed to cut between steps, trained or not.
            [full] = chat.encode([chat.render(example, example.step_messages)])
            parts = _fit_pieces(chat, example, full, limit, config.messages)
        except NotPrefixStableError as error:
            _not_prefix_stable(result, error)
            continue
        head_only = config.messages and config.overflow == "truncate"
        if head_only:
            parts = parts[:1]
        for number, (sub, enc) in enumerate(parts):
            result.stats.add(enc.stats)
            if config.messages:
                if len(enc.input_ids) > limit:
                    result.drop("too_long")  # one step longer alone: no message can be cut
                else:
                    _keep(result, sub, enc, config, truncated=head_only)
                continue
            row = weigh_tokens(enc, sub.weights)
            cut = len(row.input_ids) > limit
            row = truncate(TokenRow(row.input_ids, row.weights, number), limit)
            _keep_tokens(result, row, truncated=cut)


def _fit_pieces(
    chat: ChatTokenizer, example: Example, full: Encoded, limit: int, messages: bool
) -> list[tuple[Example, Encoded]]:
    """The pieces of one conversation, each rendered and encoded on its own."""
    firsts = [first for _, first, _ in full.turn_tokens]
    budget = limit
    for _ in range(_SPLIT_TRIES):
        parts = split_pieces(
            example.messages,
            example.step_messages,
            example.weights,
            firsts,
            full.message_ends,
            firsts[0],
            budget,
        )
        subs = [
            Example(example.key, p.messages, example.tools, tuple(p.wanted), p.weights)
            for p in parts
        ]
        encoded = chat.encode([chat.render(s, () if messages else sorted(s.weights)) for s in subs])
        excess = max(
            (
                len(enc.input_ids) - limit
                for sub, enc in zip(subs, encoded, strict=True)
                if len(sub.step_messages) > 1
            ),
            default=0,
        )
        if excess <= 0:
            break
        budget -= excess
    return list(zip(subs, encoded, strict=True))


def weights_from_messages(messages: Sequence[Mapping[str, Any]]) -> dict[int, float]:
    """Weights of an `openai_jsonl` row: its assistant messages' `weight` (default 1)."""
    return {
        i: float(m.get("weight", 1))
        for i, m in enumerate(messages)
        if m.get("role") == "assistant" and float(m.get("weight", 1)) > 0
    }
