"""Token spans from prefix renders: exact on stable templates, refused on unstable ones, and
the edge cases a mask can silently break on (straddling tokens, turns with no end-of-turn
token, truncation, splitting) counted or handled."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from app.exports.tokenize import (
    ChatTokenizer,
    Example,
    TokenizeConfig,
    tokenize_examples,
    weights_from_messages,
)
from app.recipe.render import NotPrefixStableError, render_chat, split_pieces
from tests.builders import make_trajectory

TOOLS = [{"type": "function", "function": {"name": "bash", "parameters": {"type": "object"}}}]


def _chat(tokenizers: dict[str, Path], name: str, template: str | None = None) -> ChatTokenizer:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizers[name]))
    if template is not None:
        tokenizer.chat_template = template
    return ChatTokenizer(tokenizer)


def _example(steps: int, trained: list[int]) -> Example:
    messages: list[dict[str, Any]] = make_trajectory(steps)["messages"]
    positions = tuple(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return Example("t", messages, TOOLS, positions, {positions[k]: 1.0 for k in trained})


def _trained_texts(chat: ChatTokenizer, ids: list[int], weights: list[float]) -> list[str]:
    runs: list[list[int]] = [[]]
    for token, weight in zip(ids, weights, strict=True):
        if weight > 0:
            runs[-1].append(token)
        elif runs[-1]:
            runs.append([])
    return [chat.tokenizer.decode(run) for run in runs if run]


def test_spans_hold_each_trained_turn_and_its_end_token(tokenizers: dict[str, Path]) -> None:
    chat = _chat(tokenizers, "chatml")
    [result] = tokenize_examples(chat, [_example(3, [0, 2])], TokenizeConfig())
    [row] = result.rows
    assert _trained_texts(chat, row.input_ids, row.weights) == [
        f'step {k}: look around<tool_call>\n{{"name": "bash", "arguments": '
        f'{{"command": "ls {k}"}}}}\n</tool_call><|im_end|>'
        for k in (0, 2)
    ]
    assert result.stats.straddling_tokens == 0
    assert result.stats.turns_without_end_token == 0
    # The full row is exactly what apply_chat_template renders, tokenized.
    text = chat.tokenizer.apply_chat_template(_example(3, []).messages, tools=TOOLS, tokenize=False)
    assert row.input_ids == chat.tokenizer(text, add_special_tokens=False)["input_ids"]


def test_a_template_that_rewrites_history_is_refused(tokenizers: dict[str, Path]) -> None:
    chat = _chat(tokenizers, "chatml_drops_past_thoughts")
    example = _example(2, [0])
    with pytest.raises(NotPrefixStableError) as refused:
        render_chat(chat.renderer, example.messages, example.tools, [2])
    assert refused.value.message_index in (2, 3)
    assert "step 0: look around" in refused.value.expected + refused.value.got
    [result] = tokenize_examples(chat, [example], TokenizeConfig())
    assert result.rows == []
    assert result.error_code == "template_not_prefix_stable"


def test_a_token_across_a_span_edge_is_counted_and_not_trained(
    tokenizers: dict[str, Path],
) -> None:
    from tests.chat_tokenizers import CHATML

    # The generation prompt ends in a space: byte-level BPE glues it to the content's first
    # word (" step"), a token that starts before the span and must not be trained.
    glued = CHATML.replace("<|im_start|>assistant\n", "<|im_start|>assistant ")
    chat = _chat(tokenizers, "chatml", glued)
    [result] = tokenize_examples(chat, [_example(2, [0, 1])], TokenizeConfig())
    [row] = result.rows
    assert result.stats.straddling_tokens >= 1
    texts = _trained_texts(chat, row.input_ids, row.weights)
    assert len(texts) == 2
    for k, text in enumerate(texts):
        assert text.startswith(f" {k}: look around")
        assert text.endswith("<|im_end|>")


def test_turns_without_an_end_token_are_counted(tokenizers: dict[str, Path]) -> None:
    plain = (
        "{% for m in messages %}{{ m.role }}: {{ m.content or '' }}\n\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    chat = _chat(tokenizers, "chatml", plain)
    [result] = tokenize_examples(chat, [_example(2, [0, 1])], TokenizeConfig())
    assert result.stats.turns_without_end_token == 2
    assert result.stats.straddling_tokens == 2  # " step" starts in "assistant: "
    [row] = result.rows
    assert _trained_texts(chat, row.input_ids, row.weights) == [
        " 0: look around",
        " 1: look around",
    ]


def test_truncation_keeps_the_head_and_drops_rows_left_with_nothing(
    tokenizers: dict[str, Path],
) -> None:
    chat = _chat(tokenizers, "chatml")
    [full] = tokenize_examples(chat, [_example(4, [0, 3])], TokenizeConfig())
    length = len(full.rows[0].input_ids)
    [cut] = tokenize_examples(chat, [_example(4, [0, 3])], TokenizeConfig(length - 20))
    assert len(cut.rows[0].input_ids) == length - 20
    assert cut.rows[0].input_ids == full.rows[0].input_ids[: length - 20]
    assert cut.truncated == 1
    # Only the last step is trained, and truncation removes it: no row, counted.
    [gone] = tokenize_examples(chat, [_example(4, [3])], TokenizeConfig(length - 60))
    assert gone.rows == []
    assert gone.dropped == {"no_trained_tokens": 1}
    [dropped] = tokenize_examples(chat, [_example(4, [0])], TokenizeConfig(length - 1, "drop"))
    assert dropped.dropped == {"too_long": 1}


def test_split_pieces_repeat_the_prefix_and_carry_their_weights() -> None:
    messages = make_trajectory(4)["messages"]
    starts = [2, 4, 6, 8]
    # Each step: a turn of 6 tokens, then an observation of 4.
    firsts, ends = [5, 15, 25, 35], [11, 21, 31, 41]
    pieces = split_pieces(messages, starts, {4: 1.0, 8: 0.5}, firsts, ends, 5, 26)
    assert [len(p.messages) for p in pieces] == [5, 5]
    for piece in pieces:
        assert piece.messages[:2] == messages[:2]
        assert piece.messages[-1]["role"] == "assistant"
    assert pieces[0].weights == {4: 1.0}
    assert pieces[1].weights == {4: 0.5}
    assert pieces[0].messages[2:] == messages[2:5]
    assert pieces[1].messages[2:] == messages[6:9]


def test_a_long_observation_ends_a_piece_instead_of_making_its_step_too_long() -> None:
    """The observation after a piece's last step is left out, and not counted: the step it
    follows fits alone, and the next piece starts after it."""
    messages = make_trajectory(4)["messages"]
    firsts, ends = [5, 15, 1025, 1035], [11, 21, 1031, 1041]  # step 1's observation: 1004
    pieces = split_pieces(
        messages, [2, 4, 6, 8], {2: 1.0, 4: 1.0, 6: 1.0, 8: 1.0}, firsts, ends, 5, 30
    )
    assert [p.messages[2:] for p in pieces] == [messages[2:5], messages[6:9]]


def test_split_rows_each_fit_and_train_each_step_once(tokenizers: dict[str, Path]) -> None:
    chat = _chat(tokenizers, "chatml")
    example = _example(6, [0, 1, 2, 3, 4, 5])
    [whole] = tokenize_examples(chat, [example], TokenizeConfig())
    limit = len(whole.rows[0].input_ids) // 2
    [split] = tokenize_examples(chat, [example], TokenizeConfig(limit, "split"))
    assert len(split.rows) >= 2
    assert all(len(r.input_ids) <= limit for r in split.rows)
    assert [r.part for r in split.rows] == list(range(len(split.rows)))
    texts = [t for r in split.rows for t in _trained_texts(chat, r.input_ids, r.weights)]
    assert texts == _trained_texts(chat, whole.rows[0].input_ids, whole.rows[0].weights)


def test_openai_rows_weights_read_back() -> None:
    messages = [
        {"role": "user", "content": "x"},
        {"role": "assistant", "content": "a", "weight": 0},
        {"role": "tool", "content": "y"},
        {"role": "assistant", "content": "b", "weight": 1},
        {"role": "assistant", "content": "c"},
    ]
    assert weights_from_messages(messages) == {3: 1.0, 4: 1.0}


def _long_observation(steps: int, step: int, words: int) -> Example:
    example = _example(steps, list(range(steps)))
    messages = [dict(m) for m in example.messages]
    observation = example.step_messages[step] + 1
    messages[observation]["content"] = " ".join(f"file_{n}.py" for n in range(words))
    return Example("t", messages, TOOLS, example.step_messages, example.weights)


def test_split_cuts_no_token_when_each_step_fits_alone(tokenizers: dict[str, Path]) -> None:
    """A step followed by a long observation used to count it against the limit and, alone in
    its piece, be truncated (the tokens cut were the observation's, none trained): counted as
    truncated though nothing trained was lost. Pieces end on their last step's turn now."""
    chat = _chat(tokenizers, "chatml")
    normal = _example(4, [0, 1, 2, 3])
    [whole] = tokenize_examples(chat, [normal], TokenizeConfig())
    limit = len(whole.rows[0].input_ids)
    example = _long_observation(4, 1, 800)
    [long] = tokenize_examples(chat, [example], TokenizeConfig())
    assert len(long.rows[0].input_ids) > 2 * limit
    [split] = tokenize_examples(chat, [example], TokenizeConfig(limit, "split"))
    assert split.truncated == 0
    assert len(split.rows) == 2
    assert all(len(r.input_ids) <= limit for r in split.rows)
    texts = [t for r in split.rows for t in _trained_texts(chat, r.input_ids, r.weights)]
    assert texts == _trained_texts(chat, long.rows[0].input_ids, long.rows[0].weights)
    for row in split.rows:
        assert "file_799.py" not in chat.tokenizer.decode(row.input_ids)
    # A turn longer alone than what the prefix leaves is cut: that row is counted.
    example.messages[4]["content"] = " ".join(f"step {n}" for n in range(2000))
    [cut] = tokenize_examples(chat, [example], TokenizeConfig(limit, "split"))
    assert cut.truncated == 1
    assert [len(r.input_ids) for r in cut.rows].count(limit) == 1
    assert all(len(r.input_ids) <= limit for r in cut.rows)


def test_rows_of_messages_are_split_cut_or_dropped_whole(tokenizers: dict[str, Path]) -> None:
    chat = _chat(tokenizers, "chatml")
    example = _example(6, [0, 2, 3, 5])
    [whole] = tokenize_examples(chat, [example], TokenizeConfig())
    limit = len(whole.rows[0].input_ids) // 2

    def length(piece: Example) -> int:
        text = chat.tokenizer.apply_chat_template(piece.messages, tools=TOOLS, tokenize=False)
        return len(chat.tokenizer(text, add_special_tokens=False)["input_ids"])

    [split] = tokenize_examples(chat, [example], TokenizeConfig(limit, "split", messages=True))
    assert split.rows == []
    assert len(split.pieces) >= 2
    for piece in split.pieces:
        assert length(piece) <= limit
        assert piece.messages[:2] == example.messages[:2]
        assert piece.messages[-1]["role"] == "assistant"
    trained = [p.messages[i]["content"] for p in split.pieces for i in sorted(p.weights)]
    assert trained == [example.messages[i]["content"] for i in sorted(example.weights)]
    assert split.truncated == 0

    [head] = tokenize_examples(chat, [example], TokenizeConfig(limit, "truncate", messages=True))
    [piece] = head.pieces
    assert piece.messages == example.messages[: len(piece.messages)]
    assert piece.messages[-1]["role"] == "assistant"
    assert length(piece) <= limit
    assert head.truncated == 1

    [dropped] = tokenize_examples(chat, [example], TokenizeConfig(limit, "drop", messages=True))
    assert dropped.pieces == []
    assert dropped.dropped == {"too_long": 1}

    [fits] = tokenize_examples(chat, [example], TokenizeConfig(10**6, "split", messages=True))
    assert fits.pieces == [example]

    # A step longer alone than the limit cannot be cut inside a message: dropped.
    big = _example(3, [0, 1, 2])
    big.messages[4]["content"] = " ".join(f"step {n}" for n in range(3000))
    [result] = tokenize_examples(chat, [big], TokenizeConfig(limit, "split", messages=True))
    assert result.dropped == {"too_long": 1}
    assert len(result.pieces) == 2
