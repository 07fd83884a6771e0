"""Rendering a conversation with a chat template, and the token span of every trained turn.

Right by construction, not by pattern matching: the span of assistant message `i` is read off
renders of growing prefixes of the conversation. Rendering the first `i` messages with the
generation prompt gives where the model starts writing; rendering the first `i + 1` messages
gives where its turn ends. Both must be exact prefixes of the full render, or the template
re-renders past turns differently (reasoning templates that drop old thoughts, dates stamped
on the last turn...) and no mask computed from it could be right: we refuse, naming the
message. The trained span runs from the end of the generation prompt to the end of the turn
less trailing whitespace, so it holds the message and its end-of-turn token, and not the
newline some templates put between turns.

Tokens come from encoding the full render once (what a trainer and an inference server see),
with offsets; a token is trained when it lies wholly inside a trained span. A token that
straddles a span edge is not trained, and is counted.

This module imports neither torch nor the database; the tokenizer is any Hugging Face fast
tokenizer (its chat template and `__call__` with offsets).
"""

from __future__ import annotations

import hashlib
import logging
from bisect import bisect_left, bisect_right
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
Overflow = Literal["truncate", "drop", "split"]
# The first renders of each renderer are compared with `apply_chat_template` itself.
_CROSS_CHECKS = 8


class NotPrefixStableError(Exception):
    """The chat template renders a prefix of the conversation differently from the whole."""

    def __init__(self, message_index: int, position: int, expected: str, got: str) -> None:
        self.message_index = message_index
        self.position = position
        self.expected = expected
        self.got = got
        super().__init__(
            f"rendering the first {message_index} messages is not a prefix of rendering all of "
            f"them: at character {position} the full render has {expected!r} but the prefix "
            f"render has {got!r}"
        )


def template_hash(template: str) -> str:
    return hashlib.sha256(template.encode()).hexdigest()


