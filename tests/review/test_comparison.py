"""Comparing critics on a gold set: Cohen's kappa and the bootstrap intervals against
computations written out here, then the API and `srft evaluate` over two jobs with different
label sets on the same human-labeled steps."""

from __future__ import annotations

import random
from typing import Any

import numpy
import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session
from typer.testing import CliRunner

from app.cli import app as cli_app
from app.review.evaluation import cohen_kappa, compare
from tests.builders import make_trajectory
from tests.conftest import Caller
from tests.helpers import outcome, prepare_job, record

LABELS = ("good", "unnecessary", "mistake", "recover")

# Twelve steps as (human, critic).
STEPS = [
    ("good", "good"),
    ("good", "good"),
    ("good", "mistake"),
    ("good", "good"),
    ("mistake", "mistake"),
    ("mistake", "good"),
    ("mistake", "mistake"),
    ("unnecessary", "unnecessary"),
    ("unnecessary", "mistake"),
    ("good", "good"),
    ("mistake", "mistake"),
    ("good", "unnecessary"),
]


def test_kappa_of_a_two_by_two_table_is_the_textbook_value() -> None:
    # 50 items: both yes 20, first yes second no 5, first no second yes 10, both no 15.
    first = ["yes"] * 20 + ["yes"] * 5 + ["no"] * 10 + ["no"] * 15
    second = ["yes"] * 20 + ["no"] * 5 + ["yes"] * 10 + ["no"] * 15
    observed = (20 + 15) / 50
    expected = (25 / 50) * (30 / 50) + (25 / 50) * (20 / 50)
    assert cohen_kappa(first, second) == pytest.approx((observed - expected) / (1 - expected))
    assert cohen_kappa(first, second) == pytest.approx(0.4)
    assert cohen_kappa(first, first) == 1.0
    # Two raters who always say the same single thing agree perfectly; nothing rated is 0.
    assert cohen_kappa(["a", "a"], ["a", "a"]) == 1.0
    assert cohen_kappa([], []) == 0.0
    # Exactly opposite on a balanced set: -1.
    assert cohen_kappa(["a", "b"], ["b", "a"]) == pytest.approx(-1.0)


def _reference_scores(pairs: list[tuple[str, str]]) -> tuple[float, float | None, float | None]:
    """Accuracy, masked F1 (mask = mistake) and the F1 of `good`, counted step by step; an F1
    is None where neither side used its label (nothing to score)."""

    def f1(label: str) -> float | None:
        tp = sum(1 for h, c in pairs if h == label and c == label)
        fp = sum(1 for h, c in pairs if h != label and c == label)
        fn = sum(1 for h, c in pairs if h == label and c != label)
        return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else None

    right = sum(1 for human, critic in pairs if human == critic)
    return right / len(pairs), f1("mistake"), f1("good")


def test_bootstrap_intervals_match_a_straightforward_resampling() -> None:
    human = [h for h, _ in STEPS]
    critic = [c for _, c in STEPS]
    result = compare(human, [critic], [LABELS], ["mistake"], resamples=300, seed=7)
    (scored,) = result.critics

    # The same scheme written out: resample the steps with replacement, score, percentiles.
    rng = random.Random(7)
    replicates = []
    for _ in range(300):
        drawn = rng.choices(range(len(STEPS)), k=len(STEPS))
        replicates.append(_reference_scores([STEPS[i] for i in drawn]))
    accuracy, mask_f1, good_f1 = _reference_scores(STEPS)
    for interval, value, column in (
        (scored.accuracy, accuracy, 0),
        (scored.mask_f1, mask_f1, 1),
        (scored.per_label[0][2], good_f1, 2),
    ):
        defined = [r[column] for r in replicates if r[column] is not None]
        low, high = numpy.percentile(defined, [2.5, 97.5])
        assert interval.value == pytest.approx(value)
        assert (interval.low, interval.high) == (pytest.approx(low), pytest.approx(high))
        assert interval.low <= interval.value <= interval.high
        assert interval.low < interval.high


def test_intervals_shrink_with_more_steps_and_a_perfect_critic_is_certain() -> None:
    human = [h for h, _ in STEPS]
    critic = [c for _, c in STEPS]
    small = compare(human, [critic], [LABELS], resamples=500).critics[0].mask_f1
    large = compare(human * 10, [critic * 10], [LABELS], resamples=500).critics[0].mask_f1
    assert large.value == pytest.approx(small.value)
    assert large.high - large.low < (small.high - small.low) / 2

    perfect = compare(human, [human], [LABELS], resamples=200).critics[0]
    for interval in (perfect.accuracy, perfect.macro_f1, perfect.mask_f1):
        assert (interval.value, interval.low, interval.high) == (1.0, 1.0, 1.0)


