"""Critic evaluation: the pure scores against hand-computed numbers, then the API over a job
whose verdicts and human labels are written by the test."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from app.review.evaluation import evaluate
from tests.builders import make_trajectory
from tests.conftest import Caller
from tests.helpers import outcome, prepare_job, record

LABELS = ("good", "unnecessary", "mistake", "recover")

# Ten steps as (critic, human).
PAIRS = [
    ("good", "good"),
    ("good", "good"),
    ("good", "good"),
    ("mistake", "good"),
    ("unnecessary", "good"),
    ("mistake", "mistake"),
    ("mistake", "mistake"),
    ("good", "mistake"),
    ("unnecessary", "unnecessary"),
    ("mistake", "unnecessary"),
]


def test_scores_match_the_hand_computation() -> None:
    result = evaluate(PAIRS, LABELS)
    assert result.compared == 10
    assert result.labels == LABELS
    # Rows: human good, unnecessary, mistake, recover; columns: the critic, same order.
    assert result.confusion == (
        (3, 1, 1, 0),
        (0, 1, 1, 0),
        (1, 0, 2, 0),
        (0, 0, 0, 0),
    )
    scores = {s.label: s for s in result.per_label}
    # good: 3 right of 4 predicted, of 5 true.
    assert scores["good"].precision == pytest.approx(3 / 4)
    assert scores["good"].recall == pytest.approx(3 / 5)
    assert scores["good"].f1 == pytest.approx(2 / 3)
    assert scores["good"].support == 5
    # unnecessary: 1 of 2 predicted, of 2 true.
    assert (scores["unnecessary"].precision, scores["unnecessary"].recall) == (0.5, 0.5)
    assert scores["unnecessary"].f1 == pytest.approx(0.5)
    assert scores["unnecessary"].support == 2
    # mistake: 2 of 4 predicted, of 3 true.
    assert scores["mistake"].precision == pytest.approx(1 / 2)
    assert scores["mistake"].recall == pytest.approx(2 / 3)
    assert scores["mistake"].f1 == pytest.approx(4 / 7)
    assert scores["mistake"].support == 3
    # recover: never used by either side: all zeros, and left out of the macro average.
    assert (scores["recover"].precision, scores["recover"].recall, scores["recover"].f1) == (
        0.0,
        0.0,
        0.0,
    )
    assert result.macro_f1 == pytest.approx((2 / 3 + 1 / 2 + 4 / 7) / 3)
    assert result.accuracy == pytest.approx(6 / 10)

    masked = result.masked_vs_trained
    assert masked.mask_labels == ("mistake",)
    assert (masked.true_positive, masked.false_positive) == (2, 2)
    assert (masked.false_negative, masked.true_negative) == (1, 5)
    assert masked.precision == pytest.approx(2 / 4)
    assert masked.recall == pytest.approx(2 / 3)
    assert masked.f1 == pytest.approx(4 / 7)


def test_masking_several_labels() -> None:
    masked = evaluate(PAIRS, LABELS, ["mistake", "unnecessary"]).masked_vs_trained
    # Human masks steps 6-10 (5); the critic masks 4, 5, 6, 7, 9, 10 (6).
    assert (masked.true_positive, masked.false_positive) == (4, 2)
    assert (masked.false_negative, masked.true_negative) == (1, 3)
    assert masked.precision == pytest.approx(4 / 6)
    assert masked.recall == pytest.approx(4 / 5)
    assert masked.f1 == pytest.approx(8 / 11)


def test_nothing_compared_gives_zeros_and_a_label_outside_the_set_is_appended() -> None:
    empty = evaluate([], LABELS)
    assert empty.compared == 0
    assert (empty.accuracy, empty.macro_f1) == (0.0, 0.0)
    assert empty.confusion == ((0,) * 4,) * 4
    assert empty.masked_vs_trained.f1 == 0.0
    assert empty.as_dict()["masked_vs_trained"]["counts"]["true_negative"] == 0

    extra = evaluate([("good", "weird")], ["good", "mistake"])
    assert extra.labels == ("good", "mistake", "weird")
    assert extra.confusion == ((0, 0, 0), (0, 0, 0), (1, 0, 0))


# ---------------------------------------------------------------------- API

CRITIC = {0: "good", 1: "good", 2: "mistake", 3: "mistake", 4: "unnecessary"}  # 5 fails
HUMAN = {0: "good", 1: "mistake", 2: "mistake", 3: "good", 4: "unnecessary", 5: "mistake"}


def _job_with_labels(client: TestClient, caller: Caller, session: Session) -> tuple[str, str]:
    upload = client.post(
        "/v1/trajectories", json=make_trajectory(6, resolved=False), headers=caller.headers
    )
    assert upload.status_code == 201, upload.text
    tid = upload.json()["trajectories"][0]["id"]
    job = client.post(
        "/v1/jobs", json={"selection": {}, "scope": "unresolved"}, headers=caller.headers
    )
    assert job.status_code == 202, job.text
    job_id = job.json()["id"]
    prepare_job(session, job_id)
    outcomes = [outcome(step, label) for step, label in CRITIC.items()]
    outcomes.append(outcome(5, error="429 from critic (after 6 attempts)"))
    record(session, job_id, {tid: outcomes})
    return job_id, tid


def test_evaluation_of_a_job_against_human_labels(
    client: TestClient, caller: Caller, session: Session
) -> None:
    job_id, tid = _job_with_labels(client, caller, session)
    url = f"/v1/jobs/{job_id}/evaluation"
    nothing = client.get(url, headers=caller.headers)
    assert nothing.status_code == 200, nothing.text
    assert nothing.json()["compared"] == 0
    assert nothing.json()["macro_f1"] == 0.0
    assert nothing.json()["disagreements"] == {"items": [], "next_cursor": None}

    for step, label in HUMAN.items():
        put = client.put(
            f"/v1/trajectories/{tid}/steps/{step}/human_label",
            json={"label": label, "note": f"note {step}"},
            headers=caller.headers,
        )
        assert put.status_code == 200, put.text

    body = client.get(url, headers=caller.headers).json()
    # Step 5's verdict failed: 5 steps compared.
    assert body["compared"] == 5
    assert body["confusion"]["labels"] == list(LABELS)
    assert body["confusion"]["matrix"] == [
        [1, 0, 1, 0],  # human good: critic good (0), mistake (3)
        [0, 1, 0, 0],  # human unnecessary: step 4
        [1, 0, 1, 0],  # human mistake: critic good (1), mistake (2)
        [0, 0, 0, 0],
    ]
    scores = {s["label"]: s for s in body["per_label"]}
    assert scores["good"] | {"label": "x"} == {
        "label": "x",
        "precision": 0.5,
        "recall": 0.5,
        "f1": 0.5,
        "support": 2,
        "predicted": 2,
    }
    assert (scores["unnecessary"]["f1"], scores["unnecessary"]["support"]) == (1.0, 1)
    assert (scores["mistake"]["precision"], scores["mistake"]["recall"]) == (0.5, 0.5)
    assert scores["recover"]["support"] == 0
    assert body["macro_f1"] == pytest.approx(2 / 3)
    assert body["accuracy"] == pytest.approx(3 / 5)
    assert body["masked_vs_trained"] == {
        "mask_labels": ["mistake"],
        "precision": 0.5,
        "recall": 0.5,
        "f1": 0.5,
        "counts": {
            "true_positive": 1,
            "false_positive": 1,
            "false_negative": 1,
            "true_negative": 2,
        },
    }
    assert [d["step_index"] for d in body["disagreements"]["items"]] == [1, 3]

    both = client.get(
        url, params={"mask_labels": ["mistake", "unnecessary"]}, headers=caller.headers
    ).json()["masked_vs_trained"]
    assert both["counts"] == {
        "true_positive": 2,
        "false_positive": 1,
        "false_negative": 1,
        "true_negative": 1,
    }

    first = client.get(url, params={"limit": 1}, headers=caller.headers).json()["disagreements"]
    assert first["items"] == [
        {
            "trajectory_id": tid,
            "step_index": 1,
            "critic_label": "good",
            "human_label": "mistake",
            "critic_reason": "critic says good",
            "human_note": "note 1",
            "author": "tests",
        }
    ]
    assert first["next_cursor"]
    second = client.get(
        url, params={"limit": 1, "cursor": first["next_cursor"]}, headers=caller.headers
    ).json()["disagreements"]
    assert [(d["step_index"], d["critic_label"], d["human_label"]) for d in second["items"]] == [
        (3, "mistake", "good")
    ]
    assert second["next_cursor"] is None


def test_evaluation_refusals(
    client: TestClient, caller: Caller, other_caller: Caller, session: Session
) -> None:
    job_id, _ = _job_with_labels(client, caller, session)
    url = f"/v1/jobs/{job_id}/evaluation"
    foreign = client.get(url, headers=other_caller.headers)
    assert foreign.status_code == 404
    assert foreign.json()["error"]["location"] == "path.job_id"
    unknown = client.get(url, params={"mask_labels": "meh"}, headers=caller.headers)
    assert unknown.status_code == 422
    assert unknown.json()["error"]["code"] == "unknown_label"
    assert unknown.json()["error"]["location"] == "query.mask_labels"
    bad_cursor = client.get(url, params={"cursor": "nope"}, headers=caller.headers)
    assert bad_cursor.status_code == 422
    assert bad_cursor.json()["error"]["location"] == "query.cursor"
    assert client.get(url).status_code == 401
