"""Critic answers: tolerated forms parse, bad answers fail with a precise message."""

from __future__ import annotations

import json
from typing import Any

import pytest

from app.critic.labels import DEFAULT_LABELS, LabelSet
from app.critic.parse import (
    MAX_REASON_CHARS,
    CriticAnswerError,
    Judgment,
    parse_step_answer,
    parse_trajectory_answer,
)

TARGETS = [3, 4, 5]


def answer(*entries: Any) -> str:
    return json.dumps({"steps": list(entries)})


def entry(index: Any, label: str = "good", reason: Any = "fine") -> dict[str, Any]:
    return {"index": index, "label": label, "reason": reason}


GOOD_ANSWER = answer(entry(3), entry(4, "mistake", "broke it"), entry(5, "recover"))


def test_a_well_formed_answer_parses() -> None:
    judgments = parse_trajectory_answer(GOOD_ANSWER, TARGETS, DEFAULT_LABELS)
    assert judgments == {
        3: Judgment(3, "good", "fine"),
        4: Judgment(4, "mistake", "broke it"),
        5: Judgment(5, "recover", "fine"),
    }
    assert list(judgments) == TARGETS


@pytest.mark.parametrize(
    "text",
    [
        f"```json\n{GOOD_ANSWER}\n```",
        f"```\n{GOOD_ANSWER}```",
        f"Here are the labels you asked for:\n\n{GOOD_ANSWER}\n\nLet me know {{if}} needed.",
        f"I looked at [the steps] carefully. {GOOD_ANSWER}",
        json.dumps([entry(3), entry(4, "mistake", "broke it"), entry(5, "recover")]),
        answer(
            {"step": 3, "label": "GOOD", "reason": "fine"},
            {"step_index": "4", "label": " Mistake\n", "reason": "broke it"},
            {"index": 5.0, "label": "recover", "reason": "fine"},
        ),
    ],
)
def test_tolerated_forms_parse_to_the_same_judgments(text: str) -> None:
    judgments = parse_trajectory_answer(text, TARGETS, DEFAULT_LABELS)
    assert [(j.index, j.label) for j in judgments.values()] == [
        (3, "good"),
        (4, "mistake"),
        (5, "recover"),
    ]


def test_missing_or_null_reasons_are_empty_and_long_ones_are_cut() -> None:
    text = answer(
        {"index": 3, "label": "good"},
        entry(4, reason=None),
        entry(5, reason="  " + "r" * 900),
    )
    judgments = parse_trajectory_answer(text, TARGETS, DEFAULT_LABELS)
    assert judgments[3].reason == ""
    assert judgments[4].reason == ""
    assert judgments[5].reason == "r" * MAX_REASON_CHARS


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (answer(entry(3), entry(5)), "step 4 is missing"),
        (answer(entry(3)), "steps 4, 5 are missing"),
        (answer(entry(3), entry(4), entry(5), entry(12)), "step 12 was not asked for"),
        (
            answer(entry(3), entry(3), entry(4), entry(5)),
            "step 3 appears twice",
        ),
        (
            answer(entry(3), entry(4), entry(12)),
            "step 5 is missing; step 12 was not asked for",
        ),
        (
            answer(entry(3), entry(4, "bad"), entry(5)),
            "step 4: label 'bad' is not one of good, unnecessary, mistake, recover",
        ),
        (answer(entry(3), entry(4, reason=7), entry(5)), "step 4: the reason must be a string"),
        (answer(entry(3), {"index": 4}, entry(5)), "step 4: the label is missing"),
        (answer(entry(3), {"label": "good"}, entry(5)), "steps[1] has no index"),
        (answer(entry(3), entry(True), entry(5)), "steps[1]: the index must be a step number"),
        (answer(entry(3), entry("four"), entry(5)), "steps[1]: the index must be a step number"),
        (answer(entry(3), "good", entry(5)), "steps[1] is a string, not an object"),
        (json.dumps({"steps": "all good"}), '"steps" must be a list, got a string'),
        (json.dumps({"labels": []}), 'expected {"steps": [...]}, got an object with keys: labels'),
        ("All steps look good to me.", "no JSON object found"),
        ("", "the answer is empty"),
        (GOOD_ANSWER[: len(GOOD_ANSWER) // 2], "the answer is truncated or not valid JSON: "),
        (
            "Here are my labels:\n" + repr({"steps": [entry(3), entry(4), entry(5)]}),
            "the answer is truncated or not valid JSON: Expecting property name",
        ),
    ],
)
def test_bad_answers_say_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(CriticAnswerError) as caught:
        parse_trajectory_answer(text, TARGETS, DEFAULT_LABELS)
    assert str(caught.value).startswith(message)


def test_none_is_an_empty_answer() -> None:
    with pytest.raises(CriticAnswerError, match="the answer is empty"):
        parse_trajectory_answer(None, TARGETS, DEFAULT_LABELS)


def test_custom_labels_are_checked_against_their_own_set() -> None:
    labels = LabelSet.from_request({"keep": "train on it", "drop": "do not"})
    text = json.dumps({"index": 2, "label": "DROP", "reason": "bad edit"})
    assert parse_step_answer(text, 2, labels) == Judgment(2, "drop", "bad edit")
    with pytest.raises(CriticAnswerError, match="label 'good' is not one of keep, drop"):
        parse_step_answer(json.dumps(entry(2)), 2, labels)


# ---------------------------------------------------------------------------- step mode


def test_a_step_answer_parses() -> None:
    text = '```json\n{"index": "7", "label": "Unnecessary", "reason": "already read"}\n```'
    assert parse_step_answer(text, 7, DEFAULT_LABELS) == Judgment(7, "unnecessary", "already read")


def test_a_step_answer_may_leave_out_the_index_or_wrap_itself() -> None:
    bare = json.dumps({"label": "good", "reason": "ok"})
    assert parse_step_answer(bare, 7, DEFAULT_LABELS) == Judgment(7, "good", "ok")
    wrapped = json.dumps({"steps": [entry(7)]})
    assert parse_step_answer(wrapped, 7, DEFAULT_LABELS) == Judgment(7, "good", "fine")
    listed = json.dumps([entry(7)])
    assert parse_step_answer(listed, 7, DEFAULT_LABELS) == Judgment(7, "good", "fine")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (json.dumps(entry(8)), "the answer is about step 8, but step 7 was asked for"),
        (json.dumps({"steps": [entry(7), entry(8)]}), "expected one judgment, for step 7; got 2"),
        (json.dumps(entry(7, "fine")), "step 7: label 'fine' is not one of"),
        ('{"index": 7, "label": "go', "the answer is truncated or not valid JSON"),
        ("[7]", "expected a JSON object, got a number"),
        ('"good"', "no JSON object found"),
    ],
)
def test_bad_step_answers_say_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(CriticAnswerError) as caught:
        parse_step_answer(text, 7, DEFAULT_LABELS)
    assert str(caught.value).startswith(message)


@pytest.mark.parametrize("index", ["²", "٣", "9" * 5000, "1" * 19])
def test_an_index_int_cannot_read_is_a_bad_answer_not_a_crash(index: str) -> None:
    with pytest.raises(CriticAnswerError, match="step number"):
        parse_trajectory_answer(answer(entry(index)), [3], DEFAULT_LABELS)