def test_the_resamples_are_shared_so_differences_are_paired() -> None:
    human = [h for h, _ in STEPS]
    critic = [c for _, c in STEPS]
    # The same critic twice: every paired difference is exactly zero, which two independent
    # resamplings would not give.
    result = compare(human, [critic, critic], [LABELS, LABELS], resamples=200)
    (pair,) = result.pairs
    assert (pair.mask_f1_difference.low, pair.mask_f1_difference.high) == (0.0, 0.0)
    assert (pair.label_kappa, pair.mask_kappa) == (1.0, 1.0)


# ---------------------------------------------------------------------- API

HUMAN = {0: "good", 1: "mistake", 2: "mistake", 3: "good", 4: "unnecessary", 5: "mistake"}
# Job A, the default labels, every step.
CRITIC_A = {0: "good", 1: "good", 2: "mistake", 3: "mistake", 4: "unnecessary", 5: "good"}
# Job B, its own two labels; step 5 failed.
CRITIC_B = {0: "ok", 1: "bad", 2: "bad", 3: "ok", 4: "ok"}
OK_BAD = {"ok": "a fine step", "bad": "a step to mask"}


def _start_job(client: TestClient, caller: Caller, critic: dict[str, Any] | None = None) -> str:
    body: dict[str, Any] = {"selection": {}, "scope": "unresolved", "cache": False}
    if critic:
        body["critic"] = critic
    job = client.post("/v1/jobs", json=body, headers=caller.headers)
    assert job.status_code == 202, job.text
    job_id: str = job.json()["id"]
    return job_id


def _two_jobs(client: TestClient, caller: Caller, session: Session) -> tuple[str, str, str]:
    upload = client.post(
        "/v1/trajectories", json=make_trajectory(6, resolved=False), headers=caller.headers
    )
    assert upload.status_code == 201, upload.text
    tid = upload.json()["trajectories"][0]["id"]
    job_a = _start_job(client, caller)
    job_b = _start_job(client, caller, {"labels": OK_BAD})
    prepare_job(session, job_a)
    prepare_job(session, job_b)
    record(
        session,
        job_a,
        {
            tid: [
                outcome(s, label, prompt_tokens=100, completion_tokens=10)
                for s, label in CRITIC_A.items()
            ]
        },
    )
    failed = outcome(5, error="429 from critic (after 6 attempts)")
    record(
        session,
        job_b,
        {
            tid: [
                outcome(s, label, prompt_tokens=40, completion_tokens=4)
                for s, label in CRITIC_B.items()
            ]
            + [failed]
        },
    )
    for step, label in HUMAN.items():
        put = client.put(
            f"/v1/trajectories/{tid}/steps/{step}/human_label",
            json={"label": label},
            headers=caller.headers,
        )
        assert put.status_code == 200, put.text
    return job_a, job_b, tid


def _inside(interval: dict[str, float]) -> bool:
    return interval["low"] <= interval["value"] <= interval["high"]


