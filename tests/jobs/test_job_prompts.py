"""Prompts as data at the job API (rolled-back test database, no worker): templates checked at
POST /v1/jobs, the prompt hash and the cache keys that follow from them, few-shot examples
chosen from the project's human labels and kept on the job."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.jobs import prompts
from app.jobs import service as job_service
from app.models import Job, Verdict
from tests.builders import make_trajectory
from tests.conftest import Caller
from tests.helpers import prepare_job


def _upload(client: TestClient, caller: Caller, count: int, steps: int = 3) -> list[str]:
    items = [make_trajectory(steps, salt=f"p{n}", resolved=False) for n in range(count)]
    response = client.post(
        "/v1/trajectories", content=json.dumps(items).encode(), headers=caller.headers
    )
    assert response.status_code == 201, response.text
    return [t["id"] for t in response.json()["trajectories"]]


def _label(
    client: TestClient, caller: Caller, trajectory: str, step: int, label: str, note: str | None
) -> None:
    response = client.put(
        f"/v1/trajectories/{trajectory}/steps/{step}/human_label",
        json={"label": label, "note": note},
        headers=caller.headers,
    )
    assert response.status_code == 200, response.text


def _post(client: TestClient, caller: Caller, body: dict[str, Any]) -> Any:
    return client.post("/v1/jobs", json=body, headers=caller.headers)


@pytest.mark.parametrize(
    ("prompt", "location", "says"),
    [
        ({"system": "Rate steps. {labels} {verdict}"}, "critic.prompt.system", "{verdict}"),
        ({"system": "Rate steps with { labels"}, "critic.prompt.system", "not a valid template"),
        ({"system": "Rate the steps."}, "critic.prompt.system", "{labels}"),
        ({"instructions": "Rate {what}."}, "critic.prompt.instructions", "{context}"),
        ({"instructions": "Rate them.{context}"}, "critic.prompt.instructions", "{targets}"),
        ({"step_question": "Rate {step}."}, "critic.prompt.step_question", "{step}"),
        ({"step_question": "Rate it."}, "critic.prompt.step_question", "{index}"),
    ],
)
def test_bad_templates_are_422_with_the_part_and_create_nothing(
    client: TestClient,
    caller: Caller,
    session: Session,
    prompt: dict[str, str],
    location: str,
    says: str,
) -> None:
    _upload(client, caller, 1)
    before = session.scalar(select(func.count()).select_from(Job))
    response = _post(client, caller, {"selection": {}, "critic": {"prompt": prompt}})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert (error["code"], error["location"]) == ("invalid_prompt", location)
    assert says in error["message"]
    assert session.scalar(select(func.count()).select_from(Job)) == before


@pytest.mark.parametrize(
    ("critic", "location"),
    [
        ({"prompt": {"variant": "shouting"}}, "body.critic.prompt.variant"),
        ({"prompt": {"system": "{labels}" + "x" * 16_000}}, "body.critic.prompt.system"),
        ({"prompt": {"system": ""}}, "body.critic.prompt.system"),
        ({"examples": {"from_human_labels": 33}}, "body.critic.examples.from_human_labels"),
        ({"examples": {"from_human_labels": 0}}, "body.critic.examples.from_human_labels"),
    ],
)
def test_out_of_range_prompt_options_are_422(
    client: TestClient, caller: Caller, critic: dict[str, Any], location: str
) -> None:
    _upload(client, caller, 1)
    response = _post(client, caller, {"selection": {}, "critic": critic})
    assert response.status_code == 422, response.text
    assert response.json()["error"]["location"] == location


def test_examples_chosen_by_srft_are_refused_in_a_request(
    client: TestClient, caller: Caller
) -> None:
    _upload(client, caller, 1)
    chosen = {
        "human_label_id": 1,
        "trajectory_id": str(uuid.uuid4()),
        "step_index": 0,
        "label": "good",
        "action": "ls",
        "source": "0" * 64,
    }
    critic = {"examples": {"from_human_labels": 2, "chosen": [chosen]}}
    response = _post(client, caller, {"selection": {}, "critic": critic})
    assert response.status_code == 422, response.text
    assert response.json()["error"]["location"] == "critic.examples.chosen"


def test_templates_variant_and_examples_change_the_prompt_hash_and_the_cache_keys(
    client: TestClient, caller: Caller, session: Session
) -> None:
    ids = _upload(client, caller, 2)
    _label(client, caller, ids[1], 0, "mistake", "broke the build")
    selection = {"trajectory_ids": [ids[0]]}
    bodies = {
        "built-in": {},
        "same as built-in": {"prompt": {"variant": "label_first"}},
        "system": {"prompt": {"system": "Rate steps.\n{labels}"}},
        "reason_first": {"prompt": {"variant": "reason_first"}},
        "examples": {"examples": {"from_human_labels": 2}},
    }
    jobs: dict[str, Job] = {}
    for name, critic in bodies.items():
        response = _post(client, caller, {"selection": selection, "critic": critic})
        assert response.status_code == 202, response.text
        prepare_job(session, response.json()["id"])
        jobs[name] = session.get(Job, uuid.UUID(response.json()["id"]))  # type: ignore[assignment]
        assert response.json()["prompt_hash"] == jobs[name].prompt_hash
    hashes = {name: job.prompt_hash for name, job in jobs.items()}
    assert hashes["same as built-in"] == hashes["built-in"]
    assert len(set(hashes.values())) == 4
    keys = {
        name: set(session.scalars(select(Verdict.cache_key).where(Verdict.job_id == job.id)).all())
        for name, job in jobs.items()
    }
    assert keys["same as built-in"] == keys["built-in"]
    for name in ("system", "reason_first", "examples"):
        assert not keys[name] & keys["built-in"], name
    # The job shows its options.
    shown = client.get(f"/v1/jobs/{jobs['system'].id}", headers=caller.headers).json()
    assert shown["critic"]["options"] == {"prompt": {"system": "Rate steps.\n{labels}"}}


def test_examples_are_balanced_capped_in_the_label_set_and_shown_on_the_job(
    client: TestClient, caller: Caller, session: Session
) -> None:
    ids = _upload(client, caller, 12)
    # A job with its own labels makes them labels of the project.
    keep_drop = {"keep": "worth training on", "drop": "harmful"}
    response = _post(client, caller, {"selection": {}, "critic": {"labels": keep_drop}})
    assert response.status_code == 202, response.text
    # Ten `good`, three `mistake`, one `recover`, two of another label set, over trajectories.
    labeled: list[tuple[str, int, str]] = []
    for n in range(10):
        labeled.append((ids[n], 0, "good"))
    labeled += [(ids[10], 1, "mistake"), (ids[11], 1, "mistake"), (ids[0], 2, "mistake")]
    labeled += [(ids[1], 1, "recover"), (ids[2], 1, "keep"), (ids[3], 1, "drop")]
    for trajectory, step, label in labeled:
        _label(client, caller, trajectory, step, label, f"note on {label}")

    critic = {"examples": {"from_human_labels": 5}}
    response = _post(client, caller, {"selection": {"trajectory_ids": ids[:2]}, "critic": critic})
    assert response.status_code == 202, response.text
    job = session.get(Job, uuid.UUID(response.json()["id"]))
    assert job is not None
    chosen = job.critic_options["examples"]["chosen"]
    # K = 5 and 5 spares: round-robin good, mistake, recover; then good and mistake; ...
    assert [e["label"] for e in chosen] == [
        "good", "mistake", "recover", "good", "mistake", "good", "mistake", "good", "good",
        "good",
    ]  # fmt: skip
    assert all(e["label"] in ("good", "mistake", "recover") for e in chosen)
    ids_in_order = [e["human_label_id"] for e in chosen if e["label"] == "good"]
    assert ids_in_order == sorted(ids_in_order)
    first = chosen[0]
    assert (first["trajectory_id"], first["step_index"]) == (ids[0], 0)
    assert first["action"].startswith("step 0: look around") or "ls 0" in first["action"]
    assert first["observation"] == "file_0.py"
    assert first["reason"] == "note on good"
    shown = client.get(f"/v1/jobs/{job.id}", headers=caller.headers).json()
    assert shown["critic"]["options"]["examples"] == {
        "from_human_labels": 5,
        "shown": 5,
        "pool": 10,
        "labels": {"good": 6, "mistake": 3, "recover": 1},
        "human_label_ids": [e["human_label_id"] for e in chosen],
    }
    # What the workers are given: 5 shown of the 10 kept.
    templates = prompts.templates(job_service.critic_options(job))
    assert (templates.shown_examples, len(templates.examples)) == (5, 10)

    # The keep/drop job's examples come from its own labels only.
    other = _post(
        client,
        caller,
        {"selection": {}, "critic": {"labels": keep_drop, "examples": {"from_human_labels": 4}}},
    ).json()
    options = client.get(f"/v1/jobs/{other['id']}", headers=caller.headers).json()
    assert options["critic"]["options"]["examples"]["labels"] == {"keep": 1, "drop": 1}
    assert options["critic"]["options"]["examples"]["shown"] == 2  # fewer than asked: all there is


def test_a_project_without_human_labels_gets_a_job_without_examples(
    client: TestClient, caller: Caller
) -> None:
    _upload(client, caller, 1)
    response = _post(
        client, caller, {"selection": {}, "critic": {"examples": {"from_human_labels": 3}}}
    )
    assert response.status_code == 202, response.text
    assert response.json()["critic"]["options"]["examples"]["shown"] == 0
    plain = _post(client, caller, {"selection": {}}).json()
    assert response.json()["prompt_hash"] == plain["prompt_hash"]
