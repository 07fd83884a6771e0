"""Prompts as data end to end: API -> Redis -> `srft worker` processes -> rules critic over
HTTP -> Postgres, on shared real trajectories: a job with its own templates sends exactly
them; a few-shot job shows examples of other trajectories only; a small hand-labeled gold set
is scored for the built-in prompt, the reason_first variant and few-shot examples."""

from __future__ import annotations

from typing import Any

import pytest

from app.critic import prompt
from app.critic.labels import DEFAULT_LABELS
from app.critic.rules import label_trajectory
from app.recipe.steps import split_steps
from tests.e2e import Api, RulesCritic, Workers
from tests.helpers import trajectory_file

pytestmark = pytest.mark.slow

RUNS = [
    "mini-swe-agent/mini-v1.15.0__gemini-3-pro__django__django-11163.traj.json",
    "mini-swe-agent/mini-v1.15.0__gemini-3-pro__django__django-16560.traj.json",
    "swe-agent/msb-java__gpt-4o__fasterxml__jackson-core-174.traj",
]
# The gold set: every step of django-11163, labeled by hand by reading it. Step 1 prints a
# whole file and gets a too-long warning (wasted); step 5 re-runs the reproduction right after
# the fix (the check that matters); step 10 re-runs it once more with nothing changed.
GOLD = {0: "good", 1: "unnecessary", 2: "good", 3: "good", 4: "good", 5: "good", 6: "good"}
GOLD |= {7: "good", 8: "good", 9: "good", 10: "unnecessary", 11: "good", 12: "good"}


@pytest.fixture(scope="module")
def runs(api: Api, workers: Workers) -> list[str]:
    ids: list[str] = []
    for path in RUNS:
        ids += [r["id"] for r in api.upload(trajectory_file(path).read_bytes(), resolved="false")]
    return ids


def _put_label(api: Api, trajectory: str, step: int, label: str, note: str) -> None:
    response = api.client.put(
        f"/v1/trajectories/{trajectory}/steps/{step}/human_label",
        json={"label": label, "note": note},
        headers=api.headers,
    )
    assert response.status_code == 200, response.text


def _expected(api: Api, ids: list[str]) -> dict[tuple[str, int], str]:
    expected = {}
    for trajectory in ids:
        messages = api.get(f"/v1/trajectories/{trajectory}").json()["messages"]
        for verdict in label_trajectory(messages, split_steps(messages), DEFAULT_LABELS):
            expected[(trajectory, verdict.index)] = verdict.label
    return expected


def _labels(api: Api, job_id: str) -> dict[tuple[str, int], str]:
    return {(v["trajectory_id"], v["step_index"]): v["label"] for v in api.verdicts(job_id)}


def _requests_of(
    rules_critic: RulesCritic, api: Api, trajectory: str
) -> list[list[dict[str, Any]]]:
    messages = api.get(f"/v1/trajectories/{trajectory}").json()["messages"]
    task = prompt.neutralise(prompt.task_text(messages))[:200]
    return [m for m in rules_critic.recent_requests() if task in m[1]["content"]]


def test_a_job_with_its_own_templates_sends_exactly_them(
    api: Api, runs: list[str], rules_critic: RulesCritic
) -> None:
    system = "You grade the steps of a coding agent.\nThe grades:\n{labels}\nAnswer in JSON."
    instructions = (
        "Grade {what}.{context}\nReply with only "
        '{{"steps": [{{"index": <n>, "label": "<one of {names}>", "reason": "<why>"}}]}}.'
    )
    critic = {"mode": "trajectory", "prompt": {"system": system, "instructions": instructions}}
    job = api.start_job({"selection": {"trajectory_ids": runs[:2]}, "critic": critic})
    finished = api.wait(job["id"], timeout=120)
    assert finished["status"] == "completed", finished
    assert finished["critic"]["options"]["prompt"] == {
        "system": system,
        "instructions": instructions,
    }
    # The rules critic reads the custom prompt and answers as it always does.
    assert _labels(api, job["id"]) == _expected(api, runs[:2])
    lines = "\n".join(f"- {n}: {' '.join(d.split())}" for n, d in DEFAULT_LABELS.labels)
    names = ", ".join(DEFAULT_LABELS.names)
    for trajectory in runs[:2]:
        (messages,) = _requests_of(rules_critic, api, trajectory)
        assert messages[0]["content"] == system.format(labels=lines)
        steps = len(split_steps(api.get(f"/v1/trajectories/{trajectory}").json()["messages"]))
        assert messages[1]["content"].endswith(
            f'</trajectory>\n<instructions targets="0-{steps - 1}">\n'
            f"Grade steps 0-{steps - 1} ({steps} steps).\nReply with only "
            f'{{"steps": [{{"index": <n>, "label": "<one of {names}>", "reason": "<why>"}}]}}.'
            "\n</instructions>"
        )