def test_two_jobs_with_different_label_sets_compared_on_the_same_steps(
    client: TestClient, caller: Caller, session: Session
) -> None:
    job_a, job_b, _ = _two_jobs(client, caller, session)
    response = client.get(
        "/v1/evaluations",
        params={
            "job_id": [job_a, job_b],
            "mask_labels": ["mistake", "bad"],
            "resamples": 200,
            "price_prompt_per_mtok": 1.0,
            "price_completion_per_mtok": 2.0,
        },
        headers=caller.headers,
    )
    assert response.status_code == 200, response.text
    body = response.json()
    # Step 5 has no done verdict of job B: left out for both.
    assert (body["human_labeled"], body["compared"], body["left_out"]) == (6, 5, 1)
    assert body["bootstrap"] == {"resamples": 200, "seed": 0, "confidence": 0.95}
    first, second = body["jobs"]
    assert (first["job_id"], second["job_id"]) == (job_a, job_b)
    assert second["labels"] == ["ok", "bad"]

    # Job A on steps 0-4 masks 2, 3; the humans mask 1, 2.
    assert first["accuracy"]["value"] == pytest.approx(3 / 5)
    assert first["masked_vs_trained"]["counts"] == {
        "true_positive": 1,
        "false_positive": 1,
        "false_negative": 1,
        "true_negative": 2,
    }
    assert first["masked_vs_trained"]["f1"]["value"] == pytest.approx(0.5)
    assert _inside(first["masked_vs_trained"]["f1"])
    assert _inside(first["macro_f1"])
    assert all(_inside(s["f1"]) for s in first["per_label"])
    # Job B's "bad" is exactly the humans' masking: certain, whatever the resample.
    assert second["masked_vs_trained"]["f1"] == {"value": 1.0, "low": 1.0, "high": 1.0}
    # Its labels never equal a human label: per-label scores are of its own names.
    assert second["accuracy"]["value"] == 0.0
    assert [s["label"] for s in second["per_label"]][:2] == ["ok", "bad"]

    (pair,) = body["agreement"]
    assert pair["job_ids"] == [job_a, job_b]
    # Disjoint label sets never agree, nor by chance.
    assert pair["label_kappa"] == 0.0
    # Masks: A F F T T F, B F T T F F: p_o 3/5, p_e .4 x .4 + .6 x .6.
    assert pair["mask_kappa"] == pytest.approx((0.6 - 0.52) / (1 - 0.52))
    assert pair["mask_f1_difference"]["value"] == pytest.approx(-0.5)

    cost_a, cost_b = first["cost"], second["cost"]
    assert cost_a["steps_done"] == 6
    assert (cost_a["prompt_tokens_per_step"], cost_a["completion_tokens_per_step"]) == (100, 10)
    assert cost_a["usd_per_step"] == pytest.approx((100 * 1.0 + 10 * 2.0) / 1e6)
    assert (cost_b["steps_done"], cost_b["prompt_tokens_per_step"]) == (5, 40)

    no_prices = client.get(
        "/v1/evaluations", params={"job_id": [job_a]}, headers=caller.headers
    ).json()
    assert no_prices["jobs"][0]["cost"]["usd_per_step"] is None
    # One job alone is compared on every step it labeled, with the default mask.
    assert no_prices["compared"] == 6
    assert no_prices["mask_labels"] == ["mistake"]


def test_comparison_refusals(
    client: TestClient, caller: Caller, other_caller: Caller, session: Session
) -> None:
    job_a, job_b, _ = _two_jobs(client, caller, session)
    url = "/v1/evaluations"
    twice = client.get(url, params={"job_id": [job_a, job_a]}, headers=caller.headers)
    assert twice.status_code == 422
    assert twice.json()["error"]["location"] == "query.job_id"
    nine = client.get(url, params={"job_id": [job_a] * 9}, headers=caller.headers)
    assert nine.status_code == 422
    assert "at most 8" in nine.json()["error"]["message"]
    foreign = client.get(url, params={"job_id": [job_a, job_b]}, headers=other_caller.headers)
    assert foreign.status_code == 404
    assert foreign.json()["error"]["location"] == "query.job_id"
    unknown = client.get(
        url, params={"job_id": [job_a], "mask_labels": "meh"}, headers=caller.headers
    )
    assert unknown.status_code == 422
    assert unknown.json()["error"]["code"] == "unknown_label"
    no_resamples = client.get(
        url, params={"job_id": [job_a], "resamples": 0}, headers=caller.headers
    )
    assert no_resamples.status_code == 422
    assert no_resamples.json()["error"]["location"] == "query.resamples"
    assert client.get(url, params={"job_id": [job_a]}).status_code == 401


@pytest.mark.usefixtures("cli")
def test_srft_evaluate_prints_the_jobs_side_by_side(
    client: TestClient, caller: Caller, session: Session
) -> None:
    job_a, job_b, _ = _two_jobs(client, caller, session)
    result = CliRunner().invoke(
        cli_app,
        ["evaluate", job_a, job_b, "--mask-label", "mistake", "--mask-label", "bad"],
        env={"SRFT_API_KEY": "unused"},
    )
    assert result.exit_code == 0, result.output
    out = result.output
    assert "5 steps compared" in out
    assert "1 human-labeled step left out" in out
    lines = out.splitlines()
    header = next(line for line in lines if line.startswith("score"))
    assert job_a[-8:] in header
    assert job_b[-8:] in header
    masked = next(line for line in lines if line.startswith("masked F1"))
    # A's masked F1 0.500 [low, high], B's 1.000 [1.000, 1.000].
    assert "0.500 [" in masked
    assert "1.000 [1.000, 1.000]" in masked
    kappa = next(line for line in lines if "kappa" in line)
    assert "0.167" in kappa

    as_json = CliRunner().invoke(
        cli_app, ["evaluate", job_a, "--json"], env={"SRFT_API_KEY": "unused"}
    )
    assert as_json.exit_code == 0, as_json.output
    assert '"compared": 6' in as_json.output

    missing = CliRunner().invoke(
        cli_app, ["evaluate", job_a, job_a], env={"SRFT_API_KEY": "unused"}
    )
    assert missing.exit_code == 1
    assert "query.job_id" in missing.output