class ChatRenderer:
    """Renders conversations exactly as `tokenizer.apply_chat_template(..., tokenize=False)`.

    Many prefixes of one conversation are rendered, so this skips the per-call work of
    `apply_chat_template` (copying and normalising every message again for every prefix): the
    conversation is normalised once, with transformers' own functions, and the template is
    compiled once by transformers' own compiler. The first renders are cross-checked against
    `apply_chat_template`; if those internals are unavailable, every render goes through it.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                f"tokenizer {tokenizer.name_or_path!r} has no chat template: exports render "
                "conversations with the template the model will be served with"
            )
        self._kwargs: dict[str, Any] = dict(tokenizer.special_tokens_map)
        self._checks_left = _CROSS_CHECKS
        self._fast: Any = None
        try:
            from transformers.utils import chat_template_utils as ctu

            self._fast = ctu
            # Probe the internals used below, so a transformers release without them falls
            # back to the public API at construction, not halfway through an export.
            self._fast._compile_jinja_template  # noqa: B018
            self._fast._plain_template_data  # noqa: B018
            self._fast._alias_reasoning_fields  # noqa: B018
            self._fast._normalize_chat_messages  # noqa: B018
        except (ImportError, AttributeError):
            log.warning("transformers chat-template internals not found; rendering is slower")
            self._fast = None

    def template_for(self, tools: Sequence[Mapping[str, Any]] | None) -> str:
        template: str = self.tokenizer.get_chat_template(None, list(tools) if tools else None)
        return template

    def prepare(
        self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None
    ) -> PreparedChat:
        """Normalise a conversation once; its prefixes are then rendered without copies."""
        if self._fast is None:
            return PreparedChat(
                [dict(m) for m in messages], [dict(t) for t in tools] if tools else None, None
            )
        ctu = self._fast
        chat = ctu._alias_reasoning_fields(
            ctu._plain_template_data(ctu._normalize_chat_messages(list(messages)))
        )
        schemas = ctu._plain_template_data(list(tools)) if tools else None
        compiled = ctu._compile_jinja_template(self.template_for(tools))
        return PreparedChat(chat, schemas, compiled)

    def render(self, chat: PreparedChat, count: int, *, generation_prompt: bool) -> str:
        """The first `count` messages, optionally followed by the generation prompt."""
        if chat.compiled is None:
            text: str = self.tokenizer.apply_chat_template(
                chat.messages[:count],
                tools=chat.tools,
                tokenize=False,
                add_generation_prompt=generation_prompt,
            )
            return text
        rendered: str = chat.compiled.render(
            messages=chat.messages[:count],
            tools=chat.tools,
            documents=None,
            add_generation_prompt=generation_prompt,
            **self._kwargs,
        )
        return rendered

    def cross_check(
        self,
        messages: Sequence[Mapping[str, Any]],
        tools: Sequence[Mapping[str, Any]] | None,
        rendered: str,
    ) -> None:
        if self._fast is None or self._checks_left <= 0:
            return
        self._checks_left -= 1
        official = self.tokenizer.apply_chat_template(
            list(messages), tools=list(tools) if tools else None, tokenize=False
        )
        if official != rendered:
            # Never expected; if a transformers release changes its preprocessing, stop using
            # the fast path rather than write spans from a render the trainer will not see.
            log.error("fast chat-template render differs from apply_chat_template; falling back")
            self._fast = None
            raise RenderMismatchError()


class RenderMismatchError(Exception):
    """Internal: the fast render path disagreed with `apply_chat_template`; render again."""


@dataclass
class PreparedChat:
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None
    compiled: Any


@dataclass(frozen=True)
class TurnSpan:
    """Where assistant message `message_index` sits in the render, in characters."""

    message_index: int
    start: int  # end of the generation prompt: the first character the model writes
    end: int  # end of its turn, end-of-turn token included, trailing whitespace not
    close: int  # end of the message's render, trailing whitespace included: the next one's start


@dataclass(frozen=True)
class RenderedChat:
    text: str
    turns: tuple[TurnSpan, ...]  # the assistant messages asked for, in order
    prefix_end: int  # where the first assistant turn's content starts: the task prefix


def render_chat(
    renderer: ChatRenderer,
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Mapping[str, Any]] | None,
    wanted: Sequence[int],
) -> RenderedChat:
    """Render `messages` and find the span of each assistant message in `wanted`.

    Raises NotPrefixStableError when a prefix render is not a prefix of the full render.
    """
    try:
        return _render_chat(renderer, messages, tools, wanted)
    except RenderMismatchError:
        return _render_chat(renderer, messages, tools, wanted)


def _render_chat(
    renderer: ChatRenderer,
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Mapping[str, Any]] | None,
    wanted: Sequence[int],
) -> RenderedChat:
    chat = renderer.prepare(messages, tools)
    full = renderer.render(chat, len(messages), generation_prompt=False)
    renderer.cross_check(messages, tools, full)
    first_assistant = next(
        (i for i, m in enumerate(messages) if m.get("role") == "assistant"), len(messages)
    )
    prefix = renderer.render(chat, first_assistant, generation_prompt=True)
    _require_prefix(full, prefix, first_assistant)
    turns: list[TurnSpan] = []
    for index in wanted:
        if messages[index].get("role") != "assistant":
            raise ValueError(f"message {index} is not an assistant message")
        opened = renderer.render(chat, index, generation_prompt=True)
        closed = renderer.render(chat, index + 1, generation_prompt=False)
        _require_prefix(full, opened, index)
        _require_prefix(full, closed, index + 1)
        start = len(opened)
        end = max(start, len(closed.rstrip()))
        if len(closed) < start:
            raise NotPrefixStableError(index + 1, len(closed), full[len(closed) : start], "")
        turns.append(TurnSpan(index, start, end, len(closed)))
    return RenderedChat(full, tuple(turns), len(prefix))


def _require_prefix(full: str, prefix: str, count: int) -> None:
    if full.startswith(prefix):
        return
    position = next(
        (i for i, (a, b) in enumerate(zip(full, prefix, strict=False)) if a != b),
        min(len(full), len(prefix)),
    )
    raise NotPrefixStableError(
        count, position, full[position : position + 40], prefix[position : position + 40]
    )


# ---------------------------------------------------------------------- tokens


@dataclass
class SpanStats:
    """What a checker should know about the masks of some rows."""

    straddling_tokens: int = 0  # tokens across a trained span's edge (left untrained)
    turns_without_end_token: int = 0  # trained turns whose last token is not a special token
    empty_turns: int = 0  # trained turns that rendered to nothing

    def add(self, other: SpanStats) -> None:
        self.straddling_tokens += other.straddling_tokens
        self.turns_without_end_token += other.turns_without_end_token
        self.empty_turns += other.empty_turns


@dataclass(frozen=True)
class TokenRow:
    """One training row: tokens, and for each a loss weight (0 = no loss)."""

    input_ids: list[int]
    weights: list[float]
    part: int = 0

    @property
    def labels(self) -> list[int]:
        pairs = zip(self.input_ids, self.weights, strict=True)
        return [token if weight > 0 else IGNORE_INDEX for token, weight in pairs]

    @property
    def num_trained(self) -> int:
        return sum(1 for w in self.weights if w > 0)


@dataclass(frozen=True)
class Encoded:
    """A rendered conversation as tokens, with the token range of every asked-for turn."""

    input_ids: list[int]
    turn_tokens: tuple[tuple[int, int, int], ...]  # (message_index, first, end) trained tokens
    message_ends: tuple[int, ...]  # per turn: the token where the next message's render starts
    prefix_tokens: int  # tokens of the task prefix (up to the first turn's content)
    stats: SpanStats


def encode_rendered(
    tokenizer: Any, rendered: Sequence[RenderedChat], special_ids: frozenset[int]
) -> list[Encoded]:
    """Encode full renders (one batched call: the tokenizer runs them in parallel) and map
    every turn's character span onto whole tokens."""
    if not rendered:
        return []
    batch = tokenizer(
        [r.text for r in rendered],
        add_special_tokens=False,
        return_offsets_mapping=True,
        return_attention_mask=False,
    )
    out: list[Encoded] = []
    for chat, ids, offsets in zip(
        rendered, batch["input_ids"], batch["offset_mapping"], strict=True
    ):
        out.append(_map_spans(chat, ids, offsets, special_ids))
    return out


