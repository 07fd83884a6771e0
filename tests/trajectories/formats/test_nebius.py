"""nebius/SWE-agent-trajectories importer, on the real sample rows and on broken copies."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from app.errors import InvalidTrajectoryError, SrftError
from app.recipe.steps import split_steps
from app.trajectories.formats import parse_upload
from app.trajectories.formats.nebius import EVAL_LOG_TAIL
from tests.helpers import trajectory_file
from tests.trajectories.formats.checks import (
    assert_canonical,
    assert_paired,
    first_user,
    load,
    parse_value,
)

SAMPLE = "nebius-swe-agent/adp__nebius-swe-agent-trajectories__sample_raw@51905b6.json"
# PROVENANCE.md: 3 runs of AnalogJ__lexicon-336 with 46, 25 and 29 `ai` turns; same rule here.
EXPECTED_STEPS = [46, 25, 29]


def load_rows() -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = load(SAMPLE)
    return rows


def test_the_nebius_directory_holds_the_sample_only() -> None:
    assert [p.name for p in trajectory_file("nebius-swe-agent").iterdir()] == [SAMPLE.split("/")[1]]


def test_sample_runs_steps_and_shape() -> None:
    trajectories = parse_upload(trajectory_file(SAMPLE).read_bytes())
    assert [t.source_format for t in trajectories] == ["nebius"] * 3
    assert [len(split_steps(t.messages)) for t in trajectories] == EXPECTED_STEPS
    for trajectory in trajectories:
        assert_canonical(trajectory)
        assert_paired(trajectory)
        assert first_user(trajectory).startswith("We're currently solving the following issue")


def test_roles_and_texts_are_the_rows_turns() -> None:
    trajectories = parse_upload(trajectory_file(SAMPLE).read_bytes())
    for trajectory, row in zip(trajectories, load_rows(), strict=True):
        turns = row["trajectory"]
        assert trajectory.messages[0] == {"role": "system", "content": turns[0]["system_prompt"]}
        assert [m["content"] for m in trajectory.messages[1:]] == [t["text"] for t in turns[1:]]
        roles = [{"ai": "assistant"}.get(t["role"], t["role"]) for t in turns]
        assert [m["role"] for m in trajectory.messages] == roles


def test_resolved_task_id_and_metadata_come_from_the_row() -> None:
    rows = load_rows()
    trajectories = parse_upload(trajectory_file(SAMPLE).read_bytes())
    for index, (trajectory, row) in enumerate(zip(trajectories, rows, strict=True)):
        assert trajectory.resolved is False  # `target: false`
        assert trajectory.task_id == "AnalogJ__lexicon-336"
        metadata = trajectory.metadata
        assert metadata["instance_id"] == row["instance_id"]
        assert metadata["model"] == "swe-agent-llama-70b"
        assert metadata["exit_status"] == "submitted (exit_context)"
        assert metadata["submission"] == row["generated_patch"]
        assert metadata["run_index"] == index
        assert metadata["eval_logs_tail"] == row["eval_logs"][-EVAL_LOG_TAIL:]
        assert len(metadata["eval_logs_tail"]) <= EVAL_LOG_TAIL
        assert "trajectory" not in metadata
        assert "eval_logs" not in metadata


def test_sample_suffix_is_stripped_from_the_task_id() -> None:
    row = load_rows()[0]
    row["instance_id"] = "getmoto__moto-5321_2"
    row["target"] = True
    (trajectory,) = parse_value(row)  # a single row object is accepted too
    assert trajectory.task_id == "getmoto__moto-5321"
    assert trajectory.metadata["instance_id"] == "getmoto__moto-5321_2"
    assert trajectory.resolved is True


@pytest.mark.parametrize("target", [None, "false", 0])
def test_resolved_only_from_a_boolean_target(target: Any) -> None:
    row = load_rows()[1]
    row["target"] = target
    (trajectory,) = parse_value(row)
    assert trajectory.resolved is None


def test_missing_optional_columns_are_tolerated() -> None:
    row = {"trajectory": load_rows()[1]["trajectory"], "target": False}
    (trajectory,) = parse_value(row)
    assert trajectory.task_id is None
    assert trajectory.metadata == {"run_index": 0}
    assert len(split_steps(trajectory.messages)) == 25


def test_autosubmit_pseudo_turn_is_left_out() -> None:
    row = load_rows()[1]
    row["trajectory"].append(
        {"role": "ai", "text": "Exit due to cost limit", "system_prompt": None, "mask": True}
    )
    (trajectory,) = parse_value(row)
    assert len(split_steps(trajectory.messages)) == 25
    assert trajectory.messages[-1]["content"] != "Exit due to cost limit"


def test_jsonl_of_rows() -> None:
    rows = load_rows()
    trajectories = parse_upload("\n".join(json.dumps(r) for r in rows).encode())
    assert [len(split_steps(t.messages)) for t in trajectories] == EXPECTED_STEPS
    assert [t.metadata["run_index"] for t in trajectories] == [0, 1, 2]


def damaged(damage: Callable[[list[dict[str, Any]]], object]) -> list[dict[str, Any]]:
    rows = load_rows()
    damage(rows)
    return rows


@pytest.mark.parametrize(
    ("damage", "location"),
    [
        (lambda rows: rows[2]["trajectory"][5].pop("role"), "[2].trajectory[5].role"),
        (lambda rows: rows[2]["trajectory"][5].update(role="bot"), "[2].trajectory[5].role"),
        (lambda rows: rows[0]["trajectory"][4].update(text=None), "[0].trajectory[4].text"),
        (
            lambda rows: rows[0]["trajectory"][0].update(system_prompt=None),
            "[0].trajectory[0].system_prompt",
        ),
        (lambda rows: rows[1].update(trajectory="gone"), "[1].trajectory"),
        (lambda rows: rows[1].update(trajectory=[]), "[1].trajectory"),
        (lambda rows: rows[1]["trajectory"].__setitem__(3, 7), "[1].trajectory[3]"),
        (lambda rows: rows.__setitem__(2, "row"), "[2]"),
    ],
)
def test_mangled_rows_name_the_field(
    damage: Callable[[list[dict[str, Any]]], object], location: str
) -> None:
    with pytest.raises(InvalidTrajectoryError) as caught:
        parse_value(damaged(damage))
    assert caught.value.location == location


def test_errors_in_jsonl_rows_name_the_line() -> None:
    rows = damaged(lambda rows: rows[1]["trajectory"][5].pop("role"))
    with pytest.raises(InvalidTrajectoryError) as caught:
        parse_upload("\n".join(json.dumps(r) for r in rows).encode())
    assert caught.value.location == "line 2: trajectory[5].role"


def test_forcing_nebius_on_a_swe_agent_file_fails() -> None:
    raw = trajectory_file("swe-agent/msb-java__gpt-4o__fasterxml__jackson-core-174.traj")
    with pytest.raises(SrftError) as caught:
        parse_upload(raw.read_bytes(), "nebius")
    assert "not nebius" in caught.value.message


def test_sniff_never_raises() -> None:
    from app.trajectories.formats.base import Document, Record
    from app.trajectories.formats.nebius import IMPORTER

    odd: tuple[object, ...] = (
        None,
        1,
        "x",
        [],
        [[]],
        {},
        {"trajectory": 5},
        {"trajectory": [None]},
    )
    for value in odd:
        assert isinstance(IMPORTER.sniff(Document(records=(Record(value),))), str)