def test_a_few_shot_job_shows_examples_of_other_trajectories_only(
    api: Api, runs: list[str], rules_critic: RulesCritic
) -> None:
    a, b, c = runs
    for trajectory, step, label, note in [
        (a, 0, "good", "gold-A0"),
        (a, 1, "mistake", "gold-A1"),
        (b, 2, "good", "gold-B2"),
        (b, 0, "mistake", "gold-B0"),
    ]:
        _put_label(api, trajectory, step, label, note)
    critic = {
        "mode": "trajectory",
        "prompt": {"variant": "reason_first"},
        "examples": {"from_human_labels": 2},
    }
    job = api.start_job({"selection": {"trajectory_ids": runs}, "critic": critic, "cache": False})
    finished = api.wait(job["id"], timeout=240)
    assert finished["status"] == "completed", finished
    assert finished["critic"]["options"]["examples"]["shown"] == 2
    assert finished["critic"]["options"]["examples"]["labels"] == {"good": 2, "mistake": 2}
    # Examples change what the critic reads, not what the rules answer.
    assert _labels(api, job["id"]) == _expected(api, runs)
    shown = {a: ("gold-B2", "gold-B0"), b: ("gold-A0", "gold-A1"), c: ("gold-A0", "gold-A1")}
    hidden = {a: ("gold-A",), b: ("gold-B",), c: ("gold-B",)}
    for trajectory in runs:
        # This job's requests: the earlier test's job had a system message of its own.
        requests = [
            messages
            for messages in _requests_of(rules_critic, api, trajectory)
            if messages[0]["content"].startswith(prompt.system_message(DEFAULT_LABELS))
        ]
        assert requests, trajectory
        for messages in requests:
            system = messages[0]["content"]
            assert all(f'"reason": "{note}", "label": ' in system for note in shown[trajectory])
            assert not any(note in system for note in hidden[trajectory])
            assert "Example 2, labeled" in system
            assert "Example 3," not in system
            assert not any("gold-" in m["content"] for m in messages[1:])


def test_prompt_variants_on_a_hand_labeled_gold_set(api: Api, runs: list[str]) -> None:
    """What README "Prompts as data and few-shot examples" reports: the rules critic does not
    read instructions or examples, so the three prompts score the same on the gold set."""
    gold_run = runs[0]
    for step, label in GOLD.items():
        _put_label(api, gold_run, step, label, f"hand label of step {step}")
    critics = {
        "label_first": {},
        "reason_first": {"prompt": {"variant": "reason_first"}},
        "few-shot 4": {"examples": {"from_human_labels": 4}},
    }
    scores = {}
    for name, critic in critics.items():
        job = api.start_job({"selection": {"trajectory_ids": [gold_run]}, "critic": critic})
        assert api.wait(job["id"])["status"] == "completed"
        scores[name] = api.get(f"/v1/jobs/{job['id']}/evaluation").json()
    first = scores["label_first"]
    assert first["compared"] == len(GOLD)
    # The rules label step 5 (a repeat of step 3's command) unnecessary and step 1 good; the
    # other 11 steps agree with the hand labels.
    assert first["accuracy"] == pytest.approx(11 / 13)
    assert first["macro_f1"] == pytest.approx((10 / 11 + 1 / 2) / 2)  # good, unnecessary
    for name in ("reason_first", "few-shot 4"):
        assert scores[name]["confusion"] == first["confusion"], name
        assert scores[name]["macro_f1"] == first["macro_f1"], name