def _map_spans(
    chat: RenderedChat,
    ids: list[int],
    offsets: list[tuple[int, int]],
    special_ids: frozenset[int],
) -> Encoded:
    starts = [s for s, _ in offsets]
    ends = [e for _, e in offsets]
    stats = SpanStats()
    turns: list[tuple[int, int, int]] = []
    message_ends: list[int] = []
    for turn in chat.turns:
        message_ends.append(bisect_left(starts, turn.close))
        first = bisect_left(starts, turn.start)  # first token starting inside the span
        if turn.end <= turn.start:
            stats.empty_turns += 1
            turns.append((turn.message_index, first, first))
            continue
        end = bisect_right(ends, turn.end)  # tokens ending inside the span
        # Offsets are ordered, so only the tokens just outside [first, end) can straddle.
        if first > 0 and ends[first - 1] > turn.start:
            stats.straddling_tokens += 1
        if end < len(ids) and starts[end] < turn.end:
            stats.straddling_tokens += 1
        end = max(first, end)
        if end > first and ids[end - 1] not in special_ids:
            stats.turns_without_end_token += 1
        turns.append((turn.message_index, first, end))
    prefix_tokens = bisect_left(starts, chat.prefix_end)
    return Encoded(ids, tuple(turns), tuple(message_ends), prefix_tokens, stats)


def weigh_tokens(encoded: Encoded, weights: Mapping[int, float]) -> TokenRow:
    """The row of an encoded conversation, each trained turn's tokens at its message weight."""
    token_weights = [0.0] * len(encoded.input_ids)
    for message_index, first, end in encoded.turn_tokens:
        weight = weights.get(message_index, 0.0)
        if weight > 0:
            token_weights[first:end] = [weight] * (end - first)
    return TokenRow(list(encoded.input_ids), token_weights)


def truncate(row: TokenRow, max_seq_len: int) -> TokenRow:
    return TokenRow(row.input_ids[:max_seq_len], row.weights[:max_seq_len], row.part)


# ---------------------------------------------------------------------- overflow: split


@dataclass
class Piece:
    """A contiguous run of steps, rendered after the task prefix on its own."""

    messages: list[dict[str, Any]]
    wanted: list[int]  # assistant message indices within `messages`
    weights: dict[int, float]


def split_pieces(
    messages: Sequence[Mapping[str, Any]],
    step_starts: Sequence[int],
    weights: Mapping[int, float],
    first_tokens: Sequence[int],
    end_tokens: Sequence[int],
    prefix_tokens: int,
    max_seq_len: int,
) -> list[Piece]:
    """Group steps greedily into pieces that, after repeating the task prefix, fit
    `max_seq_len` by the token counts of the full render (the caller re-renders and checks).

    `step_starts[k]` is the message index of step k (its assistant message); a step runs to the
    next step's start. A piece ends on its last step's assistant message: what answers that
    step carries no loss and no trained token follows it in the piece, so it is left out and
    not counted (it would otherwise make a step with a long observation "too long" alone, and
    be cut). In the full render, step k's turn starts at token `first_tokens[k]` and the
    message after its assistant message at `end_tokens[k]`; the `prefix_tokens` before the
    first step's turn (task and generation prompt) are repeated in every piece.
    """
    prefix = [dict(m) for m in messages[: step_starts[0]]]
    groups: list[tuple[int, int]] = []
    first = 0
    for k in range(1, len(step_starts)):
        if prefix_tokens + end_tokens[k] - first_tokens[first] > max_seq_len:
            groups.append((first, k))
            first = k
    groups.append((first, len(step_starts)))
    pieces: list[Piece] = []
    for a, b in groups:
        body = [dict(m) for m in messages[step_starts[a] : step_starts[b - 1] + 1]]
        offset = len(prefix) - step_starts[a]
        wanted = [start + offset for start in step_starts[a:b]]
        piece_weights = {
            start + offset: weights[start] for start in step_starts[a:b] if start in weights
        }
        pieces.append(Piece(prefix + body, wanted, piece_weights))
    return pieces
