"""Exports over the shared real trajectories: a committed database of the module's own, the
corpus uploaded once and labeled, and tokenizers built locally with several chat templates.

Verdicts are written straight into the job's rows (the rules critic's labels, plus votes on
some steps for soft weights): these tests are about what an export makes of verdicts, and the
labeling pipeline that produces them is tested end to end in tests/jobs.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from app.critic.judge import StepOutcome
from app.critic.labels import DEFAULT_LABELS
from app.critic.rules import label_trajectory
from app.exports.builder import build_export, export_path
from app.models import Export, Verdict
from app.recipe.steps import split_steps
from tests.e2e import (  # noqa: F401
    Api,
    api,
    e2e_database_url,
    e2e_redis,
    export_dir,
    rules_critic,
    workers,
)
from tests.helpers import all_trajectory_files, outcome, prepare_job, record

RESOLUTIONS: tuple[bool | None, ...] = (True, False, None)


def votes_for(label: str, step: int) -> list[str] | None:
    """Three votes on every third step (the winner first-most), none elsewhere."""
    if step % 3 != 1:
        return None
    other = "good" if label != "good" else "mistake"
    return [label, other, label] if step % 2 else [label, label, other]


@dataclass
class Corpus:
    api: Api
    trajectories: dict[str, dict[str, Any]]  # id -> detail (messages, resolved, steps...)
    job_id: str  # every unresolved run, labeled by the rules
    override_job_id: str  # a few runs (resolved ones too) relabeled: all "unnecessary"
    override_ids: list[str]

    def export(self, body: dict[str, Any], processes: int = 1) -> dict[str, Any]:
        """POST an export and build it here, as a worker would; return its final state."""
        response = self.api.post("/v1/exports", json=body)
        assert response.status_code == 202, response.text
        export_id = response.json()["id"]
        settings = self.api.settings.model_copy(update={"export_processes": processes})
        build_export(self.api.database, settings, uuid.UUID(export_id))
        # A worker process of the module (if one runs) may have claimed it first.
        deadline = time.monotonic() + 120
        while True:
            state: dict[str, Any] = self.api.get(f"/v1/exports/{export_id}").json()
            if state["status"] in ("completed", "failed") or time.monotonic() > deadline:
                return state
            time.sleep(0.1)

    def path(self, export: dict[str, Any]) -> Path:
        with self.api.database.transaction() as session:
            row = session.get(Export, uuid.UUID(export["id"]))
            assert row is not None
            return export_path(self.api.settings, row.project_id, row.id)

    def verdicts(self, job_id: str) -> dict[tuple[str, int], dict[str, Any]]:
        return {(v["trajectory_id"], v["step_index"]): v for v in self.api.verdicts(job_id)}


def _label(
    caller: Api, job_id: str, labeler: Callable[[str, dict[str, Any], int], tuple[str, Any]]
) -> None:
    """Write the job's rows and a done verdict into each, as a worker would, then close the
    job."""
    with caller.database.transaction() as session:
        prepare_job(session, job_id)
        rows = session.execute(
            select(Verdict.trajectory_id, Verdict.step_index).where(
                Verdict.job_id == uuid.UUID(job_id)
            )
        ).all()
        details: dict[str, dict[str, Any]] = {}
        outcomes: dict[str, list[StepOutcome]] = {}
        for row in rows:
            tid = str(row.trajectory_id)
            if tid not in details:
                details[tid] = caller.get(f"/v1/trajectories/{tid}").json()
            label, votes = labeler(tid, details[tid], row.step_index)
            outcomes.setdefault(tid, []).append(
                outcome(row.step_index, label, votes=votes, reason=f"test label {label}")
            )
        record(session, job_id, outcomes)


@pytest.fixture(scope="module")
def corpus(api: Api) -> Corpus:  # noqa: F811 (the e2e fixture)
    ids: list[str] = []
    for path in all_trajectory_files():
        ids += [run["id"] for run in api.upload(path.read_bytes())]
    ids.sort()
    for n, trajectory_id in enumerate(ids):
        response = api.client.patch(
            f"/v1/trajectories/{trajectory_id}",
            json={"resolved": RESOLUTIONS[n % 3]},
            headers=api.headers,
        )
        assert response.status_code == 200, response.text
    details = {i: api.get(f"/v1/trajectories/{i}").json() for i in ids}

    rules: dict[str, list[str]] = {}

    def by_rules(tid: str, detail: dict[str, Any], step: int) -> tuple[str, Any]:
        if tid not in rules:
            messages = detail["messages"]
            rules[tid] = [
                v.label for v in label_trajectory(messages, split_steps(messages), DEFAULT_LABELS)
            ]
        label = rules[tid][step]
        return label, votes_for(label, step)

    job = api.start_job({"selection": {}, "scope": "unresolved", "cache": False})
    _label(api, job["id"], by_rules)

    override_ids = ids[:4]  # resolved, unresolved, unknown, resolved
    override = api.start_job(
        {"selection": {"trajectory_ids": override_ids}, "scope": "all", "cache": False}
    )
    _label(api, override["id"], lambda tid, detail, step: ("unnecessary", None))
    for job_id in (job["id"], override["id"]):
        assert api.get(f"/v1/jobs/{job_id}").json()["status"] == "completed"
    return Corpus(api, details, job["id"], override["id"], override_ids)
